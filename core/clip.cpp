// CLIP vision and text encoders (HF CLIPVisionModel / CLIPTextModel / CLIPModel semantics).
#include <emt/core/attention.h>
#include <emt/core/clip.h>
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <torch/torch.h>

#include <cmath>

namespace emt {

namespace {

ClipEncoderOptions encoder_options(const std::string& where, int64_t hidden, int64_t layers, int64_t heads,
                                   int64_t intermediate, const std::string& act, double eps) {
  if (hidden <= 0 || heads <= 0 || hidden % heads != 0)
    throw ConfigError("[clip] " + where + ".hidden_size (" + std::to_string(hidden) +
                      ") must be a positive multiple of " + where + ".num_heads (" + std::to_string(heads) + ")");
  if (layers <= 0 || intermediate <= 0)
    throw ConfigError("[clip] " + where + ".num_layers and " + where + ".intermediate_size must be positive");
  check_activation_name(act);
  return ClipEncoderOptions{hidden, layers, heads, intermediate, act, eps};
}

torch::nn::LayerNorm layer_norm(int64_t d, double eps) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({d}).eps(eps));
}

}  // namespace

ClipVisionOptions clip_vision_options(const VisionConfig& c) {
  ClipVisionOptions o;
  o.image_size = c.image_size;
  o.patch_size = c.patch_size;
  o.num_channels = c.num_channels;
  if (o.patch_size <= 0 || o.image_size <= 0 || o.image_size % o.patch_size != 0)
    throw ConfigError("[clip] model.vision.image_size (" + std::to_string(o.image_size) +
                      ") must be a positive multiple of model.vision.patch_size (" + std::to_string(o.patch_size) +
                      ")");
  o.encoder = encoder_options("model.vision", c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size,
                              c.hidden_act, c.layer_norm_eps);
  return o;
}

ClipTextOptions clip_text_options(const ClipTextConfig& c) {
  ClipTextOptions o;
  o.vocab_size = c.vocab_size;
  o.max_position_embeddings = c.max_position_embeddings;
  o.encoder = encoder_options("model.clip_text", c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size,
                              c.hidden_act, c.layer_norm_eps);
  return o;
}

ClipOptions clip_options(const VisionConfig& v, const ClipTextConfig& t) {
  ClipOptions o;
  o.vision = clip_vision_options(v);
  o.text = clip_text_options(t);
  o.projection_dim = t.projection_dim;
  return o;
}

ClipAttentionImpl::ClipAttentionImpl(const ClipEncoderOptions& o) : num_heads(o.num_heads) {
  int64_t d = o.hidden_size;
  q_proj = register_module("q_proj", Linear(LinearOptions{d, d, true}));
  k_proj = register_module("k_proj", Linear(LinearOptions{d, d, true}));
  v_proj = register_module("v_proj", Linear(LinearOptions{d, d, true}));
  out_proj = register_module("out_proj", Linear(LinearOptions{d, d, true}));
}

torch::Tensor ClipAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& mask) {
  // x: [B, T, D] -> [B, T, D]
  TORCH_CHECK(x.dim() == 3, "ClipAttention: expected [B, T, D], got ", x.sizes());
  int64_t b = x.size(0), t = x.size(1), d = x.size(2), hd = d / num_heads;
  auto split = [&](const torch::Tensor& y) { return y.view({b, t, num_heads, hd}).transpose(1, 2); };
  auto y = attention(split(q_proj(x)), split(k_proj(x)), split(v_proj(x)), mask);
  return out_proj(y.transpose(1, 2).reshape({b, t, d}));
}

ClipMlpImpl::ClipMlpImpl(const ClipEncoderOptions& o) : act(o.hidden_act) {
  fc1 = register_module("fc1", Linear(LinearOptions{o.hidden_size, o.intermediate_size, true}));
  fc2 = register_module("fc2", Linear(LinearOptions{o.intermediate_size, o.hidden_size, true}));
}

torch::Tensor ClipMlpImpl::forward(const torch::Tensor& x) {
  // x: [B, T, D] -> [B, T, D]
  TORCH_CHECK(x.dim() >= 2, "ClipMlp: expected [B, T, D], got ", x.sizes());
  return fc2(activation(act, fc1(x)));
}

ClipEncoderLayerImpl::ClipEncoderLayerImpl(const ClipEncoderOptions& o) {
  layer_norm1 = register_module("layer_norm1", layer_norm(o.hidden_size, o.layer_norm_eps));
  self_attn = register_module("self_attn", ClipAttention(o));
  layer_norm2 = register_module("layer_norm2", layer_norm(o.hidden_size, o.layer_norm_eps));
  mlp = register_module("mlp", ClipMlp(o));
}

