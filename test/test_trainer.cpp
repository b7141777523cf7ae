// The one Trainer: schedules, accumulation equivalence, NaN guard, resume parity (in process and across kill -9),
// interrupted checkpoint writes, SIGTERM preemption, and overfitting one batch with the real multimodal model.
#include <emt/adapters/policy.h>
#include <emt/core/config.h>
#include <emt/core/generate.h>
#include <emt/core/dataset.h>
#include <emt/core/hf_checkpoint.h>
#include <emt/core/llava.h>
#include <emt/core/loader.h>
#include <emt/core/runtime.h>
#include <emt/core/safetensors.h>
#include <emt/core/tokenizer.h>
#include <emt/train/finetune.h>
#include <emt/train/trainer.h>
#include <signal.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "expect_error.h"
#include "helpers.h"
#include "test_batches.h"
#include "test_models_common.h"

namespace fs = std::filesystem;
using emt::Batch;

namespace {

// y = W x + noise; dropout on the input exercises the RNG that checkpoints must restore.
struct ToyModelImpl : torch::nn::Module {
  ToyModelImpl() {
    lin = register_module("lin", torch::nn::Linear(8, 4));
    drop = register_module("drop", torch::nn::Dropout(0.2));
  }
  torch::nn::Linear lin{nullptr};
  torch::nn::Dropout drop{nullptr};
};
TORCH_MODULE(ToyModel);

class ToyObjective : public emt::Objective {
 public:
  explicit ToyObjective(ToyModel m) : m_(std::move(m)) {}
  emt::StepLoss loss(const Batch& b) override {
    auto pred = m_->lin(m_->drop(b.images));
    auto l = torch::mse_loss(pred, b.labels.to(torch::kFloat32));
    if (poison_at_ >= 0 && calls_++ >= poison_at_) l = l * std::numeric_limits<float>::quiet_NaN();
    return {l, b.size(), b.size()};
  }
  void set_train(bool on) override { m_->train(on); }
  int64_t poison_at_ = -1;
  int64_t calls_ = 0;

 private:
  ToyModel m_;
};

// Fixed data: batch k of epoch e is a deterministic function of (e, k), so resumed epochs see the same batches.
class ToySource : public emt::BatchSource {
 public:
  ToySource(int64_t batches, int64_t bs) : n_(batches), bs_(bs) {}
  int64_t num_batches() const override { return n_; }
  void start_epoch(int64_t epoch, int64_t skip) override { epoch_ = epoch, k_ = skip; }
  bool next(Batch& out) override {
    if (k_ >= n_) return false;
    auto g = torch::make_generator<at::CPUGeneratorImpl>(1000 * epoch_ + k_);
    out.images = torch::randn({bs_, 8}, g);
    out.labels = out.images.matmul(torch::ones({8, 4})) * 0.5;
    out.indices.assign(bs_, 0);
    ++k_;
    return true;
  }

 private:
  int64_t n_, bs_, epoch_ = 0, k_ = 0;
};

struct ToyRun {
  ToyModel model;
  std::unique_ptr<ToyObjective> obj;
  std::unique_ptr<ToySource> src;
  std::unique_ptr<emt::Trainer> trainer;
};

ToyRun make_toy(const emt::TrainerOptions& o, int64_t batches = 6, int64_t bs = 4, uint64_t seed = 3) {
  torch::manual_seed(seed);
  ToyRun r{ToyModel()};
  r.obj = std::make_unique<ToyObjective>(r.model);
  r.src = std::make_unique<ToySource>(batches, bs);
  std::vector<emt::ParamGroup> groups = {{"default", r.model->parameters(), 0.05, true}};
  auto model = r.model;
  emt::TrainableIO io;
  io.get = [model] {
    emt::NamedTensors t;
    for (auto& p : model->named_parameters()) t.emplace_back(p.key(), p.value().detach());
    return t;
  };
  io.set = [model](const emt::NamedTensors& t) {
    torch::NoGradGuard ng;
    auto params = model->named_parameters();
    for (auto& [k, v] : t) params[k].copy_(v);
  };
  r.trainer = std::make_unique<emt::Trainer>(*r.obj, *r.src, groups, io, o);
  return r;
}

emt::TrainerOptions toy_options(const std::string& dir, int epochs) {
  emt::TrainerOptions o;
  o.epochs = epochs;
  o.run_dir = dir;
  o.schedule = "cosine";
  o.warmup_steps = 2;
  o.progress = false;
  o.handle_signals = false;
  o.log_every_steps = 1;
  return o;
}

std::vector<double> metric_losses(const std::string& run_dir) {
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::vector<double> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line).at("loss").get<double>());
  return out;
}

}  // namespace

