// The one training loop: AdamW over parameter groups, schedules, accumulation, clipping, autocast, NaN guard,
// atomic checkpoints with exact resume (weights, optimizer, step, data position, RNG), preemption, metrics.
#include "core/logging.h"
#include <emt/core/metrics.h>
#include <emt/core/runtime.h>
#include <emt/train/grad_scaler.h>
#include <emt/train/trainer.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <type_traits>

namespace emt {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

class LoaderSource : public BatchSource {
 public:
  explicit LoaderSource(DataLoader& l) : l_(l) {}
  int64_t num_batches() const override { return l_.num_batches(); }
  void start_epoch(int64_t epoch, int64_t skip) override { l_.start_epoch(epoch, skip); }
  bool next(Batch& out) override { return l_.next(out); }

 private:
  DataLoader& l_;
};

// Fault injection for the crash/preemption tests: EMT_FAULT_AT_STEP="<step>:<KILL|TERM|USR1>" sends that
// signal to this process right after optimizer step <step> (KILL = a real kill -9: no cleanup at all); with
// EMT_FAULT_RANK=<r>, only in the data-parallel rank r (RANK).
void maybe_inject_fault(int64_t step) {
  static const char* spec = std::getenv("EMT_FAULT_AT_STEP");
  if (!spec) return;
  static const char* only = std::getenv("EMT_FAULT_RANK");
  static const char* rank = std::getenv("RANK");
  if (only && std::string(only) != (rank ? rank : "0")) return;
  std::string s(spec);
  auto colon = s.find(':');
  if (colon == std::string::npos || std::stoll(s.substr(0, colon)) != step) return;
  std::string sig = s.substr(colon + 1);
  ::kill(::getpid(), sig == "KILL" ? SIGKILL : sig == "USR1" ? SIGUSR1 : SIGTERM);
}

// Optimizer::state() is keyed by the parameter's TensorImpl: as its printed address (a string) up to LibTorch
// 2.1, as the pointer itself from 2.2 on. The key type is read off the map, so no version number is guessed.
template <typename Key>
Key state_key_as(const torch::Tensor& p) {
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream os;
    os << p.unsafeGetTensorImpl();
    return os.str();
  } else {
    return Key(p.unsafeGetTensorImpl());
  }
}

auto state_key(torch::optim::Optimizer& opt, const torch::Tensor& p) {
  using Key = typename std::decay_t<decltype(opt.state())>::key_type;
  return state_key_as<Key>(p);
}

// Whole-tensor serialisation through safetensors keeps checkpoints inspectable with standard tools.
NamedTensors optimizer_tensors(torch::optim::Optimizer& opt) {
  NamedTensors out;
  auto& groups = opt.param_groups();
  auto& state = opt.state();
  for (size_t g = 0; g < groups.size(); ++g) {
    auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      auto it = state.find(state_key(opt, params[i]));
      if (it == state.end()) continue;
      auto& s = static_cast<torch::optim::AdamWParamState&>(*it->second);
      std::string base = "g" + std::to_string(g) + ".p" + std::to_string(i);
      out.emplace_back(base + ".exp_avg", s.exp_avg());
      out.emplace_back(base + ".exp_avg_sq", s.exp_avg_sq());
      out.emplace_back(base + ".step", torch::tensor({s.step()}, torch::kInt64));
    }
  }
  return out;
}

void load_optimizer_tensors(torch::optim::Optimizer& opt, const SafetensorsReader& r) {
  auto& groups = opt.param_groups();
  auto& state = opt.state();
  for (size_t g = 0; g < groups.size(); ++g) {
    auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      std::string base = "g" + std::to_string(g) + ".p" + std::to_string(i);
      if (!r.contains(base + ".exp_avg")) continue;
      auto s = std::make_unique<torch::optim::AdamWParamState>();
      auto ea = r.load(base + ".exp_avg"), eas = r.load(base + ".exp_avg_sq");
      if (!ea.sizes().equals(params[i].sizes()))
        throw FormatError("[trainer] " + r.path() + ": optimizer state '" + base + "' has shape " +
                          c10::str(ea.sizes()) + ", parameter has " + c10::str(params[i].sizes()));
      s->exp_avg(ea.to(params[i].device()));
      s->exp_avg_sq(eas.to(params[i].device()));
      s->step(r.load(base + ".step").item<int64_t>());
      state[state_key(opt, params[i])] = std::move(s);
    }
  }
}

}  // namespace

std::unique_ptr<BatchSource> loader_source(DataLoader& loader) { return std::make_unique<LoaderSource>(loader); }

double schedule_factor(const std::string& kind, int64_t step, int64_t total, int64_t warmup) {
  if (warmup > 0 && step < warmup) return static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (kind == "constant") return 1.0;
  int64_t decay = std::max<int64_t>(1, total - warmup);
  double progress = std::clamp(static_cast<double>(step - warmup) / static_cast<double>(decay), 0.0, 1.0);
  if (kind == "linear") return 1.0 - progress;
  if (kind == "cosine") return 0.5 * (1.0 + std::cos(M_PI * progress));
  throw ConfigError("[trainer] unknown schedule '" + kind + "' (expected constant, linear or cosine)");
}

