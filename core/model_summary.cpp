// Analytic parameter counts and training-memory estimates (no tensors allocated), and the text of
// `emt model summary`.
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/core/model_summary.h>
#include "core/text.h"

#include <fmt/format.h>

#include <regex>

namespace emt {

namespace {

int64_t linear_params(int64_t in, int64_t out, bool bias) { return in * out + (bias ? out : 0); }

struct NamedLinear {
  std::string path;
  int64_t in, out;
};

// Every decoder Linear of the language model, by module path (lm_head excluded, as PEFT's all-linear does).
std::vector<NamedLinear> llm_linears(const LlmConfig& l) {
  int64_t d = l.hidden_size, hd = l.hidden_size / std::max(1, l.num_heads), i = l.intermediate_size;
  std::vector<NamedLinear> out;
  for (int k = 0; k < l.num_layers; ++k) {
    auto p = "language_model.model.layers." + std::to_string(k) + ".";
    out.push_back({p + "self_attn.q_proj", d, l.num_heads * hd});
    out.push_back({p + "self_attn.k_proj", d, l.num_kv_heads * hd});
    out.push_back({p + "self_attn.v_proj", d, l.num_kv_heads * hd});
    out.push_back({p + "self_attn.o_proj", l.num_heads * hd, d});
    out.push_back({p + "mlp.gate_proj", d, i});
    out.push_back({p + "mlp.up_proj", d, i});
    out.push_back({p + "mlp.down_proj", i, d});
  }
  return out;
}


bool lora_targets(const LoraConfig& c, const std::string& path) {
  for (auto& e : c.exclude)
    if (!e.empty() && path.find(e) != std::string::npos) return false;
  if (!c.target_regex.empty()) return std::regex_match(path, std::regex(c.target_regex));
  for (auto& t : c.target_modules)
    if (t == "all-linear" || detail::ends_with_component(path, t)) return true;
  return false;
}

int64_t lora_rank(const LoraConfig& c, const std::string& path) {
  for (auto& [pattern, r] : c.rank_pattern)
    if (std::regex_match(path, std::regex("(.*\\.)?" + pattern))) return r;
  return c.r;
}

int64_t lora_params(const ModelSection& m, const LoraConfig& c) {
  int64_t n = 0;
  for (auto& l : llm_linears(m.llm))
    if (lora_targets(c, l.path)) n += lora_rank(c, l.path) * (l.in + l.out);
  return n;
}

double dtype_bytes(const std::string& dtype) {
  if (dtype == "f32" || dtype == "float32") return 4;
  if (dtype == "bf16" || dtype == "bfloat16" || dtype == "f16" || dtype == "float16") return 2;
  throw ConfigError("[model] unknown dtype '" + dtype + "' (expected f32, bf16 or f16)");
}

std::string grouped(int64_t n) {
  auto s = std::to_string(n < 0 ? -n : n);
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (i && (s.size() - i) % 3 == 0) out += ',';
    out += s[i];
  }
  return n < 0 ? "-" + out : out;
}

std::string gib(double bytes) { return fmt::format("{:.2f} GiB", bytes / (1024.0 * 1024.0 * 1024.0)); }

}  // namespace

ParamCounts count_params(const ModelSection& m) {
  ParamCounts c;
  const auto& v = m.vision;
  int64_t dv = v.hidden_size, grid = v.patch_size > 0 ? v.image_size / v.patch_size : 0;
  int64_t ln_v = 2 * dv;
  c.vision_per_layer = 2 * ln_v + 4 * linear_params(dv, dv, true) + linear_params(dv, v.intermediate_size, true) +
                       linear_params(v.intermediate_size, dv, true);
  int64_t vision_embed = int64_t(v.num_channels) * v.patch_size * v.patch_size * dv + dv + (grid * grid + 1) * dv;
  c.vision_tower = vision_embed + ln_v /*pre_layrnorm*/ + v.num_layers * c.vision_per_layer + ln_v /*post_layernorm*/;

  int64_t dl = m.llm.hidden_size;
  c.projector = linear_params(dv, dl, true) + (m.projector == "mlp2x_gelu" ? linear_params(dl, dl, true) : 0);

  const auto& l = m.llm;
  int64_t hd = l.hidden_size / std::max(1, l.num_heads);
  c.llm_per_layer = 2 * dl + linear_params(dl, l.num_heads * hd, false) +
                    2 * linear_params(dl, l.num_kv_heads * hd, false) + linear_params(l.num_heads * hd, dl, false) +
                    3 * linear_params(dl, l.intermediate_size, false);
  c.llm_embeddings = int64_t(l.vocab_size) * dl * (l.tie_word_embeddings ? 1 : 2);
  c.language_model = c.llm_embeddings + l.num_layers * c.llm_per_layer + dl;
  c.total = c.vision_tower + c.projector + c.language_model;

  const auto& t = m.clip_text;
  int64_t dt = t.hidden_size;
  int64_t text_layer = 4 * dt + 4 * linear_params(dt, dt, true) + linear_params(dt, t.intermediate_size, true) +
                       linear_params(t.intermediate_size, dt, true);
  c.clip_text = int64_t(t.vocab_size) * dt + int64_t(t.max_position_embeddings) * dt + t.num_layers * text_layer +
                2 * dt + (dv + dt) * t.projection_dim + 1;
  return c;
}

