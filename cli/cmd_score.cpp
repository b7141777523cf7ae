// `emt score CONFIG [key=value...] [--adapter DIR] [--out DIR]`: scores the base model (optionally with a PEFT
// adapter / projector checkpoint on top) on every eval dataset, plus the CLIP zero-shot baseline, and writes
// OUT/results.jsonl (the study's row schema) and OUT/predictions/<dataset>.jsonl.
#include <emt/adapters/peft.h>
#include <emt/core/config.h>
#include <emt/core/error.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <emt/eval/evaluator.h>
#include <emt/eval/metrics.h>
#include <emt/train/finetune.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <iostream>

#include "commands.h"

namespace {

namespace fs = std::filesystem;

struct ScoreArgs {
  std::string config, adapter, out;
  std::vector<std::string> overrides;
  bool no_clip = false;
  bool allow_judge = false;
};

// eval.clip_model, else <base model dir>/clip when it has a config.json, else "".
std::string clip_model_dir(const emt::RunConfig& cfg) {
  if (!cfg.eval.clip_model.empty()) return cfg.eval.clip_model;
  const fs::path d = fs::path(emt::base_model_dir(cfg)) / "clip";
  return fs::exists(d / "config.json") ? d.string() : std::string();
}

// Which cell a scored model belongs to, so that its rows sit in the study's grid (and `emt report` reads them).
struct ScoredCell {
  std::string finetune_dataset, method = "base";
  int64_t seed = 0, epoch = 0;
};

// A checkpoint emt wrote (RUN/cells/<cell>/epoch_K) carries the training config: its fine-tuning dataset,
// method and seed, and K from its name. Any other adapter directory becomes method "adapter" with the
// directory's name as its fine-tuning dataset.
ScoredCell scored_cell(const std::string& adapter, const emt::RunConfig& cfg) {
  ScoredCell c;
  if (adapter.empty()) return c;  // the base model: seed 0, epoch 0, as in a study
  c.seed = cfg.run.seed;
  const fs::path dir = fs::path(adapter).lexically_normal();
  const std::string name = (dir.has_filename() ? dir : dir.parent_path()).filename().string();
  if (name.rfind("epoch_", 0) == 0 && name.size() > 6 && name.find_first_not_of("0123456789", 6) == std::string::npos)
    c.epoch = std::stoll(name.substr(6));
  if (fs::exists(dir / "config.yaml")) {
    auto trained = emt::load_config((dir / "config.yaml").string(), {});
    c.finetune_dataset = trained.finetune.dataset;
    c.method = trained.finetune.method;
    c.seed = trained.run.seed;
  }
  if (c.finetune_dataset.empty()) {
    c.method = "adapter";
    c.finetune_dataset = c.epoch > 0 ? dir.parent_path().filename().string() : name;
  }
  return c;
}

emt::ResultRow row_of(const emt::DatasetScores& s, const std::string& scorer, const emt::ScoreCounts& c,
                      const ScoredCell& cell, const std::string& run) {
  if (scorer == "clip_zero_shot")
    return emt::make_result_row("clip_zero_shot", "", "clip", 0, 0, s.dataset, scorer, c, run);
  return emt::make_result_row("mllm", cell.finetune_dataset, cell.method, cell.seed, cell.epoch, s.dataset, scorer, c,
                              run);
}

void run_score(const ScoreArgs& a) {
  auto cfg = emt::load_config(a.config, a.overrides);
  emt::set_log_level(emt::parse_log_level(cfg.run.log_level));
  emt::apply_run_section(cfg.run);
  const std::string out = a.out.empty() ? (fs::path(cfg.run.out_dir) / cfg.run.name / "score").string() : a.out;

  emt::Evaluator ev(cfg);  // opens the data first: a bad dataset fails before the model is loaded
  auto base = emt::load_base_model(cfg);
  auto m = emt::eval_model(base);
  if (!a.adapter.empty()) emt::log_info("[score] {}: {}", a.adapter, emt::apply_checkpoint_dir(m.model, a.adapter));

  const auto scorers = cfg.eval.scorers;
  const bool want_clip_scorer = cfg.eval.primary_scorer == "clip" ||
                                std::find(scorers.begin(), scorers.end(), "clip") != scorers.end();
  const std::string clip_dir = a.no_clip ? "" : clip_model_dir(cfg);
  std::pair<emt::ClipModel, std::shared_ptr<emt::Tokenizer>> clip{emt::ClipModel(nullptr), nullptr};
  if (!clip_dir.empty() && (want_clip_scorer || cfg.eval.clip_baseline)) {
    clip = emt::load_clip_dir(clip_dir, m.device);
    if (want_clip_scorer) ev.set_clip(clip.first, clip.second);
  } else if (cfg.eval.clip_baseline && !a.no_clip) {
    emt::log_warn("[score] no CLIP model (eval.clip_model unset and {}/clip absent): no zero-shot baseline",
                  emt::base_model_dir(cfg));
  }

  fs::create_directories(out);
  auto scores = ev.evaluate(m, (fs::path(out) / "predictions").string());
  std::vector<emt::ResultRow> rows;
  const ScoredCell cell = scored_cell(a.adapter, cfg);
  const std::string run = fs::path(out).lexically_normal().filename().string();
  for (const auto& s : scores)
    for (const auto& [scorer, c] : s.by_scorer) rows.push_back(row_of(s, scorer, c, cell, run));
  if (clip.first && cfg.eval.clip_baseline) {
    auto zs = ev.clip_zero_shot(clip.first, *clip.second, emt::clip_image_options(clip_dir, clip.first), m.device);
    for (const auto& s : zs)
      for (const auto& [scorer, c] : s.by_scorer) rows.push_back(row_of(s, scorer, c, cell, run));
  }
  std::string lines;
  for (const auto& r : rows) lines += emt::result_to_json_line(r) + "\n";
  emt::write_file_atomic((fs::path(out) / "results.jsonl").string(), lines);

  std::cout << fmt::format("{:<20} {:<16} {:>9} {:>7}  {}\n", "dataset", "scorer", "accuracy", "n", "95% interval");
  for (const auto& r : rows)
    std::cout << fmt::format("{:<20} {:<16} {:>8.2f}% {:>7}  [{:.2f}, {:.2f}]\n", r.eval_dataset, r.scorer,
                             100.0 * r.accuracy, r.n, 100.0 * r.ci_low, 100.0 * r.ci_high);
  std::cout << "results: " << (fs::path(out) / "results.jsonl").string() << "\n";
}

emt::cli::RegisterCommand register_score([](CLI::App& root) {
  auto args = std::make_shared<ScoreArgs>();
  auto* cmd = root.add_subcommand("score", "Score a model (optionally with an adapter) on every eval dataset");
  cmd->add_option("config", args->config, "YAML config")->required()->check(CLI::ExistingFile);
  cmd->add_option("overrides", args->overrides, "dotted.key=value config overrides");
  cmd->add_option("--adapter", args->adapter,
                  "checkpoint directory with a PEFT adapter and/or mm_projector.safetensors (e.g. RUN/epoch_3)")
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--out", args->out, "output directory (default: <run.out_dir>/<run.name>/score)");
  cmd->add_flag("--no-clip", args->no_clip, "skip the CLIP model (no zero-shot baseline, no clip scorer)");
  cmd->add_flag("--allow-judge", args->allow_judge, "run the judge command or contact the judge endpoint the config names (eval.judge_command, eval.judge_url)");
  cmd->callback([args] {
    emt::allow_config_judge(args->allow_judge);
    run_score(*args);
  });
});

}  // namespace
