// HF model directories: config.json <-> ModelSection / module options, key-style mapping, strict loading that
// reports every problem at once, and saving LLaVA, CLIP and LLaMA back in the HF layout.
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/core/hf_checkpoint.h>
#include <emt/core/layers.h>
#include <emt/core/llava.h>
#include <emt/core/runtime.h>
#include <emt/core/safetensors.h>
#include "core/text.h"
#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace emt {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

json read_config_json(const std::string& dir) {
  auto path = (fs::path(dir) / "config.json").string();
  if (!fs::exists(path)) throw IoError("[hf] " + dir + ": no config.json (not an HF model directory)");
  try {
    return json::parse(read_file(path));
  } catch (const json::exception& e) {
    throw FormatError("[hf] " + path + ": invalid JSON: " + e.what());
  }
}

// The original LLaVA code's config.json: LLaMA's fields at the top level plus mm_* keys, no sub-configs.
bool is_original_llava(const json& j) {
  return !j.contains("text_config") && (j.contains("mm_vision_tower") || j.contains("mm_hidden_size"));
}

// Typed field with a default (the HF class default) and a FormatError naming the file and key on a wrong type.
template <class T>
T field(const json& j, const char* key, T def, const std::string& where) {
  if (!j.contains(key) || j.at(key).is_null()) return def;
  try {
    return j.at(key).get<T>();
  } catch (const json::exception&) {
    throw FormatError("[hf] " + where + ": key '" + key + "' has the wrong type (got " + j.at(key).dump() + ")");
  }
}

// The encoder fields CLIP's vision and text configs share; the width defaults differ per tower.
template <class C>
void read_clip_encoder(C& c, const json& j, int hidden, int intermediate, int heads, const std::string& where) {
  c.hidden_size = field(j, "hidden_size", hidden, where);
  c.intermediate_size = field(j, "intermediate_size", intermediate, where);
  c.num_layers = field(j, "num_hidden_layers", 12, where);
  c.num_heads = field(j, "num_attention_heads", heads, where);
  c.hidden_act = field<std::string>(j, "hidden_act", "quick_gelu", where);
  c.layer_norm_eps = field(j, "layer_norm_eps", 1e-5, where);
}

VisionConfig vision_from_json(const json& j, const std::string& where) {
  VisionConfig v;  // HF CLIPVisionConfig defaults
  read_clip_encoder(v, j, 768, 3072, 12, where);
  v.num_channels = field(j, "num_channels", 3, where);
  v.image_size = field(j, "image_size", 224, where);
  v.patch_size = field(j, "patch_size", 32, where);
  return v;
}

json vision_to_json(const VisionConfig& v, int projection_dim) {
  return json{{"model_type", "clip_vision_model"}, {"hidden_size", v.hidden_size},
              {"intermediate_size", v.intermediate_size}, {"num_hidden_layers", v.num_layers},
              {"num_attention_heads", v.num_heads}, {"num_channels", v.num_channels},
              {"image_size", v.image_size}, {"patch_size", v.patch_size}, {"hidden_act", v.hidden_act},
              {"layer_norm_eps", v.layer_norm_eps}, {"projection_dim", projection_dim}};
}

LlmConfig llm_from_json(const json& j, const std::string& where) {
  LlmConfig l;  // HF LlamaConfig defaults
  l.vocab_size = field(j, "vocab_size", 32000, where);
  l.hidden_size = field(j, "hidden_size", 4096, where);
  l.intermediate_size = field(j, "intermediate_size", 11008, where);
  l.num_layers = field(j, "num_hidden_layers", 32, where);
  l.num_heads = field(j, "num_attention_heads", 32, where);
  l.num_kv_heads = field(j, "num_key_value_heads", l.num_heads, where);
  l.max_position_embeddings = field(j, "max_position_embeddings", 2048, where);
  l.rms_norm_eps = field(j, "rms_norm_eps", 1e-6, where);
  l.rope_theta = field(j, "rope_theta", 10000.0, where);
  l.tie_word_embeddings = field(j, "tie_word_embeddings", false, where);
  auto act = field<std::string>(j, "hidden_act", "silu", where);
  if (act != "silu") throw FormatError("[hf] " + where + ": hidden_act '" + act + "' is not supported (silu only)");
  if (j.contains("rope_scaling") && !j.at("rope_scaling").is_null())
    throw FormatError("[hf] " + where + ": rope_scaling " + j.at("rope_scaling").dump() + " is not supported");
  if (field(j, "attention_bias", false, where) || field(j, "mlp_bias", false, where))
    throw FormatError("[hf] " + where + ": attention_bias / mlp_bias are not supported");
  return l;
}

