// Forgetting mitigations under the study's protocol (docs/mitigation.md). Each is a study method that trains the
// components of its base method (lora, or the method after ':') with the one Trainer and is scored by the one
// Evaluator:
//   l2sp     w * sum (theta - theta_0)^2 added to the loss (theta_0: the trained tensors before fine-tuning)
//   ewc      the same pull weighted by a diagonal Fisher of the base model on reference data, scaled to mean 1
//   lwf      w * T^2 * KL(base || model) on the answer tokens; the base is the same weights seen as the base
//            (LoRA scale 0, the base projector), not a second copy of the model
//   replay   a share r of every combined batch drawn from reference data
//   ema      an exponential moving average of the trained tensors, which is what is scored and exported
//   wise-ft  after every epoch, base + a * (tuned - base) scored for each a of a grid (no retraining)
// Reference data: the tiny base's own generic instruction set (what its instruction stage trained on), or the
// other study datasets asked the fine-tuning question.
#pragma once
#include <emt/core/config.h>
#include <emt/core/llava.h>
#include <emt/core/loader.h>
#include <emt/core/safetensors.h>
#include <torch/types.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace emt {

class Tokenizer;
struct BaseModel;

// The result-row method label of one wise-ft weight: "wise-ft@0.5" (the cell's method, then '@' and the weight).
std::string wise_ft_label(const std::string& method, double alpha);
// Every label a study cell of `method` scores under: the wise-ft labels for a wise-ft method, else {method}.
std::vector<std::string> scored_method_labels(const std::string& method, const MitigationConfig& m);

// sum over names of weight[n] * (live[n] - initial[n])^2 (weight 1 where `weights` is empty); differentiable in
// `live`. FormatError naming the tensor when names or shapes disagree.
torch::Tensor weighted_sq_distance(const NamedTensors& live, const NamedTensors& initial,
                                   const NamedTensors& weights = {});

// T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the positions whose next token is supervised
// (shifted labels != -100); student, teacher: [B, T', V] logits, labels: [B, T'] as LlavaOutput gives them.
torch::Tensor distillation_kl(const torch::Tensor& student, const torch::Tensor& teacher, const torch::Tensor& labels,
                              double temperature);

// The base model inside a fine-tuned one: LoRA runtime scale, the projector's weights and the prompt prefix are
// switched between the base's and the tuned ones without copying the model. The base projector is kept as a
// copy of its (small) weights taken at construction, i.e. before fine-tuning.
class BaseView {
 public:
  explicit BaseView(LlavaModelImpl& model);
  // Logits of the base on a batch (no gradient, eval mode, the model left exactly as it was).
  torch::Tensor base_logits(const torch::Tensor& images, const torch::Tensor& input_ids,
                            const torch::Tensor& attention_mask);
  // The model becomes base + a * (tuned - base): LoRA at runtime scale a, the projector interpolated (a prompt
  // prefix is not interpolated: wise-ft refuses prompt methods). interpolate(1) restores the tuned model exactly
  // (its projector weights are kept aside meanwhile).
  void interpolate(double a);

 private:
  LlavaModelImpl& model_;
  Projector base_projector_{nullptr};
  NamedTensors tuned_;  // the tuned projector weights while interpolated (empty otherwise)
  double alpha_ = 1.0;
};

// Batches of reference data for replay and the EWC Fisher: an endless sequence, one source per batch in turn (each
// source's loader goes on with a new epoch when it runs out). at(g) is the g-th batch of that sequence, so a
// resumed run draws exactly the batches the uninterrupted run drew. ConfigError when there is no reference data
// (e.g. `datasets` in a study of one dataset).
class ReferenceStream {
 public:
  ReferenceStream(const RunConfig& cfg, const BaseModel& base, int64_t batch_size, uint64_t seed);
  ~ReferenceStream();
  Batch at(int64_t g);
  Batch next() { return at(next_); }
  int64_t sources() const { return static_cast<int64_t>(loaders_.size()); }
  // The texts of the first `n` samples of every source (the leak check's test).
  std::vector<std::string> sample_texts(int64_t n) const;

 private:
  std::vector<std::unique_ptr<DataLoader>> loaders_;
  std::vector<std::pair<int64_t, int64_t>> pos_;  // per source: (epoch, batch) its loader gives next
  int64_t next_ = 0;
};

// Replay's batch of reference samples beside a fine-tuning batch of `batch`: r / (1 - r) * batch, at least 1.
int64_t replay_batch_size(double ratio, int64_t batch);

// Diagonal Fisher of the model's causal-LM loss on `batches` reference batches, one tensor per trained tensor
// (mean squared gradient), scaled so its mean over every element is 1 (all ones when every gradient is zero).
// The model is left in eval mode with no gradients.
NamedTensors diagonal_fisher(LlavaModelImpl& model, const NamedTensors& live, const std::function<Batch()>& next,
                             int64_t batches, torch::Device device);

// The exponential moving average of the trained tensors (ema). Starts at their values before fine-tuning.
class WeightAverage {
 public:
  WeightAverage(const NamedTensors& live, double decay);
  void update();                       // average <- d * average + (1 - d) * live
  void swap();                         // exchange the live tensors' values with the average's
  const NamedTensors& average() const { return avg_; }
  // Checkpoint entries "ema/<name>" and back.
  NamedTensors state() const;
  // Takes the "ema/" entries of `tensors` (FormatError naming the first one missing) and returns the others.
  NamedTensors load_state(const NamedTensors& tensors, const std::string& source);

 private:
  NamedTensors live_, avg_;
  double decay_;
};
extern const char* const kEmaPrefix;  // "ema/"

}  // namespace emt
