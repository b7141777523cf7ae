// `emt eval --rescore RUN_DIR [--judge CMD | --judge-url URL --judge-model M] [--config CFG]`: re-scores a run's kept generations (predictions/)
// with the strict scorer (and an external judge), rewrites results.jsonl and prints the matrix. Model-based
// evaluation options of `emt eval` belong in this file too.
#include <emt/core/config.h>
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include "core/logging.h"
#include <emt/eval/evaluator.h>
#include <emt/eval/metrics.h>
#include <emt/eval/report.h>
#include <emt/eval/scoring.h>

#include <filesystem>
#include <iostream>
#include <memory>

#include "commands.h"

namespace {

namespace fs = std::filesystem;

struct EvalArgs {
  std::string rescore, judge, config;
  std::vector<std::string> aliases;
  emt::JudgeOptions http;  // --judge-url and friends
};

// Class names per dataset: the run's config (listed names, else the dataset files), else what predictions show.
// Label sets are then built exactly as the evaluator builds them (eval_label_sets: config aliases + foreign labels).
std::map<std::string, emt::LabelSet> label_sets_for(const EvalArgs& a) {
  std::map<std::string, std::vector<std::string>> names = emt::class_names_from_predictions(a.rescore);
  emt::RunConfig cfg;
  std::string cfg_path = a.config.empty() ? (fs::path(a.rescore) / "config.yaml").string() : a.config;
  if (fs::exists(cfg_path)) {
    cfg = emt::load_config(cfg_path);
    for (auto& [ds, list] : names) {
      auto it = cfg.data.datasets.find(ds);
      if (it == cfg.data.datasets.end()) continue;
      if (!it->second.class_names.empty()) {
        list = it->second.class_names;
        continue;
      }
      try {
        list = emt::open_dataset_full(ds, it->second, cfg.data.root, emt::Split::test)->class_names();
      } catch (const emt::Error& e) {
        emt::log_warn("[rescore] {}: class names taken from predictions/ ({})", ds, e.what());
      }
    }
  } else if (!a.config.empty()) {
    throw emt::ConfigError("[rescore] --config " + a.config + ": no such file");
  } else {
    emt::log_warn("[rescore] {} has no config.yaml: class names come from predictions/ (pass --config to use the "
                  "run's configuration and aliases)", a.rescore);
  }
  for (const auto& spec : a.aliases) {  // "dataset:alias=label"
    auto colon = spec.find(':');
    if (colon == std::string::npos || !names.count(spec.substr(0, colon)))
      throw emt::ConfigError("[rescore] --alias '" + spec + "': expected DATASET:alias=label with a scored dataset");
    cfg.data.datasets[spec.substr(0, colon)].aliases.push_back(spec.substr(colon + 1));
  }
  return emt::eval_label_sets(names, cfg);
}

emt::cli::RegisterCommand register_eval_rescore([](CLI::App& root) {
  auto a = std::make_shared<EvalArgs>();
  auto* cmd = root.add_subcommand("eval", "Evaluate; --rescore RUN_DIR re-scores kept generations without a model");
  cmd->add_option("--rescore", a->rescore, "run directory whose predictions/ are re-scored");
  cmd->add_option("--judge", a->judge, "external judge command (JSON question on stdin, yes/no on stdout)");
  cmd->add_option("--judge-url", a->http.url, "or an OpenAI-compatible judge endpoint (base URL, e.g. "
                                               "https://api.openai.com/v1)");
  cmd->add_option("--judge-model", a->http.model, "the judge endpoint's model");
  cmd->add_option("--judge-key-env", a->http.api_key_env, "variable holding the endpoint's API key")
      ->default_str(a->http.api_key_env);
  cmd->add_option("--judge-timeout", a->http.timeout_s, "seconds per judge request")->default_str("30");
  cmd->add_option("--judge-retries", a->http.retries, "further tries after a timeout, 408, 429 or 5xx")
      ->default_str("3");
  cmd->add_option("--judge-cache", a->http.cache, "judge answer cache (default RUN_DIR/judge_cache.jsonl)");
  cmd->add_option("--config", a->config, "run config for class names and aliases (default RUN_DIR/config.yaml)");
  cmd->add_option("--alias", a->aliases, "extra DATASET:alias=label pairs for the strict scorer");
  cmd->callback([a] {
    if (a->rescore.empty())
      throw emt::ConfigError("[eval] nothing to do: pass --rescore RUN_DIR (model-based evaluation runs inside "
                             "`emt study`)");
    emt::RescoreOptions opts;
    opts.label_sets = label_sets_for(*a);
    if (!a->judge.empty() || !a->http.url.empty()) {
      emt::JudgeOptions jo = a->http;
      jo.command = a->judge;
      if (jo.cache.empty()) jo.cache = (fs::path(a->rescore) / "judge_cache.jsonl").string();
      opts.judge = std::make_shared<emt::Judge>(jo);
    }
    emt::RescoreSummary s = emt::rescore_run(a->rescore, opts);
    const emt::LoadedResults results = emt::load_results({a->rescore});
    std::cout << emt::format_matrix(results.rows, "strict");
    if (opts.judge) std::cout << emt::format_matrix(results.rows, "judge");
    std::cout << "rescored " << s.predictions << " answers in " << s.files << " files (" << s.changed
              << " strict verdicts changed); " << s.rows_written << " results rows written\n";
    if (opts.judge)
      std::cout << "judge " << opts.judge->describe() << ": " << opts.judge->asked() << " question(s) asked, "
                << opts.judge->cached() << " answered from the cache\n";
  });
});

}  // namespace