json llm_to_json(const LlmConfig& l) {
  return json{{"model_type", "llama"}, {"architectures", {"LlamaForCausalLM"}}, {"vocab_size", l.vocab_size},
              {"hidden_size", l.hidden_size}, {"intermediate_size", l.intermediate_size},
              {"num_hidden_layers", l.num_layers}, {"num_attention_heads", l.num_heads},
              {"num_key_value_heads", l.num_kv_heads}, {"max_position_embeddings", l.max_position_embeddings},
              {"rms_norm_eps", l.rms_norm_eps}, {"rope_theta", l.rope_theta}, {"hidden_act", "silu"},
              {"tie_word_embeddings", l.tie_word_embeddings}, {"rope_scaling", nullptr}};
}


ClipTextConfig clip_text_from_json(const json& j, const std::string& where) {
  ClipTextConfig t;  // HF CLIPTextConfig defaults
  read_clip_encoder(t, j, 512, 2048, 8, where);
  t.vocab_size = field(j, "vocab_size", 49408, where);
  t.max_position_embeddings = field(j, "max_position_embeddings", 77, where);
  return t;
}

std::string torch_dtype_name(torch::ScalarType t) {
  switch (t) {
    case torch::kBFloat16: return "bfloat16";
    case torch::kHalf: return "float16";
    case torch::kDouble: return "float64";
    default: return "float32";
  }
}

// LlavaConfig.projector_hidden_act: the activation between the projector's two layers (transformers' ACT2FN name).
std::string projector_act_from_json(const json& j, const std::string& where) {
  auto act = field<std::string>(j, "projector_hidden_act", "gelu", where);
  try {
    check_activation_name(act);
  } catch (const ConfigError&) {
    throw FormatError("[hf] " + where + ": projector_hidden_act '" + act +
                      "' is not supported (gelu, gelu_new, gelu_pytorch_tanh, quick_gelu, silu or relu)");
  }
  return act;
}

std::string model_type_of(const json& j, const std::string& dir) {
  auto t = field<std::string>(j, "model_type", "", dir + "/config.json");
  if (t.empty()) throw FormatError("[hf] " + dir + "/config.json: no 'model_type'");
  return t;
}

bool is_lora_key(const std::string& k) {
  return k.find(".lora_A.") != std::string::npos || k.find(".lora_B.") != std::string::npos ||
         k.find(".lora_dropout.") != std::string::npos;
}


void ensure_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw IoError("[hf] cannot create directory " + dir + ": " + ec.message());
}

}  // namespace

DefaultDtypeGuard::DefaultDtypeGuard(torch::ScalarType dtype) : saved_(torch::get_default_dtype()) {
  if (at::isFloatingType(dtype)) torch::set_default_dtype(caffe2::TypeMeta::fromScalarType(dtype));
}
DefaultDtypeGuard::~DefaultDtypeGuard() { torch::set_default_dtype(saved_); }

// ---- llava-hf key styles: one table, both directions ---------------------------------------------------

