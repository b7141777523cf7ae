// What gets trained: each of {vision, projector, llm} is frozen | lora | full, plus optional prompt tuning.
// Named methods (linear, lora, lora-only, prompt, linear+prompt, full, lora-attn, lora-mlp) map onto a policy, a
// mitigation (l2sp, ewc, lwf, ema, replay, wise-ft; train/mitigation.h) onto its base method's; applying it to a model
// injects LoRA / creates prompt embeddings / sets requires_grad and returns the optimizer's parameter groups.
#pragma once
#include <emt/core/config.h>
#include <emt/core/safetensors.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace emt {

class Tokenizer;
struct LlavaModelImpl;

enum class ComponentMode { Frozen, Lora, Full };
std::string to_string(ComponentMode m);

struct TrainingPolicy {
  std::string name;  // the method it came from ("custom" for an explicit spec)
  ComponentMode vision = ComponentMode::Frozen;
  ComponentMode projector = ComponentMode::Frozen;
  ComponentMode llm = ComponentMode::Frozen;
  bool prompt = false;  // K learned embeddings before the text (PEFT PROMPT_TUNING)
};

// The named methods, in documentation order.
const std::vector<std::string>& method_names();
// A method name, or an explicit spec "vision=MODE,projector=MODE,llm=MODE[,prompt]" (MODE: frozen|lora|full; the
// only way to train the CLIP tower). ConfigError naming the valid choices otherwise.
TrainingPolicy policy_for_method(const std::string& method);
std::string describe_policy(const TrainingPolicy& p);  // "vision=frozen projector=full llm=lora prompt=no"

// Module-path roots of the three components (older llava-hf layout).
extern const char* const kVisionRoot;     // "vision_tower"
extern const char* const kProjectorRoot;  // "multi_modal_projector"
extern const char* const kLlmRoot;        // "language_model"

struct ParamGroup {
  std::string name;  // projector | projector_no_decay | default | no_decay
  std::vector<torch::Tensor> params;
  double lr = 0.0;
  bool weight_decay = true;  // false: biases, norm weights (1-D tensors) and prompt embeddings
};

struct TrainableSetup {
  TrainingPolicy policy;
  std::vector<ParamGroup> groups;          // only trainable tensors, never empty groups
  std::vector<std::string> lora_modules;   // paths that received a delta
  torch::Tensor prompt_embeddings;         // [K, D] leaf tensor with requires_grad (policy.prompt only)
  int64_t trainable = 0, total = 0;        // element counts (prompt embeddings included in both)
};

struct PolicyHooks {
  // Receives the prompt embeddings (LlavaModel::set_prompt_prefix). Required when the policy has prompt = true.
  std::function<void(const torch::Tensor&)> set_prompt_prefix;
  const Tokenizer* tokenizer = nullptr;  // for prompt_tuning.init = text
};

// Freezes everything, then: lora components get LoRA from ft.lora (target selection limited to the component's
// root; all-linear = every Linear there except lm_head), full components become trainable, and prompt policies
// get ft.prompt_tuning.num_virtual_tokens embeddings (random N(0,1) or the init_text token embeddings, as PEFT).
// Groups: projector params use ft.projector_lr when > 0 (else ft.learning_rate); 1-D tensors, biases and prompt embeddings
// go to the no-decay groups. ConfigError for invalid LoRA/prompt settings or a prompt policy without the hook.
TrainableSetup apply_training_policy(torch::nn::Module& model, const TrainingPolicy& policy,
                                     const FinetuneSection& ft, const PolicyHooks& hooks = {});
// The LoRA settings a method trains with: lora-attn adapts only q/k/v/o_proj, lora-mlp only gate_proj and up_proj
// (target_regex cleared); every other method keeps `lora` as it is.
LoraConfig lora_for_method(const std::string& method, const LoraConfig& lora);
// policy_for_method(ft.method) applied to a LLaVA model (LoRA targets from lora_for_method) (prompt embeddings handed to set_prompt_prefix).
TrainableSetup apply_method(LlavaModelImpl& model, const FinetuneSection& ft, const Tokenizer* tokenizer = nullptr);

// Exactly what is trained, by name: every parameter with requires_grad (its module path), plus
// "prompt_embeddings" when `prompt` is defined. Tensors are detached views (no copy).
NamedTensors trainable_tensors(torch::nn::Module& model, const torch::Tensor& prompt = {});
// Copies such a set back (e.g. from a checkpoint). ONE FormatError lists unknown names, shape mismatches and
// currently trainable tensors the set lacks; nothing is copied unless all fit. `source` labels messages.
void load_trainable_tensors(torch::nn::Module& model, const NamedTensors& tensors, const torch::Tensor& prompt = {},
                            const std::string& source = "<tensors>");

// Element counts per component ("vision", "projector", "llm", "other", "lora", "prompt"): total and trainable.
struct ComponentCount {
  std::string component;
  int64_t total = 0, trainable = 0;
};
std::vector<ComponentCount> count_parameters(torch::nn::Module& model, const torch::Tensor& prompt = {});

}  // namespace emt
