// PEFT adapter directories (LoRA, prompt tuning), LLaVA projector files, llava-hf key-style mapping.
// Field set and key names follow what PEFT (0.17) writes for LlavaForConditionalGeneration; see docs/adapters.md.
#include <emt/adapters/lora.h>
#include <emt/adapters/peft.h>
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include "core/text.h"
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>

namespace emt {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

const char* kPeftPrefix = "base_model.model.";
const char* kConfigName = "adapter_config.json";
const char* kWeightsName = "adapter_model.safetensors";

bool under(const std::string& path, const std::string& root) {
  return path == root || (path.size() > root.size() && path.compare(0, root.size(), root) == 0 &&
                          path[root.size()] == '.');
}


torch::Tensor for_file(const torch::Tensor& t, const std::string& dtype) {
  auto out = t.detach().to(torch::kCPU);
  if (!dtype.empty()) out = out.to(parse_dtype(dtype));
  return out.contiguous();
}

json null_or(const std::string& s) { return s.empty() ? json(nullptr) : json(s); }

// Python writes integral floats like 16.0 as given; PEFT's lora_alpha is an int in practice (LLaVA: 16).
json number(double v) {
  if (std::floor(v) == v && std::fabs(v) < 1e15) return json(static_cast<int64_t>(v));
  return json(v);
}

std::string path_join(const std::string& dir, const std::string& name) { return (fs::path(dir) / name).string(); }

void write_config(const std::string& dir, const json& j) {
  // Same text as Python's json.dumps(indent=2, sort_keys=True): nlohmann objects are key-sorted.
  write_file_atomic(path_join(dir, kConfigName), j.dump(2, ' ', /*ensure_ascii=*/true));
}

[[noreturn]] void throw_problems(const std::string& head, const std::vector<std::string>& problems) {
  std::string msg = head + " (" + std::to_string(problems.size()) + " problem" + (problems.size() == 1 ? "" : "s") +
                    "):";
  for (const auto& p : problems) msg += "\n  - " + p;
  throw FormatError(msg);
}

// PEFT's name-list selection over module paths: equal, or a suffix at a '.' boundary.

std::string regex_escape(const std::string& s) {
  static const std::string special = R"(\^$.|?*+()[]{})";
  std::string out;
  for (char c : s) {
    if (special.find(c) != std::string::npos) out += '\\';
    out += c;
  }
  return out;
}

std::set<std::string> select_by_regex(const std::vector<std::string>& paths, const std::string& pattern) {
  std::set<std::string> out;
  std::regex re(pattern);
  for (const auto& p : paths)
    if (std::regex_match(p, re)) out.insert(p);
  return out;
}

// The target_modules value (list or regex) that makes PEFT pick exactly `adapted` among `all_paths` (both in
// the file's key style), preferring the user's own form. Also returns the exclude list to write.
std::pair<json, json> peft_targets(const LoraConfig& cfg, const std::vector<std::string>& all_paths,
                                   const std::set<std::string>& adapted) {
  const bool all_linear = cfg.target_regex.empty() && cfg.target_modules.size() == 1 &&
                          cfg.target_modules[0] == "all-linear";
  if (cfg.target_regex.empty() && !all_linear) {
    std::set<std::string> picked;
    for (const auto& p : all_paths) {
      bool hit = false;
      for (const auto& n : cfg.target_modules) hit = hit || detail::ends_with_component(p, n);
      for (const auto& n : cfg.exclude) hit = hit && !detail::ends_with_component(p, n);
      if (hit) picked.insert(p);
    }
    if (picked == adapted) {
      std::set<std::string> sorted(cfg.target_modules.begin(), cfg.target_modules.end());
      json ex = cfg.exclude.empty() ? json(nullptr) : json(std::set<std::string>(cfg.exclude.begin(),
                                                                                 cfg.exclude.end()));
      return {json(sorted), ex};
    }
  }
  if (!cfg.target_regex.empty() && select_by_regex(all_paths, cfg.target_regex) == adapted)
    return {json(cfg.target_regex), json(nullptr)};
  // Compact form: .*<root>.*.(leaf names), <root> the llava-hf top module of every adapted layer. The leading
  // ".*" makes it match in both key styles (`language_model.model.*` and `model.language_model.*`), so PEFT
  // selects the same layers on transformers before and after 4.52, whichever style the tensors are named in.
  std::set<std::string> leaves, roots;
  for (const auto& p : adapted) {
    leaves.insert(p.substr(p.rfind('.') + 1));
    std::string old = path_to_old_style(p);
    std::string root = under(old, "language_model")     ? "language_model"
                       : under(old, "vision_tower")      ? "vision_tower"
                       : under(old, "multi_modal_projector") ? "multi_modal_projector"
                                                             : "";
    roots.insert(root);
  }
  if (roots.size() == 1 && !roots.begin()->empty()) {
    std::string alt;
    for (const auto& l : leaves) alt += (alt.empty() ? "" : "|") + regex_escape(l);
    std::string pattern = ".*" + regex_escape(*roots.begin()) + "\\..*\\.(" + alt + ")";
    if (select_by_regex(all_paths, pattern) == adapted) return {json(pattern), json(nullptr)};
  }
  std::string alt;
  for (const auto& p : adapted) alt += (alt.empty() ? "" : "|") + regex_escape(p);
  return {json("(" + alt + ")"), json(nullptr)};
}

std::string get_string(const json& j, const char* key, const std::string& file) {
  if (!j.contains(key) || j[key].is_null()) return "";
  if (!j[key].is_string()) throw FormatError("[peft] " + file + ": field '" + key + "' must be a string (got " +
                                             j[key].dump() + ")");
  return j[key].get<std::string>();
}

template <class T>
T get_number(const json& j, const char* key, T dflt, const std::string& file) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_number()) throw FormatError("[peft] " + file + ": field '" + key + "' must be a number (got " +
                                             j[key].dump() + ")");
  return j[key].get<T>();
}