namespace {
struct StyleRoot {
  const char* old_root;  // the older llava-hf layout: emt's module paths
  const char* new_root;  // transformers >= 4.52
};
constexpr StyleRoot kStyleRoots[] = {
    {"language_model.model", "model.language_model"},
    {"language_model.lm_head", "lm_head"},
    {"vision_tower", "model.vision_tower"},
    {"multi_modal_projector", "model.multi_modal_projector"},
};
bool under_root(const std::string& path, const std::string& root) {
  return path == root || starts_with(path, root + ".");
}
}  // namespace

KeyStyle parse_key_style(const std::string& s) {
  if (s == "old") return KeyStyle::Old;
  if (s == "new") return KeyStyle::New;
  throw ConfigError("[hf] key style must be 'old' (language_model.model.*) or 'new' (model.language_model.*), got '" +
                    s + "'");
}

std::string to_string(KeyStyle s) { return s == KeyStyle::Old ? "old" : "new"; }

std::string path_to_style(const std::string& p, KeyStyle style) {
  if (style == KeyStyle::Old) return path_to_old_style(p);
  if (p == "language_model") return "model.language_model";  // the LLM's own module (a PEFT target root)
  for (const auto& r : kStyleRoots)
    if (under_root(p, r.old_root)) return r.new_root + p.substr(std::strlen(r.old_root));
  return p;
}

std::string path_to_old_style(const std::string& p) {
  for (const auto& r : kStyleRoots)
    if (under_root(p, r.new_root)) return r.old_root + p.substr(std::strlen(r.new_root));
  return p;
}

std::optional<KeyStyle> detect_key_style(const std::vector<std::string>& paths, const std::string& file) {
  bool old_seen = false, new_seen = false;
  std::string old_example, new_example;
  for (const auto& p : paths) {
    bool is_new = false, is_old = under_root(p, "language_model");
    for (const auto& r : kStyleRoots) {
      is_new = is_new || under_root(p, r.new_root);
      is_old = is_old || under_root(p, r.old_root);
    }
    if (is_old) {
      if (!old_seen) old_example = p;
      old_seen = true;
    } else if (is_new) {
      if (!new_seen) new_example = p;
      new_seen = true;
    }
  }
  if (old_seen && new_seen)
    throw FormatError("[hf] " + file + ": mixes old-style ('" + old_example + "') and new-style ('" + new_example +
                      "') llava-hf key names");
  if (old_seen) return KeyStyle::Old;
  if (new_seen) return KeyStyle::New;
  return std::nullopt;
}

std::string llava_module_key(const std::string& k) {
  if (ends_with(k, ".position_ids") || ends_with(k, ".rotary_emb.inv_freq")) return "";
  // the original LLaVA code's projector names
  std::string key;
  if (starts_with(k, "model.mm_projector.0.")) key = "multi_modal_projector.linear_1." + k.substr(21);
  else if (starts_with(k, "model.mm_projector.2.")) key = "multi_modal_projector.linear_2." + k.substr(21);
  else key = path_to_old_style(k);
  // transformers 5 holds the tower without CLIPVisionModel's `vision_model.` level and writes it so for a LLaVA
  // it built from a config (`vision_tower.embeddings.*`); a LLaVA it loaded keeps the file's layout.
  const std::string tower = "vision_tower.";
  if (starts_with(key, tower) && !starts_with(key, tower + "vision_model."))
    key = tower + "vision_model." + key.substr(tower.size());
  return key;
}

// The original LLaVA layout's tensor names -> module paths (the LLaMA decoder at the top level, the projector under
// model.mm_projector, a tower saved with the checkpoint under model.vision_tower.vision_tower).
static std::string original_llava_module_key(const std::string& k) {
  if (ends_with(k, ".position_ids") || ends_with(k, ".rotary_emb.inv_freq")) return "";
  if (starts_with(k, "model.mm_projector.0.")) return "multi_modal_projector.linear_1." + k.substr(21);
  if (starts_with(k, "model.mm_projector.2.")) return "multi_modal_projector.linear_2." + k.substr(21);
  if (starts_with(k, "model.mm_projector.")) return "multi_modal_projector.linear_1." + k.substr(19);
  if (starts_with(k, "model.vision_tower.vision_tower.")) return "vision_tower." + k.substr(32);
  if (starts_with(k, "model.")) return "language_model." + k;
  if (starts_with(k, "lm_head.")) return "language_model." + k;
  return k;  // reported as unexpected by the strict loader
}

