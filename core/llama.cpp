// Attention core, RoPE and the LLaMA-style decoder (HF LlamaForCausalLM semantics), with KV cache and
// activation checkpointing.
#include <emt/core/attention.h>
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/core/llama.h>
#include <emt/core/runtime.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <cmath>

namespace emt {

// ---- attention core ---------------------------------------------------------------------------------------

bool has_sdpa() {
#if TORCH_VERSION_MAJOR >= 2
  return true;
#else
  return false;
#endif
}

torch::Tensor attention_plain(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& mask) {
  // q: [B, H, Tq, hd], k/v: [B, H, Tk, hd] -> [B, H, Tq, hd]
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: expected 4-d q/k/v, got ", q.sizes(),
              k.sizes(), v.sizes());
  TORCH_CHECK(q.size(-1) == k.size(-1) && k.sizes() == v.sizes(), "attention: q/k/v shapes disagree: ",
              q.sizes(), k.sizes(), v.sizes());
  double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  auto scores = torch::matmul(q.to(torch::kFloat32), k.to(torch::kFloat32).transpose(-2, -1)).mul(scale);
  if (mask.defined()) {
    TORCH_CHECK(mask.scalar_type() == torch::kBool, "attention: mask must be bool, got ", mask.scalar_type());
    scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<float>::infinity());
  }
  auto probs = torch::softmax(scores, -1);
  // A row with no visible key gives 0/0: define it as attending to nothing.
  if (mask.defined()) probs = probs.masked_fill(probs.isnan(), 0.0);
  return torch::matmul(probs.to(v.scalar_type()), v);
}

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& mask) {
  // q: [B, H, Tq, hd], k/v: [B, H, Tk, hd] -> [B, H, Tq, hd]
#if TORCH_VERSION_MAJOR >= 2
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: expected 4-d q/k/v, got ", q.sizes());
  if (mask.defined()) {
    TORCH_CHECK(mask.scalar_type() == torch::kBool, "attention: mask must be bool, got ", mask.scalar_type());
    return torch::scaled_dot_product_attention(q, k, v, mask.expand({q.size(0), q.size(1), q.size(2), k.size(2)}),
                                               0.0, false);
  }
  return torch::scaled_dot_product_attention(q, k, v, {}, 0.0, false);
#else
  return attention_plain(q, k, v, mask);
#endif
}

torch::Tensor causal_mask(const torch::Tensor& key_mask, int64_t batch, int64_t past, int64_t tq, int64_t tk,
                          torch::Device device) {
  auto opts = torch::TensorOptions().dtype(torch::kLong).device(device);
  auto qpos = torch::arange(past, past + tq, opts).view({tq, 1});
  auto kpos = torch::arange(tk, opts).view({1, tk});
  auto allowed = kpos.le(qpos).view({1, 1, tq, tk});  // [1, 1, Tq, Tk]
  if (!key_mask.defined()) return allowed.expand({batch, 1, tq, tk});
  TORCH_CHECK(key_mask.dim() == 2 && key_mask.size(0) == batch && key_mask.size(1) == tk,
              "causal_mask: key mask must be [", batch, ", ", tk, "], got ", key_mask.sizes());
  auto keys = key_mask.to(device).ne(0).view({batch, 1, 1, tk});
  auto self = kpos.eq(qpos).view({1, 1, tq, tk});
  return allowed.logical_and(keys).logical_or(self);
}

torch::Tensor positions_from_mask(const torch::Tensor& mask) {
  // mask: [B, T] -> [B, T] int64
  TORCH_CHECK(mask.dim() == 2, "positions_from_mask: expected [B, T], got ", mask.sizes());
  auto m = mask.ne(0).to(torch::kLong);
  return (m.cumsum(1) - 1).clamp_min(0).mul(m);
}

std::pair<torch::Tensor, torch::Tensor> rope_cos_sin(const torch::Tensor& positions, int64_t head_dim,
                                                     double theta) {
  // positions: [B, T] -> cos, sin: [B, 1, T, hd]
  TORCH_CHECK(positions.dim() == 2, "rope: positions must be [B, T], got ", positions.sizes());
  TORCH_CHECK(head_dim % 2 == 0, "rope: head_dim must be even, got ", head_dim);
  auto fopts = torch::TensorOptions().dtype(torch::kFloat64).device(positions.device());
  auto inv_freq = torch::pow(theta, torch::arange(0, head_dim, 2, fopts).div(static_cast<double>(head_dim))).reciprocal();
  auto freqs = positions.to(torch::kFloat64).unsqueeze(-1) * inv_freq;  // [B, T, hd/2]
  auto emb = torch::cat({freqs, freqs}, -1).unsqueeze(1);               // [B, 1, T, hd]
  return {emb.cos().to(torch::kFloat32), emb.sin().to(torch::kFloat32)};
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  auto half = x.size(-1) / 2;
  return torch::cat({x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)}, -1);
}

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  // x: [B, H, T, hd] -> [B, H, T, hd]
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && x.size(2) == cos.size(2) && x.size(3) == cos.size(3),
              "rope: x ", x.sizes(), " and cos ", cos.sizes(), " disagree");
  auto xf = x.to(torch::kFloat32);
  return (xf * cos + rotate_half(xf) * sin).to(x.scalar_type());
}

