// YAML -> RunConfig: layered loading (extends chains, then command-line overrides), unknown-key detection with
// suggestions, type checks, cross-field validation; every problem is collected and reported at once.
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <fmt/format.h>
#include <functional>
#include <map>
#include <mutex>
#include <regex>
#include <set>
#include <sstream>
#include <type_traits>

namespace emt {
namespace fs = std::filesystem;

namespace {

// visit() is a template, so its presence is probed with a do-nothing visitor.
struct NullVisitor {
  template <class T>
  void operator()(const char*, T&, const char*) {}
};
template <class T, class = void>
struct has_visit : std::false_type {};
template <class T>
struct has_visit<T, std::void_t<decltype(std::declval<T&>().visit(std::declval<NullVisitor&>()))>> : std::true_type {};

template <class T>
struct is_struct_map : std::false_type {};
template <class V>
struct is_struct_map<std::map<std::string, V>> : has_visit<V> {};

// Where a problem is; for command-line overrides the "file" is the override text itself.
struct Layer {
  std::string file;
  bool override_layer = false;
  std::string override_text;
};

struct Problems {
  std::vector<std::string> items;
  std::map<std::string, std::string> origin;  // dotted key -> location of the value that set it

  void add(const std::string& where, const std::string& key, const std::string& msg) {
    items.push_back(fmt::format("{}: {}: {}", where, key, msg));
  }
  std::string where_of(const std::string& key) const {
    auto it = origin.find(key);
    return it == origin.end() ? std::string("<defaults>") : it->second;
  }
};

std::string location(const Layer& layer, const YAML::Mark& m) {
  if (layer.override_layer) return "command line '" + layer.override_text + "'";
  if (m.line < 0) return layer.file;
  return fmt::format("{}:{}:{}", layer.file, m.line + 1, m.column + 1);
}

std::string shown(const YAML::Node& n) {
  if (n.IsScalar()) return n.Scalar();
  if (n.IsNull()) return "null";
  YAML::Emitter e;
  e << YAML::Flow << n;
  return e.c_str();
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

// Applies one YAML layer onto a section, field by field, recording problems.
class Loader {
 public:
  Loader(const Layer& layer, Problems& problems) : layer_(layer), p_(problems) {}

  template <class S>
  void apply_section(const YAML::Node& node, S& section, const std::string& prefix) {
    if (!node.IsMap()) {
      p_.add(location(layer_, node.Mark()), prefix.empty() ? "<root>" : prefix.substr(0, prefix.size() - 1),
             "expected a mapping (got " + shown(node) + ")");
      return;
    }
    std::vector<std::string> names;
    NameCollector nc{names};
    section.visit(nc);
    for (auto it = node.begin(); it != node.end(); ++it) {
      const std::string key = it->first.as<std::string>();
      if (prefix.empty() && key == "extends") continue;
      if (std::find(names.begin(), names.end(), key) == names.end()) {
        std::string hint = did_you_mean(key, names);
        p_.add(location(layer_, it->first.Mark()), prefix + key,
               "unknown key" + (hint.empty() ? std::string() : " (did you mean '" + hint + "'?)"));
      }
    }
    FieldApplier fa{*this, node, prefix};
    section.visit(fa);
  }

 private:
  struct NameCollector {
    std::vector<std::string>& names;
    template <class T>
    void operator()(const char* name, T&, const char*) { names.emplace_back(name); }
  };
  struct FieldApplier {
    Loader& self;
    const YAML::Node& node;
    const std::string& prefix;
    template <class T>
    void operator()(const char* name, T& field, const char*) {
      const YAML::Node child = node[name];
      if (!child.IsDefined()) return;
      self.set(child, field, prefix + name);
    }
  };

  void mark(const std::string& key, const YAML::Node& n) { p_.origin[key] = location(layer_, n.Mark()); }
  void bad(const YAML::Node& n, const std::string& key, const std::string& expected) {
    p_.add(location(layer_, n.Mark()), key, "expected " + expected + " (got " + shown(n) + ")");
  }

  template <class T>
  bool scalar_as(const YAML::Node& n, const std::string& key, T& out, const char* expected) {
    if (!n.IsScalar()) {
      bad(n, key, expected);
      return false;
    }
    try {
      out = n.as<T>();
      return true;
    } catch (const YAML::Exception&) {
      bad(n, key, expected);
      return false;
    }
  }

  void set(const YAML::Node& n, bool& f, const std::string& key) {
    bool v;
    if (scalar_as(n, key, v, "true or false")) f = v, mark(key, n);
  }
  void set(const YAML::Node& n, int& f, const std::string& key) {
    int64_t v;
    if (!scalar_as(n, key, v, "an integer")) return;
    if (v < INT32_MIN || v > INT32_MAX) return bad(n, key, "a 32-bit integer");
    f = static_cast<int>(v), mark(key, n);
  }
  void set(const YAML::Node& n, int64_t& f, const std::string& key) {
    int64_t v;
    if (scalar_as(n, key, v, "an integer")) f = v, mark(key, n);
  }
  void set(const YAML::Node& n, double& f, const std::string& key) {
    double v;
    if (scalar_as(n, key, v, "a number")) f = v, mark(key, n);
  }
  void set(const YAML::Node& n, std::string& f, const std::string& key) {
    if (n.IsNull()) {
      f.clear();
      mark(key, n);
      return;
    }
    std::string v;
    if (scalar_as(n, key, v, "a string")) f = v, mark(key, n);
  }
  template <class E>
  void set(const YAML::Node& n, std::vector<E>& f, const std::string& key) {
    std::vector<E> out;
    if (n.IsNull()) {
      f.clear();
      mark(key, n);
      return;
    }
    if (n.IsScalar()) {  // a single value is a one-element list (convenient for overrides)
      E e{};
      size_t before = p_.items.size();
      set(n, e, key);
      if (p_.items.size() == before) f = {e};
      return;
    }
    if (!n.IsSequence()) return bad(n, key, "a list");
    size_t before = p_.items.size();
    for (size_t i = 0; i < n.size(); ++i) {
      E e{};
      set(n[i], e, key + "[" + std::to_string(i) + "]");
      out.push_back(e);
    }
    if (p_.items.size() == before) f = std::move(out), mark(key, n);
  }
  template <class V>
  void set(const YAML::Node& n, std::map<std::string, V>& f, const std::string& key) {
    if (n.IsNull()) {
      f.clear();
      mark(key, n);
      return;
    }
    if (!n.IsMap()) return bad(n, key, "a mapping");
    mark(key, n);
    for (auto it = n.begin(); it != n.end(); ++it) {
      const std::string name = it->first.as<std::string>();
      if constexpr (has_visit<V>::value) {
        // Later layers refine an entry field by field instead of replacing it.
        V& entry = f[name];
        if (it->second.IsNull()) continue;
        apply_section(it->second, entry, key + "." + name + ".");
      } else {
        V v{};
        size_t before = p_.items.size();
        set(it->second, v, key + "." + name);
        if (p_.items.size() == before) f[name] = v;
      }
    }
  }
  template <class S, std::enable_if_t<has_visit<S>::value, int> = 0>
  void set(const YAML::Node& n, S& f, const std::string& key) {
    if (n.IsNull()) return;
    apply_section(n, f, key + ".");
  }

  const Layer& layer_;
  Problems& p_;
};

YAML::Node parse_yaml_file(const std::string& path) {
  try {
    return YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    throw ConfigError(path + ": cannot open config file");
  } catch (const YAML::ParserException& e) {
    throw ConfigError(fmt::format("{}:{}:{}: YAML syntax error: {}", path, e.mark.line + 1, e.mark.column + 1, e.msg));
  }
}

void apply_file(const std::string& path, RunConfig& cfg, Problems& p, std::vector<std::string>& chain) {
  std::string canon = fs::weakly_canonical(path).string();
  if (std::find(chain.begin(), chain.end(), canon) != chain.end())
    throw ConfigError(path + ": 'extends' cycle: " + fmt::format("{}", fmt::join(chain, " -> ")) + " -> " + canon);
  chain.push_back(canon);
  YAML::Node root = parse_yaml_file(path);
  if (root.IsNull()) {
    chain.pop_back();
    return;  // an empty file is a valid (empty) layer
  }
  Layer layer{path, false, {}};
  if (!root.IsMap()) {
    p.add(location(layer, root.Mark()), "<root>", "expected a mapping of sections (got " + shown(root) + ")");
    chain.pop_back();
    return;
  }
  if (YAML::Node ext = root["extends"]) {
    std::vector<std::string> bases;
    if (ext.IsScalar()) bases.push_back(ext.Scalar());
    else if (ext.IsSequence()) for (const auto& e : ext) bases.push_back(e.as<std::string>());
    else p.add(location(layer, ext.Mark()), "extends", "expected a file name or a list of them (got " + shown(ext) + ")");
    for (const auto& b : bases) {
      fs::path bp = fs::path(b).is_absolute() ? fs::path(b) : fs::path(path).parent_path() / b;
      if (!fs::exists(bp)) {
        p.add(location(layer, ext.Mark()), "extends", "file not found: " + bp.string());
        continue;
      }
      apply_file(bp.string(), cfg, p, chain);
    }
  }
  Loader(layer, p).apply_section(root, cfg, "");
  chain.pop_back();
}

void apply_overrides(const std::vector<std::string>& overrides, RunConfig& cfg, Problems& p) {
  for (const auto& ov : overrides) {
    auto eq = ov.find('=');
    if (eq == std::string::npos || eq == 0) {
      p.add("command line '" + ov + "'", ov, "expected dotted.key=value");
      continue;
    }
    std::string key = ov.substr(0, eq), value = ov.substr(eq + 1);
    YAML::Node v;
    try {
      v = YAML::Load(value);
    } catch (const YAML::Exception&) {
      v = YAML::Node(value);
    }
    if (!v.IsDefined() || (v.IsNull() && !value.empty() && value != "null" && value != "~")) v = YAML::Node(value);
    // Build {a: {b: {c: value}}} and apply it as one more layer.
    std::vector<std::string> parts;
    std::stringstream ss(key);
    for (std::string part; std::getline(ss, part, '.');) parts.push_back(part);
    if (std::any_of(parts.begin(), parts.end(), [](const std::string& s) { return s.empty(); })) {
      p.add("command line '" + ov + "'", key, "empty component in dotted key");
      continue;
    }
    YAML::Node root(YAML::NodeType::Map);
    YAML::Node cur = root;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      YAML::Node next(YAML::NodeType::Map);
      cur[parts[i]] = next;
      cur.reset(next);
    }
    cur[parts.back()] = v;
    Layer layer{"<command line>", true, ov};
    Loader(layer, p).apply_section(root, cfg, "");
  }
}

// ---- validation ---------------------------------------------------------------------------------------------

const std::vector<std::string> kMethods = {"linear", "lora", "lora-only", "prompt", "linear+prompt", "full",
                                           "lora-attn", "lora-mlp", "l2sp", "ewc", "lwf", "ema", "replay", "wise-ft"};
const std::vector<std::string> kMitigations = {"l2sp", "ewc", "lwf", "ema", "replay", "wise-ft"};
const std::vector<std::string> kScorers = {"strict", "clip", "likelihood", "judge"};
const std::vector<std::string> kFormats = {"idx", "cifar10", "cifar100", "imagefolder", "manifest", "llava_json",
                                           "synthetic"};

std::mutex g_ext_mutex;
std::map<ExtensionKind, std::map<std::string, std::string>> g_ext;  // kind -> name -> base (methods)

const std::vector<std::string>& builtin_names(ExtensionKind kind) {
  return kind == ExtensionKind::dataset_format ? kFormats : kind == ExtensionKind::scorer ? kScorers : kMethods;
}

// Built-in names followed by the registered ones.
std::vector<std::string> with_extensions(ExtensionKind kind) {
  auto all = builtin_names(kind);
  for (const auto& n : extension_names(kind)) all.push_back(n);
  return all;
}

}  // namespace

const std::vector<std::string>& mitigation_names() { return kMitigations; }

MethodParts split_method(const std::string& method) {
  const auto colon = method.find(':');
  const std::string head = method.substr(0, colon);
  if (std::find(kMitigations.begin(), kMitigations.end(), head) == kMitigations.end()) return {method, ""};
  return {colon == std::string::npos ? "lora" : method.substr(colon + 1), head};
}

namespace {

struct Checker {
  Problems& p;
  // A method name: a built-in or registered one, or MITIGATION:METHOD with METHOD one that is not a mitigation.
  void method(const std::string& key, const std::string& v, const std::vector<std::string>& allowed) {
    const auto colon = v.find(':');
    if (colon == std::string::npos) return one_of(key, v, allowed);
    const auto parts = split_method(v);
    if (parts.mitigation.empty())
      return fail(key, fmt::format("'{}': the part before ':' must be a mitigation ({}) (got '{}')", v,
                                   fmt::join(kMitigations, ", "), v.substr(0, colon)));
    std::vector<std::string> bases;
    for (const auto& m : allowed)
      if (split_method(m).mitigation.empty()) bases.push_back(m);
    if (std::find(bases.begin(), bases.end(), parts.base) == bases.end())
      fail(key, fmt::format("'{}': the method after ':' must be one of {} (got '{}')", v, fmt::join(bases, ", "),
                            parts.base));
  }
  void fail(const std::string& key, const std::string& msg) { p.add(p.where_of(key), key, msg); }
  void one_of(const std::string& key, const std::string& v, const std::vector<std::string>& allowed) {
    if (std::find(allowed.begin(), allowed.end(), v) != allowed.end()) return;
    std::string hint = did_you_mean(v, allowed);
    fail(key, fmt::format("must be one of {} (got '{}'){}", fmt::join(allowed, ", "), v,
                          hint.empty() ? "" : " - did you mean '" + hint + "'?"));
  }
  template <class N>
  void positive(const std::string& key, N v) {
    if (!(v > 0)) fail(key, fmt::format("must be > 0 (got {})", v));
  }
  template <class N>
  void non_negative(const std::string& key, N v) {
    if (!(v >= 0)) fail(key, fmt::format("must be >= 0 (got {})", v));
  }
  void in_range(const std::string& key, double v, double lo, double hi, bool lo_open = false) {
    bool ok = (lo_open ? v > lo : v >= lo) && v <= hi;
    if (!ok) fail(key, fmt::format("must be in {}{}, {}] (got {})", lo_open ? "(" : "[", lo, hi, v));
  }
  void dataset_ref(const std::string& key, const std::string& name, const RunConfig& c) {
    if (c.data.datasets.count(name)) return;
    std::vector<std::string> known;
    for (const auto& [k, _] : c.data.datasets) known.push_back(k);
    std::string hint = did_you_mean(name, known);
    fail(key, fmt::format("unknown dataset '{}' (defined in data.datasets: {}){}", name,
                          known.empty() ? std::string("none") : fmt::format("{}", fmt::join(known, ", ")),
                          hint.empty() ? "" : " - did you mean '" + hint + "'?"));
  }
};

// One checker per section, in the order of the YAML file; each names the keys it finds wrong.

void check_run(const RunConfig& c, Checker& ck) {
  static const std::regex device_re("^(auto|cpu|cuda|cuda:[0-9]+)$");
  if (!std::regex_match(c.run.device, device_re))
    ck.fail("run.device", "must be auto, cpu, cuda or cuda:N (got '" + c.run.device + "')");
  ck.non_negative("run.threads", c.run.threads);
  ck.one_of("run.dtype", c.run.dtype, {"f32", "bf16", "f16"});
  ck.one_of("run.log_level", c.run.log_level, {"debug", "info", "warn", "error"});
  if (c.run.name.empty() || c.run.name.find('/') != std::string::npos)
    ck.fail("run.name", "must be a non-empty name without '/' (got '" + c.run.name + "')");
}

void check_vision(const ModelSection& m, Checker& ck) {
  const auto& v = m.vision;
  for (auto [k, x] : {std::pair<const char*, int>{"image_size", v.image_size}, {"patch_size", v.patch_size},
                      {"num_channels", v.num_channels}, {"hidden_size", v.hidden_size},
                      {"num_layers", v.num_layers}, {"num_heads", v.num_heads},
                      {"intermediate_size", v.intermediate_size}})
    ck.positive(std::string("model.vision.") + k, x);
  if (v.patch_size > 0 && v.image_size % v.patch_size != 0)
    ck.fail("model.vision.patch_size", fmt::format("must divide model.vision.image_size {} (got {})", v.image_size,
                                                   v.patch_size));
  if (v.num_heads > 0 && v.hidden_size % v.num_heads != 0)
    ck.fail("model.vision.num_heads", fmt::format("must divide model.vision.hidden_size {} (got {})", v.hidden_size,
                                                  v.num_heads));
  ck.one_of("model.vision.hidden_act", v.hidden_act, {"quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh"});
  ck.one_of("model.vision.select_feature", v.select_feature, {"patch", "cls_patch"});
  if (v.select_layer > v.num_layers || v.select_layer < -(v.num_layers + 1))
    ck.fail("model.vision.select_layer", fmt::format("must index one of the {} hidden states, i.e. be in [{}, {}] "
                                                     "(got {})", v.num_layers + 1, -(v.num_layers + 1), v.num_layers,
                                                     v.select_layer));
}

void check_clip_text(const ModelSection& m, Checker& ck) {
  const auto& t = m.clip_text;
  for (auto [k, x] : {std::pair<const char*, int>{"vocab_size", t.vocab_size}, {"hidden_size", t.hidden_size},
                      {"num_layers", t.num_layers}, {"num_heads", t.num_heads},
                      {"intermediate_size", t.intermediate_size},
                      {"max_position_embeddings", t.max_position_embeddings},
                      {"projection_dim", t.projection_dim}})
    ck.positive(std::string("model.clip_text.") + k, x);
  if (t.num_heads > 0 && t.hidden_size % t.num_heads != 0)
    ck.fail("model.clip_text.num_heads", fmt::format("must divide model.clip_text.hidden_size {} (got {})",
                                                     t.hidden_size, t.num_heads));
}

void check_llm(const ModelSection& m, Checker& ck) {
  const auto& l = m.llm;
  for (auto [k, x] : {std::pair<const char*, int>{"vocab_size", l.vocab_size}, {"hidden_size", l.hidden_size},
                      {"num_layers", l.num_layers}, {"num_heads", l.num_heads}, {"num_kv_heads", l.num_kv_heads},
                      {"intermediate_size", l.intermediate_size},
                      {"max_position_embeddings", l.max_position_embeddings}})
    ck.positive(std::string("model.llm.") + k, x);
  if (l.num_heads > 0 && l.hidden_size % l.num_heads != 0)
    ck.fail("model.llm.num_heads", fmt::format("must divide model.llm.hidden_size {} (got {})", l.hidden_size,
                                               l.num_heads));
  else if (l.num_heads > 0 && (l.hidden_size / l.num_heads) % 2 != 0)
    ck.fail("model.llm.num_heads", fmt::format("head dim hidden_size/num_heads = {} must be even for RoPE",
                                               l.hidden_size / l.num_heads));
  if (l.num_kv_heads > 0 && l.num_heads % l.num_kv_heads != 0)
    ck.fail("model.llm.num_kv_heads", fmt::format("must divide model.llm.num_heads {} (got {})", l.num_heads,
                                                  l.num_kv_heads));
  ck.positive("model.llm.rope_theta", l.rope_theta);
  ck.positive("model.llm.rms_norm_eps", l.rms_norm_eps);
}

void check_model(const RunConfig& c, Checker& ck) {
  const auto& m = c.model;
  ck.one_of("model.projector", m.projector, {"linear", "mlp2x_gelu"});
  ck.one_of("model.conversation", m.conversation, {"plain", "vicuna_v1", "llava_v0"});
  check_vision(m, ck);
  check_clip_text(m, ck);
  check_llm(m, ck);
}

void check_data(const RunConfig& c, Checker& ck) {
  ck.non_negative("data.workers", c.data.workers);
  ck.positive("data.prefetch", c.data.prefetch);
  for (const auto& [name, d] : c.data.datasets) {
    std::string k = "data.datasets." + name;
    ck.one_of(k + ".format", d.format, with_extensions(ExtensionKind::dataset_format));
    const bool builtin = std::find(kFormats.begin(), kFormats.end(), d.format) != kFormats.end();
    if (d.path.empty() && d.format != "synthetic" && builtin) ck.fail(k + ".path", "must be set for format '" + d.format + "'");
    ck.non_negative(k + ".train_max_samples", d.train_max_samples);
    ck.non_negative(k + ".test_max_samples", d.test_max_samples);
    ck.in_range(k + ".test_fraction", d.test_fraction, 0.0, 1.0, true);
    if (d.answer.find("{label}") == std::string::npos)
      ck.fail(k + ".answer", "must contain {label} (got '" + d.answer + "')");
    for (const auto& a : d.aliases)
      if (a.find('=') == std::string::npos || a.front() == '=' || a.back() == '=')
        ck.fail(k + ".aliases", "each alias must be 'alias=label' (got '" + a + "')");
  }
}

// finetune.lora: the one place LoRA settings are validated (the adapter layer only asserts invariants).
void check_lora(const LoraConfig& lora, Checker& ck) {
  ck.positive("finetune.lora.r", lora.r);
  ck.positive("finetune.lora.alpha", lora.alpha);
  ck.in_range("finetune.lora.dropout", lora.dropout, 0.0, 0.95);
  ck.one_of("finetune.lora.init", lora.init, {"kaiming", "gaussian"});
  if (lora.target_modules.empty() && lora.target_regex.empty())
    ck.fail("finetune.lora.target_modules", "must name at least one module (or set finetune.lora.target_regex)");
  if (!lora.target_regex.empty()) {
    try {
      std::regex re(lora.target_regex);
    } catch (const std::regex_error& e) {
      ck.fail("finetune.lora.target_regex", std::string("invalid regex: ") + e.what() + " (got '" + lora.target_regex + "')");
    }
  }
  for (const auto& [k, r] : lora.rank_pattern) ck.positive("finetune.lora.rank_pattern." + k, r);
  for (const auto& [k, a] : lora.alpha_pattern) ck.positive("finetune.lora.alpha_pattern." + k, a);
}

void check_finetune(const RunConfig& c, Checker& ck) {
  const auto& f = c.finetune;
  if (!f.dataset.empty()) ck.dataset_ref("finetune.dataset", f.dataset, c);
  ck.method("finetune.method", f.method, with_extensions(ExtensionKind::method));
  ck.non_negative("finetune.max_steps", f.max_steps);
  if (f.epochs < 1 && f.max_steps <= 0) ck.fail("finetune.epochs", fmt::format("must be >= 1 unless finetune.max_steps > 0 (got {})", f.epochs));
  ck.positive("finetune.batch_size", f.batch_size);
  ck.positive("finetune.grad_accum", f.grad_accum);
  ck.positive("finetune.learning_rate", f.learning_rate);
  ck.non_negative("finetune.projector_lr", f.projector_lr);
  ck.non_negative("finetune.weight_decay", f.weight_decay);
  ck.in_range("finetune.adam_beta1", f.adam_beta1, 0.0, 1.0);
  ck.in_range("finetune.adam_beta2", f.adam_beta2, 0.0, 1.0);
  ck.positive("finetune.adam_eps", f.adam_eps);
  ck.one_of("finetune.schedule", f.schedule, {"constant", "linear", "cosine"});
  ck.in_range("finetune.warmup_ratio", f.warmup_ratio, 0.0, 1.0);
  ck.non_negative("finetune.warmup_steps", f.warmup_steps);
  ck.non_negative("finetune.max_grad_norm", f.max_grad_norm);
  ck.one_of("finetune.precision", f.precision, {"f32", "bf16", "fp16"});
  ck.positive("finetune.nan_patience", f.nan_patience);
  ck.non_negative("finetune.keep_last_n", f.keep_last_n);
  ck.non_negative("finetune.checkpoint_every_steps", f.checkpoint_every_steps);
  ck.positive("finetune.log_every_steps", f.log_every_steps);
  check_lora(f.lora, ck);
  const auto& m = f.mitigation;
  ck.one_of("finetune.mitigation.reference", m.reference, {"generic", "datasets"});
  if (!(m.replay_ratio > 0 && m.replay_ratio < 1))
    ck.fail("finetune.mitigation.replay_ratio", fmt::format("must be in (0, 1) (got {})", m.replay_ratio));
  ck.non_negative("finetune.mitigation.l2sp_weight", m.l2sp_weight);
  ck.non_negative("finetune.mitigation.ewc_weight", m.ewc_weight);
  ck.positive("finetune.mitigation.ewc_fisher_batches", m.ewc_fisher_batches);
  ck.non_negative("finetune.mitigation.lwf_weight", m.lwf_weight);
  ck.positive("finetune.mitigation.lwf_temperature", m.lwf_temperature);
  if (!(m.ema_decay > 0 && m.ema_decay < 1))
    ck.fail("finetune.mitigation.ema_decay", fmt::format("must be in (0, 1) (got {})", m.ema_decay));
  if (m.wise_ft_alphas.empty()) ck.fail("finetune.mitigation.wise_ft_alphas", "needs at least one weight");
  for (size_t i = 0; i < m.wise_ft_alphas.size(); ++i)
    ck.in_range(fmt::format("finetune.mitigation.wise_ft_alphas[{}]", i), m.wise_ft_alphas[i], 0.0, 1.0);
  ck.positive("finetune.prompt_tuning.num_virtual_tokens", f.prompt_tuning.num_virtual_tokens);
  ck.one_of("finetune.prompt_tuning.init", f.prompt_tuning.init, {"random", "text"});
  if (f.prompt_tuning.init == "text" && f.prompt_tuning.init_text.empty())
    ck.fail("finetune.prompt_tuning.init_text", "must be set when finetune.prompt_tuning.init is 'text'");
}

void check_eval(const RunConfig& c, Checker& ck) {
  const auto& e = c.eval;
  for (size_t i = 0; i < e.datasets.size(); ++i) ck.dataset_ref(fmt::format("eval.datasets[{}]", i), e.datasets[i], c);
  ck.positive("eval.batch_size", e.batch_size);
  ck.positive("eval.max_new_tokens", e.max_new_tokens);
  ck.non_negative("eval.max_samples", e.max_samples);
  const auto scorers = with_extensions(ExtensionKind::scorer);
  ck.one_of("eval.primary_scorer", e.primary_scorer, scorers);
  for (size_t i = 0; i < e.scorers.size(); ++i) ck.one_of(fmt::format("eval.scorers[{}]", i), e.scorers[i], scorers);
  bool uses_judge = e.primary_scorer == "judge" ||
                    std::find(e.scorers.begin(), e.scorers.end(), "judge") != e.scorers.end();
  if (uses_judge && e.judge_command.empty() && e.judge_url.empty())
    ck.fail("eval.judge_command", "eval.judge_command or eval.judge_url must be set when the 'judge' scorer is used");
  if (!e.judge_command.empty() && !e.judge_url.empty())
    ck.fail("eval.judge_url", "set either eval.judge_command or eval.judge_url, not both");
  if (!e.judge_url.empty()) {
    if (e.judge_url.rfind("http://", 0) != 0 && e.judge_url.rfind("https://", 0) != 0)
      ck.fail("eval.judge_url", "must start with http:// or https:// (got '" + e.judge_url + "')");
    if (e.judge_model.empty()) ck.fail("eval.judge_model", "must name the endpoint's model when eval.judge_url is set");
  }
  ck.positive("eval.judge_timeout_s", e.judge_timeout_s);
  ck.non_negative("eval.judge_retries", e.judge_retries);
  if (e.clip_baseline && e.clip_templates.empty()) ck.fail("eval.clip_templates", "needs at least one template");
  for (const auto& tpl : e.clip_templates)
    if (tpl.find("{label}") == std::string::npos)
      ck.fail("eval.clip_templates", "each template must contain {label} (got '" + tpl + "')");
  ck.non_negative("eval.temperature", e.temperature);
  ck.in_range("eval.top_p", e.top_p, 0.0, 1.0, true);
}

void check_study(const RunConfig& c, Checker& ck) {
  const auto& s = c.study;
  for (size_t i = 0; i < s.finetune_datasets.size(); ++i)
    ck.dataset_ref(fmt::format("study.finetune_datasets[{}]", i), s.finetune_datasets[i], c);
  const auto methods = with_extensions(ExtensionKind::method);
  for (size_t i = 0; i < s.methods.size(); ++i) ck.method(fmt::format("study.methods[{}]", i), s.methods[i], methods);
  if (s.seeds.empty()) ck.fail("study.seeds", "needs at least one seed");
  ck.positive("study.epochs", s.epochs);
  for (const auto& [meth, lr] : s.learning_rate_by_method) {
    ck.method("study.learning_rate_by_method." + meth, meth, methods);
    ck.positive("study.learning_rate_by_method." + meth, lr);
  }
}

void check_pretrain(const RunConfig& c, Checker& ck) {
  const auto& pt = c.pretrain;
  for (size_t i = 0; i < pt.datasets.size(); ++i) ck.dataset_ref(fmt::format("pretrain.datasets[{}]", i), pt.datasets[i], c);
  ck.non_negative("pretrain.clip_steps", pt.clip_steps);
  ck.non_negative("pretrain.align_steps", pt.align_steps);
  ck.non_negative("pretrain.instruct_steps", pt.instruct_steps);
  ck.positive("pretrain.batch_size", pt.batch_size);
  ck.positive("pretrain.clip_batch_size", pt.clip_batch_size);
  ck.positive("pretrain.learning_rate", pt.learning_rate);
  ck.positive("pretrain.tokenizer_vocab", pt.tokenizer_vocab);
  ck.non_negative("pretrain.train_max_samples", pt.train_max_samples);
  ck.non_negative("pretrain.instruct_max_samples", pt.instruct_max_samples);
  ck.one_of("pretrain.contrast", pt.contrast, {"disjoint_labels", "own_dataset"});
  ck.non_negative("pretrain.pick_own_labels", pt.pick_own_labels);
  ck.in_range("pretrain.pick_unlisted", pt.pick_unlisted, 0, 100);
}

void check(const RunConfig& c, Problems& p) {
  Checker ck{p};
  check_run(c, ck);
  check_model(c, ck);
  check_data(c, ck);
  check_finetune(c, ck);
  check_eval(c, ck);
  check_study(c, ck);
  check_pretrain(c, ck);
}

[[noreturn]] void throw_problems(const Problems& p) {
  std::string msg = fmt::format("{} problem{} in the configuration:", p.items.size(), p.items.size() == 1 ? "" : "s");
  for (const auto& item : p.items) msg += "\n  " + item;
  throw ConfigError(msg);
}

RunConfig finish(RunConfig cfg, Problems& p, const std::vector<std::string>& overrides) {
  apply_overrides(overrides, cfg, p);
  if (p.items.empty()) check(cfg, p);  // cross-field rules only make sense on well-typed values
  if (!p.items.empty()) throw_problems(p);
  return cfg;
}

// ---- emitting -----------------------------------------------------------------------------------------------

struct Emitter {
  YAML::Emitter& out;
  void value(bool b) { out << (b ? "true" : "false"); }
  void value(int x) { out << x; }
  void value(int64_t x) { out << x; }
  void value(double d) {
    std::string s = fmt::format("{}", d);
    if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // keep it visibly a float
    out << s;
  }
  void value(const std::string& s) {
    if (s.empty()) out << YAML::DoubleQuoted << "";
    else out << s;
  }
  template <class E>
  void value(const std::vector<E>& v) {
    out << YAML::Flow << YAML::BeginSeq;
    for (const auto& e : v) value(e);
    out << YAML::EndSeq;
  }
  template <class V>
  void value(const std::map<std::string, V>& m) {
    if (m.empty()) {
      out << YAML::Flow << YAML::BeginMap << YAML::EndMap;
      return;
    }
    out << YAML::BeginMap;
    for (const auto& [k, v] : m) {
      out << YAML::Key << k << YAML::Value;
      value(v);
    }
    out << YAML::EndMap;
  }
  template <class S, std::enable_if_t<has_visit<S>::value, int> = 0>
  void value(const S& s) {
    out << YAML::BeginMap;
    const_cast<S&>(s).visit(*this);
    out << YAML::EndMap;
  }
  template <class T>
  void operator()(const char* name, T& field, const char*) {
    out << YAML::Key << name << YAML::Value;
    value(field);
  }
};

struct Referencer {
  std::vector<std::pair<std::string, std::string>>& rows;
  std::string prefix;
  template <class T>
  void operator()(const char* name, T& field, const char* doc) {
    std::string key = prefix + name;
    if constexpr (has_visit<T>::value) {
      Referencer sub{rows, key + "."};
      field.visit(sub);
    } else if constexpr (is_struct_map<T>::value) {
      rows.emplace_back(key, doc);
      typename T::mapped_type entry{};
      Referencer sub{rows, key + ".<name>."};
      entry.visit(sub);
    } else {
      rows.emplace_back(key, doc);
    }
  }
};

}  // namespace

std::string did_you_mean(const std::string& key, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::string::npos;
  for (const auto& c : candidates) {
    size_t d = edit_distance(key, c);
    if (d < best_d) best_d = d, best = c;
  }
  size_t limit = std::max<size_t>(2, key.size() / 3);
  return best_d <= limit ? best : std::string();
}

RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  if (!fs::exists(path)) throw ConfigError(path + ": config file not found");
  RunConfig cfg;
  Problems p;
  std::vector<std::string> chain;
  apply_file(path, cfg, p, chain);
  return finish(std::move(cfg), p, overrides);
}