std::string llava_file_key(const std::string& k, const std::string& style) {
  return path_to_style(k, parse_key_style(style));
}

// ---- strict loading / saving ------------------------------------------------------------------------------

void load_state_strict(torch::nn::Module& module, const CheckpointReader& reader,
                       const std::function<std::string(const std::string&)>& to_module_key,
                       const std::string& source, const std::vector<std::string>& optional_missing) {
  std::map<std::string, torch::Tensor> targets;
  for (auto& p : module.named_parameters(true)) targets[p.key()] = p.value();
  for (auto& b : module.named_buffers(true)) targets[b.key()] = b.value();
  std::vector<std::string> problems;
  std::map<std::string, std::string> seen;  // module key -> file key
  torch::NoGradGuard ng;
  for (auto& name : reader.names()) {
    auto key = to_module_key(name);
    if (key.empty()) continue;
    auto it = targets.find(key);
    if (it == targets.end()) {
      problems.push_back("unexpected tensor '" + name + "'" + (key != name ? " (as '" + key + "')" : ""));
      continue;
    }
    if (seen.count(key)) {
      problems.push_back("tensors '" + seen[key] + "' and '" + name + "' both map to '" + key + "'");
      continue;
    }
    seen[key] = name;
    const auto& info = reader.info(name);
    if (c10::IntArrayRef(info.shape) != it->second.sizes()) {
      problems.push_back("tensor '" + name + "' has shape " + detail::shape_str(info.shape) + ", model expects " +
                         detail::shape_str(it->second.sizes()));
      continue;
    }
    it->second.copy_(reader.load(name));  // converts dtype and device
  }
  for (auto& t : targets) {
    if (seen.count(t.first) || is_lora_key(t.first)) continue;
    if (std::find(optional_missing.begin(), optional_missing.end(), t.first) != optional_missing.end()) continue;
    problems.push_back("missing tensor '" + t.first + "' (shape " + detail::shape_str(t.second.sizes()) + ")");
  }
  if (!problems.empty()) {
    std::string msg = "[hf] " + source + ": " + std::to_string(problems.size()) + " problem(s) loading weights:";
    for (auto& p : problems) msg += "\n  " + p;
    throw FormatError(msg);
  }
}

std::vector<std::pair<std::string, torch::Tensor>> state_for_save(
    torch::nn::Module& module, const std::function<std::string(const std::string&)>& to_file_key) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& p : module.named_parameters(true))
    if (!is_lora_key(p.key())) out.emplace_back(to_file_key(p.key()), p.value().detach());
  for (auto& b : module.named_buffers(true))
    if (!is_lora_key(b.key())) out.emplace_back(to_file_key(b.key()), b.value().detach());
  return out;
}

// ---- config.json ------------------------------------------------------------------------------------------

// The CLIP folder of an original-layout LLaVA: `override` (model.vision_tower), else mm_vision_tower when it is a
// local directory (absolute, or relative to the model directory).
static std::string original_vision_tower(const json& j, const std::string& dir, const std::string& override) {
  const std::string where = dir + "/config.json";
  const auto named = field<std::string>(j, "mm_vision_tower", "", where);
  std::vector<std::string> candidates;
  if (!override.empty()) candidates = {override};
  else if (!named.empty()) candidates = {named, (fs::path(dir) / named).string()};
  for (const auto& c : candidates)
    if (fs::exists(fs::path(c) / "config.json")) return c;
  if (!override.empty())
    throw IoError("[hf] model.vision_tower: '" + override + "' has no config.json (expected a CLIP model directory)");
  throw ConfigError("[hf] " + where + ": the vision tower is not in this checkpoint; config.json names it '" + named +
                    "' (mm_vision_tower), which is not a local directory: download that CLIP model and set "
                    "model.vision_tower=<its directory>");
}

