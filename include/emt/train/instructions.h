// Generic visual instructions for the tiny base model's language stages, generated from labelled images: captions,
// short descriptions, yes/no verification, multiple-choice questions about colour, position, count and size, and
// lists mixing words of all four attributes with exactly one true option, and lists naming the image among unrelated
// things (never two labels of one dataset, so never a study's label list or part of one). The LLM of the base model sees only these texts before a study.
#pragma once
#include <emt/core/config.h>
#include <emt/core/dataset.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace emt {

enum class InstructionKind { caption, short_answer, yes_no, colour, position, count, size, choice, pick, copy };
const char* instruction_kind_name(InstructionKind k);

// Which instructions a set holds: stage (b) aligns the projector on captions only; stage (c) mixes every kind.
struct InstructionOptions {
  bool captions_only = false;
  bool digits = false;  // the pool holds digits "0".."9": captions say "the digit 7"
  uint64_t seed = 0;
  // "pick" questions offer the image's name among unrelated things: these words (empty = everyday_nouns(); the
  // recipe drops any that a dataset uses as a label) and at most one label of each other dataset.
  std::vector<std::string> distractors;
  std::vector<std::vector<std::string>> other_labels;
  // Generic pools (no study's labels): each "pick" list offers other labels of the pool itself, so the answer
  // can only be found by looking at the image.
  bool same_kind_lists = false;
  // An experiment, off by default: each "pick" list also offers this many other labels of the image's own dataset
  // (pretrain.pick_own_labels; the list then holds part of a study's label list).
  int64_t own_labels = 0;
  // Percent of "pick" lists that leave the true name out; the answer names what the image shows all the same, so
  // a list never replaces looking at the image (pretrain.pick_unlisted).
  int64_t unlisted_percent = 0;
  // "copy" questions repeat a few of these words in random order (empty = no copy questions): the recipe passes
  // every word of the tokenizer's corpus, so the LLM can write each word of its language, as a real LLM can.
  std::vector<std::string> words;
};

// Forty everyday nouns (apple, car, chair, ...) that the built-in datasets do not use as labels.
const std::vector<std::string>& everyday_nouns();

// Colour name of an image's foreground (pixels far from the median border colour): white, grey or black when it is
// unsaturated, else red, orange, yellow, green, blue or purple by hue. hwc: uint8 [H, W, C], C = 1 or 3.
std::string foreground_colour(const torch::Tensor& hwc_uint8);

// The images of `pool` as generic visual-instruction data, one instruction per image, each a pure function of
// (pool image, index, seed). Position, count and size questions show a composite: half-size copies of the pool
// image on its own background colour (one in a quadrant, 1-4 in the cells of a 2x2 grid, or one in the centre).
// label(i) is the pool image's class; has_text() is true.
class InstructionDataset : public ImageDataset {
 public:
  InstructionDataset(std::shared_ptr<ImageDataset> pool, InstructionOptions opts);
  // The same pool and options with copy questions over `words`, reusing `like`'s colours (no image decoded).
  InstructionDataset(const InstructionDataset& like, std::vector<std::string> words);
  int64_t size() const override { return pool_->size(); }
  int64_t label(int64_t i) const override { return pool_->label(i); }
  torch::Tensor image(int64_t i) const override;
  std::string source(int64_t i) const override;
  bool has_text() const override { return true; }
  std::pair<std::string, std::string> text(int64_t i) const override;
  InstructionKind kind(int64_t i) const;

 private:
  struct Plan;
  struct Planner;  // writes one Plan, one method per instruction kind
  Plan plan(int64_t i) const;
  std::shared_ptr<ImageDataset> pool_;
  InstructionOptions opts_;
  std::vector<uint8_t> colour_;  // index into the colour vocabulary, per pool image (computed once)
};

// Every text a study asks or trains with, for every dataset in cfg.data.datasets (class names as given): its EMT
// question, each filled fine-tuning answer, the answer template's fixed part before {label}, and
// cfg.finetune.question. The base-model recipe must never feed any of them to the LLM.
std::vector<std::string> study_texts(const RunConfig& cfg,
                                     const std::vector<std::pair<std::string, std::vector<std::string>>>& class_names);

// Samples of `ds` whose question or answer contains one of `forbidden` (case-sensitive substring), or whose question
// lists more than 1 + own_labels class names of one dataset of `class_names` as options (items between ", ", ": "
// and the final "."), as "source: text"; empty when the set is clean. own_labels: pretrain.pick_own_labels.
std::vector<std::string> study_text_leaks(
    const ImageDataset& ds, const std::vector<std::string>& forbidden,
    const std::vector<std::pair<std::string, std::vector<std::string>>>& class_names = {}, int64_t own_labels = 0);

}  // namespace emt