bool get_bool(const json& j, const char* key, bool dflt, const std::string& file) {
  if (!j.contains(key) || j[key].is_null()) return dflt;
  if (!j[key].is_boolean()) throw FormatError("[peft] " + file + ": field '" + key + "' must be true/false (got " +
                                              j[key].dump() + ")");
  return j[key].get<bool>();
}

// null | "regex" | ["name", ...]
void get_names(const json& j, const char* key, std::vector<std::string>* list, std::string* regex,
               const std::string& file) {
  if (!j.contains(key) || j[key].is_null()) return;
  const auto& v = j[key];
  if (v.is_string() && regex) {
    *regex = v.get<std::string>();
    return;
  }
  if (!v.is_array()) throw FormatError("[peft] " + file + ": field '" + key + "' must be a list of names (got " +
                                       v.dump() + ")");
  for (const auto& e : v) {
    if (!e.is_string()) throw FormatError("[peft] " + file + ": field '" + key + "' has a non-string entry " +
                                          e.dump());
    list->push_back(e.get<std::string>());
  }
}

std::vector<std::string> projector_param_names(torch::nn::Module& projector) {
  std::vector<std::string> out;
  for (const auto& p : projector.named_parameters(true))
    if (!is_lora_parameter(p.key())) out.push_back(p.key());
  return out;
}

// "linear_1.weight" -> name under `naming`.
std::string projector_key(const std::string& param, ProjectorNaming naming, bool has_linear_2) {
  if (naming == ProjectorNaming::Hf) return "multi_modal_projector." + param;
  auto dot = param.find('.');
  std::string child = param.substr(0, dot), rest = param.substr(dot + 1);
  if (!has_linear_2 && child == "linear_1") return "model.mm_projector." + rest;
  if (child == "linear_1") return "model.mm_projector.0." + rest;
  if (child == "linear_2") return "model.mm_projector.2." + rest;
  return "model.mm_projector." + param;
}

}  // namespace

// ---- adapter_config.json ---------------------------------------------------------------------------------------

LoraConfig AdapterFileConfig::to_lora_config() const {
  LoraConfig c;
  c.r = static_cast<int>(r);
  c.alpha = lora_alpha;
  c.dropout = lora_dropout;
  c.use_rslora = use_rslora;
  c.target_modules = target_modules;
  c.target_regex = target_regex;
  c.exclude = exclude_modules;
  c.rank_pattern = rank_pattern;
  c.alpha_pattern = alpha_pattern;
  c.init = init_lora_weights == "gaussian" ? "gaussian" : "kaiming";
  return c;
}

