// `emt report RUN_DIR... --out DIR [--scorer strict]`: combines the results of one or more run directories
// (machines, job-array tasks) into CSV/JSON tables, PNG/SVG/PDF plots and report.html, and prints the accuracy matrix.
#include <emt/core/error.h>
#include <emt/eval/metrics.h>
#include <emt/eval/report.h>

#include <iostream>
#include <memory>

#include "commands.h"

namespace {
struct ReportArgs {
  std::vector<std::string> runs;
  emt::ReportOptions opts;
};

emt::cli::RegisterCommand register_report([](CLI::App& root) {
  auto a = std::make_shared<ReportArgs>();
  auto* cmd = root.add_subcommand("report", "Tables, plots and report.html from one or more study run directories");
  cmd->add_option("runs", a->runs, "run directories (or results.jsonl files); later ones win on duplicate keys")
      ->required();
  cmd->add_option("--out", a->opts.out_dir, "output directory")->required();
  cmd->add_option("--scorer", a->opts.scorer, "scorer shown: strict | clip | likelihood | judge")
      ->capture_default_str();
  cmd->add_option("--title", a->opts.title, "report title")->capture_default_str();
  cmd->callback([a] {
    const emt::LoadedResults results = emt::load_results(a->runs);
    const emt::ReportFiles files = emt::write_report(results, a->opts);
    std::cout << files.matrix;
    std::cout << "report: " << files.html << " (" << files.tables.size() << " tables, " << files.plots.size()
              << " plots, each also as SVG and PDF";
    if (results.duplicates > 0) std::cout << ", " << results.duplicates << " duplicate rows replaced";
    std::cout << ")\n";
  });
});
}  // namespace