TEST_CASE("trainer: schedule values", "[trainer]") {
  CHECK(emt::schedule_factor("constant", 50, 100, 0) == 1.0);
  CHECK(emt::schedule_factor("linear", 0, 100, 0) == 1.0);
  CHECK(emt::schedule_factor("linear", 50, 100, 0) == Approx(0.5));
  CHECK(emt::schedule_factor("cosine", 50, 100, 0) == Approx(0.5));
  CHECK(emt::schedule_factor("cosine", 100, 100, 0) == Approx(0.0).margin(1e-12));
  CHECK(emt::schedule_factor("cosine", 0, 100, 10) == Approx(0.1));   // warmup: (step+1)/warmup
  CHECK(emt::schedule_factor("cosine", 9, 100, 10) == Approx(1.0));
  CHECK(emt::schedule_factor("cosine", 10, 100, 10) == Approx(1.0));  // decay starts after warmup
  CHECK(emt::schedule_factor("linear", 55, 100, 10) == Approx(0.5));
  CHECK(emt::warmup_for(0.03, 0, 1000) == 30);
  CHECK(emt::warmup_for(0.03, 7, 1000) == 7);
  CHECK_THROWS_AS(emt::schedule_factor("step", 1, 10, 0), emt::ConfigError);
}

TEST_CASE("trainer: accumulation 2 x 4 equals batch 8", "[trainer]") {
  // Same 8 samples, seen as one batch of 8 or two micro-batches of 4: one optimizer step must agree.
  auto run = [](int accum, int64_t bs) {
    auto o = toy_options("", 1);
    o.grad_accum = accum;
    o.max_steps = 1;
    o.epochs = 1;
    torch::manual_seed(11);
    ToyModel m;
    m->drop->options.p(0.0);
    ToyObjective obj(m);
    struct Src : emt::BatchSource {
      int64_t bs, k = 0;
      explicit Src(int64_t b) : bs(b) {}
      int64_t num_batches() const override { return 8 / bs; }
      void start_epoch(int64_t, int64_t skip) override { k = skip; }
      bool next(Batch& out) override {
        if (k >= 8 / bs) return false;
        auto g = torch::make_generator<at::CPUGeneratorImpl>(5);
        auto x = torch::randn({8, 8}, g);
        out.images = x.slice(0, k * bs, (k + 1) * bs);
        out.labels = out.images.matmul(torch::ones({8, 4}));
        out.indices.assign(bs, 0);
        ++k;
        return true;
      }
    } src(bs);
    std::vector<emt::ParamGroup> groups = {{"default", m->parameters(), 0.1, true}};
    emt::TrainableIO io{[] { return emt::NamedTensors{}; }, [](const emt::NamedTensors&) {}, {}};
    emt::Trainer t(obj, src, groups, io, o);
    t.fit();
    return m->lin->weight.detach().clone();
  };
  auto a = run(2, 4), b = run(1, 8);
  CHECK(torch::allclose(a, b, 1e-6, 1e-6));
  auto c = run(1, 4);  // one micro-batch of 4 is a different step: the check above can fail
  CHECK_FALSE(torch::allclose(a, c, 1e-6, 1e-6));
}

TEST_CASE("trainer: resume parity after an interrupted run is bitwise", "[trainer]") {
  auto straight_dir = emt_test::scratch_dir("trainer_straight");
  auto resumed_dir = emt_test::scratch_dir("trainer_resumed");
  auto a = make_toy(toy_options(straight_dir, 3));
  auto sa = a.trainer->fit();
  auto wa = a.model->lin->weight.detach().clone();
  {
    // the same run, crashing right after epoch 1's checkpoint (as a kill between epochs would)
    struct Crash {};
    auto b1 = make_toy(toy_options(resumed_dir, 3));
    b1.trainer->on_epoch_end([](const emt::EpochEnd& e) {
      if (e.epoch == 1) throw Crash{};
    });
    CHECK_THROWS_AS(b1.trainer->fit(), Crash);
  }
  auto o = toy_options(resumed_dir, 3);
  o.resume = true;
  auto b2 = make_toy(o, 6, 4, /*different init seed: must be overwritten*/ 99);
  auto sb = b2.trainer->fit();
  CHECK(sb.resumed);
  CHECK(torch::equal(wa, b2.model->lin->weight.detach()));
  CHECK(metric_losses(straight_dir) == metric_losses(resumed_dir));
  CHECK(metric_losses(straight_dir).size() == 18);
  CHECK(fs::exists(resumed_dir + "/epoch_3/trainable.safetensors"));
  CHECK(fs::exists(resumed_dir + "/epoch_3/config.yaml") == false);  // no config given to this trainer
}