int64_t warmup_for(double ratio, int64_t steps, int64_t total) {
  if (steps > 0) return steps;
  return static_cast<int64_t>(std::ceil(ratio * static_cast<double>(total)));
}

TrainerOptions trainer_options(const FinetuneSection& ft, const RunSection& run) {
  TrainerOptions o;
  o.epochs = ft.epochs;
  o.max_steps = ft.max_steps;
  o.grad_accum = ft.grad_accum;
  o.max_grad_norm = ft.max_grad_norm;
  o.schedule = ft.schedule;
  o.warmup_ratio = ft.warmup_ratio;
  o.warmup_steps = ft.warmup_steps;
  o.weight_decay = ft.weight_decay;
  o.beta1 = ft.adam_beta1;
  o.beta2 = ft.adam_beta2;
  o.eps = ft.adam_eps;
  o.precision = ft.precision;
  o.nan_patience = ft.nan_patience;
  o.keep_last_n = ft.keep_last_n;
  o.checkpoint_every_steps = ft.checkpoint_every_steps;
  o.log_every_steps = ft.log_every_steps;
  o.device = resolve_device(run.device);
  return o;
}

std::map<std::string, std::string> resume_compat(const RunConfig& c) {
  const auto& f = c.finetune;
  std::ostringstream shapes;
  shapes << c.model.pretrained << "|" << c.model.projector << "|" << c.model.llm.hidden_size << "x"
         << c.model.llm.num_layers << "|" << c.model.vision.hidden_size << "x" << c.model.vision.num_layers;
  std::ostringstream lora;
  lora << f.lora.r << "/" << f.lora.alpha << "/" << f.lora.use_rslora << "/" << f.lora.target_regex << "/";
  for (auto& t : f.lora.target_modules) lora << t << ",";
  auto num = [](double x) { return fmt::format("{}", x); };  // shortest exact form: 2e-4 stays 0.0002
  // Everything that shapes the trajectory: a resumed run must continue the very schedule it stopped in
  // (changing epochs or max_steps changes the cosine curve of steps already taken).
  return {{"model", shapes.str()},
          {"finetune.dataset", f.dataset},
          {"finetune.method", f.method},
          {"finetune.batch_size", std::to_string(f.batch_size)},
          {"finetune.grad_accum", std::to_string(f.grad_accum)},
          {"finetune.epochs", std::to_string(f.epochs)},
          {"finetune.max_steps", std::to_string(f.max_steps)},
          {"finetune.learning_rate", num(f.learning_rate)},
          {"finetune.projector_lr", num(f.projector_lr)},
          {"finetune.weight_decay", num(f.weight_decay)},
          {"finetune.adam", num(f.adam_beta1) + "/" + num(f.adam_beta2) + "/" + num(f.adam_eps)},
          {"finetune.schedule", f.schedule},
          {"finetune.warmup", num(f.warmup_ratio) + " ratio / " + std::to_string(f.warmup_steps) + " steps"},
          {"finetune.max_grad_norm", num(f.max_grad_norm)},
          {"finetune.precision", f.precision},
          {"finetune.lora", lora.str()},
          {"finetune.prompt_tuning.num_virtual_tokens", std::to_string(f.prompt_tuning.num_virtual_tokens)},
          {"run.dtype", c.run.dtype},
          {"run.seed", std::to_string(c.run.seed)}};
}

struct Trainer::State {
  int64_t epoch = 0;          // 0-based epoch in progress
  int64_t batch = 0;          // micro-batches of this epoch already consumed
  int64_t step = 0;           // optimizer steps done
  int64_t skipped = 0;        // non-finite steps skipped in total
  int64_t bad_in_row = 0;
  int64_t overflows = 0;      // fp16 steps skipped because the scaled gradients overflowed
  double epoch_loss_sum = 0.0;
  int64_t epoch_loss_n = 0;
  std::vector<std::string> rank_fingerprints;  // data parallel, epoch checkpoints: every rank's, in rank order
};