namespace {
// The vision tower's shapes from a CLIP folder (a CLIPModel with vision_config, or a CLIPVisionModel).
VisionConfig clip_folder_vision(const std::string& clip_dir) {
  auto c = read_config_json(clip_dir);
  const std::string where = clip_dir + "/config.json";
  return c.contains("vision_config") ? vision_from_json(c.at("vision_config"), where + ": vision_config")
                                     : vision_from_json(c, where);
}
}  // namespace

ModelSection model_section_from_hf(const std::string& dir, const std::string& vision_tower) {
  auto j = read_config_json(dir);
  auto where = dir + "/config.json";
  auto type = model_type_of(j, dir);
  ModelSection m;
  m.pretrained = dir;
  if ((type == "llava" || type == "llava_llama") && is_original_llava(j)) {
    m.llm = llm_from_json(j, where);
    m.vision = clip_folder_vision(original_vision_tower(j, dir, vision_tower));
    const auto mm_hidden = field<int64_t>(j, "mm_hidden_size", m.vision.hidden_size, where);
    if (mm_hidden != m.vision.hidden_size)
      throw FormatError("[hf] " + where + ": mm_hidden_size " + std::to_string(mm_hidden) +
                        " but the vision tower's hidden_size is " + std::to_string(m.vision.hidden_size));
    m.vision.select_layer = field<int64_t>(j, "mm_vision_select_layer", -1, where);
    const auto feature = field<std::string>(j, "mm_vision_select_feature", "patch", where);
    if (feature != "patch" && feature != "cls_patch")
      throw FormatError("[hf] " + where + ": mm_vision_select_feature '" + feature + "' (expected patch or cls_patch)");
    m.vision.select_feature = feature;
    m.projector = field<std::string>(j, "mm_projector_type", "linear", where);
    // LLaVA v0 (mm_use_im_start_end) was trained with the "###" conversation, LLaVA 1.5 with vicuna_v1.
    m.conversation = field<std::string>(j, "conversation", field(j, "mm_use_im_start_end", false, where)
                                                                 ? "llava_v0" : "vicuna_v1", where);
    return m;
  }
  if (type == "llava") {
    if (!j.contains("vision_config") || !j.contains("text_config"))
      throw FormatError("[hf] " + where + ": llava config needs vision_config and text_config");
    m.vision = vision_from_json(j.at("vision_config"), where + ": vision_config");
    m.llm = llm_from_json(j.at("text_config"), where + ": text_config");
    m.vision.select_layer = field(j, "vision_feature_layer", -2, where);
    auto strategy = field<std::string>(j, "vision_feature_select_strategy", "default", where);
    if (strategy != "default" && strategy != "full")
      throw FormatError("[hf] " + where + ": vision_feature_select_strategy '" + strategy + "' (expected default or full)");
    m.vision.select_feature = strategy == "default" ? "patch" : "cls_patch";
    projector_act_from_json(j, where);  // validated here, applied by load_llava
    if (j.contains("mm_projector_type")) {
      m.projector = field<std::string>(j, "mm_projector_type", "mlp2x_gelu", where);
    } else {
      // llava-hf files do not name the projector: a second projector layer in the weights means mlp2x_gelu.
      m.projector = "linear";
      bool has_weights = fs::exists(fs::path(dir) / "model.safetensors") ||
                         fs::exists(fs::path(dir) / "model.safetensors.index.json");
      if (!has_weights) m.projector = "mlp2x_gelu";
      else
        for (auto& n : CheckpointReader(dir).names())
          if (n.find("multi_modal_projector.linear_2.") != std::string::npos ||
              n.find("mm_projector.2.") != std::string::npos)
            m.projector = "mlp2x_gelu";
    }
    m.conversation = field<std::string>(j, "conversation", "vicuna_v1", where);
  } else if (type == "llama") {
    m.llm = llm_from_json(j, where);
    m.conversation = "plain";
  } else if (type == "clip") {
    m.vision = vision_from_json(j.value("vision_config", json::object()), where + ": vision_config");
    m.clip_text = clip_text_from_json(j.value("text_config", json::object()), where + ": text_config");
    m.clip_text.projection_dim = field(j, "projection_dim", 512, where);
  } else {
    throw FormatError("[hf] " + where + ": model_type '" + type + "' is not supported (llava, llama or clip)");
  }
  return m;
}

