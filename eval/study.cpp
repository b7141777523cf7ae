// The forgetting study driver: one Trainer per cell, the one Evaluator after every epoch, resumable results.
#include <emt/adapters/policy.h>
#include "core/logging.h"
#include <emt/core/metrics.h>
#include <emt/core/runtime.h>
#include <emt/eval/evaluator.h>
#include <emt/eval/report.h>
#include <emt/eval/study.h>
#include <emt/train/finetune.h>
#include <emt/train/mitigation.h>
#include <emt/train/pretrain.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

namespace emt {
namespace fs = std::filesystem;

std::string study_cell_name(const std::string& dataset, const std::string& method, int64_t seed) {
  std::string m = method;
  for (auto& c : m)
    if (c == '+' || c == '/' || c == '=' || c == ',') c = '-';
  return dataset + "__" + m + "__seed" + std::to_string(seed);
}

namespace {

// What identifies a study's base model: its small descriptive files (recipe.yaml, pretrain_report.json, which a
// rebuild always rewrites, config.json) and the names and sizes of its weight files, as an FNV-1a hash. A
// 7B checkpoint is not read; a rebuilt tiny base is another base even when its recipe is the same.
std::string base_identity(const std::string& dir) {
  uint64_t h = 1469598103934665603ull;
  auto eat = [&](const std::string& bytes) {
    for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  };
  for (const char* f : {"recipe.yaml", "pretrain_report.json", "config.json"}) {
    eat(f);
    if (fs::exists(fs::path(dir) / f)) eat(read_file((fs::path(dir) / f).string()));
  }
  std::vector<std::string> weights;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors" || e.path().extension() == ".bin")
      weights.push_back(e.path().filename().string() + ":" + std::to_string(e.file_size()));
  std::sort(weights.begin(), weights.end());
  for (const auto& w : weights) eat(w);
  return fmt::format("{:016x}", h);
}

// Rows already in results.jsonl (a torn last line from a killed process is ignored with a warning).
std::set<std::string> done_keys(const std::string& path) {
  std::set<std::string> keys;
  if (!fs::exists(path)) return keys;
  std::ifstream in(path);
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty()) continue;
    try {
      keys.insert(parse_result_line(line, path + ":" + std::to_string(n)).key());
    } catch (const Error& e) {
      log_warn("[study] ignoring unreadable line {} of {}: {}", n, path, e.what());
    }
  }
  return keys;
}

class Study {
 public:
  Study(const RunConfig& cfg, const StudyOptions& opts) : cfg_(cfg), opts_(opts), comm_(opts.comm) {
    run_dir_ = (fs::path(cfg.run.out_dir) / cfg.run.name).string();
    results_path_ = run_dir_ + "/results.jsonl";
  }

  StudySummary run() {
    auto t0 = std::chrono::steady_clock::now();
    // A preemption notice at any point ends the study at the next safe point with exit 75: after the phase in
    // progress has written what it computed (the base model, result rows, an epoch checkpoint), never halfway.
    PreemptionScope preemption(true);
    if (main()) {
      fs::create_directories(run_dir_);
      write_file_atomic(run_dir_ + "/config.yaml", config_to_yaml(cfg_));
    }
    if (cfg_.model.pretrained.empty()) {
      fault_point("pretrain");
      if (main()) {  // the other ranks wait for it (the cache is not built by two processes at once)
        PretrainOptions po;
        po.progress = opts_.progress;
        build_base_model(cfg_, po);
      }
      if (comm_) comm_->barrier();
      preempted_check("the base model is built");
    }
    check_base_identity();
    done_ = done_keys(results_path_);
    if (comm_) comm_->barrier();  // every rank has read the rows before rank 0 appends any
    if (main()) writer_ = std::make_unique<JsonlWriter>(results_path_);
    evaluator_ = std::make_unique<Evaluator>(cfg_);
    evaluator_->set_progress(opts_.progress);
    evaluator_->set_communicator(comm_);
    for (const auto& d : evaluator_->datasets()) log_info("[study] eval dataset {}: {} test images", d, evaluator_->dataset(d)->size());

    clip_baseline();
    preempted_check("the CLIP baseline rows are written");
    // epoch 0: the base model
    if (cfg_.study.eval_base && !epoch_done("", "base", 0, 0)) {
      fault_point("base");
      BaseModel base = load_base_model(cfg_);
      score(base, "", "base", 0, 0, run_dir_ + "/predictions/base");
      preempted_check("the base model's rows are written");
    }
    for (const auto& ft : cfg_.study.finetune_datasets)
      for (const auto& method : cfg_.study.methods)
        for (int64_t seed : cfg_.study.seeds) {
          cell(ft, method, seed);
          preempted_check("cell " + study_cell_name(ft, method, seed) + " is complete");
        }

    StudySummary s;
    s.run_dir = run_dir_;
    s.rows_written = rows_written_;
    s.cells_trained = cells_trained_;
    s.cells_skipped = cells_skipped_;
    s.epochs_recovered = recovered_;
    writer_.reset();
    if (!main()) {  // rank 0 writes the report
      preempted_check("every result row is written");
      return s;
    }
    auto loaded = load_results({run_dir_});
    s.matrix = format_matrix(loaded.rows, cfg_.eval.primary_scorer);
    if (opts_.report) {
      fault_point("report");
      ReportOptions ro;
      ro.out_dir = run_dir_ + "/report";
      ro.scorer = cfg_.eval.primary_scorer;
      ro.title = "EMT forgetting study: " + cfg_.run.name;
      s.report_html = write_report(loaded, ro).html;
    }
    preempted_check("every result row and the report are written");
    s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return s;
  }