AdapterFileConfig read_adapter_config(const std::string& dir) {
  std::string file = path_join(dir, kConfigName);
  if (!fs::exists(file)) throw IoError("[peft] " + file + ": not found (is '" + dir + "' an adapter directory?)");
  AdapterFileConfig c;
  c.json = read_file(file);
  json j;
  try {
    j = json::parse(c.json);
  } catch (const json::parse_error& e) {
    throw FormatError("[peft] " + file + ": invalid JSON: " + e.what());
  }
  if (!j.is_object()) throw FormatError("[peft] " + file + ": expected a JSON object");
  c.peft_type = get_string(j, "peft_type", file);
  if (c.peft_type.empty()) throw FormatError("[peft] " + file + ": field 'peft_type' is missing");
  c.task_type = get_string(j, "task_type", file);
  c.base_model_name_or_path = get_string(j, "base_model_name_or_path", file);
  if (c.peft_type == "LORA") {
    c.r = get_number<int64_t>(j, "r", 8, file);
    c.lora_alpha = get_number<double>(j, "lora_alpha", 8.0, file);
    c.lora_dropout = get_number<double>(j, "lora_dropout", 0.0, file);
    c.use_rslora = get_bool(j, "use_rslora", false, file);
    c.bias = get_string(j, "bias", file);
    if (c.bias.empty()) c.bias = "none";
    get_names(j, "target_modules", &c.target_modules, &c.target_regex, file);
    std::string exclude_regex;
    get_names(j, "exclude_modules", &c.exclude_modules, &exclude_regex, file);
    get_names(j, "modules_to_save", &c.modules_to_save, nullptr, file);
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
      if (!j.contains(key) || j[key].is_null()) continue;
      if (!j[key].is_object()) throw FormatError("[peft] " + file + ": field '" + key + "' must be an object");
      for (const auto& [k, v] : j[key].items()) {
        if (!v.is_number())
          throw FormatError("[peft] " + file + ": " + key + "['" + k + "'] must be a number (got " + v.dump() + ")");
        if (std::string(key) == "rank_pattern")
          c.rank_pattern[k] = v.get<int64_t>();
        else
          c.alpha_pattern[k] = v.get<double>();
      }
    }
    if (j.contains("init_lora_weights") && !j["init_lora_weights"].is_null())
      c.init_lora_weights = j["init_lora_weights"].is_string() ? j["init_lora_weights"].get<std::string>()
                                                               : j["init_lora_weights"].dump();
    if (c.r <= 0) throw FormatError("[peft] " + file + ": field 'r' must be positive (got " + std::to_string(c.r) + ")");
    if (get_bool(j, "use_dora", false, file))
      throw FormatError("[peft] " + file + ": use_dora is true; DoRA adapters are not supported");
  } else if (c.peft_type == "PROMPT_TUNING") {
    c.num_virtual_tokens = get_number<int64_t>(j, "num_virtual_tokens", 0, file);
    c.token_dim = get_number<int64_t>(j, "token_dim", 0, file);
    c.num_transformer_submodules = get_number<int64_t>(j, "num_transformer_submodules", 1, file);
    c.num_attention_heads = get_number<int64_t>(j, "num_attention_heads", 0, file);
    c.num_layers = get_number<int64_t>(j, "num_layers", 0, file);
    c.prompt_tuning_init = get_string(j, "prompt_tuning_init", file);
    c.prompt_tuning_init_text = get_string(j, "prompt_tuning_init_text", file);
    c.tokenizer_name_or_path = get_string(j, "tokenizer_name_or_path", file);
    get_names(j, "modules_to_save", &c.modules_to_save, nullptr, file);
  }
  return c;
}

// ---- LoRA ------------------------------------------------------------------------------------------------------