// ---- LLaMA ------------------------------------------------------------------------------------------------

namespace {
// The fields model.llm (LlmConfig) and the module's LlamaOptions share, by the same names: one list, copied
// either way.
template <class To, class From>
void copy_llama_fields(To& to, const From& from) {
  to.vocab_size = from.vocab_size;
  to.hidden_size = from.hidden_size;
  to.num_layers = from.num_layers;
  to.num_heads = from.num_heads;
  to.num_kv_heads = from.num_kv_heads;
  to.intermediate_size = from.intermediate_size;
  to.max_position_embeddings = from.max_position_embeddings;
  to.rope_theta = from.rope_theta;
  to.rms_norm_eps = from.rms_norm_eps;
  to.tie_word_embeddings = from.tie_word_embeddings;
}
}  // namespace

LlmConfig llm_config_of(const LlamaOptions& o) {
  LlmConfig l;
  copy_llama_fields(l, o);
  return l;
}

LlamaOptions llama_options(const LlmConfig& c) {
  LlamaOptions o;
  copy_llama_fields(o, c);
  if (o.num_heads <= 0 || o.hidden_size % o.num_heads != 0 || o.head_dim() % 2 != 0)
    throw ConfigError("[llama] model.llm.hidden_size (" + std::to_string(o.hidden_size) +
                      ") must be a multiple of model.llm.num_heads (" + std::to_string(o.num_heads) +
                      ") with an even head dimension");
  if (o.num_kv_heads <= 0 || o.num_heads % o.num_kv_heads != 0)
    throw ConfigError("[llama] model.llm.num_kv_heads (" + std::to_string(o.num_kv_heads) +
                      ") must divide model.llm.num_heads (" + std::to_string(o.num_heads) + ")");
  return o;
}

KVCache make_kv_cache(const LlamaOptions& o, int64_t batch, int64_t capacity, torch::ScalarType dtype,
                      torch::Device device) {
  KVCache c;
  auto opts = torch::TensorOptions().dtype(dtype).device(device);
  for (int64_t l = 0; l < o.num_layers; ++l) {
    c.k.push_back(torch::zeros({batch, o.num_kv_heads, capacity, o.head_dim()}, opts));
    c.v.push_back(torch::zeros({batch, o.num_kv_heads, capacity, o.head_dim()}, opts));
  }
  return c;
}

LlamaAttentionImpl::LlamaAttentionImpl(const LlamaOptions& o) : options(o) {
  int64_t d = o.hidden_size, hd = o.head_dim();
  q_proj = register_module("q_proj", Linear(LinearOptions{d, o.num_heads * hd, false}));
  k_proj = register_module("k_proj", Linear(LinearOptions{d, o.num_kv_heads * hd, false}));
  v_proj = register_module("v_proj", Linear(LinearOptions{d, o.num_kv_heads * hd, false}));
  o_proj = register_module("o_proj", Linear(LinearOptions{o.num_heads * hd, d, false}));
}

torch::Tensor LlamaAttentionImpl::forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                          const torch::Tensor& mask, KVCache* cache, int64_t layer) {
  // x: [B, T, D] -> [B, T, D]
  TORCH_CHECK(x.dim() == 3 && x.size(2) == options.hidden_size, "LlamaAttention: expected [B, T, ",
              options.hidden_size, "], got ", x.sizes());
  int64_t b = x.size(0), t = x.size(1), hd = options.head_dim();
  auto q = q_proj(x).view({b, t, options.num_heads, hd}).transpose(1, 2);
  auto k = k_proj(x).view({b, t, options.num_kv_heads, hd}).transpose(1, 2);
  auto v = v_proj(x).view({b, t, options.num_kv_heads, hd}).transpose(1, 2);
  q = apply_rope(q, cos, sin);
  k = apply_rope(k, cos, sin);
  if (cache) {
    int64_t start = cache->length;
    TORCH_CHECK(start + t <= cache->capacity(), "KVCache: ", start, " + ", t, " tokens exceed capacity ",
                cache->capacity());
    cache->k[layer].narrow(2, start, t).copy_(k);
    cache->v[layer].narrow(2, start, t).copy_(v);
    k = cache->k[layer].narrow(2, 0, start + t);
    v = cache->v[layer].narrow(2, 0, start + t);
  }
  int64_t rep = options.num_heads / options.num_kv_heads;
  if (rep > 1) {  // grouped-query attention: each kv head serves `rep` consecutive query heads
    k = k.repeat_interleave(rep, 1);
    v = v.repeat_interleave(rep, 1);
  }
  auto y = attention(q, k, v, mask);  // [B, H, T, hd]
  return o_proj(y.transpose(1, 2).reshape({b, t, options.num_heads * hd}));
}