 private:
  std::vector<std::string> scorers() const { return evaluator_->scorers(); }

  bool main() const { return is_main_process(comm_.get()); }

  // A safe point. Data parallel: the ranks vote, so that all of them stop here or none does.
  void preempted_check(const std::string& done) {
    const std::string where = "[study] " + done + "; rerun the same command to continue";
    if (!comm_) return throw_if_preempted(where);
    auto votes = torch::tensor({pending_preemption() != 0 ? 1.0 : 0.0}, torch::kFloat64);
    comm_->all_reduce_sum(votes);
    if (votes.item<double>() > 0) {
      take_preemption();
      throw Preempted("a data-parallel rank received a preemption notice: " + where);
    }
  }

  bool epoch_done(const std::string& ft, const std::string& method, int64_t seed, int64_t epoch) const {
    const auto labels = ft.empty() ? std::vector<std::string>{method} : scored_method_labels(method, cfg_.finetune.mitigation);
    for (const auto& label : labels)
      for (const auto& d : evaluator_->datasets())
        for (const auto& sc : evaluator_->scorers_for(d))
          if (!done_.count(make_result_row("mllm", ft, label, seed, epoch, d, sc, {}, "").key())) return false;
    return true;
  }

  // Scores one epoch of a cell: the model as it is, or for wise-ft each interpolation toward the base (`view`
  // holds the base), each under its own method label; the model is left as it was.
  void score_epoch(const BaseModel& base, BaseView* view, const std::string& ft, const std::string& method,
                   int64_t seed, int64_t epoch, const std::string& pred_dir) {
    if (!view) return score(base, ft, method, seed, epoch, pred_dir);
    struct Tuned {  // the tuned model again on any exit
      BaseView* v;
      ~Tuned() { v->interpolate(1.0); }
    } restore{view};
    for (double a : cfg_.finetune.mitigation.wise_ft_alphas) {
      const std::string label = wise_ft_label(method, a);
      view->interpolate(a);
      score(base, ft, label, seed, epoch, pred_dir + "/" + label);
    }
  }

  // Every rank keeps the same record of finished rows (they decide together what is left); rank 0 writes them.
  void append(const ResultRow& r) {
    if (writer_) writer_->write_raw(result_to_json_line(r));
    done_.insert(r.key());
    ++rows_written_;
  }