namespace {

// The LoRA deltas as PEFT names them, checked against what PEFT will recompute from the config: rank and scale
// from the styled path. Fills `adapted` with the styled layer paths.
NamedTensors lora_delta_tensors(const std::vector<std::pair<std::string, LinearImpl*>>& layers, const LoraConfig& cfg,
                                KeyStyle style, const std::string& dtype, std::set<std::string>& adapted) {
  std::vector<std::string> problems;
  NamedTensors tensors;
  for (const auto& [path, lin] : layers) {
    std::string styled = path_to_style(path, style);
    adapted.insert(styled);
    int64_t r = lin->lora_rank();
    int64_t want_r = lora_rank_for(cfg, styled);
    double want_scale = lora_scale(r, lora_alpha_for(cfg, styled), cfg.use_rslora);
    if (want_r != r || lora_rank_for(cfg, path) != r)
      problems.push_back("layer '" + path + "' has rank " + std::to_string(r) + " but the LoRA settings give " +
                         std::to_string(want_r) + " for '" + styled + "'");
    else if (std::fabs(want_scale - lin->lora_scale()) > 1e-12 * std::max(1.0, std::fabs(want_scale)))
      problems.push_back("layer '" + path + "' has scale " + std::to_string(lin->lora_scale()) +
                         " but the LoRA settings give " + std::to_string(want_scale) + " for '" + styled + "'");
    tensors.emplace_back(kPeftPrefix + styled + ".lora_A.weight", for_file(lin->lora_A->weight, dtype));
    tensors.emplace_back(kPeftPrefix + styled + ".lora_B.weight", for_file(lin->lora_B->weight, dtype));
  }
  if (!problems.empty()) {
    std::string msg = "[peft] save_lora_adapter: the LoRA settings do not describe the model's deltas:";
    for (const auto& p : problems) msg += "\n  - " + p;
    throw ConfigError(msg);
  }
  return tensors;
}

// modules_to_save: their whole tensors appended to `tensors` (and the projector file written when asked) -> the
// config's modules_to_save value.
json modules_to_save_tensors(torch::nn::Module& model, const std::string& dir, const LoraSaveOptions& opts,
                             KeyStyle style, NamedTensors& tensors) {
  std::map<std::string, std::shared_ptr<torch::nn::Module>> modules;
  for (const auto& m : model.named_modules("", true)) modules[m.key()] = m.value();
  json modules_to_save = nullptr;
  for (const auto& m : opts.modules_to_save) {
    auto it = modules.find(m);
    if (it == modules.end()) throw ConfigError("[peft] save_lora_adapter: modules_to_save '" + m + "' is not a module");
    if (modules_to_save.is_null()) modules_to_save = json::array();
    // PEFT matches modules_to_save as a suffix of module paths: an old-style vision_tower.* or
    // multi_modal_projector.* path is a suffix of its new-style one, so it selects the module in both trees.
    modules_to_save.push_back(under(m, "language_model") ? path_to_style(m, style) : m);
    for (const auto& p : it->second->named_parameters(true)) {
      if (is_lora_parameter(p.key())) continue;
      tensors.emplace_back(kPeftPrefix + path_to_style(m + "." + p.key(), style), for_file(p.value(), opts.dtype));
    }
    if (m == "multi_modal_projector" && !opts.projector_file.empty()) {
      fs::create_directories(dir);
      save_projector_file(*it->second, path_join(dir, opts.projector_file), ProjectorNaming::Llava, opts.dtype);
    }
  }
  return modules_to_save;
}

// adapter_config.json with every field PEFT 0.17 writes for LoRA.
json lora_adapter_config(const LoraConfig& cfg, const LoraSaveOptions& opts, const json& modules_to_save,
                         const json& targets, const json& exclude) {
  json j = {
      {"alpha_pattern", json::object()},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", null_or(opts.base_model_name_or_path)},
      {"bias", "none"},
      {"corda_config", nullptr},
      {"eva_config", nullptr},
      {"exclude_modules", exclude},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", cfg.init == "gaussian" ? json("gaussian") : json(true)},
      {"layer_replication", nullptr},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"loftq_config", json::object()},
      {"lora_alpha", number(cfg.alpha)},
      {"lora_bias", false},
      {"lora_dropout", cfg.dropout},
      {"megatron_config", nullptr},
      {"megatron_core", "megatron.core"},
      {"modules_to_save", modules_to_save},
      {"peft_type", "LORA"},
      {"qalora_group_size", 16},
      {"r", cfg.r},
      {"rank_pattern", json::object()},
      {"revision", nullptr},
      {"target_modules", targets},
      {"target_parameters", nullptr},
      {"task_type", "CAUSAL_LM"},
      {"trainable_token_indices", nullptr},
      {"use_dora", false},
      {"use_qalora", false},
      {"use_rslora", cfg.use_rslora},
  };
  for (const auto& kv : cfg.rank_pattern) j["rank_pattern"][kv.first] = kv.second;
  for (const auto& kv : cfg.alpha_pattern) j["alpha_pattern"][kv.first] = number(kv.second);
  return j;
}

}  // namespace

void save_lora_adapter(torch::nn::Module& model, const LoraConfig& cfg, const std::string& dir,
                       const LoraSaveOptions& opts) {
  KeyStyle style = parse_key_style(opts.key_style);
  if (!opts.dtype.empty()) parse_dtype(opts.dtype);
  auto layers = lora_layers(model);
  if (layers.empty()) throw ConfigError("[peft] save_lora_adapter: the model has no LoRA layers to save");
  std::set<std::string> adapted;
  NamedTensors tensors = lora_delta_tensors(layers, cfg, style, opts.dtype, adapted);
  const json modules_to_save = modules_to_save_tensors(model, dir, opts, style, tensors);
  std::vector<std::string> all_paths;
  for (auto& p : linear_layers(model)) all_paths.push_back(path_to_style(p.first, style));
  auto [targets, exclude] = peft_targets(cfg, all_paths, adapted);
  const json j = lora_adapter_config(cfg, opts, modules_to_save, targets, exclude);
  fs::create_directories(dir);
  save_safetensors(path_join(dir, kWeightsName), tensors, {{"format", "pt"}});
  write_config(dir, j);
}

