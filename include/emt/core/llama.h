// LLaMA-style decoder with the semantics and parameter names of HF LlamaForCausalLM: RMSNorm, rotate-half RoPE,
// grouped-query attention, SwiGLU, a preallocated KV cache, optional per-block activation checkpointing.
#pragma once
#include <emt/core/layers.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>

#include <string>
#include <vector>

namespace emt {

struct LlmConfig;

struct LlamaOptions {
  int64_t vocab_size = 32000, hidden_size = 4096, num_layers = 32, num_heads = 32, num_kv_heads = 32;
  int64_t intermediate_size = 11008, max_position_embeddings = 2048;
  double rope_theta = 10000.0, rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  std::string hidden_act = "silu";
  int64_t head_dim() const { return hidden_size / num_heads; }
};
LlamaOptions llama_options(const LlmConfig& c);  // ConfigError on inconsistent shapes (heads, kv heads)
LlmConfig llm_config_of(const LlamaOptions& o);   // the inverse (shapes only)

// Keys and values of every layer, preallocated for `capacity` slots: k[l], v[l]: [B, H_kv, capacity, hd].
// `length` slots are filled; a forward with T new tokens writes slots [length, length + T).
struct KVCache {
  std::vector<torch::Tensor> k, v;
  int64_t length = 0;
  int64_t capacity() const { return k.empty() ? 0 : k[0].size(2); }
};
KVCache make_kv_cache(const LlamaOptions& o, int64_t batch, int64_t capacity, torch::ScalarType dtype,
                      torch::Device device);

struct LlamaAttentionImpl : torch::nn::Module {
  explicit LlamaAttentionImpl(const LlamaOptions& o);
  // x: [B, T, D], cos/sin: [B, 1, T, hd], mask: bool [B, 1, T, Tk] -> [B, T, D]. With a cache, keys/values are
  // written at slots [cache->length, +T) of layer `layer` and attention spans slots [0, length + T).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& mask, KVCache* cache = nullptr, int64_t layer = 0);
  LlamaOptions options;
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
};
TORCH_MODULE(LlamaAttention);

struct LlamaMlpImpl : torch::nn::Module {
  explicit LlamaMlpImpl(const LlamaOptions& o);
  // x: [B, T, D] -> down(act(gate(x)) * up(x)): [B, T, D]
  torch::Tensor forward(const torch::Tensor& x);
  std::string act;
  Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(LlamaMlp);

struct LlamaDecoderLayerImpl : torch::nn::Module {
  explicit LlamaDecoderLayerImpl(const LlamaOptions& o);
  // x: [B, T, D] -> [B, T, D]
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& mask, KVCache* cache = nullptr, int64_t layer = 0);
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  LlamaAttention self_attn{nullptr};
  LlamaMlp mlp{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

// Runs `layer` without keeping activations and recomputes it (with the same RNG state) during backward, so a
// block's memory is one hidden state. Gradients reach x and every parameter of the layer that requires grad.
torch::Tensor checkpointed_layer(LlamaDecoderLayerImpl& layer, const torch::Tensor& x, const torch::Tensor& cos,
                                 const torch::Tensor& sin, const torch::Tensor& mask);

// HF LlamaModel (`model`): embed_tokens, layers, norm.
struct LlamaModelImpl : torch::nn::Module {
  explicit LlamaModelImpl(const LlamaOptions& o);
  // embeds: [B, T, D], attention_mask: [B, past + T] (1 = token; undefined = all), positions: [B, T] (undefined
  // = from the mask, so left padding is handled) -> final-normed hidden states [B, T, D]. With a cache, past =
  // cache->length and the cache advances by T.
  torch::Tensor forward(const torch::Tensor& embeds, const torch::Tensor& attention_mask = {},
                        const torch::Tensor& positions = {}, KVCache* cache = nullptr);
  LlamaOptions options;
  bool grad_checkpointing = false;  // only takes effect in training without a cache
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers;
  RMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaModel);

// HF LlamaForCausalLM: `model` + `lm_head` (absent when tied: logits then use embed_tokens' weight).
struct LlamaForCausalLMImpl : torch::nn::Module {
  explicit LlamaForCausalLMImpl(const LlamaOptions& o);
  // ids: [B, T], mask: [B, T] -> logits [B, T, V]
  torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& mask = {});
  torch::Tensor embed(const torch::Tensor& ids);     // [B, T] -> [B, T, D]
  torch::Tensor logits(const torch::Tensor& hidden);  // [..., D] -> [..., V]
  LlamaOptions options;
  LlamaModel model{nullptr};
  Linear lm_head{nullptr};
};
TORCH_MODULE(LlamaForCausalLM);

}  // namespace emt