TEST_CASE("trainer: keep_last_n prunes old epoch checkpoints", "[trainer]") {
  auto dir = emt_test::scratch_dir("trainer_keep");
  auto o = toy_options(dir, 3);
  o.keep_last_n = 1;
  auto r = make_toy(o);
  r.trainer->fit();
  CHECK_FALSE(fs::exists(dir + "/epoch_1"));
  CHECK_FALSE(fs::exists(dir + "/epoch_2"));
  CHECK(fs::exists(dir + "/epoch_3"));

}

TEST_CASE("trainer: a fresh run refuses a run directory that holds an earlier run's checkpoints", "[trainer]") {
  // otherwise the earlier run's higher-step epoch_3 would sit beside the new epoch_1 and win a later --resume
  auto dir = emt_test::scratch_dir("trainer_fresh_refuse");
  make_toy(toy_options(dir, 3)).trainer->fit();
  auto again = make_toy(toy_options(dir, 1));
  auto msg = emt_test::error_of<emt::ConfigError>([&] { again.trainer->fit(); });
  CHECK_THAT(msg, Catch::Contains(dir) && Catch::Contains("epoch_3") && Catch::Contains("--resume"));
  CHECK(fs::exists(dir + "/epoch_3/trainable.safetensors"));  // nothing of the earlier run was touched
}

TEST_CASE("trainer: resume refuses a checkpoint made with another schedule, naming each setting", "[trainer]") {
  auto dir = emt_test::scratch_dir("trainer_compat_schedule");
  auto o = toy_options(dir, 3);
  o.compat = {{"finetune.epochs", "3"}, {"finetune.learning_rate", "0.0002"}, {"run.seed", "0"}};
  {
    struct Crash {};
    auto first = make_toy(o);
    first.trainer->on_epoch_end([](const emt::EpochEnd& e) {
      if (e.epoch == 1) throw Crash{};
    });
    CHECK_THROWS_AS(first.trainer->fit(), Crash);
  }
  o.resume = true;
  o.compat["finetune.epochs"] = "5";
  o.compat["finetune.learning_rate"] = "0.001";
  auto second = make_toy(o);
  auto msg = emt_test::error_of<emt::ConfigError>([&] { second.trainer->fit(); });
  CHECK_THAT(msg, Catch::Contains("finetune.epochs: checkpoint has '3', this run has '5'"));
  CHECK_THAT(msg, Catch::Contains("finetune.learning_rate: checkpoint has '0.0002', this run has '0.001'"));
  CHECK_THAT(msg, !Catch::Contains("run.seed"));
}

TEST_CASE("resume_compat covers every setting that shapes the training trajectory", "[trainer]") {
  const emt::RunConfig base;
  const auto ref = emt::resume_compat(base);
  auto changes = [&](const char* key, const std::function<void(emt::RunConfig&)>& edit) {
    emt::RunConfig c = base;
    edit(c);
    auto got = emt::resume_compat(c);
    INFO(key);
    REQUIRE(got.count(key) == 1);
    CHECK(got.at(key) != ref.at(key));
    for (const auto& [k, v] : got)
      if (k != key) CHECK(v == ref.at(k));
  };
  changes("finetune.epochs", [](emt::RunConfig& c) { c.finetune.epochs += 2; });
  changes("finetune.max_steps", [](emt::RunConfig& c) { c.finetune.max_steps = 100; });
  changes("finetune.learning_rate", [](emt::RunConfig& c) { c.finetune.learning_rate = 2.1e-4; });
  changes("finetune.projector_lr", [](emt::RunConfig& c) { c.finetune.projector_lr = 2e-3; });
  changes("finetune.weight_decay", [](emt::RunConfig& c) { c.finetune.weight_decay = 0.01; });
  changes("finetune.schedule", [](emt::RunConfig& c) { c.finetune.schedule = "linear"; });
  changes("finetune.warmup", [](emt::RunConfig& c) { c.finetune.warmup_ratio = 0.1; });
  changes("finetune.warmup", [](emt::RunConfig& c) { c.finetune.warmup_steps = 7; });
  changes("finetune.max_grad_norm", [](emt::RunConfig& c) { c.finetune.max_grad_norm = 0.5; });
  changes("finetune.precision", [](emt::RunConfig& c) { c.finetune.precision = "bf16"; });
  changes("run.dtype", [](emt::RunConfig& c) { c.run.dtype = "bf16"; });
  changes("finetune.batch_size", [](emt::RunConfig& c) { c.finetune.batch_size *= 2; });
  changes("run.seed", [](emt::RunConfig& c) { c.run.seed += 1; });
}

