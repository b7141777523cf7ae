// The one evaluator: opens every eval dataset's test subset once, asks the model each dataset's EMT question with
// batched KV-cache greedy generation, and scores the answers (strict, likelihood ranking, CLIP nearest label,
// external judge); plus the CLIP zero-shot baseline of a vision encoder. Rules and costs: docs/scoring.md.
#pragma once
#include <emt/core/clip.h>
#include <emt/core/config.h>
#include <emt/core/distributed.h>
#include <emt/core/image.h>
#include <emt/core/llava.h>
#include <emt/core/metrics.h>
#include <emt/core/tokenizer.h>
#include <emt/eval/metrics.h>
#include <emt/eval/scoring.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace emt {

class ImageDataset;
struct BaseModel;

// ---- scorers of your own ------------------------------------------------------------------------------------
// ScorerInput, ScorerResult and ScorerFn: emt/eval/scoring.h.
// Registers a scorer by name: where eval.scorers (or eval.primary_scorer) names it, the Evaluator calls it for every
// answer of the eval datasets in `datasets` (empty = all of them), counts its verdicts into result rows like the
// built-in scorers' and writes verdict_<name> / pred_<name> into the predictions. It runs on the evaluating thread
// (one answer at a time). ConfigError for a built-in name. Register before loading configs.
void register_scorer(const std::string& name, ScorerFn fn, std::vector<std::string> datasets = {});
// A registered scorer as re-scoring takes it (RescoreOptions::scorers in scoring.h): ConfigError naming the
// registered ones when `name` is not registered.
RescoreOptions::Scorer registered_scorer(const std::string& name);

// What is evaluated: a multimodal model with what it needs to read prompts and images.
struct EvalModel {
  LlavaModel model{nullptr};
  std::shared_ptr<Tokenizer> tokenizer;
  ImageProcessorOptions image;
  std::string conversation = "plain", system;  // template name; system "" = the template's default
  torch::Device device = torch::kCPU;
};
EvalModel eval_model(const BaseModel& base);  // shares base's model and tokenizer

// Verdict counts of one scorer on one dataset, with accuracy and its Wilson 95% interval.
struct ScoreCounts {
  int64_t n = 0, correct = 0, incorrect = 0, intrinsic = 0, extrinsic = 0;
  double accuracy = 0, ci_low = 0, ci_high = 0;
  // Answer drift: per other eval dataset, how many answers name one of its classes (names_class_of in
  // scoring.h). A property of the answers, so every scorer of one dataset carries the same map.
  std::map<std::string, int64_t> naming;
  void add(VerdictKind k);
  void finish();  // fills accuracy and the interval from the counts
};

// Copies n, the verdict counts, accuracy, the interval and the answer drift of `c` into a results.jsonl row (other fields untouched).
void set_counts(ResultRow& row, const ScoreCounts& c);
// A result row of the study's schema: its cell (kind, finetune dataset, method, seed, epoch), what was scored
// (eval dataset, scorer), the counts and the run's name.
ResultRow make_result_row(const std::string& kind, const std::string& finetune_dataset, const std::string& method,
                          int64_t seed, int64_t epoch, const std::string& eval_dataset, const std::string& scorer,
                          const ScoreCounts& c, const std::string& run);

struct DatasetScores {
  std::string dataset;
  std::map<std::string, ScoreCounts> by_scorer;  // "strict", "likelihood", "clip", "judge" | "clip_zero_shot"
  double seconds = 0;                            // wall time spent on this dataset
};

// ConfigError when the config scores with the judge (eval.scorers or eval.primary_scorer) and the process has
// not allowed a config's judge command to run or its endpoint to be contacted (allow_config_judge in judge.h); the
// message names the command or the URL and says how to allow it. The Evaluator and the study
// check it before any work.
void check_config_judge(const RunConfig& cfg);

class Evaluator {
 public:
  // Opens the TEST split of every dataset in cfg.eval.datasets (empty = all of cfg.data.datasets that are
  // classification data) once, with the configured subsets (test_fraction, test_max_samples, balanced, then
  // eval.max_samples) chosen deterministically from cfg.run.seed, so every epoch scores exactly the same images.
  // Builds each dataset's strict label set (its aliases; the other eval datasets' class names as contradicting
  // phrases). ConfigError on unknown or unlabelled datasets named explicitly, unknown scorers, judge without a
  // command or URL, and a judge the process has not allowed (allow_config_judge in judge.h). The judge scorer
  // asks a Judge built from judge_options(cfg) (judge.h), so its answers are cached in the run directory.
  explicit Evaluator(const RunConfig& cfg);
  ~Evaluator();
  Evaluator(const Evaluator&) = delete;
  Evaluator& operator=(const Evaluator&) = delete;

