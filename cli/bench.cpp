// `emt bench eval | data | memory` and what every `emt bench` table shares (cli/bench.h). Each table prints
// medians after a warm-up; where there is a reference, both sides run in turns within one run and the table
// prints their ratio.
#include "bench.h"

#include <emt/core/config.h>
#include <emt/core/dataset.h>
#include <emt/core/generate.h>
#include <emt/core/image.h>
#include <emt/core/llava.h>
#include <emt/core/runtime.h>
#include <emt/core/tokenizer.h>
#include <emt/eval/evaluator.h>
#include <fmt/core.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

namespace emt::cli::bench {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

Reference::Reference(const std::string& python, const std::string& script, const std::string& spec)
    : python_(python) {
  int in[2], out[2];
  if (::pipe(in) != 0 || ::pipe(out) != 0) throw IoError("[bench] pipe() failed");
  pid_ = ::fork();
  if (pid_ < 0) throw IoError("[bench] fork() failed");
  if (pid_ == 0) {
    ::dup2(in[0], 0);
    ::dup2(out[1], 1);
    ::close(in[1]);
    ::close(out[0]);
    ::execl(python.c_str(), python.c_str(), script.c_str(), spec.c_str(), static_cast<char*>(nullptr));
    std::perror(("[bench] cannot run " + python).c_str());
    ::_exit(127);
  }
  ::close(in[0]);
  ::close(out[1]);
  to_ = ::fdopen(in[1], "w");
  from_ = ::fdopen(out[0], "r");
  const std::string hello = read_line();
  if (hello.rfind("ready ", 0) != 0)
    throw Error("[bench] " + python + " " + script + " did not start (said '" + hello + "'); see its error above");
  label_ = hello.substr(6);
}

Reference::~Reference() {
  if (to_) {
    std::fputs("quit\n", to_);
    std::fclose(to_);
  }
  if (from_) std::fclose(from_);
  if (pid_ > 0) ::waitpid(pid_, nullptr, 0);
}

std::vector<double> Reference::run(int units) {
  std::fprintf(to_, "run %d\n", units);
  std::fflush(to_);
  const std::string line = read_line();
  std::istringstream is(line);
  std::string ok;
  is >> ok;
  if (ok != "ok") throw Error("[bench] the reference under " + python_ + " failed: '" + line + "'");
  std::vector<double> ms;
  for (double x; is >> x;) ms.push_back(x);
  if (static_cast<int>(ms.size()) != units) throw Error("[bench] the reference answered " + line);
  return ms;
}

double Reference::peak_mib() {
  std::fputs("peak\n", to_);
  std::fflush(to_);
  const std::string line = read_line();
  std::istringstream is(line);
  std::string word;
  double mib = -1.0;
  if (!(is >> word >> mib) || word != "peak")
    throw Error("[bench] the reference under " + python_ + " did not answer 'peak': '" + line + "'");
  return mib;
}

nlohmann::json model_spec(const LlavaOptions& lo, const std::string& projector, int64_t vocab, int64_t image_token) {
  nlohmann::json spec;
  spec["vision"] = {{"image_size", lo.vision.image_size}, {"patch_size", lo.vision.patch_size},
                    {"num_channels", lo.vision.num_channels}, {"hidden_size", lo.vision.encoder.hidden_size},
                    {"num_layers", lo.vision.encoder.num_layers}, {"num_heads", lo.vision.encoder.num_heads},
                    {"intermediate_size", lo.vision.encoder.intermediate_size},
                    {"layer_norm_eps", lo.vision.encoder.layer_norm_eps}, {"select_layer", lo.select_layer},
                    {"select_feature", lo.select_feature}};
  spec["llm"] = {{"vocab_size", vocab}, {"hidden_size", lo.llm.hidden_size}, {"num_layers", lo.llm.num_layers},
                 {"num_heads", lo.llm.num_heads}, {"num_kv_heads", lo.llm.num_kv_heads},
                 {"intermediate_size", lo.llm.intermediate_size}, {"rope_theta", lo.llm.rope_theta},
                 {"rms_norm_eps", lo.llm.rms_norm_eps}};
  spec["projector"] = projector;
  spec["image_token_id"] = image_token;
  return spec;
}

std::string Reference::read_line() {
  std::string s;
  for (int c; (c = std::fgetc(from_)) != EOF && c != '\n';) s.push_back(static_cast<char>(c));
  return s;
}

namespace {

double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

// ---- eval -------------------------------------------------------------------------------------------------------

struct EvalArgs {
  std::string model = "configs/models/tiny.yaml";
  std::vector<std::string> pythons = {"/usr/bin/python3", ".venv/bin/python"};
  std::string script = "scripts/bench/eval_ref.py";
  int threads = 2, batch = 16, prompt = 40, new_tokens = 16, repeats = 5, images = 64;
  std::string device = "cpu";
  bool no_evaluator = false, no_reference = false;
  std::vector<std::string> overrides;
};

// Generation on random weights of the model's shapes (KV cache vs recomputing the sequence every step, a batch vs
// its rows one at a time), then Evaluator::evaluate() end to end on shapes10 (images/s at batch 1 and 32, and what
// the likelihood scorer adds).
void bench_eval(const EvalArgs& a) {
  if (a.batch < 1 || a.prompt < 3 || a.new_tokens < 1 || a.repeats < 1 || a.images < 1)
    throw ConfigError("[bench] eval: --batch, --new-tokens, --repeats and --images must be at least 1, --prompt 3");
  RunConfig cfg = load_config(a.model, a.overrides);
  cfg.run.threads = a.threads;
  apply_run_section(cfg.run);
  const torch::Device dev = resolve_device(a.device);
  const torch::ScalarType dtype = parse_dtype(cfg.run.dtype);
  const int64_t vocab = cfg.model.llm.vocab_size, image_token = vocab - 1;
  torch::manual_seed(0);
  LlavaModel model = build_llava(cfg.model, image_token);
  model->to(dev, dtype);
  model->eval();
  const auto& vo = model->options.vision;
  auto ids = torch::randint(4, vocab - 1, {a.batch, a.prompt}, torch::kLong);
  ids.select(1, 0).fill_(1);
  ids.select(1, 1).fill_(image_token);
  auto mask = torch::ones_like(ids);
  auto images = torch::randn({a.batch, vo.num_channels, vo.image_size, vo.image_size});
  ids = ids.to(dev);
  mask = mask.to(dev);
  images = images.to(dev, dtype);
  reset_device_peak(dev);
  GenerateOptions opt;
  opt.max_new_tokens = a.new_tokens;
  auto gen_once = [&](bool cache, bool one_at_a_time) {
    opt.use_cache = cache;
    const auto t0 = Clock::now();
    if (!one_at_a_time) {
      generate(model, images, ids, mask, opt);
    } else {
      for (int64_t i = 0; i < a.batch; ++i)
        generate(model, images.narrow(0, i, 1), ids.narrow(0, i, 1), mask.narrow(0, i, 1), opt);
    }
    return ms_since(t0);
  };
  // The references: the same model in PyTorch eager (scripts/bench/eval_ref.py), one process per interpreter and
  // mode (KV cache, recompute), on the same prompt batch; fp32 only, on the CPU.
  struct Ref {
    std::unique_ptr<Reference> proc;
    bool cache;
    std::vector<double> ms;
  };
  std::vector<Ref> refs;
  const fs::path dir = fs::temp_directory_path() / fmt::format("emt-bench-eval-{}", ::getpid());
  fs::create_directories(dir);
  struct RemoveAtEnd {
    fs::path p;
    ~RemoveAtEnd() {
      std::error_code err;
      fs::remove_all(p, err);
    }
  } remove_dir{dir};
  if (!a.pythons.empty() && (dev.is_cuda() || dtype != torch::kFloat32)) {
    fmt::print("(the PyTorch references are left out: they run fp32 on the CPU)\n");
  } else if (!a.pythons.empty()) {
    auto raw = [&](const std::string& name, const torch::Tensor& t) {
      auto c = t.cpu().contiguous();
      write_file_atomic((dir / name).string(), std::string(static_cast<const char*>(c.data_ptr()),
                                                           static_cast<size_t>(c.numel() * c.element_size())));
    };
    raw("images.f32", images.to(torch::kFloat32));
    raw("input_ids.i64", ids);
    nlohmann::json spec = model_spec(model->options, cfg.model.projector, vocab, image_token);
    spec["threads"] = a.threads;
    spec["batch"] = {{"dir", dir.string()}, {"B", a.batch}, {"T", a.prompt}};
    spec["new_tokens"] = a.new_tokens;
    for (const auto& py : a.pythons) {
      if (!fs::exists(py)) {
        fmt::print("(no {}: that reference is left out)\n", py);
        continue;
      }
      for (bool cache : {true, false}) {
        spec["use_cache"] = cache;
        const fs::path sp = dir / fmt::format("spec-{}-{}.json", refs.size(), cache ? "cache" : "recompute");
        write_file_atomic(sp.string(), spec.dump(1));
        refs.push_back({std::make_unique<Reference>(py, a.script, sp.string()), cache, {}});
      }
    }
  }
  // Every side once to warm up, then the sides in turns, a.repeats rounds.
  std::vector<double> t_cached, t_recompute, t_rows;
  for (int r = 0; r <= a.repeats; ++r) {
    const double c = gen_once(true, false), re = gen_once(false, false), rows = gen_once(true, true);
    for (auto& ref : refs) {
      const auto ms = ref.proc->run(1);
      if (r > 0) ref.ms.insert(ref.ms.end(), ms.begin(), ms.end());
    }
    if (r == 0) continue;
    t_cached.push_back(c);
    t_recompute.push_back(re);
    t_rows.push_back(rows);
  }
  const int64_t seq = a.prompt - 1 + model->options.num_image_tokens();
  fmt::print("emt bench eval: {} (random weights, {}), on {}, batch {}, prompt {} tokens ({} of them image tokens), "
             "{} new tokens, {} threads, median of {} after a warm-up, sides in turns\n\n",
             a.model, cfg.run.dtype, dev.str(), a.batch, seq, model->options.num_image_tokens(), a.new_tokens,
             a.threads, a.repeats);
  const double cached = median(t_cached), recompute = median(t_recompute), rows = median(t_rows);
  const double tokens = static_cast<double>(a.batch) * a.new_tokens;
  fmt::print("{:<44} {:>10} {:>10} {:>10} {:>12} {:>10}\n", "generation", "ms", "samples/s", "tokens/s",
             "time/cache", "peak MiB");
  auto gen_row = [&](const std::string& what, double ms, const std::string& ratio, const std::string& mib) {
    fmt::print("{:<44} {:>10.1f} {:>10.2f} {:>10.1f} {:>12} {:>10}\n", what, ms, a.batch / ms * 1e3,
               tokens / ms * 1e3, ratio, mib);
  };
  gen_row("KV cache, whole batch", cached, "1.00x", dev.is_cuda() ? "" : fmt::format("{:.0f}", host_peak_rss_mb()));
  gen_row("recompute every step, whole batch", recompute, fmt::format("{:.2f}x", recompute / cached), "");
  gen_row("KV cache, one row at a time (batch 1)", rows, fmt::format("{:.2f}x", rows / cached), "");
  // A reference's time/cache is against its own KV-cache row (refs come in pairs: cache, then recompute);
  // emt/side compares the same mode.
  std::vector<std::pair<std::string, double>> vs;
  for (size_t i = 0; i < refs.size(); ++i) {
    const auto& ref = refs[i];
    const double ms = median(ref.ms);
    const double own_cache = ref.cache ? ms : median(refs[i - 1].ms);
    const std::string what = fmt::format("python {}, {}", ref.proc->label(), ref.cache ? "KV cache" : "recompute");
    gen_row(what, ms, fmt::format("{:.2f}x", ms / own_cache), fmt::format("{:.0f}", ref.proc->peak_mib()));
    vs.push_back({what, (ref.cache ? cached : recompute) / ms});
  }
  if (!vs.empty()) {
    fmt::print("\nemt/side (emt's median time over the reference's in the same mode; below 1 = emt faster):");
    for (const auto& [what, ratio] : vs) fmt::print(" {} {:.2f}x;", what, ratio);
    fmt::print("\npeak MiB: emt's process's peak RSS after its rows, each reference's own\n");
  }
  refs.clear();
  if (dev.is_cuda() && built_with_cuda_stats())
    fmt::print("peak GPU memory (CUDA allocator): {:.0f} MiB\n", device_peak_allocated_mb(dev));
  if (a.no_evaluator) return;
  if (!built_with_opencv()) {
    fmt::print("\n(the evaluator rows are left out: they score shapes10, which this build cannot draw without "
               "OpenCV)\n");
    return;
  }

  // The evaluator end to end: a SentencePiece tokenizer trained on shapes10's prompts, random weights.
  RunConfig ec;
  ec.data.root = dir.string();
  DatasetConfig shapes;
  shapes.format = "synthetic";
  shapes.path = "shapes10";
  shapes.test_max_samples = a.images;
  ec.data.datasets = {{"shapes", shapes}};
  ec.eval.max_new_tokens = 12;
  ec.eval.scorers = {"strict"};
  Evaluator probe(ec);
  const auto& names = probe.dataset("shapes")->class_names();
  std::string corpus;
  for (int rep = 0; rep < 20; ++rep) {
    corpus += dataset_question("shapes", shapes, names) + "\n";
    for (const auto& n : names) corpus += answer_text(shapes, n) + "\n";
  }
  write_file_atomic((dir / "corpus.txt").string(), corpus);
  SentencePieceTrainOptions so;
  so.vocab_size = 160;
  train_sentencepiece((dir / "corpus.txt").string(), (dir / "tok").string(), so);
  std::shared_ptr<Tokenizer> tok = load_sentencepiece((dir / "tok.model").string());
  const int64_t image_id = tok->add_special_token("<image>");
  ModelSection m = cfg.model;
  m.llm.vocab_size = static_cast<int>(tok->vocab_size());
  torch::manual_seed(0);
  EvalModel em;
  em.model = build_llava(m, image_id);
  em.model->to(dev, dtype);
  em.tokenizer = tok;
  em.image = image_options_for_size(m.vision.image_size);
  em.conversation = "plain";
  auto images_per_s = [&](int batch, const std::vector<std::string>& scorers) {
    RunConfig c = ec;
    c.eval.batch_size = batch;
    c.eval.scorers = scorers;
    Evaluator ev(c);
    ev.set_progress(false);
    ev.evaluate(em, "");  // warm-up
    std::vector<double> t;
    for (int r = 0; r < std::max(1, a.repeats / 2); ++r) {
      const auto t0 = Clock::now();
      ev.evaluate(em, "");
      t.push_back(ms_since(t0) / 1e3);
    }
    return static_cast<double>(a.images) / median(t);
  };
  const double b1 = images_per_s(1, {"strict"}), b32 = images_per_s(32, {"strict"});
  const double lik = images_per_s(32, {"strict", "likelihood"});
  fmt::print("\n{:<44} {:>10} {:>12}\n", fmt::format("evaluator ({} shapes10 images)", a.images), "images/s",
             "speed/batch1");
  fmt::print("{:<44} {:>10.1f} {:>12}\n", "batch 1, strict", b1, "1.00x");
  fmt::print("{:<44} {:>10.1f} {:>11.2f}x\n", "batch 32, strict", b32, b32 / b1);
  fmt::print("{:<44} {:>10.1f} {:>11.2f}x\n", fmt::format("batch 32, strict + likelihood ({} classes)", names.size()),
             lik, lik / b1);
}

// ---- data -------------------------------------------------------------------------------------------------------

struct DataArgs {
  std::vector<std::string> pythons = {".venv/bin/python"};
  std::string script = "scripts/bench/data_ref.py";
  std::vector<int64_t> sizes = {224, 336};
  int images = 20, rounds = 5, threads = 1;
};

// A photo-like test image (smooth colour waves plus noise, so PNG cannot shrink it to nothing).
torch::Tensor test_image(int64_t h, int64_t w) {
  torch::manual_seed(0);
  auto y = torch::arange(h, torch::kFloat).view({h, 1, 1}), x = torch::arange(w, torch::kFloat).view({1, w, 1});
  auto c = torch::arange(3, torch::kFloat).view({1, 1, 3});
  auto v = 128 + 90 * torch::sin(x / (7 + c) + y / 11) + 20 * torch::randn({h, w, 3});
  return v.clamp(0, 255).to(torch::kUInt8);
}

// Decode + CLIP preprocessing of PNG files (a 500x375 photo size, a 32x32 CIFAR size) to each --sizes, emt vs the
// reference implementations of scripts/bench/data_ref.py (PIL + transformers' CLIPImageProcessor, PIL + numpy),
// in turns; each reference's output for the image is compared with emt's.
void bench_data(const DataArgs& a) {
  if (a.images < 1 || a.rounds < 1) throw ConfigError("[bench] data: --images and --rounds must be at least 1");
  for (auto s : a.sizes)
    if (s < 16) throw ConfigError("[bench] data: --sizes must be at least 16 (got " + std::to_string(s) + ")");
  set_threads(a.threads);
  const fs::path dir = fs::temp_directory_path() / fmt::format("emt-bench-data-{}", ::getpid());
  fs::create_directories(dir);
  fmt::print("emt bench data: decode a PNG file + CLIP preprocessing (bicubic shortest-edge resize, centre crop, "
             "normalize), {} threads, {} rounds of {} images, sides in turns, median per image\n\n",
             a.threads, a.rounds, a.images);
  fmt::print("{:<12} {:>5} {:<44} {:>9} {:>10} {:>11} {:>10}\n", "input", "size", "side", "ms/image", "images/s",
             "emt/side", "max|d|");
  for (auto [h, w] : {std::pair<int64_t, int64_t>{375, 500}, {32, 32}}) {
    const std::string file = (dir / fmt::format("{}x{}.png", w, h)).string();
    write_file_atomic(file, encode_png(test_image(h, w)));
    for (int64_t size : a.sizes) {
      const auto opts = image_options_for_size(size);
      const torch::Tensor mine = preprocess_image(decode_image_file(file), opts);
      struct Side {
        std::unique_ptr<Reference> ref;
        double max_diff = 0.0;
        std::vector<double> ms;
      };
      std::vector<Side> sides;
      for (const auto& py : a.pythons) {
        if (!fs::exists(py)) {
          fmt::print("  (no {}: that reference is left out)\n", py);
          continue;
        }
        for (const std::string impl : {"transformers", "pil"}) {
          const std::string out = (dir / fmt::format("out-{}-{}.f32", sides.size(), size)).string();
          nlohmann::json spec = {{"file", file}, {"size", size}, {"impl", impl}, {"out", out},
                                 {"threads", a.threads}};
          const std::string spec_path = (dir / fmt::format("spec-{}-{}.json", sides.size(), size)).string();
          write_file_atomic(spec_path, spec.dump());
          Side s;
          s.ref = std::make_unique<Reference>(py, a.script, spec_path);
          const std::string bytes = read_file(out);
          if (static_cast<int64_t>(bytes.size()) != mine.numel() * 4)
            throw Error(fmt::format("[bench] {} ({}) wrote {} bytes to {}, expected {} (float32 [3, {}, {}])", py,
                                    impl, bytes.size(), out, mine.numel() * 4, size, size));
          auto theirs = torch::from_blob(const_cast<char*>(bytes.data()), mine.sizes(), torch::kFloat).clone();
          s.max_diff = (theirs - mine).abs().max().item<double>();
          sides.push_back(std::move(s));
        }
      }
      std::vector<double> emt_ms;
      for (int r = 0; r <= a.rounds; ++r) {  // round 0 warms every side up
        for (int i = 0; i < a.images; ++i) {
          const auto t0 = Clock::now();
          preprocess_image(decode_image_file(file), opts);
          if (r > 0) emt_ms.push_back(ms_since(t0));
        }
        for (auto& s : sides) {
          auto ms = s.ref->run(a.images);
          if (r > 0) s.ms.insert(s.ms.end(), ms.begin(), ms.end());
        }
      }
      const double e = median(emt_ms);
      const std::string input = fmt::format("{}x{} PNG", w, h);
      fmt::print("{:<12} {:>5} {:<44} {:>9.3f} {:>10.1f} {:>11} {:>10}\n", input, size, "emt", e, 1e3 / e, "", "");
      for (auto& s : sides) {
        const double m = median(s.ms);
        fmt::print("{:<12} {:>5} {:<44} {:>9.3f} {:>10.1f} {:>10.2f}x {:>10.1e}\n", input, size,
                   s.ref->label(), m, 1e3 / m, e / m, s.max_diff);
      }
    }
  }
  fmt::print("\nemt/side: emt's median time per image over the side's (below 1 = emt faster). max|d|: the largest "
             "difference between the side's preprocessed tensor and emt's for that image.\n");
  std::error_code err;
  fs::remove_all(dir, err);
}

// ---- memory -----------------------------------------------------------------------------------------------------

struct MemoryArgs {
  std::string model = "configs/models/small.yaml";
  std::vector<std::string> methods = {"linear", "lora", "full"};
  int batch = 8, text_tokens = 44, steps = 3, threads = 2;
  std::vector<std::string> overrides;
};

// Runs this program with `args` (stdout and stderr to `log`) and returns its peak resident set in bytes.
double child_peak_rss(const std::vector<std::string>& args, const std::string& log) {
  std::vector<char*> argv;
  static const std::string self = "/proc/self/exe";
  argv.push_back(const_cast<char*>(self.c_str()));
  for (const auto& s : args) argv.push_back(const_cast<char*>(s.c_str()));
  argv.push_back(nullptr);
  std::fflush(stdout);
  const pid_t pid = ::fork();
  if (pid < 0) throw IoError("[bench] fork() failed");
  if (pid == 0) {
    if (std::freopen(log.c_str(), "w", stdout) == nullptr || ::dup2(::fileno(stdout), 2) < 0) ::_exit(126);
    ::execv(self.c_str(), argv.data());
    ::_exit(127);
  }
  int status = 0;
  struct rusage ru {};
  if (::wait4(pid, &status, 0, &ru) != pid) throw IoError("[bench] wait4() failed");
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::string tail;
    try {
      tail = read_file(log);
      if (tail.size() > 2000) tail = tail.substr(tail.size() - 2000);
    } catch (const Error&) {
    }
    std::string cmd;
    for (const auto& x : args) cmd += (cmd.empty() ? "" : " ") + x;
    throw Error(fmt::format("[bench] memory: `emt {}` failed (status {}):\n{}", cmd, status, tail));
  }
  return static_cast<double>(ru.ru_maxrss) * 1024.0;  // Linux reports KiB
}

// Peak RSS of one process per method, each training --steps steps of `emt bench train` on the model, beside the
// program's own baseline (LibTorch loaded, nothing built) and the bytes the method's state needs by count.
void bench_memory(const MemoryArgs& a) {
  if (a.steps < 1 || a.batch < 1) throw ConfigError("[bench] memory: --steps and --batch must be at least 1");
  for (const auto& m : a.methods)
    if (m != "linear" && m != "lora" && m != "full")
      throw ConfigError("[bench] memory: --methods: '" + m + "' is not linear, lora or full");
  RunConfig cfg = load_config(a.model, a.overrides);  // the config's errors before any child starts
  const fs::path dir = fs::temp_directory_path() / fmt::format("emt-bench-memory-{}", ::getpid());
  fs::create_directories(dir);
  const std::string log = (dir / "child.log").string();
  const double base = child_peak_rss({"--version"}, log);
  fmt::print("emt bench memory: {} (vision {} px, decoder width {}, {} layers), batch {}, {} text tokens, {} "
             "optimizer steps per process, {} threads\n\n",
             a.model, cfg.model.vision.image_size, cfg.model.llm.hidden_size, cfg.model.llm.num_layers, a.batch,
             a.text_tokens, a.steps, a.threads);
  fmt::print("{:<10} {:>14} {:>18}\n", "method", "peak RSS MiB", "above baseline MiB");
  fmt::print("{:<10} {:>14.0f} {:>18}\n", "baseline", base / (1 << 20), "(emt --version)");
  for (const auto& m : a.methods) {
    std::vector<std::string> args = {"bench", "train", "--model", a.model, "--methods", m, "--no-reference",
                                     "--batch", std::to_string(a.batch), "--text-tokens", std::to_string(a.text_tokens),
                                     "--warmup", "1", "--rounds", "1", "--steps", std::to_string(a.steps),
                                     "--threads", std::to_string(a.threads)};
    args.insert(args.end(), a.overrides.begin(), a.overrides.end());
    const double peak = child_peak_rss(args, log);
    fmt::print("{:<10} {:>14.0f} {:>18.0f}\n", m, peak / (1 << 20), (peak - base) / (1 << 20));
  }
  std::error_code err;
  fs::remove_all(dir, err);
}

}  // namespace