RunConfig load_config_string(const std::string& yaml, const std::vector<std::string>& overrides,
                             const std::string& name) {
  RunConfig cfg;
  Problems p;
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const YAML::ParserException& e) {
    throw ConfigError(fmt::format("{}:{}:{}: YAML syntax error: {}", name, e.mark.line + 1, e.mark.column + 1, e.msg));
  }
  if (root.IsDefined() && !root.IsNull()) {
    if (root["extends"]) p.add(name, "extends", "is only supported in files (relative paths need a directory)");
    Loader(Layer{name, false, {}}, p).apply_section(root, cfg, "");
  }
  return finish(std::move(cfg), p, overrides);
}

void add_extension_name(ExtensionKind kind, const std::string& name, const std::string& base) {
  static const char* what[] = {"dataset format", "scorer", "method"};
  const char* w = what[static_cast<int>(kind)];
  if (name.empty()) throw ConfigError(fmt::format("[extensions] a registered {} needs a name", w));
  const auto& builtin = builtin_names(kind);
  if (std::find(builtin.begin(), builtin.end(), name) != builtin.end())
    throw ConfigError(fmt::format("[extensions] '{}' is a built-in {}: register yours under another name", name, w));
  if (kind == ExtensionKind::method &&
      (std::find(kMethods.begin(), kMethods.end(), base) == kMethods.end() || !split_method(base).mitigation.empty()))
    throw ConfigError(fmt::format("[extensions] method '{}': its base must be a built-in method ({}), got '{}'", name,
                                  fmt::join(kMethods, ", "), base));
  std::lock_guard<std::mutex> l(g_ext_mutex);
  g_ext[kind][name] = base;
}

std::vector<std::string> extension_names(ExtensionKind kind) {
  std::lock_guard<std::mutex> l(g_ext_mutex);
  std::vector<std::string> out;
  for (const auto& [n, _] : g_ext[kind]) out.push_back(n);
  return out;
}

std::string registered_method_base(const std::string& method) {
  std::lock_guard<std::mutex> l(g_ext_mutex);
  auto& m = g_ext[ExtensionKind::method];
  auto it = m.find(method);
  return it == m.end() ? "" : it->second;
}

void validate_config(const RunConfig& cfg) {
  Problems p;
  check(cfg, p);
  if (!p.items.empty()) throw_problems(p);
}

std::string config_to_yaml(const RunConfig& cfg) {
  YAML::Emitter out;
  Emitter em{out};
  em.value(cfg);
  return std::string(out.c_str()) + "\n";
}

std::vector<std::pair<std::string, std::string>> config_reference() {
  std::vector<std::pair<std::string, std::string>> rows;
  RunConfig cfg;
  Referencer r{rows, ""};
  cfg.visit(r);
  return rows;
}

}  // namespace emt
