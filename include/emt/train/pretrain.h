// The tiny base-model recipe (`emt pretrain`): the study needs a pretrained model to forget from, as LLaVA is one.
// Built the way LLaVA is, all with the one Trainer: (a) CLIP-style contrastive pretraining of the tiny vision and
// text towers, (b) projector alignment on captions, (c) instruction tuning of projector + decoder on generic visual
// instructions (include/emt/train/instructions.h) that never contain a study's prompt or answer. Output: an
// HF-layout model directory (+ clip/ for the baseline), reused while the recipe (config, data, seed) is unchanged.
// The closing check of the built model (EMT and CLIP accuracy per dataset) is the evaluator's job:
// build_base_model in include/emt/eval/study.h.
#pragma once
#include <emt/core/config.h>
#include <emt/core/dataset.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace emt {

struct PretrainOptions {
  bool force = false;     // rebuild even when the cache matches
  bool progress = true;
  int64_t check_samples = 500;  // test images per dataset for the closing check (0 = skip)
};

// The closing check of one dataset: the base model's EMT accuracy (strict scorer, the study's prompt) and its
// vision tower's CLIP zero-shot accuracy, each with a Wilson 95% interval, on the same n test images.
struct BaseCheck {
  int64_t n = 0, classes = 0;
  double chance = 0;  // 1 / classes
  double emt = 0, emt_low = 0, emt_high = 0;
  double clip = 0, clip_low = 0, clip_high = 0;
};

struct PretrainReport {
  std::string dir;
  bool reused = false;
  double seconds = 0.0;                     // build time (0 when reused and never recorded)
  std::string blas;                         // the BLAS kernels it was built with (blas_kernels()); "" if unknown
  std::map<std::string, BaseCheck> checks;  // dataset -> closing check (empty when skipped)
};

// The text that identifies a recipe; the cache is reused only when it matches byte for byte.
std::string pretrain_recipe(const RunConfig& cfg);
// Builds the model directory (or finds it reusable); writes no pretrain_report.json (see build_base_model).
PretrainReport pretrain_tiny(const RunConfig& cfg, const PretrainOptions& opts = {});

// Which datasets' captions an image of each dataset is contrasted with in the contrastive stage: [k][j] is true
// when j == k or the two label lists share no word (lowercased letters and digits). Sharing a word ("circle",
// "red circle") means one image may be true of both labels, so those captions never compete.
std::vector<std::vector<bool>> contrasted_datasets(const std::vector<std::vector<std::string>>& class_names);

// One dataset of the recipe's pool: its train subset (pretrain.train_max_samples, balanced, from run.seed).
struct PretrainSource {
  std::string name;
  std::shared_ptr<ImageDataset> train;     // what the contrastive stage sees
  std::shared_ptr<ImageDataset> language;  // what the language stages show the LLM: a subset of train
  bool digits = false;
  bool generic = false;  // generic data of the recipe (pretrain.letters), not a study dataset
};
// The name of the rendered-letters source (pretrain.letters); no data.datasets entry may use it.
inline constexpr const char* kGenericLetters = "generic-letters";
// pretrain.datasets (empty = every dataset of data.datasets), opened, then the generic letters.
std::vector<PretrainSource> pretrain_sources(const RunConfig& cfg);
// What the language stages feed the LLM, one instruction set per source: captions only (stage b) or every
// generic kind (stage c). ConfigError when any sample contains a study text (study_texts over data.datasets).
std::vector<std::shared_ptr<ImageDataset>> pretrain_language_sets(const RunConfig& cfg,
                                                                  const std::vector<PretrainSource>& srcs,
                                                                  bool captions_only);

// Several classification datasets seen as one (the contrastive stage): labels offset into one joint class list,
// grey images handed out with 3 channels.
class MixtureDataset : public ImageDataset {
 public:
  explicit MixtureDataset(std::vector<std::shared_ptr<ImageDataset>> parts);
  int64_t size() const override { return total_; }
  int64_t label(int64_t i) const override;
  torch::Tensor image(int64_t i) const override;
  std::string source(int64_t i) const override;

 private:
  std::pair<size_t, int64_t> locate(int64_t i) const;
  std::vector<std::shared_ptr<ImageDataset>> parts_;
  std::vector<int64_t> starts_, label_offsets_;
  int64_t total_ = 0;
};

}  // namespace emt
