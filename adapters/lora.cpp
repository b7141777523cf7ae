// LoRA injection into emt::Linear layers of any module tree, PEFT's target/pattern matching, merge/unmerge.
#include <emt/adapters/lora.h>
#include <fmt/format.h>
#include <emt/core/error.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <regex>
#include <sstream>

namespace emt {
namespace {

bool path_matches_name(const std::string& path, const std::string& name) {
  if (path == name) return true;
  return path.size() > name.size() + 1 && path.compare(path.size() - name.size(), name.size(), name) == 0 &&
         path[path.size() - name.size() - 1] == '.';
}

bool in_scope(const std::string& path, const std::vector<std::string>& scope) {
  if (scope.empty()) return true;
  for (const auto& s : scope)
    if (path.rfind(s, 0) == 0) return true;
  return false;
}

std::string last_component(const std::string& path) {
  auto dot = path.rfind('.');
  return dot == std::string::npos ? path : path.substr(dot + 1);
}

template <class Map>
const typename Map::value_type* find_pattern(const Map& patterns, const std::string& path) {
  for (const auto& kv : patterns) {
    std::regex re;
    try {
      re = std::regex("(.*\\.)?(" + kv.first + ")$");
    } catch (const std::regex_error& e) {
      throw ConfigError("[lora] pattern '" + kv.first + "' is not a valid regex: " + e.what());
    }
    if (std::regex_match(path, re)) return &kv;
  }
  return nullptr;
}

}  // namespace

bool is_lora_parameter(const std::string& name) {
  std::string::size_type start = 0;
  while (start <= name.size()) {
    if (name.compare(start, 5, "lora_") == 0) return true;
    auto dot = name.find('.', start);
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return false;
}

std::vector<std::pair<std::string, LinearImpl*>> linear_layers(torch::nn::Module& root) {
  std::vector<std::pair<std::string, LinearImpl*>> out;
  for (const auto& item : root.named_modules("", /*include_self=*/true)) {
    if (auto* lin = dynamic_cast<LinearImpl*>(item.value().get())) out.emplace_back(item.key(), lin);
  }
  return out;
}

std::vector<std::pair<std::string, LinearImpl*>> lora_layers(torch::nn::Module& root) {
  auto all = linear_layers(root);
  std::vector<std::pair<std::string, LinearImpl*>> out;
  for (auto& p : all)
    if (p.second->has_low_rank()) out.push_back(p);
  return out;
}

namespace {
// What building LoRA layers needs. The config loader (validate_config) has already checked every
// finetune.lora key by name; a LoraConfig that breaks these was built by hand and is rejected here, once.
void assert_lora_invariants(const LoraConfig& cfg) {
  if (cfg.r <= 0 || !(cfg.alpha > 0.0) || !(cfg.dropout >= 0.0 && cfg.dropout < 1.0) ||
      (cfg.target_modules.empty() && cfg.target_regex.empty()))
    throw ConfigError(fmt::format("[lora] LoraConfig breaks its invariants (finetune.lora.r {} > 0, alpha {} > 0, "
                                  "dropout {} in [0, 1), {} target_modules or a target_regex); validate_config() "
                                  "names the bad keys",
                                  cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules.size()));
}
}  // namespace

std::vector<std::string> select_lora_targets(torch::nn::Module& root, const LoraConfig& cfg,
                                             const std::vector<std::string>& scope) {
  assert_lora_invariants(cfg);
  const bool all_linear = cfg.target_regex.empty() && cfg.target_modules.size() == 1 &&
                          cfg.target_modules[0] == "all-linear";
  std::regex target_re;
  if (!cfg.target_regex.empty()) {
    try {
      target_re = std::regex(cfg.target_regex);
    } catch (const std::regex_error& e) {
      throw ConfigError("[lora] finetune.lora.target_regex '" + cfg.target_regex + "' is not a valid regex (" +
                        e.what() + ")");
    }
  }
  std::vector<std::string> out;
  for (const auto& [path, lin] : linear_layers(root)) {
    (void)lin;
    if (!in_scope(path, scope)) continue;
    bool selected = false;
    if (!cfg.target_regex.empty()) {
      selected = std::regex_match(path, target_re);
    } else if (all_linear) {
      selected = last_component(path) != "lm_head";
    } else {
      for (const auto& name : cfg.target_modules)
        if (path_matches_name(path, name)) selected = true;
    }
    for (const auto& ex : cfg.exclude)
      if (path_matches_name(path, ex)) selected = false;
    if (selected) out.push_back(path);
  }
  if (out.empty()) {
    std::ostringstream os;
    os << "[lora] no Linear layer matches ";
    if (!cfg.target_regex.empty()) {
      os << "target_regex '" << cfg.target_regex << "'";
    } else {
      os << "target_modules [";
      for (size_t i = 0; i < cfg.target_modules.size(); ++i) os << (i ? ", " : "") << cfg.target_modules[i];
      os << "]";
    }
    if (!scope.empty()) {
      os << " under [";
      for (size_t i = 0; i < scope.size(); ++i) os << (i ? ", " : "") << scope[i];
      os << "]";
    }
    throw ConfigError(os.str());
  }
  return out;
}

int64_t lora_rank_for(const LoraConfig& cfg, const std::string& path) {
  auto* hit = find_pattern(cfg.rank_pattern, path);
  return hit ? hit->second : cfg.r;
}

double lora_alpha_for(const LoraConfig& cfg, const std::string& path) {
  auto* hit = find_pattern(cfg.alpha_pattern, path);
  return hit ? hit->second : cfg.alpha;
}

double lora_scale(int64_t r, double alpha, bool use_rslora) {
  TORCH_CHECK(r > 0, "lora_scale: rank must be positive, got ", r);
  return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
}

std::vector<std::string> inject_lora(torch::nn::Module& root, const LoraConfig& cfg,
                                     const std::vector<std::string>& scope, bool freeze_base) {
  auto targets = select_lora_targets(root, cfg, scope);
  std::map<std::string, LinearImpl*> by_path;
  for (auto& p : linear_layers(root)) by_path[p.first] = p.second;
  for (const auto& path : targets) {
    LinearImpl* lin = by_path.at(path);
    if (lin->merged()) lin->unmerge();
    int64_t r = lora_rank_for(cfg, path);
    double alpha = lora_alpha_for(cfg, path);
    lin->attach_low_rank(r, lora_scale(r, alpha, cfg.use_rslora), cfg.dropout);
    lin->set_runtime_scale(1.0);  // a fresh delta is fully on, whatever an earlier one was set to
    if (cfg.init == "gaussian") {
      torch::NoGradGuard ng;
      auto& a = lin->lora_A->weight;
      a.copy_(torch::randn(a.sizes(), torch::kFloat32).mul_(1.0 / static_cast<double>(r)).to(a.scalar_type()));
    }
  }
  if (freeze_base) {
    for (auto& p : root.named_parameters(/*recurse=*/true))
      p.value().set_requires_grad(is_lora_parameter(p.key()));
  }
  return targets;
}

void merge_lora(torch::nn::Module& root) {
  for (auto& p : lora_layers(root)) p.second->merge();
}

void unmerge_lora(torch::nn::Module& root) {
  for (auto& p : lora_layers(root)) p.second->unmerge();
}

void set_lora_runtime_scale(torch::nn::Module& root, double s) {
  for (auto& p : lora_layers(root)) {
    LinearImpl* lin = p.second;
    // A merged weight holds the delta at the old scale: take it out before the scale changes.
    bool was_merged = lin->merged();
    if (was_merged) lin->unmerge();
    lin->set_runtime_scale(s);
    if (was_merged) lin->merge();
  }
}

void remove_lora(torch::nn::Module& root) {
  for (auto& p : lora_layers(root)) {
    p.second->unmerge();
    p.second->detach_low_rank();
  }
}

}  // namespace emt