namespace {

// An adapter_model.safetensors sorted by role: LoRA A/B pairs per module, whole tensors (modules_to_save).
struct AdapterFileIndex {
  struct Pair {
    std::string key_a, key_b;
  };
  std::map<std::string, Pair> pairs;                      // file module path -> keys
  std::vector<std::pair<std::string, std::string>> full;  // (file key, file param path)
  std::vector<std::string> file_paths;                    // every path after PEFT's prefix
};

AdapterFileIndex index_adapter_file(const SafetensorsReader& reader, std::vector<std::string>& problems) {
  AdapterFileIndex ix;
  for (const auto& key : reader.names()) {
    if (key.rfind(kPeftPrefix, 0) != 0) {
      problems.push_back("tensor '" + key + "' does not start with '" + kPeftPrefix + "'");
      continue;
    }
    std::string rest = key.substr(std::string(kPeftPrefix).size());
    ix.file_paths.push_back(rest);
    auto ends = [&](const std::string& s) {
      return rest.size() > s.size() && rest.compare(rest.size() - s.size(), s.size(), s) == 0;
    };
    if (ends(".lora_A.weight")) {
      ix.pairs[rest.substr(0, rest.size() - 14)].key_a = key;
    } else if (ends(".lora_B.weight")) {
      ix.pairs[rest.substr(0, rest.size() - 14)].key_b = key;
    } else if (is_lora_parameter(rest)) {
      problems.push_back("tensor '" + key + "' is a LoRA variant emt does not support");
    } else {
      ix.full.emplace_back(key, rest);
    }
  }
  return ix;
}

// One LoRA module to attach: its layer, its tensors, rank and scale.
struct LoraAttach {
  LinearImpl* lin;
  std::string path, key_a, key_b;
  int64_t r;
  double scale;
};

// The module `fpath` of the file checked against the model and the config; nullopt (with the reason added to
// `problems`) when it does not fit.
std::optional<LoraAttach> plan_lora_module(const std::string& fpath, const AdapterFileIndex::Pair& pr,
                                           const std::map<std::string, LinearImpl*>& linears,
                                           const std::set<std::string>& module_paths, const SafetensorsReader& reader,
                                           const LoraConfig& lcfg, std::vector<std::string>& problems) {
  const std::string path = path_to_old_style(fpath);
  if (pr.key_a.empty() || pr.key_b.empty()) {
    problems.push_back("module '" + fpath + "' has " + (pr.key_a.empty() ? "lora_B" : "lora_A") + " but no " +
                       (pr.key_a.empty() ? "lora_A" : "lora_B"));
    return std::nullopt;
  }
  auto it = linears.find(path);
  if (it == linears.end()) {
    problems.push_back(module_paths.count(path) ? "module '" + fpath + "' is not a Linear layer in the model"
                                                : "module '" + fpath + "' does not exist in the model");
    return std::nullopt;
  }
  LinearImpl* lin = it->second;
  const auto& ia = reader.info(pr.key_a);
  const auto& ib = reader.info(pr.key_b);
  if (ia.shape.size() != 2 || ib.shape.size() != 2) {
    problems.push_back("module '" + fpath + "': lora_A/lora_B must be 2-D (got " + detail::shape_str(ia.shape) + " and " +
                       detail::shape_str(ib.shape) + ")");
    return std::nullopt;
  }
  const int64_t r = ia.shape[0];
  bool ok = true;
  if (ia.shape[1] != lin->options.in) {
    problems.push_back("tensor '" + pr.key_a + "' has shape " + detail::shape_str(ia.shape) + ", the layer needs [" +
                       std::to_string(r) + ", " + std::to_string(lin->options.in) + "]");
    ok = false;
  }
  if (ib.shape[0] != lin->options.out || ib.shape[1] != r) {
    problems.push_back("tensor '" + pr.key_b + "' has shape " + detail::shape_str(ib.shape) + ", the layer needs [" +
                       std::to_string(lin->options.out) + ", " + std::to_string(r) + "]");
    ok = false;
  }
  const int64_t want_r = lora_rank_for(lcfg, fpath);
  if (ok && want_r != r) {
    problems.push_back("module '" + fpath + "' has rank " + std::to_string(r) + " in the file but " +
                       std::string(kConfigName) + " gives r = " + std::to_string(want_r));
    ok = false;
  }
  if (!ok) return std::nullopt;
  return LoraAttach{lin, path, pr.key_a, pr.key_b, r, lora_scale(r, lora_alpha_for(lcfg, fpath), lcfg.use_rslora)};
}

// Writes the checked plan into the model: LoRA deltas attached (base weights frozen), whole tensors copied.
void apply_adapter(const std::vector<LoraAttach>& plan,
                   const std::vector<std::pair<torch::Tensor, std::string>>& full_plan, const SafetensorsReader& reader,
                   double dropout, bool trainable, LoadedAdapter& out) {
  torch::NoGradGuard ng;
  for (const auto& s : plan) {
    if (s.lin->merged()) s.lin->unmerge();
    s.lin->attach_low_rank(s.r, s.scale, dropout);
    s.lin->set_runtime_scale(1.0);
    auto& a = s.lin->lora_A->weight;
    auto& b = s.lin->lora_B->weight;
    a.copy_(reader.load(s.key_a).to(a.scalar_type()));
    b.copy_(reader.load(s.key_b).to(b.scalar_type()));
    a.set_requires_grad(trainable);
    b.set_requires_grad(trainable);
    s.lin->weight.set_requires_grad(false);
    if (s.lin->bias.defined()) s.lin->bias.set_requires_grad(false);
    out.lora_modules.push_back(s.path);
  }
  for (const auto& [t, key] : full_plan) {
    auto target = t;
    target.copy_(reader.load(key).to(target.scalar_type()));
  }
}

}  // namespace