Trainer::Trainer(Objective& objective, BatchSource& data, std::vector<ParamGroup> groups, TrainableIO io,
                 TrainerOptions opts)
    : objective_(objective), data_(data), groups_(std::move(groups)), io_(std::move(io)), opts_(std::move(opts)) {
  if (groups_.empty()) throw ConfigError("[trainer] nothing to train: the method left no trainable parameters");
  if (opts_.grad_accum < 1) throw ConfigError("[trainer] grad_accum must be >= 1");
  if (opts_.precision != "f32" && opts_.precision != "bf16" && opts_.precision != "fp16")
    throw ConfigError("[trainer] finetune.precision must be f32, bf16 or fp16 (got '" + opts_.precision + "')");
  // The shard a rank resumes at depends on the number of ranks: a checkpoint continues with the same number.
  if (opts_.comm && opts_.comm->world_size() > 1)
    opts_.compat["data_parallel.world_size"] = std::to_string(opts_.comm->world_size());
  if (opts_.precision == "fp16") {
    if (!opts_.device.is_cuda())
      throw ConfigError("[trainer] finetune.precision fp16 needs a CUDA device (run.device is " +
                        opts_.device.str() + "); use bf16 on CPU");
    scaler_ = std::make_unique<GradScaler>();
  }
  for (const auto& g : groups_)
    for (const auto& p : g.params)
      if (p.is_floating_point() && p.scalar_type() != torch::kFloat32)
        throw ConfigError("[trainer] trained tensors must be fp32 (master weights; run.dtype applies to frozen "
                          "weights only), got a " + dtype_name(p.scalar_type()) + " tensor of shape " +
                          c10::str(p.sizes()) + " in group '" + g.name + "'");
  std::vector<torch::optim::OptimizerParamGroup> pg;
  for (const auto& g : groups_) {
    auto o = std::make_unique<torch::optim::AdamWOptions>(g.lr);
    o->betas({opts_.beta1, opts_.beta2}).eps(opts_.eps).weight_decay(g.weight_decay ? opts_.weight_decay : 0.0);
    pg.emplace_back(g.params, std::move(o));
  }
  optimizer_ = std::make_unique<torch::optim::AdamW>(pg, torch::optim::AdamWOptions(groups_.front().lr));
}

Trainer::~Trainer() = default;

std::optional<std::string> Trainer::latest_checkpoint(const std::string& run_dir) {
  if (run_dir.empty() || !fs::exists(run_dir)) return std::nullopt;
  std::optional<std::string> best;
  int64_t best_step = -1;
  for (const auto& e : fs::directory_iterator(run_dir)) {
    if (!e.is_directory()) continue;
    auto name = e.path().filename().string();
    if (name.rfind("epoch_", 0) != 0 && name != "step_last") continue;
    if (name.find(".tmp") != std::string::npos || name.find(".old") != std::string::npos) continue;
    auto state_file = e.path() / "trainer_state.json";
    if (!fs::exists(state_file)) continue;
    try {
      auto j = json::parse(read_file(state_file.string()));
      int64_t step = j.at("step").get<int64_t>();
      if (step > best_step) best_step = step, best = e.path().string();
    } catch (const std::exception&) {
      log_warn("[trainer] ignoring unreadable checkpoint {}", e.path().string());
    }
  }
  return best;
}

void Trainer::save_checkpoint(const std::string& name, const State& st) {
  if (opts_.run_dir.empty() || !main_process()) return;
  fs::path final_dir = fs::path(opts_.run_dir) / name;
  fs::path tmp = fs::path(opts_.run_dir) / (name + ".tmp." + std::to_string(::getpid()));
  std::error_code ec;
  fs::remove_all(tmp, ec);
  try {
    fs::create_directories(tmp);
    save_safetensors((tmp / "trainable.safetensors").string(), io_.get());
    save_safetensors((tmp / "optimizer.safetensors").string(), optimizer_tensors(*optimizer_));
    save_safetensors((tmp / "rng.safetensors").string(), generator_states());  // cpu, cuda:<i>
    json j = {{"epoch", st.epoch}, {"batch", st.batch}, {"step", st.step}, {"skipped_nonfinite", st.skipped},
              {"bad_in_row", st.bad_in_row}, {"skipped_overflow", st.overflows},
              {"epoch_loss_sum", st.epoch_loss_sum}, {"epoch_loss_n", st.epoch_loss_n}, {"compat", opts_.compat}};
    if (scaler_) j["grad_scale"] = {{"scale", scaler_->scale()}, {"good_steps", scaler_->good_steps()}};
    if (opts_.comm)
      j["data_parallel"] = {{"world_size", opts_.comm->world_size()}, {"backend", opts_.comm->backend()},
                            {"rank_fingerprints", st.rank_fingerprints}};
    write_file_atomic((tmp / "trainer_state.json").string(), j.dump(2) + "\n");
    if (!opts_.config_yaml.empty()) write_file_atomic((tmp / "config.yaml").string(), opts_.config_yaml);
    if (io_.save_artifacts) io_.save_artifacts(tmp.string());
    commit_dir_atomic(tmp.string(), final_dir.string());
  } catch (const Error& e) {
    fs::remove_all(tmp, ec);
    auto prev = latest_checkpoint(opts_.run_dir);
    throw IoError("[trainer] writing checkpoint '" + final_dir.string() + "' failed: " + e.what() +
                  (prev ? "; the previous checkpoint '" + *prev + "' is intact" : "; no earlier checkpoint exists"));
  } catch (const std::exception& e) {
    fs::remove_all(tmp, ec);
    throw IoError("[trainer] writing checkpoint '" + final_dir.string() + "' failed: " + e.what());
  }
}

