// Batched generation for the multimodal model: images encoded once, one prefill over the left-padded prompts,
// then one token per step from a preallocated KV cache; greedy or temperature/top-p sampling with a seed.
#pragma once
#include <emt/core/llava.h>

#include <cstdint>
#include <string>
#include <vector>

namespace emt {

class Tokenizer;

struct GenerateOptions {
  int64_t max_new_tokens = 16;
  double temperature = 0.0;  // 0 = greedy
  double top_p = 1.0;        // nucleus mass when sampling
  uint64_t seed = 0;         // sampling RNG (same seed, same batch -> same tokens)
  int64_t eos_id = -1;       // a row stops at this id (not included in its output); < 0 = never
  std::vector<std::string> stop_strings;  // a row stops once its decoded text contains one (needs tokenizer)
  const Tokenizer* tokenizer = nullptr;
  bool use_cache = true;     // false recomputes the whole sequence every step (reference / benchmark)
};

// images: [B, 3, S, S] or undefined; input_ids, attention_mask: [B, T], LEFT-padded (positions come from the mask)
// -> the new token ids of each row (EOS excluded; a row stopped by a stop string keeps the tokens that completed
// it, so callers cut the decoded text at the stop string).
std::vector<std::vector<int64_t>> generate(LlavaModel& model, const torch::Tensor& images,
                                           const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                                           const GenerateOptions& opts);

// Next-token logits after the prompt: [B, V] f32 (what `emt generate --dump-logits` writes).
torch::Tensor next_token_logits(LlavaModel& model, const torch::Tensor& images, const torch::Tensor& input_ids,
                                const torch::Tensor& attention_mask);

}  // namespace emt
