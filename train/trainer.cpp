// The one training loop: AdamW over parameter groups, schedules, accumulation, clipping, autocast, NaN guard,
// atomic checkpoints with exact resume (weights, optimizer, step, data position, RNG), preemption, metrics.
#include <ATen/autocast_mode.h>
#include <emt/core/log.h>
#include <emt/core/metrics.h>
#include <emt/core/runtime.h>
#include <emt/train/trainer.h>
#include <sys/resource.h>
#include <torch/torch.h>
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

namespace emt {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::atomic<int> g_signal{0};
extern "C" void on_preempt_signal(int sig) { g_signal = sig; }

struct SignalGuard {
  struct sigaction old_term {}, old_usr1 {};
  bool active = false;
  explicit SignalGuard(bool on) : active(on) {
    if (!active) return;
    g_signal = 0;
    struct sigaction sa {};
    sa.sa_handler = on_preempt_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, &old_term);
    sigaction(SIGUSR1, &sa, &old_usr1);
  }
  ~SignalGuard() {
    if (!active) return;
    sigaction(SIGTERM, &old_term, nullptr);
    sigaction(SIGUSR1, &old_usr1, nullptr);
  }
};

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
// signal to this process right after optimizer step <step> (KILL = a real kill -9: no cleanup at all).
void maybe_inject_fault(int64_t step) {
  static const char* spec = std::getenv("EMT_FAULT_AT_STEP");
  if (!spec) return;
  std::string s(spec);
  auto colon = s.find(':');
  if (colon == std::string::npos || std::stoll(s.substr(0, colon)) != step) return;
  std::string sig = s.substr(colon + 1);
  ::kill(::getpid(), sig == "KILL" ? SIGKILL : sig == "USR1" ? SIGUSR1 : SIGTERM);
}

double peak_memory_mb(const torch::Device& dev) {
  (void)dev;
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss / 1024.0;  // Linux reports KiB
}