void Trainer::load_checkpoint(const std::string& dir, State& st) {
  auto j = json::parse(read_file(dir + "/trainer_state.json"));
  if (j.contains("compat")) {
    std::vector<std::string> diffs;
    auto saved = j["compat"].get<std::map<std::string, std::string>>();
    for (const auto& [k, v] : opts_.compat) {
      auto it = saved.find(k);
      std::string was = it == saved.end() ? "<absent>" : it->second;
      if (was != v) diffs.push_back(k + ": checkpoint has '" + was + "', this run has '" + v + "'");
    }
    for (const auto& [k, v] : saved)  // a data-parallel checkpoint resumed by one process
      if (k.rfind("data_parallel.", 0) == 0 && !opts_.compat.count(k))
        diffs.push_back(k + ": checkpoint has '" + v + "', this run has '1'");
    if (!diffs.empty()) {
      std::string msg = "[trainer] checkpoint '" + dir + "' was made with an incompatible config:";
      for (auto& d : diffs) msg += "\n  " + d;
      throw ConfigError(msg);
    }
  }
  SafetensorsReader tr(dir + "/trainable.safetensors");
  NamedTensors tensors;
  for (const auto& n : tr.names()) tensors.emplace_back(n, tr.load(n));
  io_.set(tensors);
  load_optimizer_tensors(*optimizer_, SafetensorsReader(dir + "/optimizer.safetensors"));
  SafetensorsReader rng(dir + "/rng.safetensors");
  NamedTensors states;
  for (const auto& n : rng.names()) states.emplace_back(n, rng.load(n));
  for (const auto& missing : set_generator_states(states))
    log_warn("[trainer] checkpoint '{}' holds the {} generator, which this process does not see: dropout there "
             "will not continue exactly", dir, missing);
  if (scaler_ && j.contains("grad_scale"))
    scaler_->restore(j["grad_scale"].at("scale").get<double>(), j["grad_scale"].at("good_steps").get<int64_t>());
  st.epoch = j.at("epoch");
  st.batch = j.at("batch");
  st.step = j.at("step");
  st.skipped = j.at("skipped_nonfinite");
  st.bad_in_row = j.at("bad_in_row");
  st.overflows = j.value("skipped_overflow", int64_t{0});
  st.epoch_loss_sum = j.at("epoch_loss_sum");
  st.epoch_loss_n = j.at("epoch_loss_n");
}

void Trainer::prune_checkpoints() {
  if (opts_.keep_last_n <= 0 || opts_.run_dir.empty() || !main_process()) return;
  std::vector<std::pair<int64_t, fs::path>> epochs;
  static const std::regex re("^epoch_([0-9]+)$");
  for (const auto& e : fs::directory_iterator(opts_.run_dir)) {
    std::smatch m;
    auto name = e.path().filename().string();
    if (e.is_directory() && std::regex_match(name, m, re)) epochs.emplace_back(std::stoll(m[1]), e.path());
  }
  std::sort(epochs.begin(), epochs.end());
  std::error_code ec;
  for (size_t i = 0; i + opts_.keep_last_n < epochs.size(); ++i) fs::remove_all(epochs[i].second, ec);
}

// Everything one fit() call carries between its steps: the plan, the position, the loop's running sums.
struct Trainer::Loop {
  TrainSummary summary;
  State st;
  int64_t per_epoch = 0, total = 0, warmup = 0, max_epochs = 0;
  std::unique_ptr<JsonlWriter> metrics;
  std::vector<torch::Tensor> params;
  std::vector<double> base_lr;
  std::chrono::steady_clock::time_point t0, t_log;
  int64_t samples_since = 0, tokens_since = 0, answer_tokens_since = 0, samples_total = 0, tokens_total = 0;
  std::unique_ptr<Progress> progress;
  bool stop = false;
  bool preempt_voted = false;  // data parallel: some rank had a preemption notice at the last step's all-reduce
};