void add_tables(CLI::App& bench) {
  auto* eval = bench.add_subcommand(
      "eval", "Generation (KV cache vs recompute, batch vs one row at a time, vs PyTorch eager: "
              "scripts/bench/eval_ref.py) and the evaluator's images/s");
  auto e = std::make_shared<EvalArgs>();
  eval->add_option("--model", e->model, "a config naming the model (model.*)")->default_val(e->model);
  eval->add_option("--threads", e->threads, "intra-op threads")->default_val(e->threads);
  eval->add_option("--batch", e->batch, "rows generated together")->default_val(e->batch);
  eval->add_option("--prompt", e->prompt, "text tokens per row, the image token included")->default_val(e->prompt);
  eval->add_option("--new-tokens", e->new_tokens, "tokens generated per row")->default_val(e->new_tokens);
  eval->add_option("--python", e->pythons, "interpreters of the references (each gets two rows; missing = left out)")
      ->delimiter(',')->allow_extra_args(false);
  eval->add_option("--script", e->script, "the reference script")->default_val(e->script);
  eval->add_flag("--no-reference", e->no_reference, "emt's rows only");
  eval->add_option("--repeats", e->repeats, "timed repeats (median)")->default_val(e->repeats);
  eval->add_option("--images", e->images, "shapes10 test images the evaluator scores")->default_val(e->images);
  eval->add_option("--device", e->device, "cpu, cuda, cuda:N or auto")->default_val(e->device);
  eval->add_flag("--no-evaluator", e->no_evaluator, "the generation table only");
  eval->add_option("overrides", e->overrides, "config overrides key=value");
  eval->callback([e] {
    if (e->no_reference) e->pythons.clear();
    bench_eval(*e);
  });

  auto* data = bench.add_subcommand(
      "data", "PNG decode + CLIP preprocessing, images/s, vs PIL + transformers (scripts/bench/data_ref.py)");
  auto d = std::make_shared<DataArgs>();
  data->add_option("--python", d->pythons, "interpreters of the references (missing = left out)")
      ->delimiter(',')->allow_extra_args(false);
  data->add_option("--script", d->script, "the reference script")->default_val(d->script);
  data->add_option("--sizes", d->sizes, "output sizes")->delimiter(',')->allow_extra_args(false);
  data->add_option("--images", d->images, "images per side per round")->default_val(d->images);
  data->add_option("--rounds", d->rounds, "rounds")->default_val(d->rounds);
  data->add_option("--threads", d->threads, "intra-op threads of every side")->default_val(d->threads);
  data->callback([d] { bench_data(*d); });

  auto* memory = bench.add_subcommand("memory", "Peak RSS of a training process per method");
  auto m = std::make_shared<MemoryArgs>();
  memory->add_option("--model", m->model, "a config naming the model (model.*)")->default_val(m->model);
  memory->add_option("--methods", m->methods, "methods (linear, lora, full)")->delimiter(',')->allow_extra_args(false);
  memory->add_option("--batch", m->batch, "samples per step")->default_val(m->batch);
  memory->add_option("--text-tokens", m->text_tokens, "text tokens per sample")->default_val(m->text_tokens);
  memory->add_option("--steps", m->steps, "optimizer steps per process")->default_val(m->steps);
  memory->add_option("--threads", m->threads, "intra-op threads")->default_val(m->threads);
  memory->add_option("overrides", m->overrides, "config overrides key=value");
  memory->callback([m] { bench_memory(*m); });
}

}  // namespace emt::cli::bench
