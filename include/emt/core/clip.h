// CLIP vision and text encoders with the semantics and parameter names of HF CLIPVisionModel / CLIPTextModel /
// CLIPModel (pre-LN transformer, quick_gelu or gelu MLP, `pre_layrnorm` spelled as HF spells it).
#pragma once
#include <emt/core/layers.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/normalization.h>

#include <string>
#include <vector>

namespace emt {

struct VisionConfig;
struct ClipTextConfig;

// One pre-LN encoder layer's shape, shared by the vision and text towers.
struct ClipEncoderOptions {
  int64_t hidden_size = 0, num_layers = 0, num_heads = 0, intermediate_size = 0;
  std::string hidden_act = "quick_gelu";
  double layer_norm_eps = 1e-5;
};

struct ClipVisionOptions {
  int64_t image_size = 224, patch_size = 32, num_channels = 3;
  ClipEncoderOptions encoder;
  int64_t num_patches() const { return (image_size / patch_size) * (image_size / patch_size); }
};
ClipVisionOptions clip_vision_options(const VisionConfig& c);  // ConfigError on inconsistent shapes

struct ClipTextOptions {
  int64_t vocab_size = 49408, max_position_embeddings = 77;
  int64_t eos_token_id = -1;  // pooling position: first eos_token_id, or (when < 0) the argmax of the ids
  ClipEncoderOptions encoder;
};
ClipTextOptions clip_text_options(const ClipTextConfig& c);

struct ClipAttentionImpl : torch::nn::Module {
  explicit ClipAttentionImpl(const ClipEncoderOptions& o);
  // x: [B, T, D], mask: bool broadcastable to [B, H, T, T] or undefined -> [B, T, D]
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask);
  int64_t num_heads;
  Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
};
TORCH_MODULE(ClipAttention);

struct ClipMlpImpl : torch::nn::Module {
  explicit ClipMlpImpl(const ClipEncoderOptions& o);
  // x: [B, T, D] -> [B, T, D]
  torch::Tensor forward(const torch::Tensor& x);
  std::string act;
  Linear fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(ClipMlp);

struct ClipEncoderLayerImpl : torch::nn::Module {
  explicit ClipEncoderLayerImpl(const ClipEncoderOptions& o);
  // x: [B, T, D] -> [B, T, D]
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask);
  torch::nn::LayerNorm layer_norm1{nullptr}, layer_norm2{nullptr};
  ClipAttention self_attn{nullptr};
  ClipMlp mlp{nullptr};
};
TORCH_MODULE(ClipEncoderLayer);

struct ClipEncoderImpl : torch::nn::Module {
  explicit ClipEncoderImpl(const ClipEncoderOptions& o);
  // x: [B, T, D] -> hidden states after each of the first `n_layers` layers (all when < 0), input first:
  // result[0] = x, result[i] = output of layer i.
  std::vector<torch::Tensor> forward(const torch::Tensor& x, const torch::Tensor& mask, int64_t n_layers = -1);
  torch::nn::ModuleList layers;
};
TORCH_MODULE(ClipEncoder);

struct ClipVisionEmbeddingsImpl : torch::nn::Module {
  explicit ClipVisionEmbeddingsImpl(const ClipVisionOptions& o);
  // pixels: [B, C, S, S] -> [B, 1 + N, D] (class token first)
  torch::Tensor forward(const torch::Tensor& pixels);
  ClipVisionOptions options;
  torch::nn::Conv2d patch_embedding{nullptr};
  torch::Tensor class_embedding;
  torch::nn::Embedding position_embedding{nullptr};
};
TORCH_MODULE(ClipVisionEmbeddings);

struct ClipVisionOutput {
  torch::Tensor last_hidden_state;           // [B, 1 + N, D] (before post_layernorm, as HF)
  torch::Tensor pooled;                      // [B, D] = post_layernorm(CLS)
  std::vector<torch::Tensor> hidden_states;  // L + 1 entries: pre_layrnorm(embeddings), then each layer
};