LlamaMlpImpl::LlamaMlpImpl(const LlamaOptions& o) : act(o.hidden_act) {
  check_activation_name(act);
  gate_proj = register_module("gate_proj", Linear(LinearOptions{o.hidden_size, o.intermediate_size, false}));
  up_proj = register_module("up_proj", Linear(LinearOptions{o.hidden_size, o.intermediate_size, false}));
  down_proj = register_module("down_proj", Linear(LinearOptions{o.intermediate_size, o.hidden_size, false}));
}

torch::Tensor LlamaMlpImpl::forward(const torch::Tensor& x) {
  // x: [B, T, D] -> [B, T, D]
  TORCH_CHECK(x.dim() >= 2, "LlamaMlp: expected [B, T, D], got ", x.sizes());
  return down_proj(activation(act, gate_proj(x)) * up_proj(x));
}

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const LlamaOptions& o) {
  input_layernorm = register_module("input_layernorm", RMSNorm(o.hidden_size, o.rms_norm_eps));
  self_attn = register_module("self_attn", LlamaAttention(o));
  post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(o.hidden_size, o.rms_norm_eps));
  mlp = register_module("mlp", LlamaMlp(o));
}

torch::Tensor LlamaDecoderLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& cos,
                                             const torch::Tensor& sin, const torch::Tensor& mask, KVCache* cache,
                                             int64_t layer) {
  // x: [B, T, D] -> [B, T, D]
  TORCH_CHECK(x.dim() == 3, "LlamaDecoderLayer: expected [B, T, D], got ", x.sizes());
  auto h = x + self_attn(input_layernorm(x), cos, sin, mask, cache, layer);
  return h + mlp(post_attention_layernorm(h));
}

namespace {

// Recompute-in-backward for one decoder layer. Inputs: x, cos, sin, mask, then the layer's trainable parameters
// (so autograd routes their gradients through this node).
struct CheckpointFunction : torch::autograd::Function<CheckpointFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& mask,
                               torch::TensorList params, LlamaDecoderLayerImpl* layer) {
    at::Generator gen = at::globalContext().defaultGenerator(x.device());  // a handle sharing the state
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      ctx->saved_data["rng"] = gen.get_state();
    }
    // The recompute in backward runs outside the caller's autocast scope: it must cast as the forward did.
    const AutocastState ac = autocast_state(x.device().type());
    ctx->saved_data["autocast"] = ac.enabled;
    ctx->saved_data["autocast_dtype"] = static_cast<int64_t>(ac.dtype);
    ctx->saved_data["layer"] = reinterpret_cast<int64_t>(layer);
    ctx->saved_data["n_params"] = static_cast<int64_t>(params.size());
    std::vector<torch::Tensor> saved{x, cos, sin, mask};
    saved.insert(saved.end(), params.begin(), params.end());
    ctx->save_for_backward(saved);
    return layer->forward(x, cos, sin, mask);  // runs with grad mode off: nothing is kept
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    auto* layer = reinterpret_cast<LlamaDecoderLayerImpl*>(ctx->saved_data["layer"].toInt());
    int64_t n_params = ctx->saved_data["n_params"].toInt();
    auto x = saved[0].detach().requires_grad_(true);
    std::vector<torch::Tensor> inputs{x};
    for (int64_t i = 0; i < n_params; ++i) inputs.push_back(saved[4 + i]);

    at::Generator gen = at::globalContext().defaultGenerator(x.device());  // a handle sharing the state
    torch::Tensor rng_now;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      rng_now = gen.get_state();
      gen.set_state(ctx->saved_data["rng"].toTensor());  // same dropout masks as the forward
    }
    torch::Tensor y;
    {
      torch::AutoGradMode enable(true);
      AutocastState ac;
      ac.enabled = ctx->saved_data["autocast"].toBool();
      ac.dtype = static_cast<torch::ScalarType>(ctx->saved_data["autocast_dtype"].toInt());
      AutocastScope scope(x.device().type(), ac);
      y = layer->forward(x, saved[1], saved[2], saved[3]);
    }
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(rng_now);
    }
    auto grads = torch::autograd::grad({y}, inputs, {grad_out[0]}, /*retain_graph=*/false,
                                       /*create_graph=*/false, /*allow_unused=*/true);
    torch::autograd::variable_list out{grads[0], torch::Tensor(), torch::Tensor(), torch::Tensor()};
    for (int64_t i = 0; i < n_params; ++i) out.push_back(grads[1 + i]);
    out.push_back(torch::Tensor());  // the layer pointer
    return out;
  }
};

}  // namespace

