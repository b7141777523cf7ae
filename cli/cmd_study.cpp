// `emt study CONFIG [key=value ...]`: the forgetting study, the main job.
#include <emt/core/config.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <emt/eval/scoring.h>
#include <emt/eval/study.h>

#include <iostream>

#include "commands.h"

namespace {
emt::cli::RegisterCommand register_study([](CLI::App& root) {
  auto* cmd = root.add_subcommand("study", "Run the forgetting study (resumable: rerun to continue)");
  auto path = std::make_shared<std::string>();
  auto overrides = std::make_shared<std::vector<std::string>>();
  auto no_report = std::make_shared<bool>(false);
  auto list_cells = std::make_shared<bool>(false);
  cmd->add_option("config", *path, "YAML config")->required();
  cmd->add_option("overrides", *overrides, "dotted.key=value overrides");
  cmd->add_flag("--no-report", *no_report, "skip writing RUN_DIR/report");
  cmd->add_flag("--list-cells", *list_cells, "print the grid, one 'dataset method seed' line per cell, and exit");
  auto allow_judge = std::make_shared<bool>(false);
  cmd->add_flag("--allow-judge", *allow_judge, "run the judge command or contact the judge endpoint the config names (eval.judge_command, eval.judge_url)");
  cmd->callback([=] {
    emt::allow_config_judge(*allow_judge);
    auto cfg = emt::load_config(*path, *overrides);
    if (*list_cells) {
      for (const auto& d : cfg.study.finetune_datasets)
        for (const auto& m : cfg.study.methods)
          for (auto s : cfg.study.seeds) std::cout << d << " " << m << " " << s << "\n";
      return;
    }
    emt::set_log_level(emt::parse_log_level(cfg.run.log_level));
    int threads = emt::apply_run_section(cfg.run);
    emt::StudyOptions so;
    so.comm = emt::cli::join_process_group(cfg);  // data parallel under emt launch / torchrun / srun
    so.report = !*no_report;
    so.progress = emt::is_main_process(so.comm.get());
    emt::log_info("[study] {} intra-op threads, device {}", threads, cfg.run.device);
    auto s = emt::run_study(cfg, so);
    if (!so.progress) return;  // rank 0 reports
    std::cout << s.matrix << "\n";
    std::cout << fmt::format("study finished in {:.0f}s: {} cells trained, {} already complete, {} result rows "
                             "written\nresults: {}/results.jsonl\n",
                             s.seconds, s.cells_trained, s.cells_skipped, s.rows_written, s.run_dir);
    if (!s.report_html.empty()) std::cout << "report:  " << s.report_html << "\n";
  });
});
}  // namespace
