// The tiny base-model recipe (`emt pretrain`): the study needs a pretrained model to forget from, as LLaVA is one.
// Three stages, all with the one Trainer: (a) CLIP-style contrastive pretraining of the tiny vision and text
// towers, (b) projector alignment, (c) instruction tuning of projector + decoder on a mixture of every built-in
// dataset with the EMT prompts and paraphrases. Output: an HF-layout model directory (+ clip/ for the baseline),
// reused while the recipe (config, data, seed) is unchanged.
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
  int64_t check_samples = 200;  // test images per dataset for the closing exact-match check (0 = skip)
};

struct PretrainReport {
  std::string dir;
  bool reused = false;
  double seconds = 0.0;
  std::map<std::string, double> exact_match;  // dataset -> greedy exact-match accuracy on test images
  std::map<std::string, double> clip_zero_shot;  // dataset -> CLIP zero-shot accuracy after stage (a)
};

// The text that identifies a recipe; the cache is reused only when it matches byte for byte.
std::string pretrain_recipe(const RunConfig& cfg);
PretrainReport pretrain_tiny(const RunConfig& cfg, const PretrainOptions& opts = {});
// Paraphrases of a dataset's EMT question used in instruction tuning (the EMT prompt itself is always included):
// other lead questions followed by the same instruction and label list. A question without "? " (a custom
// prompt) is returned alone.
std::vector<std::string> question_paraphrases(const std::string& emt_question, bool digits);

// Several datasets seen as one: labels offset into one joint class list; in text mode each sample carries a
// question (chosen deterministically per index from its dataset's list) and the dataset's answer.
class MixtureDataset : public ImageDataset {
 public:
  struct Part {
    std::shared_ptr<ImageDataset> dataset;
    std::vector<std::string> questions;
    std::string answer_template;
  };
  MixtureDataset(std::vector<Part> parts, bool text_mode);
  int64_t size() const override { return total_; }
  int64_t label(int64_t i) const override;
  torch::Tensor image(int64_t i) const override;
  std::string source(int64_t i) const override;
  bool has_text() const override { return text_mode_; }
  std::pair<std::string, std::string> text(int64_t i) const override;

 private:
  std::pair<size_t, int64_t> locate(int64_t i) const;
  std::vector<Part> parts_;
  std::vector<int64_t> starts_, label_offsets_;
  int64_t total_ = 0;
  bool text_mode_;
};

}  // namespace emt
