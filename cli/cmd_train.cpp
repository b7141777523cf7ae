// `emt train CONFIG [key=value ...] [--resume]` and `emt pretrain CONFIG [--force]`.
#include <emt/core/config.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <emt/eval/study.h>
#include <emt/train/finetune.h>
#include <emt/train/pretrain.h>

#include <filesystem>
#include <iostream>

#include "commands.h"

namespace {

emt::RunConfig load_and_setup(const std::string& path, const std::vector<std::string>& overrides) {
  auto cfg = emt::load_config(path, overrides);
  emt::set_log_level(emt::parse_log_level(cfg.run.log_level));
  emt::apply_run_section(cfg.run);
  return cfg;
}

emt::cli::RegisterCommand reg_train([](CLI::App& root) {
  auto* cmd = root.add_subcommand("train", "Fine-tune the base model on finetune.dataset with finetune.method");
  auto path = std::make_shared<std::string>();
  auto overrides = std::make_shared<std::vector<std::string>>();
  auto resume = std::make_shared<bool>(false);
  cmd->add_option("config", *path, "YAML config")->required();
  cmd->add_option("overrides", *overrides, "dotted.key=value overrides");
  cmd->add_flag("--resume", *resume, "continue from the newest checkpoint in the run directory");
  cmd->callback([=] {
    auto cfg = load_and_setup(*path, *overrides);
    auto comm = emt::cli::join_process_group(cfg);  // data parallel under emt launch / torchrun / srun
    const bool main_rank = emt::is_main_process(comm.get());
    std::string run_dir = (std::filesystem::path(cfg.run.out_dir) / cfg.run.name).string();
    if (main_rank) {
      std::filesystem::create_directories(run_dir);
      emt::write_file_atomic(run_dir + "/config.yaml", emt::config_to_yaml(cfg));
      if (cfg.model.pretrained.empty()) emt::build_base_model(cfg);
    }
    if (comm) comm->barrier();  // the base model exists before any rank loads it
    auto base = emt::load_base_model(cfg);
    emt::FinetuneOptions fo;
    fo.run_dir = run_dir;
    fo.resume = *resume;
    fo.comm = comm;
    fo.progress = main_rank;
    auto s = emt::finetune(base, cfg, fo);
    if (!main_rank) return;
    std::cout << fmt::format("trained {} steps ({} epochs{}) in {:.1f}s, {:.1f} samples/s, last loss {:.4f}, "
                             "{} non-finite steps skipped; checkpoints in {}\n",
                             s.steps, s.epochs_done, s.resumed ? ", resumed" : "", s.seconds, s.samples_per_s,
                             s.last_loss, s.skipped_nonfinite, run_dir);
  });
});

emt::cli::RegisterCommand reg_pretrain([](CLI::App& root) {
  auto* cmd = root.add_subcommand("pretrain", "Build (or reuse) the tiny base model: CLIP, alignment, instruction tuning");
  auto path = std::make_shared<std::string>();
  auto overrides = std::make_shared<std::vector<std::string>>();
  auto force = std::make_shared<bool>(false);
  cmd->add_option("config", *path, "YAML config")->required();
  cmd->add_option("overrides", *overrides, "dotted.key=value overrides");
  cmd->add_flag("--force", *force, "rebuild even if the cached model matches the recipe");
  auto print_recipe = std::make_shared<bool>(false);
  cmd->add_flag("--print-recipe", *print_recipe,
                "print the recipe text the cache is keyed by (its recipe.yaml must match it byte for byte) and exit");
  cmd->callback([=] {
    auto cfg = load_and_setup(*path, *overrides);
    if (*print_recipe) {
      std::cout << emt::pretrain_recipe(cfg);
      return;
    }
    emt::PretrainOptions po;
    po.force = *force;
    auto r = emt::build_base_model(cfg, po);
    std::cout << fmt::format("tiny base model: {} ({}, {:.0f}s)\n", r.dir, r.reused ? "reused" : "built", r.seconds);
    if (!r.checks.empty()) std::cout << emt::format_base_checks(r);
  });
});

}  // namespace
