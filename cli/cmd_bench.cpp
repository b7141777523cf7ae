// `emt bench train`: the fine-tuning step (the one Trainer loop on one fixed batch) per method, timed in turns with
// the same model and step in plain PyTorch eager (scripts/bench/train_ref.py under each given Python), in one run;
// prints medians, ratios, samples/s, tokens/s and MFU against this machine's measured matmul peak.
#include <emt/adapters/policy.h>
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/core/llava.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <emt/train/finetune.h>
#include <emt/train/trainer.h>
#include <sys/wait.h>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fmt/core.h>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bench.h"
#include "commands.h"

namespace emt::cli {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using bench::median;
using bench::model_spec;
using bench::Reference;

// The same batch every micro-step. The time between two next() calls is one optimizer step; at a round's end the
// references run their round before the next step's clock starts.
class TimedSource : public BatchSource {
 public:
  TimedSource(Batch b, int warmup, int rounds, int steps, std::function<void(int)> between)
      : batch_(std::move(b)), warmup_(warmup), rounds_(rounds), steps_(steps), between_(std::move(between)) {}
  int64_t num_batches() const override { return warmup_ + static_cast<int64_t>(rounds_) * steps_; }
  void start_epoch(int64_t, int64_t) override { served_ = 0; }
  bool next(Batch& out) override {
    const auto now = Clock::now();
    if (served_ > warmup_) ms.push_back(std::chrono::duration<double, std::milli>(now - last_).count());
    const int64_t done = served_ - warmup_;  // measured steps finished
    if (served_ == warmup_ || (done > 0 && done % steps_ == 0)) between_(static_cast<int>(done / steps_));
    if (served_ >= num_batches()) return false;
    out = batch_;
    ++served_;
    last_ = Clock::now();
    return true;
  }
  std::vector<double> ms;