TrainSummary Trainer::fit() {
  Loop run;
  plan(run);
  open_run_dir(run);
  PreemptionScope signals(opts_.handle_signals);
  for (auto& g : groups_) {
    for (auto& p : g.params) run.params.push_back(p);
    run.base_lr.push_back(g.lr);
  }
  if (opts_.comm) {
    // Every rank must stand at the same position (they resume from one shared run directory).
    const auto pos = fmt::format("epoch {} batch {} step {}", run.st.epoch, run.st.batch, run.st.step);
    const auto all = opts_.comm->all_gather_bytes(pos);
    for (size_t r = 1; r < all.size(); ++r)
      if (all[r] != all[0])
        throw Error(fmt::format("[trainer] {}: data-parallel rank {} starts at {} but rank 0 at {} (do all ranks see "
                                "the same run directory '{}'?)", opts_.label, r, all[r], all[0], opts_.run_dir));
    broadcast_trainable(run);
  }
  objective_.set_train(true);
  run.t0 = run.t_log = std::chrono::steady_clock::now();
  run.progress = std::make_unique<Progress>(opts_.label, run.total);
  run.stop = run.st.step >= run.total;
  for (; run.st.epoch < run.max_epochs && !run.stop; ++run.st.epoch) {
    if (!train_epoch(run)) break;  // stopped mid-epoch at max_steps, position checkpointed
    end_epoch(run);
  }
  objective_.set_train(false);
  if (opts_.progress && main_process()) run.progress->finish(fmt::format("loss {:.4f}", run.summary.last_loss));
  run.summary.steps = run.st.step;
  run.summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - run.t0).count();
  run.summary.samples_per_s = run.summary.seconds > 0 ? run.samples_total / run.summary.seconds : 0.0;
  return run.summary;
}

// Optimizer steps per epoch and in total, warmup, and how many epochs max_steps allows.
void Trainer::plan(Loop& run) const {
  run.per_epoch = data_.num_batches();
  if (run.per_epoch <= 0)
    throw ConfigError("[trainer] the training data yields no batches (dataset empty or smaller than one batch with drop_last)");
  const int64_t steps_per_epoch = (run.per_epoch + opts_.grad_accum - 1) / opts_.grad_accum;
  run.total = steps_per_epoch * opts_.epochs;
  if (opts_.max_steps > 0) run.total = opts_.epochs > 0 ? std::min(run.total, opts_.max_steps) : opts_.max_steps;
  run.warmup = warmup_for(opts_.warmup_ratio, opts_.warmup_steps, run.total);
  run.max_epochs = opts_.max_steps > 0 && opts_.epochs <= 0 ? (opts_.max_steps + steps_per_epoch - 1) / steps_per_epoch
                                                            : opts_.epochs;
  log_debug("[trainer] {}: {} batches per epoch, {} optimizer steps in total over up to {} epochs, warmup {}",
            opts_.label, run.per_epoch, run.total, run.max_epochs, run.warmup);
}

// Resume from the newest checkpoint (or refuse to start over on top of one), and keep only the metrics lines
// that the position reached covers.
void Trainer::open_run_dir(Loop& run) {
  if (opts_.run_dir.empty()) return;
  fs::create_directories(opts_.run_dir);
  if (opts_.resume) {
    if (auto ck = latest_checkpoint(opts_.run_dir)) {
      load_checkpoint(*ck, run.st);
      run.summary.resumed = true;
      log_info("[trainer] resumed from {} (epoch {}, batch {}, step {})", *ck, run.st.epoch + 1, run.st.batch,
               run.st.step);
    }
  } else if (auto ck = latest_checkpoint(opts_.run_dir); ck && main_process()) {
    // Starting over here would leave checkpoints of the earlier run beside the new ones, and a later
    // --resume would pick whichever has the most steps.
    throw ConfigError("[trainer] run directory '" + opts_.run_dir + "' already holds checkpoints of an earlier "
                      "run (newest: '" + *ck + "'): resume it (--resume), or remove that directory or choose "
                      "another run.name to start over");
  }
  if (!main_process()) return;  // rank 0 keeps metrics.jsonl
  // Metrics lines past the checkpoint belong to work that is about to be redone.
  auto mpath = fs::path(opts_.run_dir) / "metrics.jsonl";
  if (fs::exists(mpath)) {
    std::istringstream in(read_file(mpath.string()));
    std::string kept, line;
    while (std::getline(in, line)) {
      try {
        auto j = json::parse(line);
        if (j.value("step", int64_t{0}) <= run.st.step && run.summary.resumed) kept += line + "\n";
      } catch (const std::exception&) {
      }
    }
    write_file_atomic(mpath.string(), kept);
  }
  run.metrics = std::make_unique<JsonlWriter>(mpath.string());
}