torch::Tensor checkpointed_layer(LlamaDecoderLayerImpl& layer, const torch::Tensor& x, const torch::Tensor& cos,
                                 const torch::Tensor& sin, const torch::Tensor& mask) {
  // x: [B, T, D] -> [B, T, D]
  TORCH_CHECK(x.dim() == 3, "checkpointed_layer: expected [B, T, D], got ", x.sizes());
  std::vector<torch::Tensor> params;
  for (auto& p : layer.parameters())
    if (p.requires_grad()) params.push_back(p);
  return CheckpointFunction::apply(x, cos, sin, mask, torch::TensorList(params), &layer);
}

LlamaModelImpl::LlamaModelImpl(const LlamaOptions& o) : options(o) {
  embed_tokens = register_module("embed_tokens", torch::nn::Embedding(o.vocab_size, o.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.num_layers; ++i) layers->push_back(LlamaDecoderLayer(o));
  norm = register_module("norm", RMSNorm(o.hidden_size, o.rms_norm_eps));
}

torch::Tensor LlamaModelImpl::forward(const torch::Tensor& embeds, const torch::Tensor& attention_mask,
                                      const torch::Tensor& positions, KVCache* cache) {
  // embeds: [B, T, D] -> [B, T, D]
  TORCH_CHECK(embeds.dim() == 3 && embeds.size(2) == options.hidden_size, "LlamaModel: expected [B, T, ",
              options.hidden_size, "], got ", embeds.sizes());
  int64_t b = embeds.size(0), t = embeds.size(1), past = cache ? cache->length : 0;
  auto dev = embeds.device();
  torch::Tensor key_mask = attention_mask;
  if (key_mask.defined())
    TORCH_CHECK(key_mask.dim() == 2 && key_mask.size(0) == b && key_mask.size(1) == past + t,
                "LlamaModel: attention_mask must be [", b, ", ", past + t, "], got ", key_mask.sizes());
  torch::Tensor pos = positions;
  if (!pos.defined()) {
    if (key_mask.defined())
      pos = positions_from_mask(key_mask.to(dev)).narrow(1, past, t);
    else
      pos = torch::arange(past, past + t, torch::TensorOptions().dtype(torch::kLong).device(dev)).expand({b, t});
  }
  auto cs = rope_cos_sin(pos.to(dev), options.head_dim(), options.rope_theta);
  auto mask = causal_mask(key_mask.defined() ? key_mask.to(dev) : key_mask, b, past, t, past + t, dev);
  bool ckpt = grad_checkpointing && !cache && is_training() && torch::GradMode::is_enabled();
  auto h = embeds;
  for (size_t i = 0; i < layers->size(); ++i) {
    auto& layer = *layers->ptr<LlamaDecoderLayerImpl>(i);
    h = ckpt ? checkpointed_layer(layer, h, cs.first, cs.second, mask)
             : layer.forward(h, cs.first, cs.second, mask, cache, static_cast<int64_t>(i));
  }
  if (cache) cache->length += t;
  return norm(h);
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const LlamaOptions& o) : options(o) {
  model = register_module("model", LlamaModel(o));
  if (!o.tie_word_embeddings)
    lm_head = register_module("lm_head", Linear(LinearOptions{o.hidden_size, o.vocab_size, false}));
}

torch::Tensor LlamaForCausalLMImpl::embed(const torch::Tensor& ids) {
  // ids: [B, T] -> [B, T, D]
  TORCH_CHECK(ids.dim() == 2, "LlamaForCausalLM: ids must be [B, T], got ", ids.sizes());
  return model->embed_tokens(ids);
}

torch::Tensor LlamaForCausalLMImpl::logits(const torch::Tensor& hidden) {
  // hidden: [..., D] -> [..., V]
  TORCH_CHECK(hidden.size(-1) == options.hidden_size, "LlamaForCausalLM: expected width ", options.hidden_size,
              ", got ", hidden.sizes());
  return lm_head ? lm_head(hidden) : torch::nn::functional::linear(hidden, model->embed_tokens->weight);
}

torch::Tensor LlamaForCausalLMImpl::forward(const torch::Tensor& ids, const torch::Tensor& mask) {
  // ids: [B, T], mask: [B, T] -> [B, T, V]
  return logits(model->forward(embed(ids), mask));
}

}  // namespace emt
