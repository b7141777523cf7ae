// The one training loop of emt: any objective (causal-LM fine-tuning, contrastive CLIP pretraining, ...), any set
// of trainable parameter groups, AdamW + schedule, accumulation, clipping, bf16 autocast, a NaN guard, atomic
// per-epoch checkpoints with exact resume, preemption by signal, metrics.jsonl, epoch callbacks, and data
// parallelism over a Communicator.
#pragma once
#include <emt/adapters/policy.h>
#include <emt/core/config.h>
#include <emt/core/distributed.h>
#include <emt/core/error.h>
#include <emt/core/loader.h>
#include <emt/core/safetensors.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace torch::optim {
class Optimizer;
}

namespace emt {

struct StepLoss {
  torch::Tensor loss;    // scalar, mean over the micro-batch
  int64_t samples = 0;
  int64_t tokens = 0;    // supervised (answer) tokens: the data-parallel weight, answer_tokens_per_s
  int64_t processed = 0; // every token the model processed (image, prompt and answer; no padding): tokens_per_s
};

// What the loop optimises: turns one batch into a loss. Owns the model(s).
class Objective {
 public:
  virtual ~Objective() = default;
  virtual StepLoss loss(const Batch& batch) = 0;
  virtual void set_train(bool on) = 0;
};

// Where batches come from: a DataLoader, or anything with the same epoch/skip semantics.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual int64_t num_batches() const = 0;
  virtual void start_epoch(int64_t epoch, int64_t skip_batches) = 0;
  virtual bool next(Batch& out) = 0;
};
// Adapts a DataLoader (not owned).
std::unique_ptr<BatchSource> loader_source(DataLoader& loader);

// Exactly what is trained, for checkpoints: read, write back, and optional user-facing artifacts (PEFT adapter,
// projector file) written into the checkpoint directory.
struct TrainableIO {
  std::function<NamedTensors()> get;
  std::function<void(const NamedTensors&)> set;
  std::function<void(const std::string& dir)> save_artifacts;  // may be empty
};

struct TrainerOptions {
  int epochs = 1;
  int64_t max_steps = 0;           // > 0 stops after this many optimizer steps
  int grad_accum = 1;
  double max_grad_norm = 1.0;      // 0 = off
  std::string schedule = "cosine";
  double warmup_ratio = 0.0;
  int64_t warmup_steps = 0;
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  std::string precision = "f32";   // f32 | bf16 (autocast) | fp16 (autocast + loss scaling, CUDA only)
  int nan_patience = 5;
  int keep_last_n = 0;
  int64_t checkpoint_every_steps = 0;
  int64_t log_every_steps = 10;
  torch::Device device = torch::kCPU;
  std::string run_dir;             // checkpoints + metrics.jsonl; empty = no checkpoints, no metrics
  std::string config_yaml;         // resolved config recorded in every checkpoint
  std::map<std::string, std::string> compat;  // settings a resumed run must share (checked, mismatches named)
  bool resume = false;
  bool handle_signals = true;      // SIGTERM/SIGUSR1 -> checkpoint + Preempted
  std::string label = "train";     // progress label
  bool progress = true;
  // Data parallel (null = one process). Every rank runs the same loop on its shard of the data (the BatchSource
  // must give every rank the same number of batches): rank 0's trainable parameters are broadcast at the start;
  // each optimizer step sums every rank's gradients and loss, weighted by its supervised tokens (samples where
  // the objective counts none), in one flattened all-reduce and divides by the summed weight, so W ranks of
  // batch B take the step one process takes on their combined batch of W x B (for token-mean objectives);
  // preemption notices are voted on in the same all-reduce, so every rank stops after the same step. Only rank 0
  // writes checkpoints, artifacts and metrics.jsonl; every rank resumes from them. At every epoch end the ranks
  // compare fingerprints of their trainable parameters (Error if they differ) and the epoch's trainer_state.json
  // records them.
  std::shared_ptr<Communicator> comm;
  // Runs after every optimizer step that was taken (not after skipped non-finite ones), e.g. a moving average.
  std::function<void()> after_step;
};
TrainerOptions trainer_options(const FinetuneSection& ft, const RunSection& run);
// The settings of `cfg` that a checkpoint must share with the run resuming it.
std::map<std::string, std::string> resume_compat(const RunConfig& cfg);

struct EpochEnd {
  int64_t epoch = 0;               // 1-based epoch just finished
  int64_t step = 0;                // optimizer steps so far
  double mean_loss = 0.0;          // over the epoch's finite micro-steps
  std::string checkpoint_dir;      // empty when run_dir is empty
};

struct TrainSummary {
  int64_t steps = 0, epochs_done = 0, skipped_nonfinite = 0;
  double last_loss = 0.0, seconds = 0.0, samples_per_s = 0.0;
  bool resumed = false;
  std::vector<double> losses;      // every finite micro-step loss of this process, in order (tests, summaries)
};

// Learning-rate multiplier in [0, 1] at optimizer step `step` (0-based) of `total`.
double schedule_factor(const std::string& kind, int64_t step, int64_t total, int64_t warmup);
int64_t warmup_for(double ratio, int64_t steps, int64_t total);

class GradScaler;

class Trainer {
 public:
  Trainer(Objective& objective, BatchSource& data, std::vector<ParamGroup> groups, TrainableIO io,
          TrainerOptions opts);
  ~Trainer();
  // Called after each epoch's checkpoint is committed (the evaluator re-scores every dataset from here).
  void on_epoch_end(std::function<void(const EpochEnd&)> cb) { callbacks_.push_back(std::move(cb)); }
  TrainSummary fit();

  // Newest complete checkpoint directory under run_dir (epoch_K or step checkpoints), if any.
  static std::optional<std::string> latest_checkpoint(const std::string& run_dir);

 private:
  struct State;
  struct Loop;  // one fit() call's plan, position and running sums
  void plan(Loop& run) const;
  void open_run_dir(Loop& run);
  bool train_epoch(Loop& run);
  struct StepFigures {
    double mean_loss, grad_norm;
  };
  StepFigures optimizer_step(Loop& run, torch::Tensor loss_sum, int64_t micro, double weight);
  torch::Tensor all_reduce_step(Loop& run, const torch::Tensor& loss_sum, int64_t micro, double weight);
  void broadcast_trainable(Loop& run);
  void check_ranks_in_sync(Loop& run, State& next);
  bool main_process() const { return is_main_process(opts_.comm.get()); }
  void log_step(Loop& run, double mean_loss, double grad_norm, bool epoch_end);
  void checkpoint_or_preempt(Loop& run, bool more_in_epoch);
  void end_epoch(Loop& run);
  void save_checkpoint(const std::string& name, const State& st);
  void load_checkpoint(const std::string& dir, State& st);
  void prune_checkpoints();

  Objective& objective_;
  BatchSource& data_;
  std::vector<ParamGroup> groups_;
  TrainableIO io_;
  TrainerOptions opts_;
  std::unique_ptr<torch::optim::Optimizer> optimizer_;
  std::unique_ptr<GradScaler> scaler_;  // fp16 only
  std::vector<std::function<void(const EpochEnd&)>> callbacks_;
};

}  // namespace emt
