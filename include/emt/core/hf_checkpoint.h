// HF checkpoint plumbing: key-style mapping, strict state loading with one report of every problem, config.json
// readers/writers, and loading/saving plain CLIP and LLaMA directories.
#pragma once
#include <emt/core/clip.h>
#include <emt/core/llama.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace emt {

class CheckpointReader;

// ---- llava-hf key styles (one mapping, used by checkpoints and PEFT adapters alike) ------------------------
// Old: vision_tower.*, multi_modal_projector.*, language_model.model.*, language_model.lm_head.*  (emt's own layout)
// New: model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.*
enum class KeyStyle { Old, New };
KeyStyle parse_key_style(const std::string& s);  // "old" | "new"; ConfigError otherwise
std::string to_string(KeyStyle s);
// Old-style path -> `style`. Paths outside the four LLaVA roots are returned unchanged.
std::string path_to_style(const std::string& old_path, KeyStyle style);
// Either style -> old style (emt's module paths).
std::string path_to_old_style(const std::string& path);
// The style of a set of paths (module or tensor paths, without PEFT's "base_model.model." prefix); nullopt when
// none of them is under a LLaVA root. FormatError when both styles occur.
std::optional<KeyStyle> detect_key_style(const std::vector<std::string>& paths, const std::string& file);

// File key -> the module key of LlavaModel (older llava-hf layout); "" when the key is a known non-persistent
// buffer to skip (`*.position_ids`, `*.rotary_emb.inv_freq`). Handles the newer `model.language_model.*`,
// `model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head.*`, the original `model.mm_projector.0/2`, and
// a vision tower without its `vision_model.` level (`vision_tower.embeddings.*`, as transformers 5 writes it).
std::string llava_module_key(const std::string& file_key);
// Module key -> file key in `style` "old" (identity) or "new" (path_to_style). ConfigError on other styles.
std::string llava_file_key(const std::string& module_key, const std::string& style);

// Copies every tensor of `reader` into `module`'s parameters and buffers, where `to_module_key` names the target
// ("" = skip). Converts dtype and device to the target's. Throws one FormatError listing all missing, unexpected
// and mis-shaped tensors by name (`source` labels the message). `optional_missing` names module keys that may be
// absent (left as they are).
void load_state_strict(torch::nn::Module& module, const CheckpointReader& reader,
                       const std::function<std::string(const std::string&)>& to_module_key,
                       const std::string& source, const std::vector<std::string>& optional_missing = {});
// The module's parameters and buffers as (file key, tensor), LoRA children skipped.
std::vector<std::pair<std::string, torch::Tensor>> state_for_save(
    torch::nn::Module& module, const std::function<std::string(const std::string&)>& to_file_key);

// Plain HF CLIP (`vision_model.*`, `text_model.*`, `visual_projection`, `text_projection`, `logit_scale`).
ClipModel load_clip(const std::string& hf_dir, torch::ScalarType dtype = torch::kFloat32,
                    torch::Device device = torch::kCPU);
void save_clip(ClipModel& model, const std::string& dir);
// Plain HF LLaMA (`model.*`, `lm_head.*`).
LlamaForCausalLM load_llama(const std::string& hf_dir, torch::ScalarType dtype = torch::kFloat32,
                            torch::Device device = torch::kCPU);
void save_llama(LlamaForCausalLM& model, const std::string& dir);

// Builds modules with parameters created directly in `dtype` (so a 7B model in bf16 never exists in f32).
// The default dtype is process-wide: other threads creating tensors without a dtype meanwhile would get `dtype`.
class DefaultDtypeGuard {
 public:
  explicit DefaultDtypeGuard(torch::ScalarType dtype);
  ~DefaultDtypeGuard();
  DefaultDtypeGuard(const DefaultDtypeGuard&) = delete;
  DefaultDtypeGuard& operator=(const DefaultDtypeGuard&) = delete;

 private:
  caffe2::TypeMeta saved_;
};

}  // namespace emt