torch::Tensor ClipEncoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& mask) {
  // x: [B, T, D] -> [B, T, D]
  TORCH_CHECK(x.dim() == 3, "ClipEncoderLayer: expected [B, T, D], got ", x.sizes());
  auto h = x + self_attn(layer_norm1(x), mask);
  return h + mlp(layer_norm2(h));
}

ClipEncoderImpl::ClipEncoderImpl(const ClipEncoderOptions& o) {
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.num_layers; ++i) layers->push_back(ClipEncoderLayer(o));
}

std::vector<torch::Tensor> ClipEncoderImpl::forward(const torch::Tensor& x, const torch::Tensor& mask,
                                                    int64_t n_layers) {
  // x: [B, T, D] -> (n_layers + 1) x [B, T, D]
  TORCH_CHECK(x.dim() == 3, "ClipEncoder: expected [B, T, D], got ", x.sizes());
  int64_t n = n_layers < 0 ? static_cast<int64_t>(layers->size()) : n_layers;
  TORCH_CHECK(n <= static_cast<int64_t>(layers->size()), "ClipEncoder: ", n, " layers requested, ",
              layers->size(), " exist");
  std::vector<torch::Tensor> hs{x};
  for (int64_t i = 0; i < n; ++i) hs.push_back(layers->ptr<ClipEncoderLayerImpl>(i)->forward(hs.back(), mask));
  return hs;
}

ClipVisionEmbeddingsImpl::ClipVisionEmbeddingsImpl(const ClipVisionOptions& o) : options(o) {
  int64_t d = o.encoder.hidden_size;
  patch_embedding = register_module(
      "patch_embedding",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(o.num_channels, d, o.patch_size).stride(o.patch_size).bias(false)));
  class_embedding = register_parameter("class_embedding", torch::randn({d}));
  position_embedding = register_module("position_embedding", torch::nn::Embedding(o.num_patches() + 1, d));
}

torch::Tensor ClipVisionEmbeddingsImpl::forward(const torch::Tensor& pixels) {
  // pixels: [B, C, S, S] -> [B, 1 + N, D]
  TORCH_CHECK(pixels.dim() == 4 && pixels.size(1) == options.num_channels &&
                  pixels.size(2) == options.image_size && pixels.size(3) == options.image_size,
              "ClipVision: expected pixels [B, ", options.num_channels, ", ", options.image_size, ", ",
              options.image_size, "], got ", pixels.sizes());
  auto w = patch_embedding->weight;
  auto patches = patch_embedding(pixels.to(w.scalar_type())).flatten(2).transpose(1, 2);  // [B, N, D]
  auto cls = class_embedding.view({1, 1, -1}).expand({pixels.size(0), 1, class_embedding.size(0)});
  auto x = torch::cat({cls.to(patches.scalar_type()), patches}, 1);
  return x + position_embedding->weight.unsqueeze(0);
}

ClipVisionTransformerImpl::ClipVisionTransformerImpl(const ClipVisionOptions& o) : options(o) {
  embeddings = register_module("embeddings", ClipVisionEmbeddings(o));
  pre_layrnorm = register_module("pre_layrnorm", layer_norm(o.encoder.hidden_size, o.encoder.layer_norm_eps));
  encoder = register_module("encoder", ClipEncoder(o.encoder));
  post_layernorm = register_module("post_layernorm", layer_norm(o.encoder.hidden_size, o.encoder.layer_norm_eps));
}

ClipVisionOutput ClipVisionTransformerImpl::forward(const torch::Tensor& pixels) {
  // pixels: [B, C, S, S] -> hidden states [B, 1 + N, D], pooled [B, D]
  auto hs = encoder(pre_layrnorm(embeddings(pixels)), torch::Tensor(), -1);
  ClipVisionOutput out;
  out.last_hidden_state = hs.back();
  out.pooled = post_layernorm(hs.back().select(1, 0));
  out.hidden_states = std::move(hs);
  return out;
}

torch::Tensor ClipVisionTransformerImpl::hidden_state(const torch::Tensor& pixels, int64_t select_layer) {
  // pixels: [B, C, S, S] -> [B, 1 + N, D]
  int64_t n = options.encoder.num_layers;
  int64_t idx = select_layer < 0 ? n + 1 + select_layer : select_layer;
  TORCH_CHECK(idx >= 0 && idx <= n, "ClipVision: select_layer ", select_layer, " out of range for ", n,
              " layers (", n + 1, " hidden states)");
  return encoder(pre_layrnorm(embeddings(pixels)), torch::Tensor(), idx).back();
}