// ---- LLaVA ------------------------------------------------------------------------------------------------

namespace {

// An added token's id from added_tokens.json / tokenizer_config.json beside the weights, else `def`.
int64_t added_token_id(const std::string& dir, const std::string& token, int64_t def) {
  const auto added = fs::path(dir) / "added_tokens.json";
  if (fs::exists(added)) {
    auto j = json::parse(read_file(added.string()), nullptr, false);
    if (j.is_object() && j.contains(token) && j.at(token).is_number_integer()) return j.at(token).get<int64_t>();
  }
  return def;
}

// The original LLaVA layout: the decoder and projector from the checkpoint, the tower from it when it holds one,
// else from the CLIP folder; v0's mm_use_im_start_end wraps the image in <im_start>/<im_end>.
LlavaModel load_original_llava(const std::string& hf_dir, const json& j, const std::string& vision_tower) {
  const std::string where = hf_dir + "/config.json";
  auto m = model_section_from_hf(hf_dir, vision_tower);
  const int64_t patch = added_token_id(hf_dir, "<im_patch>", 32000);
  auto model = build_llava(m, patch);
  if (field(j, "mm_use_im_start_end", false, where)) {
    model->options.im_start_id = added_token_id(hf_dir, "<im_start>", patch + 1);
    model->options.im_end_id = added_token_id(hf_dir, "<im_end>", patch + 2);
    for (int64_t id : {model->options.im_start_id, model->options.im_end_id})
      if (id >= m.llm.vocab_size)
        throw FormatError("[hf] " + where + ": mm_use_im_start_end needs <im_start>/<im_end> ids below vocab_size " +
                          std::to_string(m.llm.vocab_size) + " (got " + std::to_string(id) + ")");
  }
  CheckpointReader reader(hf_dir);
  bool has_tower = false;
  for (const auto& n : reader.names()) has_tower = has_tower || starts_with(n, "model.vision_tower.");
  std::vector<std::string> tower_keys;
  if (!has_tower)
    for (const auto& p : model->vision_tower->named_parameters(true)) tower_keys.push_back("vision_tower." + p.key());
  bool tied = m.llm.tie_word_embeddings;
  load_state_strict(*model, reader,
                    [tied](const std::string& k) {
                      auto key = original_llava_module_key(k);
                      return tied && key == "language_model.lm_head.weight" ? std::string() : key;
                    },
                    hf_dir, tower_keys);
  if (!has_tower) {
    const auto clip_dir = original_vision_tower(j, hf_dir, vision_tower);
    // A CLIPModel folder also holds the text tower and projections: only vision_model.* is the tower.
    load_state_strict(*model->vision_tower, CheckpointReader(clip_dir),
                      [](const std::string& k) {
                        return starts_with(k, "vision_model.") && !ends_with(k, ".position_ids") ? k : std::string();
                      },
                      clip_dir);
  }
  return model;
}

}  // namespace