// The micro-steps of one epoch, an optimizer step every grad_accum of them. False when max_steps stopped the
// run in the middle of the epoch (its position is then checkpointed as step_last).
bool Trainer::train_epoch(Loop& run) {
  auto& st = run.st;
  const auto dev_type = opts_.device.type();
  AutocastState autocast;
  autocast.enabled = opts_.precision != "f32";
  autocast.dtype = opts_.precision == "fp16" ? torch::kHalf : torch::kBFloat16;
  data_.start_epoch(st.epoch, st.batch);
  Batch batch;
  int64_t micro = 0;
  // The micro-step losses stay on the device; optimizer_step reads them with the gradient norm in one sync.
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(opts_.device);
  torch::Tensor acc_loss = torch::zeros({}, f32);
  double weight = 0.0;  // this rank's share of the step (data parallel): supervised tokens, else samples
  bool have_batch = data_.next(batch);
  while (have_batch) {
    StepLoss sl;
    {
      AutocastScope scope(dev_type, autocast);
      sl = objective_.loss(batch);
    }
    torch::Tensor loss = sl.loss.to(torch::kFloat32);
    const double scale = scaler_ ? scaler_->scale() : 1.0;
    (loss * (scale / static_cast<double>(opts_.grad_accum))).backward();
    acc_loss = acc_loss + loss.detach().to(opts_.device);
    run.samples_since += sl.samples;
    const int64_t processed = sl.processed > 0 ? sl.processed : sl.tokens;
    run.tokens_since += processed;
    run.answer_tokens_since += sl.tokens;
    run.samples_total += sl.samples;
    run.tokens_total += processed;
    weight += static_cast<double>(sl.tokens > 0 ? sl.tokens : sl.samples);
    ++micro;
    ++st.batch;
    have_batch = data_.next(batch);
    if (micro < opts_.grad_accum && have_batch) continue;

    const auto [mean_loss, grad_norm] = optimizer_step(run, acc_loss, micro, weight);
    micro = 0;
    weight = 0.0;
    acc_loss = torch::zeros({}, f32);
    log_step(run, mean_loss, grad_norm, !have_batch);
    checkpoint_or_preempt(run, have_batch);
    if (opts_.max_steps > 0 && st.step >= opts_.max_steps) {
      run.stop = true;
      break;
    }
  }
  if (run.stop && have_batch) {
    save_checkpoint("step_last", st);  // max_steps reached mid-epoch: checkpoint the exact position
    return false;
  }
  return true;
}

// One optimizer step on the accumulated gradients. One device-to-host sync reads the summed micro-step losses
// and the squared gradient norm together. A non-finite loss (or, without fp16 loss scaling, gradient) skips the
// step and counts toward nan_patience; under fp16 an overflowing gradient only shrinks the loss scale.
// Returns the mean loss and the (unscaled) gradient norm before clipping.
Trainer::StepFigures Trainer::optimizer_step(Loop& run, torch::Tensor loss_sum, int64_t micro, double weight) {
  auto& st = run.st;
  torch::Tensor votes = torch::zeros({1}, loss_sum.options());
  if (opts_.comm) {
    auto reduced = all_reduce_step(run, loss_sum, micro, weight);
    loss_sum = reduced.slice(0, 0, 1);
    votes = reduced.slice(0, 1, 2);
  }
  std::vector<torch::Tensor> parts{loss_sum.reshape({1}), votes};
  for (auto& p : run.params)
    if (p.grad().defined()) parts.push_back(p.grad().detach().to(torch::kFloat32).pow(2).sum().reshape({1}));
  auto host = torch::cat(parts).cpu();  // the step's one sync
  auto h = host.accessor<float, 1>();
  run.preempt_voted = h[1] > 0.0f;
  float norm_sq = 0.0f;  // summed in fp32 in parameter order, as the per-parameter reduction always was
  for (int64_t i = 2; i < host.size(0); ++i) norm_sq += h[i];
  const double scale = scaler_ ? scaler_->scale() : 1.0;
  const double mean_loss = static_cast<double>(h[0]) / static_cast<double>(micro);
  const double grad_norm = std::sqrt(static_cast<double>(norm_sq)) / scale;
  const bool loss_ok = std::isfinite(mean_loss), grad_ok = std::isfinite(grad_norm);
  // Under fp16, overflowing gradients of a finite loss are the loss scale's business, unless the scale is already
  // at its floor: then they count as non-finite like any other.
  bool overflow = false;
  if (loss_ok && !grad_ok && scaler_) {
    scaler_->update(false);
    overflow = !scaler_->exhausted();
  }
  if (overflow) {
    ++st.overflows;
    optimizer_->zero_grad();
    log_info("[trainer] fp16 gradient overflow at step {}: step skipped, loss scale {} -> {}", st.step + 1, scale,
             scaler_->scale());
  } else if (!loss_ok || !grad_ok) {
    ++st.skipped;
    ++st.bad_in_row;
    ++run.summary.skipped_nonfinite;
    optimizer_->zero_grad();
    log_warn("[trainer] non-finite loss/gradient at step {} (loss {}, grad norm {}): step skipped ({} in a row)",
             st.step + 1, mean_loss, grad_norm, st.bad_in_row);
    if (st.bad_in_row >= opts_.nan_patience) {
      auto prev = latest_checkpoint(opts_.run_dir);
      throw Error("[trainer] " + std::to_string(st.bad_in_row) +
                  " non-finite steps in a row (finetune.nan_patience); stopping. Last good checkpoint: " +
                  (prev ? *prev : std::string("none")));
    }
  } else {
    st.bad_in_row = 0;
    if (scaler_) scaler_->update(true);
    // Unscaling and clipping are one multiplication of every gradient.
    double coef = 1.0 / scale;
    if (opts_.max_grad_norm > 0 && grad_norm > opts_.max_grad_norm) coef *= opts_.max_grad_norm / (grad_norm + 1e-6);
    if (coef != 1.0) {
      torch::NoGradGuard ng;
      for (auto& p : run.params)
        if (p.grad().defined()) p.grad().mul_(coef);
    }
    const double f = schedule_factor(opts_.schedule, st.step, run.total, run.warmup);
    auto& pgs = optimizer_->param_groups();
    for (size_t g = 0; g < pgs.size(); ++g)
      static_cast<torch::optim::AdamWOptions&>(pgs[g].options()).lr(run.base_lr[g] * f);
    optimizer_->step();
    optimizer_->zero_grad();
    if (opts_.after_step) opts_.after_step();
    st.epoch_loss_sum += mean_loss;
    st.epoch_loss_n += 1;
    run.summary.losses.push_back(mean_loss);
    run.summary.last_loss = mean_loss;
  }
  ++st.step;
  return {mean_loss, grad_norm};
}