 private:
  Batch batch_;
  int warmup_, rounds_, steps_;
  std::function<void(int)> between_;
  int64_t served_ = 0;
  Clock::time_point last_;
};

// Model FLOPs of one optimizer step: the vision tower forward only (frozen, no gradients), the projector forward
// and weight gradients, the decoder forward and input gradients (the projector below is trained) plus weight
// gradients where trained (full) or LoRA's own three passes, logits at supervised positions only.
double step_flops(const LlavaOptions& o, const std::string& method, int64_t lora_r, int64_t lora_targets_per_layer_in_out,
                  int64_t b, int64_t t_total, int64_t supervised) {
  const auto& v = o.vision;
  const double dv = static_cast<double>(v.encoder.hidden_size), iv = static_cast<double>(v.encoder.intermediate_size);
  const double tv = static_cast<double>(v.num_patches() + 1);
  const int64_t depth = o.select_layer < 0 ? v.encoder.num_layers + 1 + o.select_layer : o.select_layer;
  double vision = 2.0 * b * v.num_patches() * v.num_channels * v.patch_size * v.patch_size * dv;
  vision += depth * (2.0 * b * tv * (4 * dv * dv + 2 * dv * iv) + 4.0 * b * tv * tv * dv);
  const double d = static_cast<double>(o.llm.hidden_size), n_img = static_cast<double>(o.num_image_tokens());
  const double proj = 2.0 * b * n_img * (o.projector.type == "mlp2x_gelu" ? dv * d + d * d : dv * d);
  const auto& l = o.llm;
  const double hd = static_cast<double>(l.head_dim()), inter = static_cast<double>(l.intermediate_size);
  const double layers = static_cast<double>(l.num_layers);
  const double lin =
      layers * 2.0 * b * t_total * (d * (l.num_heads + 2 * l.num_kv_heads) * hd + l.num_heads * hd * d + 3 * d * inter);
  const double att = layers * 4.0 * b * static_cast<double>(t_total) * t_total * d;
  const double head = 2.0 * supervised * d * l.vocab_size;
  double llm = (lin + att + head) * 2.0;   // forward + input gradients
  if (method == "full") llm += lin + head;  // weight gradients
  if (method == "lora") llm += 3.0 * 2.0 * b * t_total * lora_r * lora_targets_per_layer_in_out * l.num_layers;
  return vision + 2.0 * proj + llm;
}

// Matmul FLOP/s of this machine (at the threads in use) or of a CUDA device: median of repeats, n x n x n.
double matmul_peak(torch::ScalarType dtype, const torch::Device& dev = torch::kCPU, int64_t n = 1024) {
  auto a = torch::randn({n, n}).to(dev, dtype), bm = torch::randn({n, n}).to(dev, dtype);
  std::vector<double> s;
  for (int i = 0; i < 8; ++i) {
    auto t0 = Clock::now();
    auto c = torch::mm(a, bm);
    c.sum().item<float>();
    if (i >= 2) s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return 2.0 * n * n * n / median(s);
}

// One op's share of a profiled stretch: self time (its own, children's time taken out), calls.
struct OpTime {
  std::string name;
  double self_us = 0.0;
  int64_t calls = 0;
};

// The LibTorch profiler's trace (Chrome trace events, "X" phases with ts and dur in microseconds) -> self time per
// op name, largest first, and the wall time the events span. Nesting is per thread: an event's children are the
// events that start and end inside it.
std::vector<OpTime> self_times(const std::string& trace, double* span_us) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(trace);
  } catch (const std::exception& e) {
    throw Error(std::string("[bench] the profiler's trace is not JSON: ") + e.what());
  }
  struct Ev {
    double ts, dur;
    std::string name;
  };
  std::map<std::string, std::vector<Ev>> by_thread;
  double lo = 1e300, hi = -1e300;
  for (const auto& e : j) {
    if (!e.is_object() || e.value("ph", "") != "X" || !e.contains("ts") || !e.contains("dur")) continue;
    const double ts = e.at("ts").get<double>(), dur = e.at("dur").get<double>();
    by_thread[e.contains("tid") ? e.at("tid").dump() : "0"].push_back({ts, dur, e.value("name", "?")});
    lo = std::min(lo, ts);
    hi = std::max(hi, ts + dur);
  }
  std::map<std::string, OpTime> agg;
  for (auto& [tid, evs] : by_thread) {
    std::sort(evs.begin(), evs.end(),
              [](const Ev& a, const Ev& b) { return a.ts < b.ts || (a.ts == b.ts && a.dur > b.dur); });
    std::vector<std::pair<double, size_t>> open;  // (end, index) of the enclosing events
    std::vector<double> child(evs.size(), 0.0);
    for (size_t i = 0; i < evs.size(); ++i) {
      while (!open.empty() && open.back().first <= evs[i].ts) open.pop_back();
      if (!open.empty()) child[open.back().second] += evs[i].dur;
      open.push_back({evs[i].ts + evs[i].dur, i});
    }
    for (size_t i = 0; i < evs.size(); ++i) {
      OpTime& o = agg[evs[i].name];
      o.name = evs[i].name;
      o.self_us += std::max(0.0, evs[i].dur - child[i]);
      o.calls += 1;
    }
  }
  std::vector<OpTime> out;
  for (auto& [name, o] : agg) out.push_back(o);
  std::sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.self_us > b.self_us; });
  if (span_us) *span_us = hi > lo ? hi - lo : 0.0;
  return out;
}

struct Args {
  std::string model = "configs/models/tiny.yaml";
  std::vector<std::string> methods = {"linear", "lora", "full"};
  std::vector<std::string> pythons = {"/usr/bin/python3", ".venv/bin/python"};
  std::string script = "scripts/bench/train_ref.py";
  int batch = 32, text_tokens = 32, answer_tokens = 6, warmup = 3, rounds = 5, steps = 4, threads = 2;
  bool no_reference = false;
  std::string device = "cpu";
  double peak_tflops = 0.0;  // > 0: MFU against this peak (e.g. a GPU's datasheet figure) instead of the measured one
  std::string profile;       // a folder: one more round of emt's steps under the LibTorch profiler, per method
  int profile_top = 15;
  std::vector<std::string> overrides;
};

