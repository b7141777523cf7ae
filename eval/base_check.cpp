// The tiny base model's closing check, with the one Evaluator: EMT accuracy and CLIP zero-shot accuracy per
// pretrained dataset, with intervals and chance level, written to pretrain_report.json.
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <emt/eval/evaluator.h>
#include <emt/eval/study.h>
#include <emt/train/finetune.h>
#include <fmt/format.h>

#include <filesystem>
#include <nlohmann/json.hpp>

namespace emt {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

json counts_json(double acc, double lo, double hi) { return {{"accuracy", acc}, {"ci_low", lo}, {"ci_high", hi}}; }

json report_json(const PretrainReport& r) {
  json ds = json::object();
  for (const auto& [name, c] : r.checks)
    ds[name] = {{"n", c.n}, {"classes", c.classes}, {"chance", c.chance},
                {"emt", counts_json(c.emt, c.emt_low, c.emt_high)},
                {"clip_zero_shot", counts_json(c.clip, c.clip_low, c.clip_high)}};
  return {{"seconds", r.seconds}, {"threads", torch::get_num_threads()}, {"blas", r.blas}, {"scorer", "strict"},
          {"interval", "Wilson 95%"}, {"datasets", ds}};
}

PretrainReport parse_report(PretrainReport r, const std::string& path) {
  json j;
  try {
    j = json::parse(read_file(path));
    r.seconds = j.value("seconds", 0.0);
    r.blas = j.value("blas", std::string());
    for (const auto& [name, d] : j.at("datasets").items()) {
      BaseCheck c;
      c.n = d.at("n").get<int64_t>();
      c.classes = d.at("classes").get<int64_t>();
      c.chance = d.at("chance").get<double>();
      c.emt = d.at("emt").at("accuracy").get<double>();
      c.emt_low = d.at("emt").at("ci_low").get<double>();
      c.emt_high = d.at("emt").at("ci_high").get<double>();
      c.clip = d.at("clip_zero_shot").at("accuracy").get<double>();
      c.clip_low = d.at("clip_zero_shot").at("ci_low").get<double>();
      c.clip_high = d.at("clip_zero_shot").at("ci_high").get<double>();
      r.checks[name] = c;
    }
  } catch (const json::exception& e) {
    throw FormatError(fmt::format("[pretrain] {}: not a pretrain report ({})", path, e.what()));
  }
  return r;
}

// Scores the built model with the study's own evaluator, restricted to the pretrained datasets.
void closing_check(const RunConfig& cfg, const PretrainOptions& opts, PretrainReport& rep) {
  RunConfig c = cfg;
  c.eval.datasets = cfg.pretrain.datasets;  // empty = all, as the recipe
  c.eval.max_samples = opts.check_samples;
  c.eval.scorers = {"strict"};
  c.eval.primary_scorer = "strict";
  Evaluator ev(c);
  ev.set_progress(opts.progress);
  BaseModel base = load_base_model(c);
  EvalModel em = eval_model(base);
  auto emt_scores = ev.evaluate(em, "");
  auto [clip, tok] = load_clip_dir(base.dir + "/clip", base.device);
  auto clip_scores = ev.clip_zero_shot(clip, *tok, clip_image_options(base.dir + "/clip", clip), base.device);
  for (const auto& ds : emt_scores) {
    const auto& s = ds.by_scorer.at("strict");
    BaseCheck& b = rep.checks[ds.dataset];
    b.n = s.n;
    b.classes = static_cast<int64_t>(ev.dataset(ds.dataset)->class_names().size());
    b.chance = b.classes ? 1.0 / static_cast<double>(b.classes) : 0.0;
    b.emt = s.accuracy, b.emt_low = s.ci_low, b.emt_high = s.ci_high;
  }
  for (const auto& ds : clip_scores) {
    const auto& s = ds.by_scorer.at("clip_zero_shot");
    BaseCheck& b = rep.checks[ds.dataset];
    b.clip = s.accuracy, b.clip_low = s.ci_low, b.clip_high = s.ci_high;
  }
}

}  // namespace

PretrainReport build_base_model(const RunConfig& cfg, const PretrainOptions& opts) {
  PretrainReport rep = pretrain_tiny(cfg, opts);
  const std::string path = (fs::path(rep.dir) / "pretrain_report.json").string();
  if (rep.reused && fs::exists(path)) return parse_report(rep, path);
  if (opts.check_samples <= 0) return rep;
  closing_check(cfg, opts, rep);
  write_file_atomic(path, report_json(rep).dump(2) + "\n");
  log_info("[pretrain] closing check:\n{}", format_base_checks(rep));
  return rep;
}

std::string format_base_checks(const PretrainReport& r) {
  std::string out = fmt::format("  {:<16} {:>5} {:>7}   {:<24} {:<24}\n", "dataset", "n", "chance",
                                "EMT accuracy [95% CI]", "CLIP zero-shot [95% CI]");
  for (const auto& [name, c] : r.checks)
    out += fmt::format("  {:<16} {:>5} {:>6.1f}%   {:5.1f}% [{:4.1f}, {:5.1f}]     {:5.1f}% [{:4.1f}, {:5.1f}]\n",
                       name, c.n, 100 * c.chance, 100 * c.emt, 100 * c.emt_low, 100 * c.emt_high, 100 * c.clip,
                       100 * c.clip_low, 100 * c.clip_high);
  if (!r.blas.empty()) out += "  built with " + r.blas + "\n";
  return out;
}

}  // namespace emt