LlavaModel load_llava(const std::string& hf_dir, torch::ScalarType dtype, torch::Device device,
                      const std::string& vision_tower) {
  auto j = read_config_json(hf_dir);
  const auto type = model_type_of(j, hf_dir);
  if (type != "llava" && type != "llava_llama")
    throw FormatError("[hf] " + hf_dir + "/config.json: model_type '" + type + "' is not llava");
  LlavaModel model{nullptr};
  if (is_original_llava(j)) {
    DefaultDtypeGuard g(dtype);
    model = load_original_llava(hf_dir, j, vision_tower);
    model->to(device, dtype);
    return model;
  }
  auto m = model_section_from_hf(hf_dir);
  int64_t image_token = field<int64_t>(j, "image_token_index", 32000, hf_dir + "/config.json");
  CheckpointReader reader(hf_dir);
  {
    DefaultDtypeGuard g(dtype);
    model = build_llava(m, image_token);
  }
  // emt writes the wrapping tokens of a v0 model it saved (llava-hf layout) into config.json.
  model->options.im_start_id = field<int64_t>(j, "im_start_token_index", -1, hf_dir + "/config.json");
  model->options.im_end_id = field<int64_t>(j, "im_end_token_index", -1, hf_dir + "/config.json");
  // ModelSection has no projector activation (emt's own models always use gelu): set it on the built model.
  model->options.projector.act = projector_act_from_json(j, hf_dir + "/config.json");
  model->multi_modal_projector->options.act = model->options.projector.act;
  bool tied = m.llm.tie_word_embeddings;
  load_state_strict(*model, reader,
                    [tied](const std::string& k) {
                      auto key = llava_module_key(k);
                      return tied && key == "language_model.lm_head.weight" ? std::string() : key;
                    },
                    hf_dir);
  model->to(device, dtype);
  return model;
}

void save_llava(LlavaModel& model, const std::string& dir, const std::string& key_style, uint64_t max_shard_bytes) {
  llava_file_key("", key_style);  // validates the style before anything is written
  const auto& o = model->options;
  VisionConfig v;
  v.image_size = o.vision.image_size;
  v.patch_size = o.vision.patch_size;
  v.num_channels = o.vision.num_channels;
  v.hidden_size = o.vision.encoder.hidden_size;
  v.num_layers = o.vision.encoder.num_layers;
  v.num_heads = o.vision.encoder.num_heads;
  v.intermediate_size = o.vision.encoder.intermediate_size;
  v.hidden_act = o.vision.encoder.hidden_act;
  v.layer_norm_eps = o.vision.encoder.layer_norm_eps;
  auto l = llm_config_of(o.llm);
  auto dtype = torch_dtype_name(model->language_model->model->embed_tokens->weight.scalar_type());
  json j{{"model_type", "llava"},
         {"architectures", {"LlavaForConditionalGeneration"}},
         {"vision_config", vision_to_json(v, 768)},
         {"text_config", llm_to_json(l)},
         {"projector_hidden_act", o.projector.act},
         {"mm_projector_type", o.projector.type},
         {"vision_feature_layer", o.select_layer},
         {"vision_feature_select_strategy", o.select_feature == "patch" ? "default" : "full"},
         {"image_token_index", model->image_token_id},
         {"ignore_index", -100},
         {"conversation", o.conversation},
         {"tie_word_embeddings", l.tie_word_embeddings},
         {"torch_dtype", dtype}};
  if (o.wraps_image()) {
    j["mm_use_im_start_end"] = true;
    j["im_start_token_index"] = o.im_start_id;
    j["im_end_token_index"] = o.im_end_id;
  }
  j["text_config"]["torch_dtype"] = dtype;
  ensure_dir(dir);
  write_file_atomic((fs::path(dir) / "config.json").string(), j.dump(2) + "\n");
  save_checkpoint(dir, state_for_save(*model, [&](const std::string& k) { return llava_file_key(k, key_style); }),
                  max_shard_bytes);
}

// ---- plain CLIP / LLaMA -----------------------------------------------------------------------------------

