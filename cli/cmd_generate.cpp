// `emt generate --model DIR|CONFIG --image PATH --prompt TEXT`: answers one question about one image with a
// model directory (HF layout: config.json, safetensors, tokenizer, preprocessor_config.json), optionally with a
// trained checkpoint on top (`--adapter DIR`: an epoch directory or a PEFT folder).
#include <emt/adapters/peft.h>
#include <emt/core/config.h>
#include <emt/core/conversation.h>
#include <emt/core/error.h>
#include <emt/core/generate.h>
#include <emt/core/image.h>
#include <emt/core/llava.h>
#include <emt/core/runtime.h>
#include <emt/core/safetensors.h>
#include <emt/core/tokenizer.h>
#include <torch/torch.h>

#include <filesystem>
#include <iostream>

#include "commands.h"

namespace {

namespace fs = std::filesystem;

struct GenerateArgs {
  std::string model, adapter, image, prompt, dump_logits, system, dtype = "f32", device = "cpu";
  int64_t max_new_tokens = 32;
  double temperature = 0.0, top_p = 1.0;
  uint64_t seed = 0;
  std::vector<std::string> overrides;
};

bool is_model_dir(const std::string& p) { return fs::is_directory(p) && fs::exists(fs::path(p) / "config.json"); }

void run_generate(const GenerateArgs& a) {
  std::string dir = a.model, conversation, system = a.system;
  if (!is_model_dir(dir)) {
    if (!fs::is_regular_file(a.model))
      throw emt::ConfigError("[generate] --model " + a.model + ": neither a model directory with config.json nor a "
                             "config file");
    auto cfg = emt::load_config(a.model, a.overrides);
    dir = cfg.model.pretrained.empty() ? cfg.pretrain.cache_dir : cfg.model.pretrained;
    conversation = cfg.model.conversation;
    if (system.empty()) system = cfg.model.system_prompt;
    if (!is_model_dir(dir))
      throw emt::ConfigError("[generate] " + a.model + ": model directory '" + dir + "' has no config.json (set "
                             "model.pretrained, or build the tiny base model with `emt pretrain` first)");
  }
  auto device = emt::resolve_device(a.device);
  auto model = emt::load_llava(dir, emt::parse_dtype(a.dtype), device);
  if (!a.adapter.empty()) {
    auto what = emt::apply_checkpoint_dir(model, a.adapter);
    std::cerr << "[generate] " << a.adapter << ": " << what << "\n";
  }
  model->eval();
  if (conversation.empty()) conversation = model->options.conversation;
  auto tokenizer = emt::load_hf_tokenizer(dir);
  int64_t tok_image = tokenizer->special_token_id("<image>");
  if (tok_image >= 0 && tok_image != model->image_token_id)
    throw emt::FormatError("[generate] " + dir + ": the tokenizer's <image> id " + std::to_string(tok_image) +
                           " differs from config.json image_token_index " + std::to_string(model->image_token_id));
  auto pre_path = (fs::path(dir) / "preprocessor_config.json").string();
  auto image_opts = fs::exists(pre_path) ? emt::load_hf_preprocessor_config(pre_path)
                                         : emt::image_options_for_size(model->options.vision.image_size);
  auto pixels = emt::preprocess_image(emt::decode_image_file(a.image), image_opts).unsqueeze(0).to(device);

  auto text = emt::render_prompt(conversation, system, a.prompt);
  auto ids_vec = tokenizer->encode(text, /*add_bos=*/true);
  auto ids = torch::tensor(ids_vec, torch::kLong).unsqueeze(0).to(device);
  auto mask = torch::ones_like(ids);

  if (!a.dump_logits.empty()) {
    auto logits = emt::next_token_logits(model, pixels, ids, mask);
    emt::save_safetensors(a.dump_logits, {{"input_ids", ids.cpu()}, {"logits", logits.cpu()}},
                          {{"model", dir}, {"prompt", text}});
  }
  emt::GenerateOptions g;
  g.max_new_tokens = a.max_new_tokens;
  g.temperature = a.temperature;
  g.top_p = a.top_p;
  g.seed = a.seed;
  g.eos_id = tokenizer->eos_id();
  g.stop_strings = emt::stop_strings(conversation);
  g.tokenizer = tokenizer.get();
  auto out = emt::generate(model, pixels, ids, mask, g);
  auto answer = tokenizer->decode(out[0]);
  for (auto& s : g.stop_strings) {
    auto cut = s.empty() ? std::string::npos : answer.find(s);
    if (cut != std::string::npos) answer = answer.substr(0, cut);
  }
  std::cout << answer << "\n";
}

emt::cli::RegisterCommand register_generate([](CLI::App& root) {
  auto args = std::make_shared<GenerateArgs>();
  auto* cmd = root.add_subcommand("generate", "Answer a question about an image with a model directory or config");
  cmd->add_option("--model", args->model, "HF-layout model directory, or a YAML config (model.pretrained)")
      ->required();
  cmd->add_option("--adapter", args->adapter, "checkpoint or PEFT directory put on top of the model (LoRA, prompt tuning, mm_projector.safetensors)");
  cmd->add_option("--image", args->image, "image file")->required()->check(CLI::ExistingFile);
  cmd->add_option("--prompt", args->prompt, "question; <image> is placed before it unless it holds one")->required();
  cmd->add_option("--system", args->system, "system text (default: the template's)");
  cmd->add_option("--dump-logits", args->dump_logits,
                  "write input_ids and the next-token logits after the prompt to this safetensors file");
  cmd->add_option("--max-new-tokens", args->max_new_tokens, "longest answer")->capture_default_str();
  cmd->add_option("--temperature", args->temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-p", args->top_p, "nucleus mass when sampling")->capture_default_str();
  cmd->add_option("--seed", args->seed, "sampling seed")->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "f32 | bf16 | f16")->capture_default_str();
  cmd->add_option("--device", args->device, "cpu | cuda | cuda:N | auto")->capture_default_str();
  cmd->add_option("overrides", args->overrides, "dotted.key=value config overrides");
  cmd->callback([args] { run_generate(*args); });
});

}  // namespace
