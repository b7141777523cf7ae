// `emt model summary CONFIG|HF_DIR`: per-component parameter counts and the memory each training method needs,
// computed from shapes alone (works for 13B on a laptop).
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/core/llava.h>
#include <emt/core/model_summary.h>

#include <filesystem>
#include <iostream>

#include "commands.h"

namespace {

namespace fs = std::filesystem;

struct SummaryArgs {
  std::string source;
  std::vector<std::string> methods;
  std::string dtype;
  std::vector<std::string> overrides;
};

void run_summary(const SummaryArgs& a) {
  emt::RunConfig cfg;
  bool is_hf_dir = fs::is_directory(a.source) && fs::exists(fs::path(a.source) / "config.json");
  if (is_hf_dir) {
    cfg.model = emt::model_section_from_hf(a.source);
  } else {
    cfg = emt::load_config(a.source, a.overrides);
    const auto& dir = cfg.model.pretrained;
    // downloaded weights are the authority on shapes when they are present
    if (!dir.empty() && fs::exists(fs::path(dir) / "config.json")) {
      std::cout << "shapes from " << dir << "/config.json\n";
      cfg.model = emt::model_section_from_hf(dir);
    }
  }
  auto dtype = a.dtype.empty() ? cfg.run.dtype : a.dtype;
  auto methods = a.methods.empty() ? emt::training_methods() : a.methods;
  std::cout << emt::format_model_summary(cfg.model, cfg.finetune, dtype, methods);
}

emt::cli::RegisterCommand register_model([](CLI::App& root) {
  auto* model = root.add_subcommand("model", "Inspect model shapes");
  model->require_subcommand(1);
  auto args = std::make_shared<SummaryArgs>();
  auto* summary = model->add_subcommand(
      "summary", "Parameter counts per component and training memory per method (nothing is allocated)");
  summary->add_option("config", args->source, "YAML config (its model: section) or an HF model directory")
      ->required();
  summary->add_option("overrides", args->overrides, "dotted.key=value overrides");
  summary->add_option("--method", args->methods,
                      "method(s) to show: linear, lora, lora-only, prompt, linear+prompt, full (default: all)");
  summary->add_option("--dtype", args->dtype, "dtype of frozen weights: f32, bf16, f16 (default: run.dtype)");
  summary->callback([args] { run_summary(*args); });
});

}  // namespace