// Whole-tensor serialisation through safetensors keeps checkpoints inspectable with standard tools.
NamedTensors optimizer_tensors(torch::optim::Optimizer& opt) {
  NamedTensors out;
  auto& groups = opt.param_groups();
  auto& state = opt.state();
  for (size_t g = 0; g < groups.size(); ++g) {
    auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      auto key = c10::guts::to_string(params[i].unsafeGetTensorImpl());
      auto it = state.find(key);
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
      state[c10::guts::to_string(params[i].unsafeGetTensorImpl())] = std::move(s);
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
  return {{"model", shapes.str()},
          {"finetune.dataset", f.dataset},
          {"finetune.method", f.method},
          {"finetune.batch_size", std::to_string(f.batch_size)},
          {"finetune.grad_accum", std::to_string(f.grad_accum)},
          {"finetune.lora", lora.str()},
          {"finetune.prompt_tuning.num_virtual_tokens", std::to_string(f.prompt_tuning.num_virtual_tokens)},
          {"run.seed", std::to_string(c.run.seed)}};
}

struct Trainer::State {
  int64_t epoch = 0;          // 0-based epoch in progress
  int64_t batch = 0;          // micro-batches of this epoch already consumed
  int64_t step = 0;           // optimizer steps done
  int64_t skipped = 0;        // non-finite steps skipped in total
  int64_t bad_in_row = 0;
  double epoch_loss_sum = 0.0;
  int64_t epoch_loss_n = 0;
};

Trainer::Trainer(Objective& objective, BatchSource& data, std::vector<ParamGroup> groups, TrainableIO io,
                 TrainerOptions opts)
    : objective_(objective), data_(data), groups_(std::move(groups)), io_(std::move(io)), opts_(std::move(opts)) {
  if (groups_.empty()) throw ConfigError("[trainer] nothing to train: the method left no trainable parameters");
  if (opts_.grad_accum < 1) throw ConfigError("[trainer] grad_accum must be >= 1");
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
  if (opts_.run_dir.empty()) return;
  fs::path final_dir = fs::path(opts_.run_dir) / name;
  fs::path tmp = fs::path(opts_.run_dir) / (name + ".tmp." + std::to_string(::getpid()));
  std::error_code ec;
  fs::remove_all(tmp, ec);
  try {
    fs::create_directories(tmp);
    save_safetensors((tmp / "trainable.safetensors").string(), io_.get());
    save_safetensors((tmp / "optimizer.safetensors").string(), optimizer_tensors(*optimizer_));
    NamedTensors rng = {{"cpu", torch::globalContext().defaultGenerator(torch::kCPU).get_state()}};
    save_safetensors((tmp / "rng.safetensors").string(), rng);
    json j = {{"epoch", st.epoch}, {"batch", st.batch}, {"step", st.step}, {"skipped_nonfinite", st.skipped},
              {"bad_in_row", st.bad_in_row}, {"epoch_loss_sum", st.epoch_loss_sum},
              {"epoch_loss_n", st.epoch_loss_n}, {"compat", opts_.compat}};
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
  {
    at::Generator gen = torch::globalContext().defaultGenerator(torch::kCPU);  // a handle to the global one
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(rng.load("cpu"));
  }
  st.epoch = j.at("epoch");
  st.batch = j.at("batch");
  st.step = j.at("step");
  st.skipped = j.at("skipped_nonfinite");
  st.bad_in_row = j.at("bad_in_row");
  st.epoch_loss_sum = j.at("epoch_loss_sum");
  st.epoch_loss_n = j.at("epoch_loss_n");
}

void Trainer::prune_checkpoints() {
  if (opts_.keep_last_n <= 0 || opts_.run_dir.empty()) return;
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

TrainSummary Trainer::fit() {
  TrainSummary summary;
  State st;
  const int64_t per_epoch = data_.num_batches();
  if (per_epoch <= 0) throw ConfigError("[trainer] the training data yields no batches (dataset empty or smaller than one batch with drop_last)");
  const int64_t steps_per_epoch = (per_epoch + opts_.grad_accum - 1) / opts_.grad_accum;
  int64_t total = steps_per_epoch * opts_.epochs;
  if (opts_.max_steps > 0) total = opts_.epochs > 0 ? std::min(total, opts_.max_steps) : opts_.max_steps;
  const int64_t warmup = warmup_for(opts_.warmup_ratio, opts_.warmup_steps, total);
  const int64_t max_epochs = opts_.max_steps > 0 && opts_.epochs <= 0
                                 ? (opts_.max_steps + steps_per_epoch - 1) / steps_per_epoch
                                 : opts_.epochs;

  log_debug("[trainer] {}: {} batches per epoch, {} optimizer steps in total over up to {} epochs, warmup {}",
            opts_.label, per_epoch, total, max_epochs, warmup);
  std::unique_ptr<JsonlWriter> metrics;
  if (!opts_.run_dir.empty()) {
    fs::create_directories(opts_.run_dir);
    if (opts_.resume) {
      if (auto ck = latest_checkpoint(opts_.run_dir)) {
        load_checkpoint(*ck, st);
        summary.resumed = true;
        log_info("[trainer] resumed from {} (epoch {}, batch {}, step {})", *ck, st.epoch + 1, st.batch, st.step);
      }
    }
    // Metrics lines past the checkpoint belong to work that is about to be redone.
    auto mpath = fs::path(opts_.run_dir) / "metrics.jsonl";
    if (fs::exists(mpath)) {
      std::istringstream in(read_file(mpath.string()));
      std::string kept, line;
      while (std::getline(in, line)) {
        try {
          auto j = json::parse(line);
          if (j.value("step", int64_t{0}) <= st.step && summary.resumed) kept += line + "\n";
        } catch (const std::exception&) {
        }
      }
      write_file_atomic(mpath.string(), kept);
    }
    metrics = std::make_unique<JsonlWriter>(mpath.string());
  }

  SignalGuard signals(opts_.handle_signals);
  const bool bf16 = opts_.precision == "bf16";
  const bool cuda = opts_.device.is_cuda();
  std::vector<torch::Tensor> params;
  for (auto& g : groups_)
    for (auto& p : g.params) params.push_back(p);
  std::vector<double> base_lr;
  for (auto& g : groups_) base_lr.push_back(g.lr);

  objective_.set_train(true);
  auto t0 = std::chrono::steady_clock::now();
  auto t_log = t0;
  int64_t samples_since = 0, tokens_since = 0, samples_total = 0;
  Progress progress(opts_.label, total);
  bool stop = st.step >= total;

  for (; st.epoch < max_epochs && !stop; ++st.epoch) {
    data_.start_epoch(st.epoch, st.batch);
    Batch batch;
    int64_t micro = 0;
    torch::Tensor acc_loss = torch::zeros({}, torch::kFloat32);
    double last_grad_norm = 0.0;
    bool have_batch = data_.next(batch);
    while (have_batch) {
      // one micro-step
      torch::Tensor loss;
      StepLoss sl;
      {
        if (bf16) {
          if (cuda) at::autocast::set_enabled(true);
          else at::autocast::set_cpu_enabled(true), at::autocast::set_autocast_cpu_dtype(torch::kBFloat16);
        }
        sl = objective_.loss(batch);
        if (bf16) {
          if (cuda) at::autocast::set_enabled(false);
          else at::autocast::set_cpu_enabled(false);
          at::autocast::clear_cache();
        }
      }
      loss = sl.loss.to(torch::kFloat32);
      (loss / static_cast<double>(opts_.grad_accum)).backward();
      acc_loss = acc_loss + loss.detach().to(torch::kCPU);
      samples_since += sl.samples;
      tokens_since += sl.tokens;
      samples_total += sl.samples;
      ++micro;
      ++st.batch;
      have_batch = data_.next(batch);
      bool boundary = micro == opts_.grad_accum || !have_batch;
      if (!boundary) continue;

      // one optimizer step: a single host sync decides whether the step is finite
      double mean_loss = acc_loss.item<double>() / static_cast<double>(micro);
      torch::Tensor norm_sq = torch::zeros({}, torch::kFloat32);
      for (auto& p : params)
        if (p.grad().defined()) norm_sq = norm_sq + p.grad().detach().to(torch::kFloat32).pow(2).sum().cpu();
      double grad_norm = std::sqrt(norm_sq.item<double>());
      bool finite = std::isfinite(mean_loss) && std::isfinite(grad_norm);
      if (!finite) {
        ++st.skipped;
        ++st.bad_in_row;
        ++summary.skipped_nonfinite;
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
        if (opts_.max_grad_norm > 0 && grad_norm > opts_.max_grad_norm) {
          torch::NoGradGuard ng;
          double coef = opts_.max_grad_norm / (grad_norm + 1e-6);
          for (auto& p : params)
            if (p.grad().defined()) p.grad().mul_(coef);
        }
        double f = schedule_factor(opts_.schedule, st.step, total, warmup);
        auto& pgs = optimizer_->param_groups();
        for (size_t g = 0; g < pgs.size(); ++g)
          static_cast<torch::optim::AdamWOptions&>(pgs[g].options()).lr(base_lr[g] * f);
        optimizer_->step();
        optimizer_->zero_grad();
        st.epoch_loss_sum += mean_loss;
        st.epoch_loss_n += 1;
        summary.losses.push_back(mean_loss);
        summary.last_loss = mean_loss;
      }
      last_grad_norm = grad_norm;
      ++st.step;
      micro = 0;
      acc_loss = torch::zeros({}, torch::kFloat32);

      if (metrics && (st.step % opts_.log_every_steps == 0 || !have_batch)) {
        auto now = std::chrono::steady_clock::now();
        double dt = std::max(1e-9, std::chrono::duration<double>(now - t_log).count());
        double lr0 = static_cast<torch::optim::AdamWOptions&>(optimizer_->param_groups()[0].options()).lr();
        metrics->write({{"step", st.step}, {"epoch", st.epoch + 1}, {"loss", mean_loss}, {"lr", lr0},
                        {"grad_norm", last_grad_norm}, {"samples_per_s", samples_since / dt},
                        {"tokens_per_s", tokens_since / dt}, {"peak_mem_mb", peak_memory_mb(opts_.device)},
                        {"skipped_nonfinite", st.skipped}});
        t_log = now;
        samples_since = tokens_since = 0;
      }
      if (opts_.progress) progress.update(st.step, fmt::format("epoch {} loss {:.4f}", st.epoch + 1, mean_loss));

      maybe_inject_fault(st.step);
      bool preempt = g_signal.load() != 0;
      bool step_ck = opts_.checkpoint_every_steps > 0 && st.step % opts_.checkpoint_every_steps == 0 && have_batch;
      if (preempt || (step_ck && !opts_.run_dir.empty())) {
        save_checkpoint("step_last", st);
        if (preempt) {
          int sig = g_signal.exchange(0);
          throw Preempted(fmt::format("[trainer] received signal {} at step {}: checkpoint written to {}/step_last; "
                                      "rerun with --resume",
                                      sig, st.step, opts_.run_dir));
        }
      }
      if (opts_.max_steps > 0 && st.step >= opts_.max_steps) {
        stop = true;
        break;
      }
    }
    if (stop && have_batch) {
      // max_steps reached mid-epoch: checkpoint the exact position, then stop.
      save_checkpoint("step_last", st);
      break;
    }
    // epoch finished
    EpochEnd ee;
    ee.epoch = st.epoch + 1;
    ee.step = st.step;
    ee.mean_loss = st.epoch_loss_n ? st.epoch_loss_sum / st.epoch_loss_n : std::nan("");
    State next = st;
    next.epoch = st.epoch + 1;
    next.batch = 0;
    next.epoch_loss_sum = 0;
    next.epoch_loss_n = 0;
    std::string name = "epoch_" + std::to_string(ee.epoch);
    save_checkpoint(name, next);
    if (!opts_.run_dir.empty()) {
      ee.checkpoint_dir = (fs::path(opts_.run_dir) / name).string();
      std::error_code ec;
      fs::remove_all(fs::path(opts_.run_dir) / "step_last", ec);
    }
    prune_checkpoints();
    log_info("[trainer] {} epoch {} done: step {}, mean loss {:.4f}", opts_.label, ee.epoch, ee.step, ee.mean_loss);
    objective_.set_train(false);
    for (auto& cb : callbacks_) cb(ee);
    objective_.set_train(true);
    summary.epochs_done = ee.epoch;
    st.batch = 0;  // the loop increment moves st.epoch to next.epoch
    st.epoch_loss_sum = 0.0;
    st.epoch_loss_n = 0;
  }
  objective_.set_train(false);
  if (opts_.progress) progress.finish(fmt::format("loss {:.4f}", summary.last_loss));
  summary.steps = st.step;
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  summary.samples_per_s = summary.seconds > 0 ? samples_total / summary.seconds : 0.0;
  return summary;
}

}  // namespace emt