  void clip_baseline() {
    if (!cfg_.eval.clip_baseline) return;
    std::string dir = cfg_.eval.clip_model.empty() ? base_model_dir(cfg_) + "/clip" : cfg_.eval.clip_model;
    if (!fs::exists(fs::path(dir) / "config.json")) {
      if (!cfg_.eval.clip_model.empty())
        throw IoError("[study] eval.clip_model: '" + dir + "' has no config.json (expected an HF CLIP directory)");
      log_warn("[study] no CLIP model at {}: skipping the vision-encoder baseline (set eval.clip_model)", dir);
      return;
    }
    bool all = true;
    for (const auto& d : evaluator_->datasets())
      all = all &&
            done_.count(make_result_row("clip_zero_shot", "", "clip", 0, 0, d, "clip_zero_shot", {}, "").key());
    auto device = resolve_device(cfg_.run.device);
    auto [clip, tok] = load_clip_dir(dir, device);
    const auto sc = scorers();
    if (std::find(sc.begin(), sc.end(), "clip") != sc.end()) evaluator_->set_clip(clip, tok);
    if (all) return;
    fault_point("clip");
    ImageProcessorOptions image = fs::exists(fs::path(dir) / "preprocessor_config.json")
                                      ? load_hf_preprocessor_config(dir + "/preprocessor_config.json")
                                      : image_options_for_size(clip->options.vision.image_size);
    for (const auto& ds : evaluator_->clip_zero_shot(*clip, *tok, image, device))
      for (const auto& [sc, c] : ds.by_scorer)
        append(make_result_row("clip_zero_shot", "", "clip", 0, 0, ds.dataset, sc, c, cfg_.run.name));
  }

