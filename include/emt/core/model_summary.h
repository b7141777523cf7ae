// Parameter counts and training-memory estimates computed from shapes alone (no tensor is allocated), so the
// numbers for 7B/13B models are available on any machine.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace emt {

struct ModelSection;
struct FinetuneSection;

struct ParamCounts {
  int64_t vision_tower = 0;    // CLIP vision transformer incl. post_layernorm
  int64_t projector = 0;
  int64_t language_model = 0;  // embed_tokens + layers + norm + lm_head (once when tied)
  int64_t total = 0;           // the three above
  int64_t llm_embeddings = 0;  // embed_tokens (+ lm_head), part of language_model
  int64_t llm_per_layer = 0;
  int64_t vision_per_layer = 0;
  int64_t clip_text = 0;       // CLIP text tower + both projections + logit_scale (zero-shot baseline only)
};
ParamCounts count_params(const ModelSection& m);

// The methods of finetune.method, in the order summaries print them.
const std::vector<std::string>& training_methods();

struct MemoryEstimate {
  std::string method, dtype;
  int64_t total_params = 0, trainable_params = 0;  // trainable includes added LoRA / prompt parameters
  int64_t added_params = 0;                        // LoRA A/B or prompt embeddings (not in the base model)
  double weight_bytes = 0;     // frozen weights in `dtype` + trainable parameters in f32
  double gradient_bytes = 0;   // f32 gradients of trainable parameters
  double optimizer_bytes = 0;  // AdamW first and second moments in f32
  double total_bytes() const { return weight_bytes + gradient_bytes + optimizer_bytes; }
};
// Activations are not included (they depend on batch and sequence length). LoRA adds r * (in + out) per
// targeted decoder Linear (finetune.lora target_modules / target_regex / exclude / rank_pattern); the vision
// tower is frozen in every method. ConfigError on an unknown method or dtype.
MemoryEstimate estimate_memory(const ModelSection& m, const FinetuneSection& f, const std::string& method,
                               const std::string& dtype);

// The text `emt model summary` prints: per-component counts, then one line per method.
std::string format_model_summary(const ModelSection& m, const FinetuneSection& f, const std::string& dtype,
                                 const std::vector<std::string>& methods);

}  // namespace emt