// HF CLIPVisionTransformer (the module called `vision_model` in every checkpoint).
struct ClipVisionTransformerImpl : torch::nn::Module {
  explicit ClipVisionTransformerImpl(const ClipVisionOptions& o);
  // pixels: [B, C, S, S] -> ClipVisionOutput
  ClipVisionOutput forward(const torch::Tensor& pixels);
  // Hidden state `select_layer` (Python-style index into hidden_states, e.g. -2) without running the layers
  // after it: [B, C, S, S] -> [B, 1 + N, D].
  torch::Tensor hidden_state(const torch::Tensor& pixels, int64_t select_layer);
  ClipVisionOptions options;
  ClipVisionEmbeddings embeddings{nullptr};
  torch::nn::LayerNorm pre_layrnorm{nullptr}, post_layernorm{nullptr};
  ClipEncoder encoder{nullptr};
};
TORCH_MODULE(ClipVisionTransformer);

// HF CLIPVisionModel: a `vision_model` child, so LLaVA's tower keys read `vision_tower.vision_model.*`.
struct ClipVisionModelImpl : torch::nn::Module {
  explicit ClipVisionModelImpl(const ClipVisionOptions& o);
  ClipVisionOutput forward(const torch::Tensor& pixels) { return vision_model->forward(pixels); }
  ClipVisionTransformer vision_model{nullptr};
};
TORCH_MODULE(ClipVisionModel);

struct ClipTextEmbeddingsImpl : torch::nn::Module {
  explicit ClipTextEmbeddingsImpl(const ClipTextOptions& o);
  // ids: [B, T] -> [B, T, D]
  torch::Tensor forward(const torch::Tensor& ids);
  torch::nn::Embedding token_embedding{nullptr}, position_embedding{nullptr};
};
TORCH_MODULE(ClipTextEmbeddings);

struct ClipTextOutput {
  torch::Tensor last_hidden_state;  // [B, T, D] after final_layer_norm
  torch::Tensor pooled;             // [B, D] at the EOS position
};

// HF CLIPTextTransformer (`text_model`): causal self-attention, padding mask, final_layer_norm, EOS pooling.
struct ClipTextTransformerImpl : torch::nn::Module {
  explicit ClipTextTransformerImpl(const ClipTextOptions& o);
  // ids: [B, T], mask: [B, T] (1 = token, undefined = all) -> ClipTextOutput
  ClipTextOutput forward(const torch::Tensor& ids, const torch::Tensor& mask = {});
  ClipTextOptions options;
  ClipTextEmbeddings embeddings{nullptr};
  ClipEncoder encoder{nullptr};
  torch::nn::LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(ClipTextTransformer);

struct ClipOptions {
  ClipVisionOptions vision;
  ClipTextOptions text;
  int64_t projection_dim = 512;
  double logit_scale_init = 2.6592;  // log(1 / 0.07)
};
ClipOptions clip_options(const VisionConfig& v, const ClipTextConfig& t);

// HF CLIPModel: `vision_model`, `text_model`, `visual_projection`, `text_projection`, `logit_scale`.
struct ClipModelImpl : torch::nn::Module {
  explicit ClipModelImpl(const ClipOptions& o);
  torch::Tensor image_features(const torch::Tensor& pixels);  // [B, C, S, S] -> [B, P] (not normalised)
  torch::Tensor text_features(const torch::Tensor& ids, const torch::Tensor& mask = {});  // [B, T] -> [B, P]
  // pixels: [Bi, C, S, S], ids: [Bt, T] -> logits_per_image [Bi, Bt] = exp(logit_scale) cos-sim
  torch::Tensor forward(const torch::Tensor& pixels, const torch::Tensor& ids, const torch::Tensor& mask = {});
  ClipOptions options;
  ClipVisionTransformer vision_model{nullptr};
  ClipTextTransformer text_model{nullptr};
  Linear visual_projection{nullptr}, text_projection{nullptr};
  torch::Tensor logit_scale;
};
TORCH_MODULE(ClipModel);

}  // namespace emt