ClipModel load_clip(const std::string& hf_dir, torch::ScalarType dtype, torch::Device device) {
  auto j = read_config_json(hf_dir);
  if (model_type_of(j, hf_dir) != "clip")
    throw FormatError("[hf] " + hf_dir + "/config.json: model_type '" + model_type_of(j, hf_dir) + "' is not clip");
  auto m = model_section_from_hf(hf_dir);
  auto o = clip_options(m.vision, m.clip_text);
  // HF's legacy pooling (argmax of ids) applies when the text config keeps the old eos_token_id of 2.
  int64_t eos = field<int64_t>(j.value("text_config", json::object()), "eos_token_id", 2, hf_dir);
  o.text.eos_token_id = eos == 2 ? -1 : eos;
  o.logit_scale_init = field(j, "logit_scale_init_value", 2.6592, hf_dir);
  CheckpointReader reader(hf_dir);
  ClipModel model{nullptr};
  {
    DefaultDtypeGuard g(dtype);
    model = ClipModel(o);
  }
  load_state_strict(*model, reader, [](const std::string& k) { return ends_with(k, ".position_ids") ? "" : k; },
                    hf_dir);
  model->to(device, dtype);
  return model;
}

void save_clip(ClipModel& model, const std::string& dir) {
  const auto& o = model->options;
  auto enc = [](const ClipEncoderOptions& e) {
    return json{{"hidden_size", e.hidden_size}, {"intermediate_size", e.intermediate_size},
                {"num_hidden_layers", e.num_layers}, {"num_attention_heads", e.num_heads},
                {"hidden_act", e.hidden_act}, {"layer_norm_eps", e.layer_norm_eps}};
  };
  json vj = enc(o.vision.encoder);
  vj["model_type"] = "clip_vision_model";
  vj["image_size"] = o.vision.image_size;
  vj["patch_size"] = o.vision.patch_size;
  vj["num_channels"] = o.vision.num_channels;
  json tj = enc(o.text.encoder);
  tj["model_type"] = "clip_text_model";
  tj["vocab_size"] = o.text.vocab_size;
  tj["max_position_embeddings"] = o.text.max_position_embeddings;
  tj["eos_token_id"] = o.text.eos_token_id < 0 ? 2 : o.text.eos_token_id;
  json j{{"model_type", "clip"}, {"architectures", {"CLIPModel"}}, {"projection_dim", o.projection_dim},
         {"logit_scale_init_value", o.logit_scale_init}, {"vision_config", vj}, {"text_config", tj},
         {"torch_dtype", torch_dtype_name(model->logit_scale.scalar_type())}};
  ensure_dir(dir);
  write_file_atomic((fs::path(dir) / "config.json").string(), j.dump(2) + "\n");
  save_checkpoint(dir, state_for_save(*model, [](const std::string& k) { return k; }));
}

LlamaForCausalLM load_llama(const std::string& hf_dir, torch::ScalarType dtype, torch::Device device) {
  auto j = read_config_json(hf_dir);
  if (model_type_of(j, hf_dir) != "llama")
    throw FormatError("[hf] " + hf_dir + "/config.json: model_type '" + model_type_of(j, hf_dir) + "' is not llama");
  auto o = llama_options(llm_from_json(j, hf_dir + "/config.json"));
  CheckpointReader reader(hf_dir);
  LlamaForCausalLM model{nullptr};
  {
    DefaultDtypeGuard g(dtype);
    model = LlamaForCausalLM(o);
  }
  bool tied = o.tie_word_embeddings;
  load_state_strict(*model, reader,
                    [tied](const std::string& k) {
                      if (ends_with(k, ".rotary_emb.inv_freq") || (tied && k == "lm_head.weight")) return std::string();
                      return k;
                    },
                    hf_dir);
  model->to(device, dtype);
  return model;
}

void save_llama(LlamaForCausalLM& model, const std::string& dir) {
  const auto& o = model->options;
  auto l = llm_config_of(o);
  auto j = llm_to_json(l);
  j["torch_dtype"] = torch_dtype_name(model->model->embed_tokens->weight.scalar_type());
  ensure_dir(dir);
  write_file_atomic((fs::path(dir) / "config.json").string(), j.dump(2) + "\n");
  save_checkpoint(dir, state_for_save(*model, [](const std::string& k) { return k; }));
}

}  // namespace emt