  void score(const BaseModel& base, const std::string& ft, const std::string& method, int64_t seed, int64_t epoch,
             const std::string& pred_dir) {
    EvalModel em = eval_model(base);
    evaluator_->set_prediction_fields({{"finetune_dataset", ft}, {"method", method}, {"seed", seed}, {"epoch", epoch}});
    auto t = std::chrono::steady_clock::now();
    for (const auto& ds : evaluator_->evaluate(em, pred_dir))
      for (const auto& [sc, c] : ds.by_scorer) {
        append(make_result_row("mllm", ft, method, seed, epoch, ds.dataset, sc, c, cfg_.run.name));
        if (sc == cfg_.eval.primary_scorer && main())
          log_info("[study] {} {} seed {} epoch {}: {} {:.1f}% ({} images)", ft.empty() ? "base" : ft, method, seed,
                   epoch, ds.dataset, 100.0 * c.accuracy, c.n);
      }
    log_info("[study] scored epoch {} in {:.1f}s", epoch,
             std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
  }

  // Rows of a run directory are only reused with the base they were computed on: a study rerun after the base
  // was rebuilt (a new recipe, --force) or replaced is refused rather than mixing two bases' results.
  void check_base_identity() {
    const std::string dir = base_model_dir(cfg_), id = base_identity(dir), path = run_dir_ + "/base.json";
    if (fs::exists(path)) {
      const auto j = nlohmann::json::parse(read_file(path), nullptr, false);
      const std::string had = j.is_object() ? j.value("identity", std::string()) : std::string();
      if (had != id)
        throw ConfigError(fmt::format(
            "[study] {}: its results were computed on another base model than {} holds now (identity {} in "
            "base.json, {} now: the base was rebuilt or replaced); choose another run.name, or remove {} to "
            "compute the study again", run_dir_, dir, had.empty() ? "unreadable" : had, id, run_dir_));
      return;
    }
    if (fs::exists(results_path_) && fs::file_size(results_path_) > 0)  // rows are read once, after this check
      log_warn("[study] {} holds results but no base.json (written before base identities were recorded): they "
               "are reused as they are, assumed to come from the base in {}", run_dir_, dir);
    if (main())
      write_file_atomic(path, nlohmann::json{{"base_dir", dir}, {"identity", id}}.dump(2) + "\n");
  }

  RunConfig cell_config(const std::string& ft, const std::string& method, int64_t seed) const {
    RunConfig c = cfg_;
    c.finetune.dataset = ft;
    c.finetune.method = method;
    c.finetune.epochs = cfg_.study.epochs;
    c.finetune.max_steps = 0;
    c.finetune.keep_last_n = 0;  // every epoch's checkpoint stays: a lost evaluation can be redone from it
    c.run.seed = seed;
    // a mitigation without a rate of its own trains at its base method's rate
    const auto& rates = cfg_.study.learning_rate_by_method;
    auto it = rates.find(method);
    if (it == rates.end()) it = rates.find(split_method(method).base);
    if (it != rates.end()) c.finetune.learning_rate = it->second;
    return c;
  }

  void cell(const std::string& ft, const std::string& method, int64_t seed) {
    const int64_t epochs = cfg_.study.epochs;
    bool all = true;
    for (int64_t e = 1; e <= epochs; ++e) all = all && epoch_done(ft, method, seed, e);
    const std::string name = study_cell_name(ft, method, seed);
    if (all) {
      log_info("[study] cell {} already complete: skipped", name);
      ++cells_skipped_;
      return;
    }
    RunConfig c = cell_config(ft, method, seed);
    const bool wise_ft = split_method(method).mitigation == "wise-ft";
    const std::string cell_dir = run_dir_ + "/cells/" + name;
    const std::string pred_root = run_dir_ + "/predictions/" + name;
    // Epochs trained before a kill but not yet scored are scored from their checkpoints first.
    for (int64_t e = 1; e <= epochs; ++e) {
      std::string ck = cell_dir + "/epoch_" + std::to_string(e);
      if (epoch_done(ft, method, seed, e) || !fs::exists(ck + "/trainable.safetensors")) continue;
      log_info("[study] {}: scoring epoch {} from its checkpoint (its evaluation was interrupted)", name, e);
      BaseModel b = load_base_model(cfg_);  // the study's base: its recipe is the study's, not the cell's seed
      std::unique_ptr<BaseView> view = wise_ft ? std::make_unique<BaseView>(*b.model) : nullptr;
      auto setup = apply_method(*b.model, c.finetune, b.tokenizer.get());
      load_scored_weights(*b.model, setup, method, ck + "/trainable.safetensors");
      b.model->eval();
      score_epoch(b, view.get(), ft, method, seed, e, pred_root + "/epoch_" + std::to_string(e));
      ++recovered_;
      preempted_check("epoch " + std::to_string(e) + " of cell " + name + " is scored");
    }
    all = true;
    for (int64_t e = 1; e <= epochs; ++e) all = all && epoch_done(ft, method, seed, e);
    if (all) return;

    seed_everything(static_cast<uint64_t>(seed));
    BaseModel base = load_base_model(cfg_);  // as above: a cell's seed is a fine-tuning seed
    std::unique_ptr<BaseView> view = wise_ft ? std::make_unique<BaseView>(*base.model) : nullptr;  // before training
    FinetuneOptions fo;
    fo.run_dir = cell_dir;
    fo.resume = true;
    fo.progress = opts_.progress;
    fo.comm = comm_;
    fo.on_epoch = [&](const EpochEnd& ee) {
      if (!epoch_done(ft, method, seed, ee.epoch)) {
        fault_point("epoch_score");
        score_epoch(base, view.get(), ft, method, seed, ee.epoch, pred_root + "/epoch_" + std::to_string(ee.epoch));
      }
      // The epoch's checkpoint is committed before this callback: stopping here loses nothing.
      preempted_check("epoch " + std::to_string(ee.epoch) + " of cell " + name + " is checkpointed and scored");
    };
    log_info("[study] cell {}: {} on {} for {} epochs (lr {})", name, method, ft, epochs, c.finetune.learning_rate);
    fault_point("train");
    finetune(base, c, fo);
    ++cells_trained_;
    // Fault injection for the resume test: EMT_FAULT_AFTER_CELLS=N kills (-9) the study after N trained cells.
    if (const char* f = std::getenv("EMT_FAULT_AFTER_CELLS"); f && std::atoll(f) == cells_trained_)
      ::kill(::getpid(), SIGKILL);
  }

  RunConfig cfg_;
  StudyOptions opts_;
  std::shared_ptr<Communicator> comm_;
  std::string run_dir_, results_path_;
  std::set<std::string> done_;
  std::unique_ptr<JsonlWriter> writer_;
  std::unique_ptr<Evaluator> evaluator_;
  int64_t rows_written_ = 0, cells_trained_ = 0, cells_skipped_ = 0, recovered_ = 0;
};

}  // namespace

StudySummary run_study(const RunConfig& cfg, const StudyOptions& opts) {
  validate_config(cfg);
  check_config_judge(cfg);  // before the base model is built
  if (cfg.study.finetune_datasets.empty())
    throw ConfigError("[study] study.finetune_datasets: name at least one dataset to fine-tune on");
  if (cfg.study.methods.empty()) throw ConfigError("[study] study.methods: name at least one method");
  return Study(cfg, opts).run();
}

}  // namespace emt
