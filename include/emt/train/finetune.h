// Fine-tuning one LLaVA-style model on ONE dataset with a named method: the base model (HF directory or the tiny
// built-in one), the causal-LM objective, and the glue that hands them to the one Trainer.
#pragma once
#include <emt/adapters/policy.h>
#include <emt/core/config.h>
#include <emt/core/image.h>
#include <emt/core/llava.h>
#include <emt/core/tokenizer.h>
#include <emt/train/trainer.h>

#include <functional>
#include <memory>
#include <string>

namespace emt {

class BaseView;

// A loaded base model with what it needs to read prompts and images.
struct BaseModel {
  LlavaModel model{nullptr};
  std::shared_ptr<Tokenizer> tokenizer;
  ImageProcessorOptions image;
  std::string dir;           // the HF-layout directory it came from
  std::string conversation;  // template name
  std::string system;        // system prompt ("" = template default)
  torch::Device device = torch::kCPU;
};

// The loader settings of fine-tuning batches (shuffled, with answers, right-padded, the base's prompt format).
LoaderOptions training_loader_options(const RunConfig& cfg, const BaseModel& base, int64_t batch_size, uint64_t seed);

// The directory holding the base model: model.pretrained, or pretrain.cache_dir for the tiny built-in model.
std::string base_model_dir(const RunConfig& cfg);
// Loads it (weights in run.dtype on run.device). IoError with the remedy when the tiny model was not built yet.
BaseModel load_base_model(const RunConfig& cfg);

// ---- methods of your own -----------------------------------------------------------------------------------
// What a loss term sees at every micro-step: the batch, the causal-LM loss just computed, the model, and every
// trained tensor by name (live: requires_grad, on the model's device; "prompt_embeddings" for prompt methods).
struct LossTermInput {
  const Batch& batch;
  const torch::Tensor& loss;
  LlavaModelImpl& model;
  const NamedTensors& trained;
};
// Returns a scalar added to the loss (it must depend on the trained tensors through autograd to have an effect).
using LossTerm = std::function<torch::Tensor(const LossTermInput&)>;

// A method of your own: the components of a built-in method (`base`: lora, linear, ...) trained with an extra loss
// term. make_loss_term runs once per training run, after the base method is applied and before a checkpoint is
// resumed, with detached copies of the trained tensors' initial values (an L2 pull toward them, a Fisher
// penalty, ...); an empty make_loss_term or an empty result trains exactly like the base method.
struct MethodSpec {
  std::string base = "lora";
  std::function<LossTerm(const NamedTensors& initial)> make_loss_term;
};
// Registers `name` for finetune.method and study.methods (ConfigError for built-in names or an unknown base).
// Register before loading configs; results rows and checkpoints carry `name` as their method.
void register_method(const std::string& name, MethodSpec spec);

// Causal-LM loss of the multimodal model on a batch (plus a method's loss term, when set).
class LlavaObjective : public Objective {
 public:
  LlavaObjective(LlavaModel model, torch::Device device) : model_(std::move(model)), device_(device) {}
  StepLoss loss(const Batch& batch) override;
  void set_train(bool on) override;
  // Adds `term` to every micro-step's loss; `trained` are the live trained tensors it receives.
  void set_loss_term(LossTerm term, NamedTensors trained);
  // lwf: adds weight * distillation_kl(model, base, T) on the answer tokens (one student forward serves both).
  void set_distillation(std::shared_ptr<BaseView> base, double weight, double temperature);
  // replay: the loss becomes (1 - ratio) * loss + ratio * loss on reference batch g = epoch * batches_per_epoch +
  // batch number (so a resumed run replays what the uninterrupted one did).
  // `data(g)` gives reference batch g.
  void set_replay(std::function<Batch(int64_t)> data, double ratio, int64_t batches_per_epoch);

 private:
  LlavaModel model_;
  torch::Device device_;
  LossTerm term_;
  NamedTensors trained_;
  std::shared_ptr<BaseView> teacher_;
  double kd_weight_ = 0.0, kd_temperature_ = 1.0;
  std::function<Batch(int64_t)> replay_;
  double replay_ratio_ = 0.0;
  int64_t replay_per_epoch_ = 1;
};

// Fine-tunes `base` in place (the method's LoRA/prompt parameters are attached to it) on cfg.finetune.dataset for
// cfg.finetune.epochs, checkpointing into run_dir/epoch_K (PEFT adapter + projector files included). on_epoch runs
// after each checkpoint with the model in eval mode (the study re-scores every dataset there).
struct FinetuneOptions {
  std::string run_dir;
  bool resume = false;
  bool progress = true;
  std::function<void(const EpochEnd&)> on_epoch;
  // Data parallel (null = one process): this rank trains on its shard of the data (finetune.batch_size per
  // rank) and the Trainer combines the ranks' gradients; see TrainerOptions::comm.
  std::shared_ptr<Communicator> comm;
};
// A mitigation method (train/mitigation.h) adds its term, replay data or moving average here; an ema run
// checkpoints the average beside the trained tensors and hands on_epoch (and the epoch's adapter files) the
// averaged weights.
TrainSummary finetune(BaseModel& base, const RunConfig& cfg, const FinetuneOptions& opts);

// Loads what a method scores from an epoch checkpoint's trainable.safetensors into a model the method was applied
// to (the moving average for ema, the trained tensors otherwise).
void load_scored_weights(LlavaModelImpl& model, const TrainableSetup& setup, const std::string& method,
                         const std::string& trainable_file);

}  // namespace emt
