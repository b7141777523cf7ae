// Training policies: named methods -> {vision, projector, llm} modes, applying them, optimizer groups,
// the trainable-tensor set for checkpoints.
#include <emt/adapters/lora.h>
#include <emt/adapters/peft.h>
#include <emt/adapters/policy.h>
#include <emt/core/error.h>
#include <emt/core/llava.h>
#include <emt/core/tokenizer.h>
#include "core/text.h"
#include <torch/torch.h>

#include <set>
#include <sstream>

namespace emt {

const char* const kVisionRoot = "vision_tower";
const char* const kProjectorRoot = "multi_modal_projector";
const char* const kLlmRoot = "language_model";

namespace {


ComponentMode parse_mode(const std::string& s, const std::string& spec) {
  if (s == "frozen") return ComponentMode::Frozen;
  if (s == "lora") return ComponentMode::Lora;
  if (s == "full") return ComponentMode::Full;
  throw ConfigError("[policy] finetune.method '" + spec + "': mode '" + s + "' is not frozen | lora | full");
}

std::string component_of(const std::string& name) {
  if (detail::strictly_under(name, kVisionRoot)) return "vision";
  if (detail::strictly_under(name, kProjectorRoot)) return "projector";
  if (detail::strictly_under(name, kLlmRoot)) return "llm";
  return "other";
}


const char* kPromptName = "prompt_embeddings";

}  // namespace

std::string to_string(ComponentMode m) {
  switch (m) {
    case ComponentMode::Frozen: return "frozen";
    case ComponentMode::Lora: return "lora";
    case ComponentMode::Full: return "full";
  }
  return "?";
}

const std::vector<std::string>& method_names() {
  static const std::vector<std::string> names = {"linear", "lora",     "lora-only", "prompt", "linear+prompt",
                                                 "full",   "lora-attn", "lora-mlp"};
  return names;
}

TrainingPolicy policy_for_method(const std::string& method) {
  using M = ComponentMode;
  TrainingPolicy p;
  p.name = method;
  if (method == "linear") {
    p.projector = M::Full;
  } else if (method == "lora" || method == "lora-attn" || method == "lora-mlp") {
    p.projector = M::Full;
    p.llm = M::Lora;
  } else if (method == "lora-only") {
    p.llm = M::Lora;
  } else if (method == "prompt") {
    p.prompt = true;
  } else if (method == "linear+prompt") {
    p.projector = M::Full;
    p.prompt = true;
  } else if (method == "full") {
    p.projector = M::Full;
    p.llm = M::Full;
  } else if (const auto parts = split_method(method); !parts.mitigation.empty()) {
    p = policy_for_method(parts.base);  // a mitigation trains its base method's components
    if (!split_method(parts.base).mitigation.empty())
      throw ConfigError("[policy] finetune.method '" + method + "': a mitigation runs on a method, not on another mitigation");
    p.name = method;
  } else if (method.find('=') != std::string::npos) {
    p.name = "custom";
    std::set<std::string> seen;
    std::stringstream ss(method);
    std::string item;
    while (std::getline(ss, item, ',')) {
      if (item == "prompt" || item == "prompt=true" || item == "prompt=yes") {
        p.prompt = true;
        continue;
      }
      if (item == "prompt=false" || item == "prompt=no") continue;
      auto eq = item.find('=');
      std::string key = item.substr(0, eq), value = eq == std::string::npos ? "" : item.substr(eq + 1);
      if (!seen.insert(key).second)
        throw ConfigError("[policy] finetune.method '" + method + "': '" + key + "' is given twice");
      if (key == "vision")
        p.vision = parse_mode(value, method);
      else if (key == "projector")
        p.projector = parse_mode(value, method);
      else if (key == "llm")
        p.llm = parse_mode(value, method);
      else
        throw ConfigError("[policy] finetune.method '" + method + "': unknown component '" + key +
                          "' (expected vision, projector, llm, prompt)");
    }
    if (p.vision == M::Frozen && p.projector == M::Frozen && p.llm == M::Frozen && !p.prompt)
      throw ConfigError("[policy] finetune.method '" + method + "' trains nothing");
  } else if (const auto base = registered_method_base(method); !base.empty()) {
    p = policy_for_method(base);  // a method registered by a library user trains its base method's components
    p.name = method;
  } else {
    std::string list;
    for (const auto& n : method_names()) list += (list.empty() ? "" : " | ") + n;
    for (const auto& n : mitigation_names()) list += " | " + n;
    for (const auto& n : extension_names(ExtensionKind::method)) list += " | " + n;
    throw ConfigError("[policy] finetune.method '" + method + "' is not one of " + list +
                      " or an explicit 'vision=MODE,projector=MODE,llm=MODE[,prompt]'");
  }
  return p;
}

std::string describe_policy(const TrainingPolicy& p) {
  return "vision=" + to_string(p.vision) + " projector=" + to_string(p.projector) + " llm=" + to_string(p.llm) +
         " prompt=" + (p.prompt ? "yes" : "no");
}

TrainableSetup apply_training_policy(torch::nn::Module& model, const TrainingPolicy& policy,
                                     const FinetuneSection& ft, const PolicyHooks& hooks) {
  TrainableSetup out;
  out.policy = policy;
  const std::pair<ComponentMode, const char*> comps[] = {
      {policy.vision, kVisionRoot}, {policy.projector, kProjectorRoot}, {policy.llm, kLlmRoot}};
  // ft was validated by the config loader. LoRA targets are resolved (and LoRA's invariants asserted) before
  // anything in the model changes.
  for (const auto& [mode, root] : comps)
    if (mode == ComponentMode::Lora) select_lora_targets(model, ft.lora, {std::string(root) + "."});
  const auto& pt = ft.prompt_tuning;
  torch::Tensor embed;
  if (policy.prompt) {
    if (!hooks.set_prompt_prefix)
      throw ConfigError("[policy] method '" + policy.name + "' uses prompt tuning but the model takes no prompt");
    auto params = model.named_parameters(true);
    const std::string embed_name = std::string(kLlmRoot) + ".model.embed_tokens.weight";
    if (auto* e = params.find(embed_name)) embed = *e;
    if (!embed.defined())
      throw ConfigError("[policy] prompt tuning needs the token embeddings '" + embed_name + "'");
    if (pt.num_virtual_tokens <= 0)
      throw ConfigError("[policy] finetune.prompt_tuning.num_virtual_tokens must be positive (got " +
                        std::to_string(pt.num_virtual_tokens) + ")");
    if (pt.init != "random" && pt.init != "text")
      throw ConfigError("[policy] finetune.prompt_tuning.init must be random or text (got '" + pt.init + "')");
    if (pt.init == "text" && (pt.init_text.empty() || !hooks.tokenizer))
      throw ConfigError("[policy] finetune.prompt_tuning.init = text needs init_text and a tokenizer");
  }
  for (auto& p : model.parameters(true)) p.set_requires_grad(false);
  for (const auto& [mode, root] : comps) {
    if (mode != ComponentMode::Lora) continue;
    auto added = inject_lora(model, ft.lora, {std::string(root) + "."}, /*freeze_base=*/false);
    out.lora_modules.insert(out.lora_modules.end(), added.begin(), added.end());
  }
  for (auto& item : model.named_parameters(true)) {
    const std::string& name = item.key();
    bool lora = is_lora_parameter(name);
    bool train = false;
    for (const auto& [mode, root] : comps) {
      if (!detail::strictly_under(name, root)) continue;
      train = (mode == ComponentMode::Full && !lora) || (mode == ComponentMode::Lora && lora);
    }
    item.value().set_requires_grad(train);
  }
  // Master weights: the frozen weights keep run.dtype, every trained tensor is fp32 (so are its optimizer
  // moments); forward passes cast at the boundaries (emt::Linear, the projector's input, the prompt prefix).
  {
    torch::NoGradGuard ng;
    for (auto& t : model.parameters(true))
      if (t.requires_grad() && t.is_floating_point() && t.scalar_type() != torch::kFloat32)
        t.set_data(t.to(torch::kFloat32));
  }
  if (policy.prompt) {
    std::vector<int64_t> ids;
    // PEFT tokenizes init_text with the model's tokenizer as is (LLaMA's adds BOS).
    if (pt.init == "text") ids = hooks.tokenizer->encode(pt.init_text, /*add_bos=*/true);
    auto prompt = init_prompt_embeddings(pt.num_virtual_tokens, embed, pt.init, ids)
                      .to(embed.device(), torch::kFloat32)
                      .detach();
    prompt.set_requires_grad(true);
    out.prompt_embeddings = prompt;
    hooks.set_prompt_prefix(prompt);
  }

  // Optimizer groups: projector (own lr) and the rest, each split by weight decay.
  double plr = ft.projector_lr > 0.0 ? ft.projector_lr : ft.learning_rate;
  ParamGroup proj{"projector", {}, plr, true}, proj_nd{"projector_no_decay", {}, plr, false};
  ParamGroup dflt{"default", {}, ft.learning_rate, true}, nd{"no_decay", {}, ft.learning_rate, false};
  for (auto& item : model.named_parameters(true)) {
    const auto& t = item.value();
    out.total += t.numel();
    if (!t.requires_grad()) continue;
    out.trainable += t.numel();
    const std::string& name = item.key();
    bool decay = t.dim() >= 2 && !(name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0);
    bool in_proj = detail::strictly_under(name, kProjectorRoot);
    (in_proj ? (decay ? proj : proj_nd) : (decay ? dflt : nd)).params.push_back(t);
  }
  if (out.prompt_embeddings.defined()) {
    nd.params.push_back(out.prompt_embeddings);
    out.total += out.prompt_embeddings.numel();
    out.trainable += out.prompt_embeddings.numel();
  }
  for (auto* g : {&proj, &proj_nd, &dflt, &nd})
    if (!g->params.empty()) out.groups.push_back(std::move(*g));
  if (out.groups.empty())
    throw ConfigError("[policy] method '" + policy.name + "' leaves no trainable parameter in this model");
  return out;
}

LoraConfig lora_for_method(const std::string& method, const LoraConfig& lora) {
  const std::string base = split_method(method).base;
  if (base != "lora-attn" && base != "lora-mlp") return lora;
  LoraConfig out = lora;
  out.target_regex.clear();
  out.target_modules = base == "lora-attn" ? std::vector<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"}
                                           : std::vector<std::string>{"gate_proj", "up_proj"};
  return out;
}

TrainableSetup apply_method(LlavaModelImpl& model, const FinetuneSection& ft_in, const Tokenizer* tokenizer) {
  FinetuneSection ft = ft_in;
  ft.lora = lora_for_method(ft.method, ft.lora);
  PolicyHooks hooks;
  hooks.tokenizer = tokenizer;
  hooks.set_prompt_prefix = [&model](const torch::Tensor& t) { model.set_prompt_prefix(t); };
  auto policy = policy_for_method(ft.method);
  if (!policy.prompt) model.set_prompt_prefix(torch::Tensor());
  return apply_training_policy(model, policy, ft, hooks);
}

NamedTensors trainable_tensors(torch::nn::Module& model, const torch::Tensor& prompt) {
  NamedTensors out;
  for (const auto& item : model.named_parameters(true))
    if (item.value().requires_grad()) out.emplace_back(item.key(), item.value().detach());
  if (prompt.defined()) out.emplace_back(kPromptName, prompt.detach());
  return out;
}

void load_trainable_tensors(torch::nn::Module& model, const NamedTensors& tensors, const torch::Tensor& prompt,
                            const std::string& source) {
  auto params = model.named_parameters(true);
  std::vector<std::string> problems;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> copies;  // (destination, source)
  std::set<std::string> given;
  for (const auto& [name, t] : tensors) {
    given.insert(name);
    torch::Tensor dst;
    if (name == kPromptName) {
      if (!prompt.defined()) {
        problems.push_back("'" + name + "': the model has no prompt embeddings");
        continue;
      }
      dst = prompt;
    } else if (auto* p = params.find(name)) {
      dst = *p;
    } else {
      problems.push_back("'" + name + "' is not a parameter of the model");
      continue;
    }
    if (!dst.sizes().equals(t.sizes())) {
      problems.push_back("'" + name + "' has shape " + detail::shape_str(t.sizes()) + ", the model's is " +
                         detail::shape_str(dst.sizes()));
      continue;
    }
    copies.emplace_back(dst, t);
  }
  for (const auto& item : params)
    if (item.value().requires_grad() && !given.count(item.key()))
      problems.push_back("trainable parameter '" + item.key() + "' is missing");
  if (prompt.defined() && !given.count(kPromptName)) problems.push_back("'prompt_embeddings' is missing");
  if (!problems.empty()) {
    std::string msg = "[policy] " + source + ": trained tensors do not fit the model (" +
                      std::to_string(problems.size()) + " problem" + (problems.size() == 1 ? "" : "s") + "):";
    for (const auto& p : problems) msg += "\n  - " + p;
    throw FormatError(msg);
  }
  torch::NoGradGuard ng;
  for (auto& [dst, src] : copies) dst.copy_(src.to(dst.device(), dst.scalar_type()));
}

std::vector<ComponentCount> count_parameters(torch::nn::Module& model, const torch::Tensor& prompt) {
  std::vector<ComponentCount> rows = {{"vision"}, {"projector"}, {"llm"}, {"other"}, {"lora"}, {"prompt"}};
  auto row = [&](const std::string& c) -> ComponentCount& {
    for (auto& r : rows)
      if (r.component == c) return r;
    return rows[3];
  };
  for (const auto& item : model.named_parameters(true)) {
    const auto& t = item.value();
    auto& r = row(is_lora_parameter(item.key()) ? "lora" : component_of(item.key()));
    r.total += t.numel();
    if (t.requires_grad()) r.trainable += t.numel();
  }
  if (prompt.defined()) {
    rows[5].total += prompt.numel();
    if (prompt.requires_grad()) rows[5].trainable += prompt.numel();
  }
  return rows;
}

}  // namespace emt