  const std::vector<std::string>& datasets() const;
  std::shared_ptr<ImageDataset> dataset(const std::string& name) const;  // ConfigError when not evaluated
  const LabelSet& label_set(const std::string& name) const;
  const std::map<std::string, LabelSet>& label_sets() const;
  // Scorers evaluate() computes, in order: strict, then the configured ones among likelihood, clip, judge, then the
  // configured registered scorers.
  std::vector<std::string> scorers() const;
  // The same for one eval dataset (a registered scorer may be limited to some datasets).
  std::vector<std::string> scorers_for(const std::string& dataset) const;

  // Generates an answer for every image of every dataset (eval.batch_size rows, eval.max_new_tokens, stops at EOS
  // and the template's stop strings; the answer is cut at a stop string and trimmed) and scores it with every
  // scorer. With a non-empty pred_dir, writes pred_dir/<dataset>.jsonl atomically: one line per image with
  // dataset, index (in the evaluated subset), source, label, label_name, prompt, output, verdict_<scorer>,
  // pred_<scorer> (predicted class index, -1 for none), preceded by the fields set with set_prediction_fields.
  // The model runs in eval mode under NoGrad; its training flag is restored afterwards.
  std::vector<DatasetScores> evaluate(EvalModel& m, const std::string& pred_dir);

  // CLIP zero-shot accuracy (scorer "clip_zero_shot"): per class the mean of the L2-normalised text embeddings of
  // cfg.eval.clip_templates ({label} replaced), renormalised; each image gets the class of highest cosine.
  std::vector<DatasetScores> clip_zero_shot(ClipModel& clip, const Tokenizer& text_tokenizer,
                                            const ImageProcessorOptions& image, torch::Device device);
  std::vector<DatasetScores> clip_zero_shot(ClipModelImpl& clip, const Tokenizer& text_tokenizer,
                                            const ImageProcessorOptions& image, torch::Device device);

  // Enables the "clip" scorer (nearest class name to the generated text in CLIP text space).
  void set_clip(ClipModel clip, std::shared_ptr<Tokenizer> text_tokenizer);
  bool has_clip() const;
  // Fields written first on every predictions line (the study's finetune_dataset, method, seed, epoch).
  void set_prediction_fields(JsonFields fields);
  void set_progress(bool on);  // progress display per dataset (default on)
  // Data parallel: every rank of `comm` must call evaluate() / clip_zero_shot() together. Each scores batches
  // r, r + W, ... of the one-process sequence (the very batches, so answers are those of one process); the
  // counts and the predictions are gathered, and only rank 0 writes pred_dir. Null = one process.
  void set_communicator(std::shared_ptr<Communicator> comm);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Strict label sets for eval datasets given their class names: each with its DatasetConfig aliases (when `cfg`
// knows the dataset) and every other listed dataset's class names as contradicting phrases. Evaluator uses it;
// re-scoring a run from predictions (class_names_from_predictions) builds the same sets with it.
std::map<std::string, LabelSet> eval_label_sets(const std::map<std::string, std::vector<std::string>>& class_names,
                                                const RunConfig& cfg);

// Log-likelihood of every candidate answer after every prompt: images [B, 3, S, S], input_ids/attention_mask
// [B, T] left-padded, candidates C id lists (answer tokens, EOS included when the template ends answers with it)
// -> [B, C] f32 = sum over the candidate's tokens of log p(token | image, prompt, earlier tokens). The prompt is
// encoded once into a KV cache; candidates run in passes of about `rows_per_pass` rows (B x classes per pass)
// against copies of that cache, so the prompt is never recomputed per candidate.
torch::Tensor candidate_logliks(LlavaModel& model, const torch::Tensor& images, const torch::Tensor& input_ids,
                                const torch::Tensor& attention_mask,
                                const std::vector<std::vector<int64_t>>& candidates, int64_t rows_per_pass);

// `s` with every byte that is not part of a well-formed UTF-8 character replaced by U+FFFD (answers cut inside a
// multi-byte character by max_new_tokens must still be writable as JSON).
std::string valid_utf8(const std::string& s);

// Token ids and mask [N, T] for the CLIP text encoder: bos + text + eos, cut to max_len (eos kept last), padded.
std::pair<torch::Tensor, torch::Tensor> clip_tokenize(const Tokenizer& tok, const std::vector<std::string>& texts,
                                                      int64_t max_len);
// L2-normalised text embeddings [N, P] of `texts` (batched, NoGrad).
torch::Tensor clip_text_embeddings(ClipModel& clip, const Tokenizer& tok, const std::vector<std::string>& texts,
                                   torch::Device device);

// Loads the CLIP model of the baseline and the clip scorer from an HF CLIP directory (vision_model, text_model,
// projections); its tokenizer is vocab.json + merges.txt (CLIP BPE) or tokenizer.model (SentencePiece, the tiny
// model). IoError naming the directory when neither tokenizer is there.
std::pair<ClipModel, std::shared_ptr<Tokenizer>> load_clip_dir(const std::string& dir, torch::Device device);
// Preprocessing of a CLIP directory: its preprocessor_config.json, else CLIP's own for the tower's image size.
ImageProcessorOptions clip_image_options(const std::string& dir, const ClipModel& clip);

}  // namespace emt