TEST_CASE("commit_dir_atomic replaces a directory in one step and leaves no staging copies", "[trainer]") {
  auto root = emt_test::scratch_dir("commit_dir");
  auto write_dir = [&](const std::string& name, const std::string& text) {
    fs::create_directories(root + "/" + name);
    emt::write_file_atomic(root + "/" + name + "/f.txt", text);
  };
  write_dir("stage1", "one");
  emt::commit_dir_atomic(root + "/stage1", root + "/final");
  CHECK(emt::read_file(root + "/final/f.txt") == "one");
  write_dir("stage2", "two");
  emt::commit_dir_atomic(root + "/stage2", root + "/final");
  CHECK(emt::read_file(root + "/final/f.txt") == "two");
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(root)) left.push_back(e.path().filename().string());
  CHECK(left == std::vector<std::string>{"final"});
  CHECK_THROWS_AS(emt::commit_dir_atomic(root + "/missing", root + "/final"), emt::IoError);
  CHECK(emt::read_file(root + "/final/f.txt") == "two");
}

TEST_CASE("trainer: a run stopped mid-epoch resumes to the same result", "[trainer]") {
  // constant schedule: stopping at max_steps does not change the learning rates of the steps before it
  auto d1 = emt_test::scratch_dir("trainer_mid_a"), d2 = emt_test::scratch_dir("trainer_mid_b");
  auto oa = toy_options(d1, 2);
  oa.schedule = "constant";
  oa.warmup_steps = 0;
  auto straight = make_toy(oa);
  straight.trainer->fit();
  auto ob = oa;
  ob.run_dir = d2;
  ob.max_steps = 8;  // stops in the middle of epoch 2
  {
    auto first = make_toy(ob);
    auto s = first.trainer->fit();
    CHECK(s.steps == 8);
  }
  auto latest = emt::Trainer::latest_checkpoint(d2);
  REQUIRE(latest);
  CHECK(fs::path(*latest).filename() == "step_last");
  ob.max_steps = 0;
  ob.resume = true;
  auto second = make_toy(ob, 6, 4, 77);
  second.trainer->fit();
  CHECK(torch::equal(straight.model->lin->weight.detach(), second.model->lin->weight.detach()));
  CHECK(metric_losses(d1) == metric_losses(d2));
  CHECK_FALSE(fs::exists(d2 + "/step_last"));  // superseded by epoch_2
}

TEST_CASE("trainer: NaN guard skips, counts, and stops after patience", "[trainer]") {
  auto dir = emt_test::scratch_dir("trainer_nan");
  auto o = toy_options(dir, 2);
  o.nan_patience = 3;
  auto r = make_toy(o);
  r.obj->poison_at_ = 7;  // epoch 1 (6 steps) completes, then every loss is NaN
  auto before = r.model->lin->weight.detach().clone();
  try {
    r.trainer->fit();
    FAIL("expected the NaN guard to stop training");
  } catch (const emt::Error& e) {
    CHECK_THAT(std::string(e.what()), Catch::Contains("3 non-finite steps in a row"));
    CHECK_THAT(std::string(e.what()), Catch::Contains("epoch_1"));
  }
  CHECK(fs::exists(dir + "/epoch_1/trainable.safetensors"));
  CHECK_FALSE(fs::exists(dir + "/epoch_2"));
  // skipped steps never reach the weights
  CHECK(torch::isfinite(r.model->lin->weight).all().item<bool>());
  CHECK_FALSE(torch::equal(before, r.model->lin->weight.detach()));
}

TEST_CASE("trainer: a failing checkpoint write keeps the previous checkpoint", "[trainer]") {
  auto dir = emt_test::scratch_dir("trainer_fail");
  auto o = toy_options(dir, 2);
  torch::manual_seed(3);
  ToyModel m;
  ToyObjective obj(m);
  ToySource src(6, 4);
  std::vector<emt::ParamGroup> groups = {{"default", m->parameters(), 0.05, true}};
  int saves = 0;
  emt::TrainableIO io;
  io.get = [m] {
    emt::NamedTensors t;
    for (auto& p : m->named_parameters()) t.emplace_back(p.key(), p.value().detach());
    return t;
  };
  io.set = [](const emt::NamedTensors&) {};
  io.save_artifacts = [&saves](const std::string& d) {
    if (++saves == 2) throw emt::IoError("[test] simulated full disk while writing " + d);
  };
  emt::Trainer t(obj, src, groups, io, o);
  try {
    t.fit();
    FAIL("expected the checkpoint write to fail");
  } catch (const emt::IoError& e) {
    CHECK_THAT(std::string(e.what()), Catch::Contains("epoch_2"));
    CHECK_THAT(std::string(e.what()), Catch::Contains("previous checkpoint"));
  }
  CHECK(fs::exists(dir + "/epoch_1/trainer_state.json"));
  CHECK_FALSE(fs::exists(dir + "/epoch_2"));
  for (auto& e : fs::directory_iterator(dir)) CHECK(e.path().filename().string().find(".tmp") == std::string::npos);
  auto latest = emt::Trainer::latest_checkpoint(dir);
  REQUIRE(latest);
  CHECK(fs::path(*latest).filename() == "epoch_1");
}