ClipVisionModelImpl::ClipVisionModelImpl(const ClipVisionOptions& o) {
  vision_model = register_module("vision_model", ClipVisionTransformer(o));
}

ClipTextEmbeddingsImpl::ClipTextEmbeddingsImpl(const ClipTextOptions& o) {
  token_embedding = register_module("token_embedding", torch::nn::Embedding(o.vocab_size, o.encoder.hidden_size));
  position_embedding = register_module(
      "position_embedding", torch::nn::Embedding(o.max_position_embeddings, o.encoder.hidden_size));
}

torch::Tensor ClipTextEmbeddingsImpl::forward(const torch::Tensor& ids) {
  // ids: [B, T] -> [B, T, D]
  TORCH_CHECK(ids.dim() == 2, "ClipText: ids must be [B, T], got ", ids.sizes());
  TORCH_CHECK(ids.size(1) <= position_embedding->weight.size(0), "ClipText: ", ids.size(1),
              " tokens exceed max_position_embeddings ", position_embedding->weight.size(0));
  return token_embedding(ids) + position_embedding->weight.narrow(0, 0, ids.size(1)).unsqueeze(0);
}

ClipTextTransformerImpl::ClipTextTransformerImpl(const ClipTextOptions& o) : options(o) {
  embeddings = register_module("embeddings", ClipTextEmbeddings(o));
  encoder = register_module("encoder", ClipEncoder(o.encoder));
  final_layer_norm = register_module("final_layer_norm", layer_norm(o.encoder.hidden_size, o.encoder.layer_norm_eps));
}

ClipTextOutput ClipTextTransformerImpl::forward(const torch::Tensor& ids, const torch::Tensor& mask) {
  // ids: [B, T], mask: [B, T] -> last hidden [B, T, D], pooled [B, D]
  TORCH_CHECK(ids.dim() == 2, "ClipText: ids must be [B, T], got ", ids.sizes());
  int64_t b = ids.size(0), t = ids.size(1);
  auto attn_mask = causal_mask(mask, b, 0, t, t, ids.device());
  ClipTextOutput out;
  out.last_hidden_state = final_layer_norm(encoder(embeddings(ids), attn_mask, -1).back());
  torch::Tensor pos;
  if (options.eos_token_id < 0) {
    pos = ids.argmax(1);
  } else {
    // first occurrence of the EOS id (the last token when a row has none)
    auto is_eos = ids.eq(options.eos_token_id).to(torch::kLong);
    auto any = is_eos.amax(1).gt(0);
    pos = torch::where(any, is_eos.argmax(1), torch::full_like(any, t - 1, torch::kLong));
  }
  out.pooled = out.last_hidden_state.index({torch::arange(b, ids.options().dtype(torch::kLong)), pos});
  return out;
}

ClipModelImpl::ClipModelImpl(const ClipOptions& o) : options(o) {
  text_model = register_module("text_model", ClipTextTransformer(o.text));
  vision_model = register_module("vision_model", ClipVisionTransformer(o.vision));
  visual_projection = register_module(
      "visual_projection", Linear(LinearOptions{o.vision.encoder.hidden_size, o.projection_dim, false}));
  text_projection =
      register_module("text_projection", Linear(LinearOptions{o.text.encoder.hidden_size, o.projection_dim, false}));
  logit_scale = register_parameter("logit_scale", torch::full({}, o.logit_scale_init));
}

torch::Tensor ClipModelImpl::image_features(const torch::Tensor& pixels) {
  // pixels: [B, C, S, S] -> [B, P]
  return visual_projection(vision_model->forward(pixels).pooled);
}

torch::Tensor ClipModelImpl::text_features(const torch::Tensor& ids, const torch::Tensor& mask) {
  // ids: [B, T] -> [B, P]
  return text_projection(text_model->forward(ids, mask).pooled);
}

torch::Tensor ClipModelImpl::forward(const torch::Tensor& pixels, const torch::Tensor& ids, const torch::Tensor& mask) {
  // pixels: [Bi, C, S, S], ids: [Bt, T] -> [Bi, Bt]
  TORCH_CHECK(pixels.dim() == 4 && ids.dim() == 2, "ClipModel: expected pixels [B, C, S, S] and ids [B, T], got ",
              pixels.sizes(), " and ", ids.sizes());
  auto img = torch::nn::functional::normalize(image_features(pixels),
                                              torch::nn::functional::NormalizeFuncOptions().dim(-1));
  auto txt = torch::nn::functional::normalize(text_features(ids, mask),
                                              torch::nn::functional::NormalizeFuncOptions().dim(-1));
  return torch::matmul(img, txt.t()) * logit_scale.exp();
}

}  // namespace emt