LoadedAdapter load_lora_adapter(torch::nn::Module& model, const std::string& dir, bool trainable) {
  LoadedAdapter out;
  out.config = read_adapter_config(dir);
  std::string cfg_file = path_join(dir, kConfigName);
  std::string file = path_join(dir, kWeightsName);
  if (out.config.peft_type != "LORA")
    throw FormatError("[peft] " + cfg_file + ": peft_type is '" + out.config.peft_type + "', expected 'LORA'");
  if (out.config.bias != "none")
    throw FormatError("[peft] " + cfg_file + ": bias '" + out.config.bias + "' is not supported (only 'none')");
  if (!fs::exists(file)) throw IoError("[peft] " + file + ": not found");
  LoraConfig lcfg = out.config.to_lora_config();
  SafetensorsReader reader(file);

  std::vector<std::string> problems;
  const AdapterFileIndex ix = index_adapter_file(reader, problems);
  out.key_style = detect_key_style(ix.file_paths, file).value_or(KeyStyle::Old);

  // Everything is checked against the model first; nothing is changed unless the whole adapter fits.
  std::map<std::string, LinearImpl*> linears;
  for (auto& p : linear_layers(model)) linears[p.first] = p.second;
  std::set<std::string> module_paths;
  for (const auto& m : model.named_modules("", true)) module_paths.insert(m.key());
  std::vector<LoraAttach> plan;
  for (const auto& [fpath, pr] : ix.pairs)
    if (auto a = plan_lora_module(fpath, pr, linears, module_paths, reader, lcfg, problems)) plan.push_back(*a);
  auto params = model.named_parameters(true);
  std::vector<std::pair<torch::Tensor, std::string>> full_plan;
  for (const auto& [key, fpath] : ix.full) {
    std::string name = path_to_old_style(fpath);
    auto* p = params.find(name);
    if (!p) {
      problems.push_back("tensor '" + key + "': parameter '" + name + "' does not exist in the model");
      continue;
    }
    const auto& info = reader.info(key);
    if (!at::IntArrayRef(info.shape).equals(p->sizes())) {
      problems.push_back("tensor '" + key + "' has shape " + detail::shape_str(info.shape) + ", the model's '" + name +
                         "' is " + detail::shape_str(p->sizes()));
      continue;
    }
    full_plan.emplace_back(*p, key);
    out.full_params.push_back(name);
  }
  if (ix.pairs.empty() && problems.empty()) problems.push_back("the file holds no lora_A/lora_B tensors");
  if (!problems.empty()) throw_problems("[peft] " + file + ": adapter does not fit the model", problems);
  apply_adapter(plan, full_plan, reader, lcfg.dropout, trainable, out);
  return out;
}

// ---- prompt tuning ---------------------------------------------------------------------------------------------

void save_prompt_adapter(const std::string& dir, const torch::Tensor& embeddings, const PromptAdapterMeta& meta,
                         const std::string& dtype) {
  if (!embeddings.defined() || embeddings.dim() != 2 || embeddings.size(0) == 0)
    throw ConfigError("[peft] save_prompt_adapter: embeddings must be [K, D] with K > 0 (got " +
                      (embeddings.defined() ? detail::shape_str(embeddings.sizes()) : std::string("undefined")) + ")");
  if (meta.init != "random" && meta.init != "text")
    throw ConfigError("[peft] save_prompt_adapter: init must be random or text (got '" + meta.init + "')");
  json j = {
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", null_or(meta.base_model_name_or_path)},
      {"inference_mode", true},
      {"modules_to_save", nullptr},
      {"num_attention_heads", meta.num_attention_heads > 0 ? json(meta.num_attention_heads) : json(nullptr)},
      {"num_layers", meta.num_layers > 0 ? json(meta.num_layers) : json(nullptr)},
      {"num_transformer_submodules", 1},
      {"num_virtual_tokens", embeddings.size(0)},
      {"peft_type", "PROMPT_TUNING"},
      {"prompt_tuning_init", meta.init == "text" ? "TEXT" : "RANDOM"},
      {"prompt_tuning_init_text", meta.init == "text" ? json(meta.init_text) : json(nullptr)},
      {"revision", nullptr},
      {"task_type", "CAUSAL_LM"},
      {"token_dim", embeddings.size(1)},
      {"tokenizer_kwargs", nullptr},
      {"tokenizer_name_or_path", null_or(meta.tokenizer_name_or_path)},
  };
  fs::create_directories(dir);
  save_safetensors(path_join(dir, kWeightsName), {{"prompt_embeddings", for_file(embeddings, dtype)}},
                   {{"format", "pt"}});
  write_config(dir, j);
}