TEST_CASE("trainer: incompatible checkpoint is refused with the mismatches named", "[trainer]") {
  auto dir = emt_test::scratch_dir("trainer_compat");
  auto o = toy_options(dir, 1);
  o.compat = {{"finetune.method", "lora"}, {"finetune.batch_size", "4"}};
  make_toy(o).trainer->fit();
  auto o2 = toy_options(dir, 2);
  o2.resume = true;
  o2.compat = {{"finetune.method", "linear"}, {"finetune.batch_size", "4"}};
  auto r = make_toy(o2);
  try {
    r.trainer->fit();
    FAIL("expected a refusal");
  } catch (const emt::ConfigError& e) {
    CHECK_THAT(std::string(e.what()), Catch::Contains("finetune.method: checkpoint has 'lora', this run has 'linear'"));
    CHECK_THAT(std::string(e.what()), !Catch::Contains("batch_size"));
  }
}

using emt_test::FixedBatchSource;

TEST_CASE("trainer: the real multimodal model memorises one batch (LoRA and full fine-tuning)", "[trainer]") {
  // Two images, the same prompt, different answers: only the image tells them apart, so the answers can only be
  // learnt if the gradient flows through projector (and LoRA or the whole LLM) into the answer tokens.
  const int64_t img = emt_test::kTinyImageToken;
  auto run = [&](const std::string& method) {
    torch::manual_seed(21);
    auto model = emt::build_llava(emt_test::tiny_model_section(), img);
    auto setup = emt::apply_method(*model, emt_test::memorise_section(method));
    Batch b = emt_test::memorise_batch(img);
    FixedBatchSource src(b);
    emt::LlavaObjective obj(model, torch::kCPU);
    emt::TrainableIO io;
    io.get = [] { return emt::NamedTensors{}; };
    io.set = [](const emt::NamedTensors&) {};
    emt::Trainer t(obj, src, setup.groups, io, emt_test::quiet_options(60));
    auto s = t.fit();
    model->eval();
    emt::GenerateOptions g;
    g.max_new_tokens = 3;
    auto prompt = b.input_ids.narrow(1, 0, 5);
    return std::make_pair(s.losses, emt::generate(model, b.images, prompt, torch::ones_like(prompt), g));
  };
  for (const std::string method : {"lora", "full"}) {
    auto [losses, out] = run(method);
    INFO(method << ": first loss " << losses.front() << ", last " << losses.back());
    REQUIRE(losses.size() == 60);
    CHECK(losses.front() > 3.0);  // ~log(48) at random init
    // LoRA leaves the random lm_head and final norm frozen, which bounds the logits of this tiny model (its loss
    // levels off near 1.07); full fine-tuning trains them too and goes to ~0.
    CHECK(losses.back() < (method == "lora" ? 0.35 : 0.02) * losses.front());
    CHECK(out[0] == std::vector<int64_t>{20, 21, 2});  // each image now gets its own answer
    CHECK(out[1] == std::vector<int64_t>{30, 31, 2});
  }
}

TEST_CASE("trainer: a multimodal step counts every processed token and its supervised ones apart", "[trainer]") {
  const int64_t img = emt_test::kTinyImageToken;
  torch::manual_seed(3);
  auto model = emt::build_llava(emt_test::tiny_model_section(), img);
  emt::apply_method(*model, emt_test::memorise_section("lora"));
  Batch b = emt_test::memorise_batch(img);
  b.attention_mask.select(0, 1).narrow(0, b.attention_mask.size(1) - 1, 1).fill_(0);  // one padded position
  emt::LlavaObjective obj(model, torch::kCPU);
  const auto sl = obj.loss(b);
  const int64_t text = b.attention_mask.sum().item<int64_t>();
  CHECK(sl.tokens == (b.labels != -100).sum().item<int64_t>());
  // the unpadded text with each row's one image token replaced by the image's tokens
  CHECK(sl.processed == text + b.size() * (model->options.num_image_tokens() - 1));
  CHECK(sl.processed > sl.tokens);
}
