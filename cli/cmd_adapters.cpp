// `emt adapters merge --model DIR --adapter DIR --out DIR`: bakes a PEFT LoRA adapter into an HF LLaVA directory.
// `emt adapters info DIR`: prints an adapter directory's config and tensor list.
#include <emt/adapters/lora.h>
#include <emt/adapters/peft.h>
#include <emt/core/error.h>
#include <emt/core/llava.h>
#include "core/logging.h"
#include <emt/core/runtime.h>

#include <filesystem>
#include <iostream>

#include "commands.h"

namespace {

namespace fs = std::filesystem;

struct MergeArgs {
  std::string model, adapter, out, key_style = "old", dtype = "f32";
};

void run_merge(const MergeArgs& a) {
  emt::parse_key_style(a.key_style);
  auto dtype = emt::parse_dtype(a.dtype);
  if (fs::exists(a.out) && !fs::is_empty(a.out))
    throw emt::ConfigError("[adapters] --out " + a.out + " exists and is not empty");
  auto cfg = emt::read_adapter_config(a.adapter);
  if (cfg.peft_type != "LORA")
    throw emt::ConfigError("[adapters] " + a.adapter + ": only LORA adapters can be merged (peft_type is '" +
                           cfg.peft_type + "')");
  // Merge in f32 so the delta is not rounded twice, then store in the requested dtype.
  auto model = emt::load_llava(a.model, torch::kFloat32);
  auto loaded = emt::load_lora_adapter(*model, a.adapter);
  emt::merge_lora(*model);
  if (dtype != torch::kFloat32) model->to(dtype);
  emt::save_llava(model, a.out, a.key_style);
  // A model directory is self-contained: carry the tokenizer and preprocessing files along.
  for (const char* name : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "added_tokens.json", "preprocessor_config.json", "generation_config.json",
                           "chat_template.json"}) {
    fs::path src = fs::path(a.model) / name, dst = fs::path(a.out) / name;
    if (fs::exists(src) && !fs::exists(dst)) fs::copy_file(src, dst);
  }
  emt::log_info("[adapters] merged {} LoRA layers{} from {} into {} -> {}", loaded.lora_modules.size(),
                loaded.full_params.empty() ? "" : " and " + std::to_string(loaded.full_params.size()) +
                                                      " full tensors",
                a.adapter, a.model, a.out);
}

emt::cli::RegisterCommand register_adapters([](CLI::App& root) {
  auto* adapters = root.add_subcommand("adapters", "Inspect and merge PEFT adapters");
  adapters->require_subcommand(1);

  auto args = std::make_shared<MergeArgs>();
  auto* merge = adapters->add_subcommand("merge", "Merge a LoRA adapter into an HF LLaVA model directory");
  merge->add_option("--model", args->model, "HF LLaVA model directory")->required();
  merge->add_option("--adapter", args->adapter, "PEFT adapter directory (adapter_config.json + safetensors)")
      ->required();
  merge->add_option("--out", args->out, "output model directory (must not exist or be empty)")->required();
  merge->add_option("--key-style", args->key_style, "key layout of the output: old | new")->capture_default_str();
  merge->add_option("--dtype", args->dtype, "dtype of the written weights: f32 | bf16 | f16")->capture_default_str();
  merge->callback([args] { run_merge(*args); });

  auto dir = std::make_shared<std::string>();
  auto* info = adapters->add_subcommand("info", "Print an adapter's config and tensors (names, dtypes, shapes)");
  info->add_option("dir", *dir, "adapter directory")->required();
  info->callback([dir] { std::cout << emt::describe_adapter(*dir); });
});

}  // namespace