// A metrics.jsonl line every log_every_steps steps and at the end of an epoch; the progress line.
void Trainer::log_step(Loop& run, double mean_loss, double grad_norm, bool epoch_end) {
  const auto& st = run.st;
  if (run.metrics && (st.step % opts_.log_every_steps == 0 || epoch_end)) {
    auto now = std::chrono::steady_clock::now();
    const double dt = std::max(1e-9, std::chrono::duration<double>(now - run.t_log).count());
    const double lr0 = static_cast<torch::optim::AdamWOptions&>(optimizer_->param_groups()[0].options()).lr();
    JsonFields metrics_line = {{"step", st.step}, {"epoch", st.epoch + 1}, {"loss", mean_loss}, {"lr", lr0},
                               {"grad_norm", grad_norm}, {"samples_per_s", run.samples_since / dt},
                               {"tokens_per_s", run.tokens_since / dt},
                               {"answer_tokens_per_s", run.answer_tokens_since / dt},
                               {"peak_mem_mb", host_peak_rss_mb()},
                               {"skipped_nonfinite", st.skipped}};
    if (opts_.device.is_cuda()) {
      const double gpu = device_peak_allocated_mb(opts_.device);
      if (gpu >= 0) metrics_line.emplace_back("peak_gpu_mem_mb", gpu);
    }
    if (scaler_) {
      metrics_line.emplace_back("loss_scale", scaler_->scale());
      metrics_line.emplace_back("skipped_overflow", st.overflows);
    }
    run.metrics->write(metrics_line);
    run.t_log = now;
    run.samples_since = run.tokens_since = run.answer_tokens_since = 0;
  }
  if (opts_.progress && main_process()) {
    const double s = std::max(1e-9, std::chrono::duration<double>(std::chrono::steady_clock::now() - run.t0).count());
    run.progress->update(st.step, fmt::format("epoch {} loss {:.4f} {:.0f} samples/s {:.0f} tokens/s", st.epoch + 1,
                                              mean_loss, run.samples_total / s, run.tokens_total / s));
  }
}

// step_last every checkpoint_every_steps steps inside an epoch, and on a preemption signal (then stop with
// Preempted, exit code 75 at the CLI).
void Trainer::checkpoint_or_preempt(Loop& run, bool more_in_epoch) {
  maybe_inject_fault(run.st.step);
  // Data parallel: the vote taken in this step's all-reduce, so that every rank stops after the same step (a
  // notice that arrived since stays pending for the next one).
  const bool preempt = opts_.comm ? run.preempt_voted : opts_.handle_signals && pending_preemption() != 0;
  const bool step_ck =
      opts_.checkpoint_every_steps > 0 && run.st.step % opts_.checkpoint_every_steps == 0 && more_in_epoch;
  if (!preempt && !(step_ck && !opts_.run_dir.empty())) return;
  save_checkpoint("step_last", run.st);
  if (preempt && opts_.comm) {
    take_preemption();  // voted on: this rank's own notice (if any) is spent
    opts_.comm->barrier();  // rank 0's checkpoint is on disk before any rank reports it
    throw Preempted(fmt::format("a data-parallel rank received a preemption notice: [trainer] step {} finished{}; "
                                "rerun the same command to continue", run.st.step,
                                opts_.run_dir.empty() ? " (no run directory: nothing checkpointed)"
                                                      : ", checkpoint written to " + opts_.run_dir + "/step_last"));
  }
  if (preempt && opts_.run_dir.empty())
    throw_if_preempted(fmt::format("[trainer] {}: step {} finished (no run directory: nothing checkpointed)",
                                   opts_.label, run.st.step));
  if (preempt)
    throw_if_preempted(fmt::format("[trainer] step {} finished, checkpoint written to {}/step_last; rerun with "
                                   "--resume (emt study: rerun the same command)", run.st.step, opts_.run_dir));
}