void write_raw(const fs::path& p, const torch::Tensor& t) {
  auto c = t.contiguous();
  std::ofstream f(p, std::ios::binary);
  f.write(static_cast<const char*>(c.data_ptr()), static_cast<std::streamsize>(c.numel() * c.element_size()));
  if (!f) throw IoError("[bench] cannot write " + p.string());
}

void bench_train(const Args& a) {
  RunConfig cfg = load_config(a.model, a.overrides);
  cfg.run.threads = a.threads;
  apply_run_section(cfg.run);
  const torch::Device dev = resolve_device(a.device);
  const torch::ScalarType frozen = parse_dtype(cfg.run.dtype);
  if (!(a.peak_tflops >= 0.0)) throw ConfigError("[bench] --peak-tflops must be positive (0 = measure)");
  const int64_t vocab = cfg.model.llm.vocab_size, image_token = vocab - 1;
  const LlavaOptions lo = llava_options(cfg.model, image_token);
  if (a.warmup < 1 || a.rounds < 1 || a.steps < 1)
    throw ConfigError("[bench] --warmup, --rounds and --steps must be at least 1 (the first steps allocate the "
                      "optimizer state)");
  if (a.text_tokens < a.answer_tokens + 2)
    throw ConfigError("[bench] --text-tokens must leave room for bos, the image token and the answer");
  // The batch: bos, the image token, prompt tokens, then the answer (supervised); no padding.
  torch::manual_seed(0);
  Batch batch;
  const int64_t B = a.batch, T = a.text_tokens;
  batch.images = torch::randn({B, lo.vision.num_channels, lo.vision.image_size, lo.vision.image_size});
  batch.input_ids = torch::randint(4, vocab - 1, {B, T}, torch::kLong);
  batch.input_ids.select(1, 0).fill_(1);
  batch.input_ids.select(1, 1).fill_(image_token);
  batch.attention_mask = torch::ones({B, T}, torch::kLong);
  batch.labels = torch::full({B, T}, -100, torch::kLong);
  batch.labels.narrow(1, T - a.answer_tokens, a.answer_tokens).copy_(batch.input_ids.narrow(1, T - a.answer_tokens, a.answer_tokens));
  for (int64_t i = 0; i < B; ++i) {
    batch.indices.push_back(i);
    batch.class_ids.push_back(-1);
  }
  const int64_t t_total = T - 1 + lo.num_image_tokens();
  const int64_t supervised = B * a.answer_tokens;
  const fs::path dir = fs::temp_directory_path() / fmt::format("emt-bench-{}", ::getpid());
  fs::create_directories(dir);
  write_raw(dir / "images.f32", batch.images);
  write_raw(dir / "input_ids.i64", batch.input_ids);
  write_raw(dir / "attention_mask.i64", batch.attention_mask);
  write_raw(dir / "labels.i64", batch.labels);
  // The batch stays on the host, as the data loader gives it: the loss copies it to the device each step.

  const int64_t peak_n = dev.is_cuda() ? 8192 : 1024;
  const double peak32 = matmul_peak(torch::kFloat32, dev, peak_n), peak16 = matmul_peak(torch::kBFloat16, dev, peak_n);
  // MFU's denominator: the given peak, else the measured fp32 matmul peak, or, when the step computes in bf16, the
  // higher of the two (some of its work stays fp32; on a CPU without bf16 units bf16 is the slower one).
  const bool bf16_math = cfg.finetune.precision == "bf16" || frozen == torch::kBFloat16;
  const double peak = a.peak_tflops > 0 ? a.peak_tflops * 1e12 : (bf16_math ? std::max(peak16, peak32) : peak32);
  const std::string peak_what = a.peak_tflops > 0 ? fmt::format("the given {:g} TFLOP/s", a.peak_tflops)
                                : bf16_math ? "the higher of the fp32 and bf16 matmul peaks"
                                            : "the fp32 matmul peak";
  fmt::print("emt bench train: {} (vision {}x{} px, {} image tokens; decoder width {}, {} layers), batch {}, "
             "{} tokens per sample ({} supervised), on {}, frozen weights {}, precision {}, {} threads\n",
             a.model, lo.vision.image_size, lo.vision.image_size, lo.num_image_tokens(), lo.llm.hidden_size,
             lo.llm.num_layers, B, t_total, a.answer_tokens, dev.str(), cfg.run.dtype, cfg.finetune.precision,
             a.threads);
  fmt::print("matmul peak ({}^3, median): fp32 {:.1f} GFLOP/s, bf16 {:.1f} GFLOP/s; {} rounds of {} steps after "
             "{} warm-up steps, sides in turns\n\n",
             peak_n, peak32 / 1e9, peak16 / 1e9, a.rounds, a.steps, a.warmup);
  if (dev.is_cuda() && !a.pythons.empty()) {
    fmt::print("  (on CUDA the PyTorch references are left out: they run on the CPU)\n");
  }
  std::vector<std::string> pythons = dev.is_cuda() ? std::vector<std::string>{} : a.pythons;
  fmt::print("{:<8} {:<26} {:>9} {:>9} {:>10} {:>9} {:>7} {:>7} {:>10} {:>11}\n", "method", "side", "ms/step",
             "samples/s", "tokens/s", "GFLOP/s", "MFU", "4N MFU", "peak MiB", "emt/side");
  for (const auto& method : a.methods)
    if (method != "linear" && method != "lora" && method != "full")
      throw ConfigError("[bench] --methods: '" + method + "' has no reference; each must be linear, lora or full");
  const std::string emt_side = fmt::format("emt (LibTorch {}.{}.{})", TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR,
                                           TORCH_VERSION_PATCH);
  std::vector<std::pair<std::string, std::string>> profile_rows;  // (method, trace)
  for (const auto& method : a.methods) {
    FinetuneSection ft = cfg.finetune;
    ft.method = method;
    ft.batch_size = a.batch;
    torch::manual_seed(0);
    LlavaModel model = build_llava(cfg.model, image_token);
    model->to(dev, frozen);  // frozen weights in run.dtype; apply_method keeps every trained tensor fp32
    TrainableSetup setup = apply_method(*model, ft, nullptr);
    int64_t llm_params = 0;  // N of "4N FLOPs per token": the decoder's non-embedding weights
    for (const auto& p : model->language_model->named_parameters())
      if (p.key().find("embed_tokens") == std::string::npos && p.key().find("lm_head") == std::string::npos &&
          p.key().find("lora_") == std::string::npos)
        llm_params += p.value().numel();
    int64_t lora_io = 0;  // sum of in + out over the adapted linears of one decoder layer
    for (const auto& name : ft.lora.target_modules) {
      const int64_t d = lo.llm.hidden_size, inter = lo.llm.intermediate_size, kv = lo.llm.num_kv_heads * lo.llm.head_dim();
      if (name == "q_proj" || name == "o_proj") lora_io += 2 * d;
      else if (name == "k_proj" || name == "v_proj") lora_io += d + kv;
      else if (name == "gate_proj" || name == "up_proj" || name == "down_proj") lora_io += d + inter;
    }
    nlohmann::json spec = model_spec(lo, cfg.model.projector, vocab, image_token);
    spec["method"] = method;
    spec["lora"] = {{"r", ft.lora.r}, {"alpha", ft.lora.alpha}, {"dropout", ft.lora.dropout},
                    {"targets", ft.lora.target_modules}};
    spec["lr"] = ft.learning_rate;
    spec["beta1"] = 0.9;
    spec["beta2"] = 0.999;
    spec["eps"] = 1e-8;
    spec["weight_decay"] = ft.weight_decay;
    spec["max_grad_norm"] = ft.max_grad_norm;
    spec["threads"] = a.threads;
    spec["batch"] = {{"dir", dir.string()}, {"B", B}, {"T", T}};
    const fs::path spec_path = dir / ("spec-" + method + ".json");
    write_file_atomic(spec_path.string(), spec.dump(1));

    std::vector<std::unique_ptr<Reference>> refs;
    for (const auto& py : pythons) {
      if (!fs::exists(py)) {
        fmt::print("  (no {}: that reference is left out)\n", py);
        continue;
      }
      refs.push_back(std::make_unique<Reference>(py, a.script, spec_path.string()));
    }
    std::vector<std::vector<double>> ref_ms(refs.size());
    // With --profile, one more round of emt's steps after the timed ones runs under the profiler (not timed).
    const bool profiling = !a.profile.empty();
    std::ostringstream trace;
    std::unique_ptr<torch::autograd::profiler::RecordProfile> recording;
    TimedSource source(batch, a.warmup, a.rounds + (profiling ? 1 : 0), a.steps, [&](int round) {
      if (round == a.rounds + 1) recording.reset();  // the profiled round is over: the trace is written
      if (round > a.rounds) return;
      for (size_t i = 0; i < refs.size(); ++i) {
        auto ms = refs[i]->run(round == 0 ? a.warmup : a.steps);
        if (round > 0) ref_ms[i].insert(ref_ms[i].end(), ms.begin(), ms.end());
      }
      if (profiling && round == a.rounds) recording = std::make_unique<torch::autograd::profiler::RecordProfile>(trace);
    });
    LlavaObjective objective(model, dev);
    TrainableIO io;
    io.get = [&] { return trainable_tensors(*model, setup.prompt_embeddings); };
    io.set = [](const NamedTensors&) {};
    TrainerOptions to = trainer_options(ft, cfg.run);
    to.epochs = 1;
    to.schedule = "constant";
    to.warmup_ratio = 0.0;
    to.warmup_steps = 0;
    to.grad_accum = 1;
    to.progress = false;
    to.handle_signals = false;
    to.log_every_steps = 1 << 30;
    to.device = dev;
    to.precision = ft.precision;
    reset_device_peak(dev);
    Trainer trainer(objective, source, setup.groups, io, to);
    trainer.fit();
    const double peak_mib = dev.is_cuda() ? device_peak_allocated_mb(dev) : host_peak_rss_mb();
    recording.reset();
    if (profiling) source.ms.resize(static_cast<size_t>(a.rounds) * a.steps);  // the profiled round is not timed

    const double flops = step_flops(lo, method, ft.lora.r, lora_io, B, t_total, supervised);
    const double emt_ms = median(source.ms);
    const double flops_4n = 4.0 * static_cast<double>(llm_params) * B * t_total;
    auto row = [&](const std::string& side, double ms, const std::string& ratio, double mib) {
      const double s = ms / 1e3;
      fmt::print("{:<8} {:<26} {:>9.1f} {:>9.1f} {:>10.0f} {:>9.1f} {:>6.1f}% {:>6.1f}% {:>10} {:>11}\n", method, side,
                 ms, B / s, B * t_total / s, flops / s / 1e9, 100.0 * flops / s / peak, 100.0 * flops_4n / s / peak,
                 mib >= 0 ? fmt::format("{:.0f}", mib) : std::string("-"), ratio);
    };
    row(emt_side, emt_ms, "", peak_mib);
    if (profiling) profile_rows.push_back({method, trace.str()});
    for (size_t i = 0; i < refs.size(); ++i) {
      // the ratio of medians, and the median of the rounds' paired ratios beside it
      std::vector<double> paired;
      for (int r = 0; r < a.rounds; ++r) {
        std::vector<double> e(source.ms.begin() + r * a.steps, source.ms.begin() + (r + 1) * a.steps);
        std::vector<double> p(ref_ms[i].begin() + r * a.steps, ref_ms[i].begin() + (r + 1) * a.steps);
        paired.push_back(median(e) / median(p));
      }
      row("python " + refs[i]->label(), median(ref_ms[i]),
          fmt::format("{:.2f}x ({:.2f})", emt_ms / median(ref_ms[i]), median(paired)), refs[i]->peak_mib());
    }
  }
  fmt::print("\nemt/side: emt's median step time over the side's (below 1 = emt faster); in brackets the median of "
             "the per-round ratios. MFU against {}; model FLOPs count the vision forward, the projector's forward "
             "and weight gradients, the decoder's forward and input gradients, and the trained weights' gradients. "
             "4N MFU counts 4 FLOPs per decoder weight (embeddings and output head left out) per token instead. peak MiB: {}.\n",
             peak_what, dev.is_cuda() ? (built_with_cuda_stats() ? "the CUDA allocator's peak over the method's steps"
                                                                 : "unavailable (no CUDA allocator statistics in this build)")
                                      : "emt's process's peak RSS so far (one process runs every method), each "
                                        "reference's own peak RSS (one process per method)");
  if (!profile_rows.empty()) {
    fs::create_directories(a.profile);
    for (const auto& [method, text] : profile_rows) {
      const std::string path = (fs::path(a.profile) / ("profile_" + method + ".json")).string();
      write_file_atomic(path, text);
      double span = 0.0;
      const auto ops = self_times(text, &span);
      double total = 0.0;
      for (const auto& o : ops) total += o.self_us;
      fmt::print("\nprofile of {} ({} steps after the timed rounds, LibTorch profiler; trace: {}): {:.1f} ms per "
                 "step in ops, {:.1f} ms per step wall\n",
                 method, a.steps, path, total / 1e3 / a.steps, span / 1e3 / a.steps);
      fmt::print("{:<44} {:>12} {:>8} {:>12}\n", "op (self time: its children taken out)", "ms per step", "share",
                 "calls/step");
      for (size_t i = 0; i < ops.size() && static_cast<int>(i) < a.profile_top; ++i)
        fmt::print("{:<44} {:>12.2f} {:>7.1f}% {:>12.1f}\n", ops[i].name.substr(0, 44), ops[i].self_us / 1e3 / a.steps,
                   total > 0 ? 100.0 * ops[i].self_us / total : 0.0, static_cast<double>(ops[i].calls) / a.steps);
    }
  }
  std::error_code ec;
  fs::remove_all(dir, ec);
}