torch::Tensor load_prompt_adapter(const std::string& dir, int64_t expected_token_dim, AdapterFileConfig* config) {
  auto cfg = read_adapter_config(dir);
  std::string cfg_file = path_join(dir, kConfigName);
  std::string file = path_join(dir, kWeightsName);
  if (cfg.peft_type != "PROMPT_TUNING")
    throw FormatError("[peft] " + cfg_file + ": peft_type is '" + cfg.peft_type + "', expected 'PROMPT_TUNING'");
  SafetensorsReader reader(file);
  std::vector<std::string> problems;
  if (!reader.contains("prompt_embeddings")) {
    problems.push_back("tensor 'prompt_embeddings' is missing");
  } else {
    const auto& s = reader.info("prompt_embeddings").shape;
    if (s.size() != 2) {
      problems.push_back("tensor 'prompt_embeddings' must be 2-D, got " + detail::shape_str(s));
    } else {
      int64_t k = cfg.num_virtual_tokens * std::max<int64_t>(1, cfg.num_transformer_submodules);
      if (cfg.num_virtual_tokens > 0 && s[0] != k)
        problems.push_back("tensor 'prompt_embeddings' has " + std::to_string(s[0]) +
                           " rows, num_virtual_tokens says " + std::to_string(k));
      if (cfg.token_dim > 0 && s[1] != cfg.token_dim)
        problems.push_back("tensor 'prompt_embeddings' has width " + std::to_string(s[1]) + ", token_dim says " +
                           std::to_string(cfg.token_dim));
      if (expected_token_dim > 0 && s[1] != expected_token_dim)
        problems.push_back("tensor 'prompt_embeddings' has width " + std::to_string(s[1]) +
                           ", the model's embeddings are " + std::to_string(expected_token_dim) + " wide");
    }
  }
  if (!problems.empty()) throw_problems("[peft] " + file + ": prompt adapter does not fit the model", problems);
  if (config) *config = cfg;
  return reader.load("prompt_embeddings");
}

torch::Tensor init_prompt_embeddings(int64_t k, const torch::Tensor& embed_weight, const std::string& init,
                                     const std::vector<int64_t>& text_ids) {
  if (k <= 0) throw ConfigError("[prompt] num_virtual_tokens must be positive (got " + std::to_string(k) + ")");
  if (!embed_weight.defined() || embed_weight.dim() != 2)
    throw ConfigError("[prompt] the token embedding table must be [V, D]");
  if (init == "random") return torch::randn({k, embed_weight.size(1)}, torch::kFloat32);
  if (init != "text") throw ConfigError("[prompt] init must be random or text (got '" + init + "')");
  if (text_ids.empty()) throw ConfigError("[prompt] init: text needs a non-empty init_text");
  std::vector<int64_t> ids;
  while (static_cast<int64_t>(ids.size()) < k)
    for (int64_t id : text_ids) {
      if (id < 0 || id >= embed_weight.size(0))
        throw ConfigError("[prompt] init_text token id " + std::to_string(id) + " is outside the vocabulary (" +
                          std::to_string(embed_weight.size(0)) + ")");
      if (static_cast<int64_t>(ids.size()) < k) ids.push_back(id);
    }
  torch::NoGradGuard ng;
  auto idx = torch::tensor(ids, torch::kLong).to(embed_weight.device());
  return embed_weight.detach().index_select(0, idx).clone();
}

// ---- projector files -------------------------------------------------------------------------------------------

NamedTensors projector_tensors(torch::nn::Module& projector, ProjectorNaming naming) {
  auto names = projector_param_names(projector);
  bool has_2 = false;
  for (const auto& n : names) has_2 = has_2 || n.rfind("linear_2.", 0) == 0;
  NamedTensors out;
  auto params = projector.named_parameters(true);
  for (const auto& n : names) out.emplace_back(projector_key(n, naming, has_2), params[n].detach());
  return out;
}

void save_projector_file(torch::nn::Module& projector, const std::string& path, ProjectorNaming naming,
                         const std::string& dtype) {
  auto tensors = projector_tensors(projector, naming);
  if (tensors.empty()) throw ConfigError("[projector] save_projector_file: the projector has no parameters");
  for (auto& t : tensors) t.second = for_file(t.second, dtype);
  save_safetensors(path, tensors, {{"format", "pt"}});
}

