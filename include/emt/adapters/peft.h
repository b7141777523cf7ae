// PEFT-compatible adapter directories (adapter_config.json + adapter_model.safetensors) for LoRA and prompt
// tuning, LLaVA projector files (HF `multi_modal_projector.linear_N` and original `model.mm_projector.N` names),
// and the mapping between the two llava-hf key styles. Byte-level format: docs/adapters.md.
#pragma once
#include <emt/core/config.h>
#include <emt/core/hf_checkpoint.h>
#include <emt/core/llava.h>
#include <emt/core/safetensors.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace emt {

// Key styles (KeyStyle, path_to_style, path_to_old_style, detect_key_style) live in <emt/core/hf_checkpoint.h>.

// ---- adapter_config.json ---------------------------------------------------------------------------------------
// The fields emt reads from (and writes to) adapter_config.json. Unknown fields are kept in `json` only.
struct AdapterFileConfig {
  std::string peft_type;  // LORA | PROMPT_TUNING
  std::string task_type = "CAUSAL_LM";
  std::string base_model_name_or_path;
  // LORA
  int64_t r = 0;
  double lora_alpha = 0.0;
  double lora_dropout = 0.0;
  bool use_rslora = false;
  std::string bias = "none";
  std::vector<std::string> target_modules;  // list form
  std::string target_regex;                 // string form (PEFT: re.fullmatch on the module path)
  std::vector<std::string> exclude_modules;
  std::vector<std::string> modules_to_save;
  std::map<std::string, int64_t> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  std::string init_lora_weights = "true";  // true | false | gaussian | ...
  // PROMPT_TUNING
  int64_t num_virtual_tokens = 0;
  int64_t token_dim = 0;
  int64_t num_transformer_submodules = 1;
  int64_t num_attention_heads = 0;
  int64_t num_layers = 0;
  std::string prompt_tuning_init = "RANDOM";  // RANDOM | TEXT
  std::string prompt_tuning_init_text;
  std::string tokenizer_name_or_path;

  std::string json;  // the file's text as read (or as written)
  // LoRA settings equivalent to this file (r, alpha, dropout, rsLoRA, patterns, targets).
  LoraConfig to_lora_config() const;
};
// Reads DIR/adapter_config.json. IoError if absent, FormatError for malformed JSON or wrong field types.
AdapterFileConfig read_adapter_config(const std::string& dir);

// ---- LoRA adapters ---------------------------------------------------------------------------------------------
struct LoraSaveOptions {
  std::string key_style = "old";             // module paths in the file: old | new llava-hf layout
  std::string base_model_name_or_path;       // recorded in adapter_config.json (null when empty)
  std::vector<std::string> modules_to_save;  // module paths (emt layout) saved whole, e.g. multi_modal_projector
  // Also write the projector (when it is in modules_to_save) as its own file with LLaVA's mm_projector names;
  // empty = do not.
  std::string projector_file = "mm_projector.safetensors";
  std::string dtype;                         // tensor dtype in the file: "" = as in memory | f32 | bf16 | f16
};
// Writes DIR/adapter_config.json and DIR/adapter_model.safetensors for every adapted layer of `model`:
// keys `base_model.model.<path>.lora_A.weight` / `.lora_B.weight` (+ `base_model.model.<path>.<param>` for
// modules_to_save). `cfg` supplies alpha/rsLoRA/patterns; ranks come from the layers. target_modules is written
// so that PEFT selects exactly the adapted layers (the name list when that is exact, else a regex).
// Merged layers are saved with their deltas; the weights are untouched.
void save_lora_adapter(torch::nn::Module& model, const LoraConfig& cfg, const std::string& dir,
                       const LoraSaveOptions& opts = {});

struct LoadedAdapter {
  AdapterFileConfig config;
  KeyStyle key_style = KeyStyle::Old;
  std::vector<std::string> lora_modules;  // emt paths that received a delta
  std::vector<std::string> full_params;   // emt parameter names overwritten (modules_to_save)
};
// Loads a PEFT LoRA adapter (either key style, detected) into `model`: attaches a delta of the file's rank to
// every listed layer (scale from lora_alpha / alpha_pattern / use_rslora), copies A and B (and modules_to_save
// tensors), converting dtype. Nothing is changed unless everything fits; otherwise ONE FormatError names every
// missing module, non-Linear target, shape mismatch and unpaired A/B. Base weights are frozen, deltas trainable
// only when `trainable`.
LoadedAdapter load_lora_adapter(torch::nn::Module& model, const std::string& dir, bool trainable = false);

// ---- prompt tuning ---------------------------------------------------------------------------------------------
struct PromptAdapterMeta {
  std::string base_model_name_or_path;
  std::string tokenizer_name_or_path;
  std::string init = "random";  // random | text
  std::string init_text;
  int64_t num_attention_heads = 0;  // of the language model (recorded, as PEFT does)
  int64_t num_layers = 0;
};
// PEFT PROMPT_TUNING directory: adapter_config.json + adapter_model.safetensors with `prompt_embeddings` [K, D].
void save_prompt_adapter(const std::string& dir, const torch::Tensor& embeddings, const PromptAdapterMeta& meta,
                         const std::string& dtype = "");
// Returns `prompt_embeddings` [K, D] (file dtype). FormatError when peft_type is not PROMPT_TUNING, the tensor is
// missing, or D != expected_token_dim (when > 0) or K != num_virtual_tokens.
torch::Tensor load_prompt_adapter(const std::string& dir, int64_t expected_token_dim = 0,
                                  AdapterFileConfig* config = nullptr);
// PEFT's initialisation: "random" = N(0, 1) like nn.Embedding; "text" = the embeddings of `text_ids` (rows of
// `embed_weight` [V, D]), cut to K or repeated until K. Result [K, D] f32 (or embed_weight's dtype for text).
torch::Tensor init_prompt_embeddings(int64_t k, const torch::Tensor& embed_weight, const std::string& init,
                                     const std::vector<int64_t>& text_ids = {});

// ---- projector files -------------------------------------------------------------------------------------------
enum class ProjectorNaming {
  Hf,    // multi_modal_projector.linear_1.weight ...
  Llava  // model.mm_projector.0.weight / .2.weight (mlp2x_gelu), model.mm_projector.weight (linear)
};
// The projector's tensors (a module with children linear_1 [, linear_2]) under `naming`.
NamedTensors projector_tensors(torch::nn::Module& projector, ProjectorNaming naming);
void save_projector_file(torch::nn::Module& projector, const std::string& path,
                         ProjectorNaming naming = ProjectorNaming::Llava, const std::string& dtype = "");
// Accepts HF (old or new style) and original LLaVA names (with or without `model.`); returns the naming found.
// ONE FormatError lists every missing, unexpected or mis-shaped tensor.
ProjectorNaming load_projector_file(torch::nn::Module& projector, const std::string& path);

// ---- checkpoint directories ------------------------------------------------------------------------------------
// Puts a trained checkpoint on top of `model`: an epoch directory of `emt train` / the study, or any PEFT folder.
// Applies the LoRA or prompt-tuning adapter (adapter_config.json) and/or mm_projector.safetensors found in DIR,
// converting to the model's device and dtype. Returns a one-line description of what was applied; ConfigError
// naming DIR when it holds neither.
std::string apply_checkpoint_dir(LlavaModel& model, const std::string& dir);

// ---- inspection ------------------------------------------------------------------------------------------------
// Human-readable summary of an adapter directory: the config JSON, then one line per tensor
// "name  dtype  [shape]" in file order. Used by `emt adapters info`.
std::string describe_adapter(const std::string& dir);

}  // namespace emt