const std::vector<std::string>& training_methods() {
  static const std::vector<std::string> m{"linear", "lora", "lora-only", "prompt", "linear+prompt", "full"};
  return m;
}

MemoryEstimate estimate_memory(const ModelSection& m, const FinetuneSection& f, const std::string& method,
                               const std::string& dtype) {
  auto c = count_params(m);
  MemoryEstimate e;
  e.method = method;
  e.dtype = dtype;
  double wb = dtype_bytes(dtype);
  int64_t prompt = int64_t(f.prompt_tuning.num_virtual_tokens) * m.llm.hidden_size;
  int64_t base_trainable = 0;
  if (method == "linear") {
    base_trainable = c.projector;
  } else if (method == "lora") {
    base_trainable = c.projector;
    e.added_params = lora_params(m, f.lora);
  } else if (method == "lora-only") {
    e.added_params = lora_params(m, f.lora);
  } else if (method == "prompt") {
    e.added_params = prompt;
  } else if (method == "linear+prompt") {
    base_trainable = c.projector;
    e.added_params = prompt;
  } else if (method == "full") {
    base_trainable = c.projector + c.language_model;
  } else {
    throw ConfigError("[model] unknown method '" + method +
                      "' (expected linear, lora, lora-only, prompt, linear+prompt or full)");
  }
  e.total_params = c.total + e.added_params;
  e.trainable_params = base_trainable + e.added_params;
  e.weight_bytes = double(c.total - base_trainable) * wb + double(e.trainable_params) * 4.0;
  e.gradient_bytes = double(e.trainable_params) * 4.0;
  e.optimizer_bytes = double(e.trainable_params) * 8.0;
  return e;
}

std::string format_model_summary(const ModelSection& m, const FinetuneSection& f, const std::string& dtype,
                                 const std::vector<std::string>& methods) {
  auto c = count_params(m);
  std::string s;
  s += fmt::format("model: CLIP ViT {}x{} (patch {}, image {}), projector {}, LLaMA {}x{} (heads {}/{}, vocab {})\n",
                   m.vision.num_layers, m.vision.hidden_size, m.vision.patch_size, m.vision.image_size, m.projector,
                   m.llm.num_layers, m.llm.hidden_size, m.llm.num_heads, m.llm.num_kv_heads, m.llm.vocab_size);
  s += fmt::format("{:<24}{:>16}\n", "component", "parameters");
  s += fmt::format("{:<24}{:>16}\n", "vision_tower", grouped(c.vision_tower));
  s += fmt::format("{:<24}{:>16}\n", "multi_modal_projector", grouped(c.projector));
  s += fmt::format("{:<24}{:>16}\n", "language_model", grouped(c.language_model));
  s += fmt::format("{:<24}{:>16}\n", "total", grouped(c.total));
  s += fmt::format("(CLIP text tower for the zero-shot baseline, not in the total: {})\n\n", grouped(c.clip_text));
  s += fmt::format("memory, frozen weights in {}, trainable parameters + gradients + AdamW moments in f32, "
                   "activations excluded (LoRA r={}, prompt tokens {})\n",
                   dtype, f.lora.r, f.prompt_tuning.num_virtual_tokens);
  s += fmt::format("{:<15}{:>16}{:>14}{:>12}{:>12}{:>12}{:>12}\n", "method", "trainable", "% of total", "weights",
                   "gradients", "optimizer", "total");
  for (auto& method : methods) {
    auto e = estimate_memory(m, f, method, dtype);
    s += fmt::format("{:<15}{:>16}{:>13.3f}%{:>12}{:>12}{:>12}{:>12}\n", method, grouped(e.trainable_params),
                     100.0 * double(e.trainable_params) / double(e.total_params), gib(e.weight_bytes),
                     gib(e.gradient_bytes), gib(e.optimizer_bytes), gib(e.total_bytes()));
  }
  return s;
}

}  // namespace emt