ProjectorNaming load_projector_file(torch::nn::Module& projector, const std::string& path) {
  SafetensorsReader reader(path);
  auto names = projector_param_names(projector);
  bool has_2 = false;
  for (const auto& n : names) has_2 = has_2 || n.rfind("linear_2.", 0) == 0;
  // Every accepted spelling of every parameter -> parameter name.
  std::map<std::string, std::pair<std::string, ProjectorNaming>> accepted;
  for (const auto& n : names) {
    std::string hf = projector_key(n, ProjectorNaming::Hf, has_2);
    std::string lv = projector_key(n, ProjectorNaming::Llava, has_2);
    accepted[hf] = {n, ProjectorNaming::Hf};
    accepted["model." + hf] = {n, ProjectorNaming::Hf};
    accepted[lv] = {n, ProjectorNaming::Llava};
    accepted[lv.substr(6)] = {n, ProjectorNaming::Llava};  // without "model."
  }
  auto params = projector.named_parameters(true);
  std::vector<std::string> problems;
  std::map<std::string, std::string> source;  // param -> file key
  std::set<int> namings;
  for (const auto& key : reader.names()) {
    auto it = accepted.find(key);
    if (it == accepted.end()) {
      problems.push_back("unexpected tensor '" + key + "'");
      continue;
    }
    const std::string& n = it->second.first;
    namings.insert(static_cast<int>(it->second.second));
    const auto& shape = reader.info(key).shape;
    if (!at::IntArrayRef(shape).equals(params[n].sizes())) {
      problems.push_back("tensor '" + key + "' has shape " + detail::shape_str(shape) + ", the projector's '" + n +
                         "' is " + detail::shape_str(params[n].sizes()));
    }
    source[n] = key;
  }
  for (const auto& n : names)
    if (!source.count(n))
      problems.push_back("missing tensor for '" + n + "' (e.g. '" + projector_key(n, ProjectorNaming::Hf, has_2) +
                         "' or '" + projector_key(n, ProjectorNaming::Llava, has_2) + "')");
  if (!problems.empty()) throw_problems("[projector] " + path + ": file does not fit the projector", problems);
  torch::NoGradGuard ng;
  for (const auto& [n, key] : source) params[n].copy_(reader.load(key).to(params[n].scalar_type()));
  return namings.count(static_cast<int>(ProjectorNaming::Hf)) ? ProjectorNaming::Hf : ProjectorNaming::Llava;
}

// ---- inspection ------------------------------------------------------------------------------------------------

std::string describe_adapter(const std::string& dir) {
  auto cfg = read_adapter_config(dir);
  std::ostringstream os;
  os << path_join(dir, kConfigName) << ":\n" << json::parse(cfg.json).dump(2) << "\n";
  std::string file = path_join(dir, kWeightsName);
  SafetensorsReader reader(file);
  auto names = reader.names();
  uint64_t total = 0, bytes = 0;
  os << file << ": " << names.size() << " tensors\n";
  for (const auto& n : names) {
    const auto& info = reader.info(n);
    uint64_t count = 1;
    for (auto d : info.shape) count *= static_cast<uint64_t>(d);
    total += count;
    bytes += info.end - info.begin;
    os << "  " << n << "  " << info.dtype << "  " << detail::shape_str(info.shape) << "\n";
  }
  os << "parameters: " << total << " (" << bytes << " bytes)\n";
  for (const auto& entry : fs::directory_iterator(dir)) {
    auto name = entry.path().filename().string();
    if (name.find("projector") != std::string::npos && entry.path().extension() == ".safetensors")
      os << "projector file: " << entry.path().string() << "\n";
  }
  return os.str();
}

// ---- checkpoint directories ------------------------------------------------------------------------------------

std::string apply_checkpoint_dir(LlavaModel& model, const std::string& dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) throw ConfigError("[adapters] checkpoint " + dir + ": not a directory");
  std::vector<std::string> applied;
  if (fs::exists(fs::path(dir) / "adapter_config.json")) {
    auto ac = read_adapter_config(dir);
    if (ac.peft_type == "PROMPT_TUNING") {
      const auto& embed = model->language_model->model->embed_tokens->weight;
      auto prefix = load_prompt_adapter(dir, model->options.llm.hidden_size);
      model->set_prompt_prefix(prefix.to(embed.device(), embed.scalar_type()));
      applied.push_back("prompt tuning (" + std::to_string(prefix.size(0)) + " virtual tokens)");
    } else {
      auto loaded = load_lora_adapter(*model, dir);
      applied.push_back("LoRA r=" + std::to_string(loaded.config.r) + " on " +
                        std::to_string(loaded.lora_modules.size()) + " layers");
    }
  }
  const auto proj = fs::path(dir) / "mm_projector.safetensors";
  if (fs::exists(proj)) {
    load_projector_file(*model->multi_modal_projector, proj.string());
    applied.push_back("projector");
  }
  if (applied.empty())
    throw ConfigError("[adapters] checkpoint " + dir + ": neither adapter_config.json nor mm_projector.safetensors "
                      "found there");
  std::string out;
  for (const auto& a : applied) out += (out.empty() ? "" : " + ") + a;
  return out;
}

}  // namespace emt