RegisterCommand register_bench([](CLI::App& root) {
  auto* bench = root.add_subcommand("bench", "Benchmarks that print figures side by side (medians, ratios)");
  bench->require_subcommand(1);
  auto* train = bench->add_subcommand(
      "train", "Fine-tuning step per method vs the same model and step in PyTorch eager (scripts/bench/train_ref.py)");
  auto a = std::make_shared<Args>();
  train->add_option("--model", a->model, "a config naming the model (model.*)")->default_val(a->model);
  train->add_option("--methods", a->methods, "methods to time (linear, lora, full)")
      ->delimiter(',')->allow_extra_args(false);
  train->add_option("--python", a->pythons, "interpreters of the references (each gets a row; missing = left out)")
      ->delimiter(',')->allow_extra_args(false);
  train->add_option("--script", a->script, "the reference script")->default_val(a->script);
  train->add_option("--batch", a->batch, "samples per step")->default_val(a->batch);
  train->add_option("--text-tokens", a->text_tokens, "text tokens per sample, the image token included")
      ->default_val(a->text_tokens);
  train->add_option("--warmup", a->warmup, "untimed steps first")->default_val(a->warmup);
  train->add_option("--rounds", a->rounds, "rounds (each side runs --steps per round, in turns)")
      ->default_val(a->rounds);
  train->add_option("--steps", a->steps, "timed steps per round")->default_val(a->steps);
  train->add_option("--threads", a->threads, "intra-op threads of every side")->default_val(a->threads);
  train->add_flag("--no-reference", a->no_reference, "emt alone (what `emt bench memory` runs in its children)");
  train->add_option("--device", a->device, "cpu, cuda, cuda:N or auto (references run on the CPU only)")
      ->default_val(a->device);
  train->add_option("--peak-tflops", a->peak_tflops, "MFU against this peak instead of the measured matmul peak")
      ->default_val(a->peak_tflops);
  train->add_option("--profile", a->profile,
                    "a folder: one more round of emt's steps per method under the LibTorch profiler; prints the ops "
                    "by self time and writes profile_<method>.json (Chrome trace)");
  train->add_option("--profile-top", a->profile_top, "ops listed per profile")->default_val(a->profile_top);
  train->add_option("overrides", a->overrides, "config overrides key=value");
  train->callback([a] {
    if (a->no_reference) a->pythons.clear();
    bench_train(*a);
  });
  bench::add_tables(*bench);
});

}  // namespace
}  // namespace emt::cli