// The epoch's checkpoint (its state already pointing at the next epoch), pruning, then the callbacks (the
// study scores every dataset there) with the objective in eval mode.
void Trainer::end_epoch(Loop& run) {
  auto& st = run.st;
  EpochEnd ee;
  ee.epoch = st.epoch + 1;
  ee.step = st.step;
  ee.mean_loss = st.epoch_loss_n ? st.epoch_loss_sum / st.epoch_loss_n : std::nan("");
  State next = st;
  next.epoch = st.epoch + 1;
  next.batch = 0;
  next.epoch_loss_sum = 0;
  next.epoch_loss_n = 0;
  const std::string name = "epoch_" + std::to_string(ee.epoch);
  if (opts_.comm) check_ranks_in_sync(run, next);
  save_checkpoint(name, next);
  if (!opts_.run_dir.empty()) {
    ee.checkpoint_dir = (fs::path(opts_.run_dir) / name).string();
    std::error_code ec;
    if (main_process()) fs::remove_all(fs::path(opts_.run_dir) / "step_last", ec);
  }
  // Other ranks may read the checkpoint (the study scores from the model in memory, but a callback may not).
  if (opts_.comm) opts_.comm->barrier();
  prune_checkpoints();
  if (main_process())
    log_info("[trainer] {} epoch {} done: step {}, mean loss {:.4f}", opts_.label, ee.epoch, ee.step, ee.mean_loss);
  objective_.set_train(false);
  for (auto& cb : callbacks_) cb(ee);
  objective_.set_train(true);
  run.summary.epochs_done = ee.epoch;
  st.batch = 0;  // the loop's increment moves st.epoch to next.epoch
  st.epoch_loss_sum = 0.0;
  st.epoch_loss_n = 0;
}

// ---- data parallel -------------------------------------------------------------------------------------------

// Rank 0's trainable parameters into every rank (one flattened broadcast): the ranks start from one state even
// when their initialisation (a LoRA B, a prompt) or their resume differed.
void Trainer::broadcast_trainable(Loop& run) {
  torch::NoGradGuard ng;
  std::vector<torch::Tensor> flat;
  for (auto& p : run.params) flat.push_back(p.detach().reshape({-1}).to(torch::kFloat32));
  auto buf = torch::cat(flat);
  opts_.comm->broadcast(buf, 0);
  int64_t off = 0;
  for (auto& p : run.params) {
    const int64_t n = p.numel();
    p.copy_(buf.slice(0, off, off + n).view_as(p));
    off += n;
  }
}

// One flattened all-reduce per optimizer step: [loss x w, w, preemption vote, gradients x w] summed over the
// ranks and divided by the summed w. Writes the combined gradients back and returns [loss sum over `micro`
// micro-steps, vote] on the device; no host sync.
torch::Tensor Trainer::all_reduce_step(Loop& run, const torch::Tensor& loss_sum, int64_t micro, double weight) {
  torch::NoGradGuard ng;
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(opts_.device);
  std::vector<torch::Tensor> parts{loss_sum.reshape({1}).to(torch::kFloat32) * (weight / static_cast<double>(micro)),
                                   torch::full({1}, weight, f32),
                                   torch::full({1}, pending_preemption() != 0 ? 1.0 : 0.0, f32)};
  for (auto& p : run.params)
    if (p.grad().defined()) parts.push_back(p.grad().detach().reshape({-1}).to(torch::kFloat32) * weight);
  auto buf = torch::cat(parts);
  opts_.comm->all_reduce_sum(buf);
  buf.div_(buf.slice(0, 1, 2).clone());
  int64_t off = 3;
  for (auto& p : run.params)
    if (p.grad().defined()) {
      const int64_t n = p.grad().numel();
      p.grad().copy_(buf.slice(0, off, off + n).view_as(p.grad()));
      off += n;
    }
  return torch::cat({buf.slice(0, 0, 1) * static_cast<double>(micro), buf.slice(0, 2, 3)});
}

// Every rank's fingerprint of its trainable parameters, compared at the epoch's end: data-parallel ranks that
// drifted apart (a non-deterministic kernel, a rank that skipped a step) are named instead of averaged.
void Trainer::check_ranks_in_sync(Loop& run, State& next) {
  const auto mine = fmt::format("{:016x}", tensor_fingerprint(run.params));
  next.rank_fingerprints = opts_.comm->all_gather_bytes(mine);
  for (size_t r = 1; r < next.rank_fingerprints.size(); ++r)
    if (next.rank_fingerprints[r] != next.rank_fingerprints[0])
      throw Error(fmt::format("[trainer] {} epoch {}: the trainable parameters of rank {} differ from rank 0's "
                              "(fingerprints {} vs {}): the data-parallel ranks no longer train one model",
                              opts_.label, run.st.epoch + 1, r, next.rank_fingerprints[r],
                              next.rank_fingerprints[0]));
}

}  // namespace emt
