// End to end through the `emt` executable on a tiny world written by the test (IDX data, tiny shapes):
// pretrain -> train; kill -9 mid-epoch + --resume reproduces the straight run's losses bit for bit; SIGTERM
// checkpoints and exits 75; a study killed between cells resumes without recomputing or losing a cell; a
// preemption notice in any phase of a study; sweeps of studies run locally.
#include <emt/core/distributed.h>
#include <emt/core/error.h>
#include <emt/core/safetensors.h>
#include <emt/eval/sweep.h>
#include <torch/torch.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#include "expect_error.h"
#include "helpers.h"

using emt_test::put_be32;

namespace fs = std::filesystem;

namespace {

// Four classes of 28x28 grey images: a bright 10x10 block in one of the four quadrants, plus deterministic noise.
void write_idx_split(const fs::path& dir, const std::string& prefix, int n) {
  std::ofstream img(dir / (prefix + "-images-idx3-ubyte"), std::ios::binary);
  std::ofstream lab(dir / (prefix + "-labels-idx1-ubyte"), std::ios::binary);
  put_be32(img, 0x00000803);
  put_be32(img, n);
  put_be32(img, 28);
  put_be32(img, 28);
  put_be32(lab, 0x00000801);
  put_be32(lab, n);
  uint32_t rng = 12345u + static_cast<uint32_t>(n);
  for (int i = 0; i < n; ++i) {
    int c = i % 4;
    for (int y = 0; y < 28; ++y)
      for (int x = 0; x < 28; ++x) {
        rng = rng * 1664525u + 1013904223u;
        int v = static_cast<int>((rng >> 24) & 0x3f);
        int qx = (c % 2) * 14 + 2, qy = (c / 2) * 14 + 2;
        if (x >= qx && x < qx + 10 && y >= qy && y < qy + 10) v = 200 + (v & 0x1f);
        img.put(static_cast<char>(v));
      }
    lab.put(static_cast<char>(c));
  }
}

struct World {
  std::string dir, config;
};

const World& tiny_world() {
  static World w = [] {
    World w;
    // ctest runs each test case in its own process, possibly in parallel: one world per process
    w.dir = emt_test::scratch_dir("e2e_world_" + std::to_string(::getpid()));
    fs::create_directories(fs::path(w.dir) / "data/quad");
    write_idx_split(fs::path(w.dir) / "data/quad", "train", 96);
    write_idx_split(fs::path(w.dir) / "data/quad", "t10k", 24);
    std::ofstream(fs::path(w.dir) / "data/quad/classes.txt") << "up left\nup right\ndown left\ndown right\n";
    fs::create_directories(fs::path(w.dir) / "data/quad2");
    write_idx_split(fs::path(w.dir) / "data/quad2", "train", 64);
    write_idx_split(fs::path(w.dir) / "data/quad2", "t10k", 16);
    std::ofstream(fs::path(w.dir) / "data/quad2/classes.txt") << "north west\nnorth east\nsouth west\nsouth east\n";
    w.config = w.dir + "/tiny.yaml";
    std::ofstream(w.config) << R"(run: {out_dir: )" << w.dir << R"(/runs, threads: 1, seed: 0, log_level: warn}
model:
  projector: mlp2x_gelu
  conversation: plain
  vision: {image_size: 28, patch_size: 7, hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}
  clip_text: {vocab_size: 160, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64,
              max_position_embeddings: 32, projection_dim: 16}
  llm: {vocab_size: 160, hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64,
        max_position_embeddings: 128}
data:
  root: )" << w.dir << R"(/data
  workers: 1
  datasets:
    quad: {format: idx, path: quad}
    quad2: {format: idx, path: quad2}
pretrain: {cache_dir: )" << w.dir << R"(/base, clip_steps: 4, align_steps: 2, instruct_steps: 6, batch_size: 16,
           tokenizer_vocab: 160, train_max_samples: 64}
finetune: {dataset: quad, method: lora, epochs: 2, batch_size: 8, log_every_steps: 1, learning_rate: 1.0e-3,
           lora: {r: 4, alpha: 8, dropout: 0.1}}
eval: {batch_size: 8, max_new_tokens: 6, scorers: [strict]}
study: {finetune_datasets: [quad, quad2], methods: [linear, lora], epochs: 2}
)";
    auto r = emt_test::run_cli("pretrain " + w.config);
    INFO(r.output);
    REQUIRE(r.code == 0);
    return w;
  }();
  return w;
}

std::vector<std::string> metric_lines(const std::string& run_dir) {
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    // losses, steps, lr and gradient norms must match exactly; throughput figures are wall-clock
    out.push_back(nlohmann::json{{"step", j["step"]}, {"loss", j["loss"]}, {"lr", j["lr"]}, {"g", j["grad_norm"]}}.dump());
  }
  return out;
}

}  // namespace

TEST_CASE("e2e: pretrain writes a reusable HF-layout base model", "[e2e][slow]") {
  const auto& w = tiny_world();
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.model", "preprocessor_config.json",
                        "recipe.yaml", "clip/config.json", "clip/model.safetensors"})
    CHECK(fs::exists(fs::path(w.dir) / "base" / f));
  auto again = emt_test::run_cli("pretrain " + w.config);
  CHECK(again.code == 0);
  // the report names the BLAS kernels the base was built with (its numerics depend on them)
  const auto rep = nlohmann::json::parse(std::ifstream(fs::path(w.dir) / "base" / "pretrain_report.json"));
  CHECK_THAT(rep.value("blas", std::string()), Catch::Contains("OPENBLAS_CORETYPE"));
  CHECK_THAT(again.output, Catch::Contains("built with "));
  CHECK_THAT(again.output, Catch::Contains("reused"));
  // scoring the cached base under a config whose recipe differs works, and says so; under its own it is silent
  auto same = emt_test::run_cli("score " + w.config + " --no-clip run.name=score_same");
  INFO(same.output);
  CHECK(same.code == 0);
  CHECK(same.output.find("another recipe") == std::string::npos);
  auto other = emt_test::run_cli("score " + w.config + " --no-clip run.name=score_other pretrain.clip_steps=5");
  INFO(other.output);
  CHECK(other.code == 0);
  CHECK_THAT(other.output, Catch::Contains("was built by another recipe") && Catch::Contains("--print-recipe"));
}

TEST_CASE("e2e: kill -9 mid-epoch then --resume reproduces the straight run exactly", "[e2e][slow]") {
  const auto& w = tiny_world();
  auto a = emt_test::run_cli("train " + w.config + " run.name=straight");
  INFO(a.output);
  REQUIRE(a.code == 0);
  // 96 images / batch 8 = 12 steps per epoch; die right after step 17 (epoch 2), as kill -9 would
  auto b = emt_test::run_cli_env("EMT_FAULT_AT_STEP=17:KILL", "train " + w.config + " run.name=killed");
  CHECK(b.code == 128 + 9);
  CHECK(fs::exists(w.dir + "/runs/killed/epoch_1"));
  CHECK_FALSE(fs::exists(w.dir + "/runs/killed/epoch_2"));
  auto c = emt_test::run_cli("train " + w.config + " run.name=killed --resume");
  INFO(c.output);
  REQUIRE(c.code == 0);
  CHECK_THAT(c.output, Catch::Contains("resumed"));
  auto la = metric_lines(w.dir + "/runs/straight"), lc = metric_lines(w.dir + "/runs/killed");
  CHECK(la.size() == 24);
  CHECK(la == lc);
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors", "mm_projector.safetensors",
                        "trainable.safetensors", "optimizer.safetensors", "config.yaml"})
    CHECK(fs::exists(w.dir + "/runs/killed/epoch_2/" + f));
  // a different method refuses the checkpoint, naming the mismatch
  auto d = emt_test::run_cli("train " + w.config + " run.name=killed finetune.method=linear finetune.epochs=3 --resume");
  CHECK(d.code == 2);
  CHECK_THAT(d.output, Catch::Contains("finetune.method: checkpoint has 'lora', this run has 'linear'"));
}

TEST_CASE("e2e: SIGTERM checkpoints and exits 75; --resume finishes", "[e2e][slow]") {
  const auto& w = tiny_world();
  auto r = emt_test::run_cli_env("EMT_FAULT_AT_STEP=5:TERM", "train " + w.config + " run.name=preempted");
  CHECK(r.code == 75);
  CHECK_THAT(r.output, Catch::Contains("step_last"));
  CHECK(fs::exists(w.dir + "/runs/preempted/step_last/trainer_state.json"));
  auto s = nlohmann::json::parse(std::ifstream(w.dir + "/runs/preempted/step_last/trainer_state.json"));
  CHECK(s["step"] == 5);
  auto c = emt_test::run_cli("train " + w.config + " run.name=preempted --resume");
  INFO(c.output);
  CHECK(c.code == 0);
  CHECK(fs::exists(w.dir + "/runs/preempted/epoch_2"));
}

TEST_CASE("e2e: a study's cells fine-tune the study's base whatever their seed, without a recipe warning",
          "[e2e][slow]") {
  const auto& w = tiny_world();
  // run.seed 0 built the base; the cell's seed 3 is a fine-tuning seed, not another recipe
  auto r = emt_test::run_cli("study " + w.config + " run.name=seeded --no-report study.finetune_datasets=[quad]"
                             " study.methods=[lora] study.seeds=[3] study.epochs=1");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("another recipe") == std::string::npos);  // warnings reach the output (see the score test)
  CHECK(fs::exists(w.dir + "/runs/seeded/cells/quad__lora__seed3/epoch_1/trainable.safetensors"));
}

TEST_CASE("e2e: a study rerun after its base model was rebuilt is refused, not mixed with the old results",
          "[e2e][slow]") {
  const auto& w = tiny_world();
  const std::string cache = w.dir + "/base-identity";  // its own base: the shared one stays as it is
  const std::string own = " pretrain.cache_dir=" + cache + " run.name=identity --no-report"
                          " study.finetune_datasets=[quad] study.methods=[lora] study.epochs=1";
  auto a = emt_test::run_cli("study " + w.config + own);
  INFO(a.output);
  REQUIRE(a.code == 0);
  CHECK(fs::exists(w.dir + "/runs/identity/base.json"));
  auto same = emt_test::run_cli("study " + w.config + own);  // the same base: every row is reused
  INFO(same.output);
  CHECK(same.code == 0);
  CHECK_THAT(same.output, Catch::Contains("1 already complete"));
  auto rebuilt = emt_test::run_cli("pretrain " + w.config + " pretrain.cache_dir=" + cache + " --force");
  REQUIRE(rebuilt.code == 0);
  auto b = emt_test::run_cli("study " + w.config + own);
  INFO(b.output);
  CHECK(b.code != 0);
  CHECK_THAT(b.output, Catch::Contains("another base model") && Catch::Contains("run.name") &&
                           Catch::Contains("base.json"));
}

TEST_CASE("e2e: a study killed between cells resumes without recomputing or losing cells", "[e2e][slow]") {
  const auto& w = tiny_world();
  auto k = emt_test::run_cli_env("EMT_FAULT_AFTER_CELLS=1", "study " + w.config + " run.name=study --no-report");
  CHECK(k.code == 128 + 9);
  auto r = emt_test::run_cli("study " + w.config + " run.name=study");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK_THAT(r.output, Catch::Contains("1 already complete"));
  CHECK_THAT(r.output, Catch::Contains("3 cells trained"));
  std::ifstream in(w.dir + "/runs/study/results.jsonl");
  std::map<std::string, int> seen;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    std::string key = j["kind"].get<std::string>() + "|" + j["finetune_dataset"].get<std::string>() + "|" +
                      j["method"].get<std::string>() + "|" + std::to_string(j["epoch"].get<int>()) + "|" +
                      j["eval_dataset"].get<std::string>() + "|" + j["scorer"].get<std::string>();
    ++seen[key];
  }
  // base (2 datasets) + CLIP baseline (2) + 4 cells x 2 epochs x 2 datasets, each exactly once
  CHECK(seen.size() == 2 + 2 + 4 * 2 * 2);
  for (const auto& [key, n] : seen) {
    INFO(key);
    CHECK(n == 1);
  }
  CHECK(fs::exists(w.dir + "/runs/study/report/report.html"));
}

namespace {
// Every result row of a study by its identity, with what was measured (n, correct, accuracy).
std::map<std::string, std::string> result_rows(const std::string& run_dir) {
  std::map<std::string, std::string> rows;
  std::ifstream in(run_dir + "/results.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    std::string key = j["kind"].get<std::string>() + "|" + j["finetune_dataset"].get<std::string>() + "|" +
                      j["method"].get<std::string>() + "|" + std::to_string(j["seed"].get<int>()) + "|" +
                      std::to_string(j["epoch"].get<int>()) + "|" + j["eval_dataset"].get<std::string>() + "|" +
                      j["scorer"].get<std::string>();
    CHECK(rows.count(key) == 0);  // every row exactly once
    rows[key] = nlohmann::json{{"n", j["n"]}, {"correct", j["n_correct"]}, {"acc", j["accuracy"]}}.dump();
  }
  return rows;
}
}  // namespace

TEST_CASE("e2e: mitigation methods in a study: wise-ft at 0 is the base, at 1 the lora cell; ema and replay resume exactly",
          "[e2e][slow][mitigation]") {
  const auto& w = tiny_world();
  auto r = emt_test::run_cli("study " + w.config +
                             " study.finetune_datasets=[quad] study.epochs=1 run.name=mitig --no-report"
                             " 'study.methods=[lora, wise-ft, ema, l2sp, ewc, lwf, replay, lora-attn, lora-mlp, \"replay:linear\"]'"
                             " 'finetune.mitigation.wise_ft_alphas=[0, 1]' finetune.mitigation.reference=datasets"
                             " 'study.learning_rate_by_method={lora: 0.03, linear: 0.03}'");  // rates that move answers
  INFO(r.output);
  REQUIRE(r.code == 0);
  const auto rows = result_rows(w.dir + "/runs/mitig");
  auto row = [&](const std::string& method, int epoch, const std::string& d) {
    const std::string key = "mllm|" + std::string(epoch == 0 ? "" : "quad") + "|" + method + "|0|" +
                            std::to_string(epoch) + "|" + d + "|strict";
    auto it = rows.find(key);
    return it == rows.end() ? std::string("missing: ") + key : it->second;
  };
  for (const std::string d : {"quad", "quad2"}) {
    for (const std::string m : {"lora", "wise-ft@0", "wise-ft@1", "ema", "l2sp", "ewc", "lwf", "replay", "lora-attn",
                                "lora-mlp", "replay:linear"})
      CHECK(row(m, 1, d).rfind("missing", 0) != 0);
    CHECK(row("wise-ft@0", 1, d) == row("base", 0, d));  // no retraining: a = 0 is the base model
    CHECK(row("wise-ft@1", 1, d) == row("lora", 1, d));  // wise-ft trains exactly as lora
    // the same answers, word for word (the tiny model's accuracy alone would not tell them apart)
    auto outputs = [&](const std::string& rel) {
      std::vector<std::string> out;
      std::ifstream in(w.dir + "/runs/mitig/predictions/" + rel + "/" + d + ".jsonl");
      std::string line;
      while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line)["output"].get<std::string>());
      return out;
    };
    const auto base = outputs("base"), lora = outputs("quad__lora__seed0/epoch_1");
    REQUIRE(!base.empty());
    CHECK(base != lora);  // fine-tuning changed the answers
    CHECK(outputs("quad__wise-ft__seed0/epoch_1/wise-ft@0") == base);
    CHECK(outputs("quad__wise-ft__seed0/epoch_1/wise-ft@1") == lora);
  }
  {  // and from the same initial weights: the trained tensors are lora's, bit for bit
    emt::SafetensorsReader lora(w.dir + "/runs/mitig/cells/quad__lora__seed0/epoch_1/trainable.safetensors");
    emt::SafetensorsReader wise(w.dir + "/runs/mitig/cells/quad__wise-ft__seed0/epoch_1/trainable.safetensors");
    REQUIRE(lora.names() == wise.names());
    for (const auto& n : lora.names()) {
      INFO(n);
      CHECK(torch::equal(lora.load(n), wise.load(n)));
    }
  }
  emt::SafetensorsReader ck(w.dir + "/runs/mitig/cells/quad__ema__seed0/epoch_1/trainable.safetensors");
  int averaged = 0, trained = 0;
  for (const auto& n : ck.names()) (n.rfind("ema/", 0) == 0 ? averaged : trained) += 1;
  CHECK(trained > 0);
  CHECK(averaged == trained);

  // kill -9 mid-epoch and --resume: the replayed batches and the moving average come out exactly as straight
  for (const std::string method : {"replay", "ema"}) {
    const std::string m = " finetune.method=" + method + " run.name=";
    auto a = emt_test::run_cli("train " + w.config + m + "mit_straight_" + method);
    REQUIRE(a.code == 0);
    auto b = emt_test::run_cli_env("EMT_FAULT_AT_STEP=17:KILL", "train " + w.config + m + "mit_killed_" + method);
    CHECK(b.code == 128 + 9);
    auto c = emt_test::run_cli("train " + w.config + m + "mit_killed_" + method + " --resume");
    INFO(c.output);
    REQUIRE(c.code == 0);
    CHECK(metric_lines(w.dir + "/runs/mit_straight_" + method) == metric_lines(w.dir + "/runs/mit_killed_" + method));
    const std::string f = "/epoch_2/trainable.safetensors";
    CHECK(emt_test::slurp(w.dir + "/runs/mit_straight_" + method + f) ==
          emt_test::slurp(w.dir + "/runs/mit_killed_" + method + f));
  }
}

TEST_CASE("e2e: a preemption notice during pretraining exits 75 and leaves no partial base model", "[e2e][slow]") {
  const auto& w = tiny_world();
  const std::string cache = w.dir + "/base-preempted";
  auto a = emt_test::run_cli_env("EMT_FAULT_AT_STEP=2:USR1", "pretrain " + w.config + " pretrain.cache_dir=" + cache);
  INFO(a.output);
  CHECK(a.code == 75);
  CHECK_THAT(a.output, Catch::Contains("not written"));
  CHECK_FALSE(fs::exists(cache));
  for (const auto& e : fs::directory_iterator(w.dir)) CHECK(e.path().filename().string().rfind("base-preempted.tmp", 0) != 0);
  auto b = emt_test::run_cli("pretrain " + w.config + " pretrain.cache_dir=" + cache);
  INFO(b.output);
  CHECK(b.code == 0);
  CHECK(fs::exists(cache + "/config.json"));
}

TEST_CASE("e2e: a preemption notice in any phase of a study exits 75 and the rerun gives the uninterrupted results",
          "[e2e][slow]") {
  const auto& w = tiny_world();
  const std::string grid = " study.finetune_datasets=[quad] study.methods=[lora] eval.clip_baseline=true";
  auto ref = emt_test::run_cli("study " + w.config + grid + " run.name=pre_ref");
  INFO(ref.output);
  REQUIRE(ref.code == 0);
  const auto want = result_rows(w.dir + "/runs/pre_ref");
  REQUIRE(want.size() >= 3 * 2);  // base + 2 epochs, 2 datasets (+ the CLIP baseline when a CLIP model exists)
  for (const char* phase : {"pretrain", "clip", "base", "train", "epoch_score", "report"}) {
    const std::string name = std::string("pre_") + phase;
    auto a = emt_test::run_cli_env(std::string("EMT_FAULT_SIGNAL_AT=") + phase, "study " + w.config + grid +
                                                                                    " run.name=" + name);
    INFO(phase << ":\n" << a.output);
    CHECK(a.code == 75);
    CHECK_THAT(a.output, Catch::Contains("preempted") && Catch::Contains("received signal"));
    auto b = emt_test::run_cli("study " + w.config + grid + " run.name=" + name);
    INFO(b.output);
    REQUIRE(b.code == 0);
    CHECK(result_rows(w.dir + "/runs/" + name) == want);
    CHECK(fs::exists(w.dir + "/runs/" + name + "/report/report.html"));
  }
}

TEST_CASE("e2e: a judge command named by the config or overrides runs only with --allow-judge", "[e2e]") {
  const auto& w = tiny_world();
  const std::string marker = w.dir + "/judge-ran-" + std::to_string(::getpid());
  const std::string judge = " 'eval.scorers=[strict, judge]' 'eval.judge_command=touch " + marker + "; echo yes'";
  for (const std::string cmd : {"study " + w.config + judge + " run.name=judge_refused",
                                "score " + w.config + judge + " --no-clip --out " + w.dir + "/judge_refused"}) {
    auto r = emt_test::run_cli(cmd);
    INFO(r.output);
    CHECK(r.code != 0);
    CHECK(r.output.find("--allow-judge") != std::string::npos);
    CHECK_FALSE(fs::exists(w.dir + "/runs/judge_refused/results.jsonl"));
  }
  CHECK_FALSE(fs::exists(marker));
  auto ok = emt_test::run_cli("score " + w.config + judge + " --no-clip --allow-judge --out " + w.dir + "/judge_ok");
  INFO(ok.output);
  REQUIRE(ok.code == 0);
  CHECK(fs::exists(marker));
  CHECK(emt_test::slurp(w.dir + "/judge_ok/results.jsonl").find("\"judge\"") != std::string::npos);
}

TEST_CASE("sweep: array specs collapse runs of indices", "[sweep]") {
  CHECK(emt::slurm_array_spec({0, 1, 2, 3}) == "0-3");
  CHECK(emt::slurm_array_spec({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8");
  CHECK(emt::slurm_array_spec({4}) == "4");
}

TEST_CASE("sweep: a grid becomes deterministic tasks; local runs them K at a time, one report, reruns skip them",
          "[e2e][slow]") {
  const auto& w = tiny_world();
  const std::string file = w.dir + "/sweep.yaml";
  std::ofstream(file) << "sweep:\n  name: seeds\n  config: tiny.yaml\n  out_dir: " << w.dir << "/runs/sweeps\n"
                      << "  overrides: ['study.finetune_datasets=[quad]', 'study.methods=[lora]', study.epochs=1]\n"
                      << "  grid:\n    run.seed: [0, 1]\n    eval.batch_size: [8]\n  parallel: 2\n"
                      << "slurm: {gpus: 2, time: '02:00:00', extra: ['--qos=short']}\n";
  auto s = emt::load_sweep(file);
  REQUIRE(s.tasks.size() == 2);
  CHECK(s.tasks[0].name == "t000_seed=0_batch_size=8");
  CHECK(s.tasks[1].name == "t001_seed=1_batch_size=8");
  CHECK(s.tasks[1].run_dir == w.dir + "/runs/sweeps/seeds/t001_seed=1_batch_size=8");
  CHECK(s.config == w.dir + "/tiny.yaml");
  CHECK(emt::sweep_task_argv(s, s.tasks[0], "/x/emt")[1] == "study");
  // --allow-judge comes from the sweep's command line only, and reaches each study task and the array script.
  CHECK(emt::sweep_task_argv(s, s.tasks[0], "/x/emt").back() == "--no-report");
  CHECK(emt::sweep_array_script(s, {0, 1}, "/x/emt").find("--allow-judge") == std::string::npos);
  {
    auto allowed = s;
    allowed.allow_judge = true;
    CHECK(emt::sweep_task_argv(allowed, allowed.tasks[0], "/x/emt").back() == "--allow-judge");
    CHECK(emt::sweep_array_script(allowed, {0, 1}, "/x/emt").find("--run-task \"$SLURM_ARRAY_TASK_ID\" --allow-judge &") !=
          std::string::npos);
  }

  auto p = emt_test::run_cli("sweep " + file + " --backend print");
  INFO(p.output);
  REQUIRE(p.code == 0);
  for (const char* want : {"#SBATCH --array=0-1%2", "#SBATCH --gres=gpu:2", "#SBATCH --signal=B:USR1@120",
                           "#SBATCH --requeue", "#SBATCH --qos=short", "#SBATCH --time=02:00:00", "--run-task",
                           "scontrol requeue", "--report-only", "run.seed=1"})
    CHECK_THAT(p.output, Catch::Contains(want));

  auto r = emt_test::run_cli("sweep " + file + " --backend local");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK_THAT(r.output, Catch::Contains("2 tasks finished, 0 failed"));
  for (const auto& t : s.tasks) {
    INFO(t.name);
    CHECK(emt::sweep_task_finished(t));
    CHECK(result_rows(t.run_dir).size() == 3 * 2);  // the CLIP baseline, base and one epoch; two datasets
  }
  CHECK(fs::exists(w.dir + "/runs/sweeps/seeds/report/report.html"));
  auto again = emt_test::run_cli("sweep " + file + " --backend local");
  INFO(again.output);
  CHECK(again.code == 0);
  CHECK_THAT(again.output, Catch::Contains("2 already finished") && Catch::Contains("0 tasks finished"));
  // Without sbatch the scripts are still written (for the unfinished tasks only) and the error says what is
  // missing; with every task finished there is nothing to submit.
  CHECK(emt_test::run_cli_env("PATH=/nonexistent", "sweep " + file + " --backend slurm").code == 0);
  fs::remove(s.tasks[1].run_dir + "/sweep_task.json");
  auto sl = emt_test::run_cli_env("PATH=/nonexistent", "sweep " + file + " --backend slurm");
  INFO(sl.output);
  CHECK(sl.code == 1);
  CHECK_THAT(sl.output, Catch::Contains("sbatch is not on PATH"));
  std::ifstream script(w.dir + "/runs/sweeps/seeds/sweep_array.sbatch");
  std::string text((std::istreambuf_iterator<char>(script)), std::istreambuf_iterator<char>());
  CHECK_THAT(text, Catch::Contains("#SBATCH --array=1%2"));
}

TEST_CASE("sweep: mistakes in a sweep file are named before anything runs", "[sweep]") {
  const std::string dir = emt_test::scratch_dir("sweep_errors");
  std::ofstream(dir + "/base.yaml") << "run: {name: x}\n";
  auto write = [&](const std::string& text) {
    std::ofstream(dir + "/s.yaml") << text;
    return dir + "/s.yaml";
  };
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] {
               emt::load_sweep(write("sweep: {name: a, config: base.yaml, gird: {run.seed: [0]}}\n"));
             }),
             Catch::Contains("sweep.gird") && Catch::Contains("unknown key"));
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] {
               emt::load_sweep(write("sweep: {name: a, config: base.yaml, grid: {finetune.lerning_rate: [1]}}\n"));
             }),
             Catch::Contains("t000") && Catch::Contains("lerning_rate"));
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] {
               emt::load_sweep(write("sweep: {name: a, config: base.yaml, grid: {run.seed: []}}\n"));
             }),
             Catch::Contains("sweep.grid.run.seed") && Catch::Contains("non-empty list"));
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] { emt::load_sweep(write("sweep: {name: 'a b', config: x}\n")); }),
             Catch::Contains("file-name safe"));
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] {
               emt::load_sweep(write("sweep: {name: a, config: base.yaml, command: eval}\n"));
             }),
             Catch::Contains("study or train"));
}

namespace {
std::string shell(const std::string& cmd) {
  std::string out;
  if (FILE* p = ::popen((cmd + " 2>&1").c_str(), "r")) {
    char buf[512];
    while (std::fgets(buf, sizeof buf, p)) out += buf;
    ::pclose(p);
  }
  return out;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Waits up to `seconds` for `done`; false on timeout.
template <class F>
bool wait_for(F done, int seconds) {
  for (int i = 0; i < seconds * 2; ++i) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  return done();
}

std::string write_slurm_sweep(const std::string& dir, const std::string& name, const std::string& grid,
                              const std::string& extra_overrides) {
  const std::string file = dir + "/" + name + ".yaml";
  std::ofstream(file) << "sweep:\n  name: " << name << "\n  config: tiny.yaml\n  out_dir: " << dir << "/runs/slurm\n"
                      << "  overrides: ['study.finetune_datasets=[quad]', run.threads=1" << extra_overrides << "]\n"
                      << "  grid:\n" << grid << "  parallel: 4\n"
                      << "slurm: {gpus: 0, cpus_per_task: 1, time: '00:15:00'}\n";
  return file;
}

struct Submitted {
  emt::Sweep sweep;
  std::string output;
};

// Writes a sweep of the tiny world and submits it with `emt sweep --backend slurm` (the cluster must be up).
Submitted submit_slurm_sweep(const std::string& name, const std::string& grid, const std::string& overrides,
                             size_t tasks) {
  REQUIRE_THAT(shell("sinfo -h -o %t"), Catch::Contains("idle") || Catch::Contains("mix"));
  const auto& w = tiny_world();
  const auto file = write_slurm_sweep(w.dir, name, grid, overrides);
  Submitted out{emt::load_sweep(file), ""};
  REQUIRE(out.sweep.tasks.size() == tasks);
  auto r = emt_test::run_cli("sweep " + file + " --backend slurm");
  INFO(r.output);
  REQUIRE(r.code == 0);
  REQUIRE_THAT(r.output, Catch::Contains("submitted array job"));
  out.output = r.output;
  return out;
}
}  // namespace

// Hidden ([.slurm]): needs the one-node cluster of scripts/slurm-local.sh (scripts/slurm-test.sh runs it), and
// fails, never skips, when that cluster is not there.
TEST_CASE("slurm: a 4-task sweep runs as a real job array with its dependent report job", "[.slurm]") {
  auto sub = submit_slurm_sweep("array", "    study.seeds: [[0], [1]]\n    study.methods: [[linear], [lora]]\n",
                                ", study.epochs=1", 4);
  const auto& s = sub.sweep;
  CHECK_THAT(sub.output, Catch::Contains("--array=0-3%4"));
  const std::string report = s.root() + "/report/report.html";
  const bool done = wait_for([&] { return fs::exists(report); }, 300);
  INFO(shell("squeue; cat " + s.root() + "/slurm-*.out"));
  REQUIRE(done);
  for (const auto& t : s.tasks) {
    INFO(t.name << "\n" << read_text(t.run_dir + "/sweep.log"));
    CHECK(emt::sweep_task_finished(t));
    CHECK(result_rows(t.run_dir).size() == 3 * 2);
  }
  CHECK_THAT(read_text(report), Catch::Contains("quad"));
  // Re-submitting a finished sweep submits nothing.
  auto again = emt_test::run_cli("sweep " + s.file + " --backend slurm");
  CHECK_THAT(again.output, Catch::Contains("4 already finished"));
  CHECK_THAT(again.output, !Catch::Contains("submitted"));
}

TEST_CASE("slurm: a preempted array task requeues itself and resumes from its checkpoint", "[.slurm]") {
  auto sub = submit_slurm_sweep("preempt", "    study.seeds: [[3]]\n",
                                ", 'study.methods=[lora]', study.epochs=60, run.log_level=info", 1);
  const auto& s = sub.sweep;
  const auto pos = sub.output.find("submitted array job ") + 20;
  const std::string job = sub.output.substr(pos, sub.output.find(' ', pos) - pos);
  const std::string cell = s.tasks[0].run_dir + "/cells/quad__lora__seed3";
  // Once the task has checkpointed an epoch, send the notice Slurm sends before preemption.
  REQUIRE(wait_for([&] { return fs::exists(cell + "/epoch_2"); }, 240));
  shell("scancel --batch --signal=USR1 " + job + "_0");
  const bool done = wait_for([&] { return fs::exists(s.root() + "/report/report.html"); }, 300);
  const std::string log = read_text(s.tasks[0].run_dir + "/sweep.log");
  INFO(log << "\n" << shell("cat " + s.root() + "/slurm-*.out"));
  REQUIRE(done);
  CHECK(emt::sweep_task_finished(s.tasks[0]));
  CHECK_THAT(log, Catch::Contains("preempted"));
  CHECK_THAT(log, Catch::Contains("[trainer] resumed from"));
  CHECK_THAT(read_text(s.root() + "/slurm-" + job + "_0.out"), Catch::Contains("requeueing"));
  CHECK(result_rows(s.tasks[0].run_dir).size() == (2 + 60) * 2);  // CLIP, base, 60 epochs; two datasets
}

// ---- data parallel (c10d Gloo on loopback, through `emt launch`) -----------------------------------------------

namespace {
std::vector<double> step_losses(const std::string& run_dir) {
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::vector<double> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return out;
}

nlohmann::json trainer_state(const std::string& ck) {
  return nlohmann::json::parse(std::ifstream(ck + "/trainer_state.json"));
}

// Largest elementwise difference between two checkpoints' trainable tensors (names must match).
double max_trainable_diff(const std::string& a_dir, const std::string& b_dir) {
  emt::SafetensorsReader a(a_dir + "/trainable.safetensors"), b(b_dir + "/trainable.safetensors");
  auto names = a.names();
  CHECK(names == b.names());
  double d = 0;
  for (const auto& n : names) d = std::max(d, (a.load(n) - b.load(n)).abs().max().item<double>());
  return d;
}
}  // namespace

TEST_CASE("dist: the launcher's environment is read as torchrun and srun set it; bad values are named", "[dist]") {
  auto clear = [] {
    for (const char* v : {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS",
                          "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_JOB_ID", "SLURM_LAUNCH_NODE_IPADDR"})
      ::unsetenv(v);
  };
  clear();
  CHECK_FALSE(emt::dist_env_from_environment().has_value());
  ::setenv("WORLD_SIZE", "1", 1);
  CHECK_FALSE(emt::dist_env_from_environment().has_value());  // one process: no group
  ::setenv("WORLD_SIZE", "4", 1);
  ::setenv("RANK", "3", 1);
  ::setenv("LOCAL_RANK", "1", 1);
  ::setenv("MASTER_ADDR", "10.0.0.7", 1);
  ::setenv("MASTER_PORT", "29511", 1);
  auto e = emt::dist_env_from_environment();
  REQUIRE(e.has_value());
  CHECK(e->rank == 3);
  CHECK(e->world_size == 4);
  CHECK(e->local_rank == 1);
  CHECK(e->master_addr == "10.0.0.7");
  CHECK(e->master_port == 29511);
  ::setenv("RANK", "4", 1);
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] { emt::dist_env_from_environment(); }),
             Catch::Contains("RANK='4'"));
  ::setenv("RANK", "x1", 1);
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] { emt::dist_env_from_environment(); }),
             Catch::Contains("expected an integer"));
  clear();
  // inside an srun step
  ::setenv("SLURM_NTASKS", "2", 1);
  ::setenv("SLURM_PROCID", "1", 1);
  ::setenv("SLURM_LOCALID", "0", 1);
  ::setenv("SLURM_STEP_ID", "0", 1);
  ::setenv("SLURM_JOB_ID", "123457", 1);
  ::setenv("SLURM_LAUNCH_NODE_IPADDR", "10.1.2.3", 1);
  e = emt::dist_env_from_environment();
  REQUIRE(e.has_value());
  CHECK(e->source == "slurm");
  CHECK(e->rank == 1);
  CHECK(e->master_addr == "10.1.2.3");
  CHECK(e->master_port == 20000 + 123457 % 20000);
  ::unsetenv("SLURM_STEP_ID");  // the batch script itself (not an srun step) is one process
  CHECK_FALSE(emt::dist_env_from_environment().has_value());
  ::setenv("SLURM_STEP_ID", "4294967294", 1);  // the batch step, as some Slurm versions name it
  CHECK_FALSE(emt::dist_env_from_environment().has_value());
  clear();
}

TEST_CASE("dist: a failing rank stops the launch with its exit code", "[dist]") {
  auto r = emt_test::run_cli("launch --nproc 2 -- emt train /nonexistent/config.yaml");
  CHECK(r.code == 2);
  CHECK_THAT(r.output, Catch::Contains("/nonexistent/config.yaml"));
  auto none = emt_test::run_cli("launch --nproc 2 -- /nonexistent/program");
  CHECK(none.code == 127);
  CHECK_THAT(none.output, Catch::Contains("cannot run '/nonexistent/program'"));
}

TEST_CASE("dist: two Gloo ranks train what one process trains on their combined batch", "[e2e][dist][slow]") {
  const auto& w = tiny_world();
  const std::string common = " finetune.lora.dropout=0 finetune.epochs=1";
  auto one = emt_test::run_cli("train " + w.config + common + " finetune.batch_size=8 run.name=dp_one");
  INFO(one.output);
  REQUIRE(one.code == 0);
  auto two = emt_test::run_cli("launch --nproc 2 -- emt train " + w.config + common +
                               " finetune.batch_size=4 run.name=dp_two");
  INFO(two.output);
  REQUIRE(two.code == 0);
  CHECK_THAT(two.output, Catch::Contains("trained 12 steps"));  // 96 images, 2 ranks x 4 per step
  const std::string a = w.dir + "/runs/dp_one/epoch_1", b = w.dir + "/runs/dp_two/epoch_1";
  auto st = trainer_state(b);
  CHECK(st["data_parallel"]["world_size"] == 2);
  CHECK(st["data_parallel"]["backend"] == "gloo");
  REQUIRE(st["data_parallel"]["rank_fingerprints"].size() == 2);
  CHECK(st["data_parallel"]["rank_fingerprints"][0] == st["data_parallel"]["rank_fingerprints"][1]);
  CHECK_FALSE(trainer_state(a).contains("data_parallel"));
  const double diff = max_trainable_diff(a, b);
  CHECK(diff <= 1e-5);
  // ... while training moved the adapter far beyond that tolerance (LoRA B starts at zero)
  emt::SafetensorsReader r(b + "/trainable.safetensors");
  double moved = 0;
  for (const auto& n : r.names())
    if (n.find("lora_B") != std::string::npos) moved = std::max(moved, r.load(n).abs().max().item<double>());
  CHECK(moved > 1e-3);
  const auto la = step_losses(w.dir + "/runs/dp_one"), lb = step_losses(w.dir + "/runs/dp_two");
  REQUIRE(la.size() == 12);
  REQUIRE(lb.size() == la.size());
  for (size_t i = 0; i < la.size(); ++i) CHECK(std::abs(la[i] - lb[i]) <= 1e-5);

  SECTION("a preemption notice on one rank stops both after the same step; the resumed run equals the straight one") {
    auto p = emt_test::run_cli_env("EMT_FAULT_AT_STEP=5:USR1 EMT_FAULT_RANK=1",
                                   "launch --nproc 2 -- emt train " + w.config + common +
                                       " finetune.batch_size=4 run.name=dp_pre");
    INFO(p.output);
    CHECK(p.code == 75);
    CHECK_THAT(p.output, Catch::Contains("a data-parallel rank received a preemption notice"));
    // the notice came after step 5's all-reduce: the ranks voted at step 6 and both stopped there
    CHECK(trainer_state(w.dir + "/runs/dp_pre/step_last")["step"] == 6);
    auto c = emt_test::run_cli("launch --nproc 2 -- emt train " + w.config + common +
                               " finetune.batch_size=4 run.name=dp_pre --resume");
    INFO(c.output);
    REQUIRE(c.code == 0);
    CHECK(max_trainable_diff(w.dir + "/runs/dp_pre/epoch_1", b) == 0.0);
    CHECK(step_losses(w.dir + "/runs/dp_pre") == lb);
    // one process cannot continue a two-rank checkpoint: its shards mean something else
    auto d = emt_test::run_cli("train " + w.config + " finetune.lora.dropout=0 finetune.epochs=2 "
                               "finetune.batch_size=4 run.name=dp_pre --resume");
    CHECK(d.code == 2);
    CHECK_THAT(d.output, Catch::Contains("data_parallel.world_size: checkpoint has '2', this run has '1'"));
  }
}

TEST_CASE("dist: a two-rank study scores exactly what one process scores", "[e2e][dist][slow]") {
  const auto& w = tiny_world();
  const std::string grid = " study.finetune_datasets=[quad] study.methods=[lora] study.epochs=1 "
                           "eval.clip_baseline=true finetune.lora.dropout=0";
  auto one = emt_test::run_cli("study " + w.config + grid + " finetune.batch_size=8 run.name=dps_one");
  INFO(one.output);
  REQUIRE(one.code == 0);
  auto two = emt_test::run_cli("launch --nproc 2 -- emt study " + w.config + grid +
                               " finetune.batch_size=4 run.name=dps_two");
  INFO(two.output);
  REQUIRE(two.code == 0);
  const auto a = result_rows(w.dir + "/runs/dps_one"), b = result_rows(w.dir + "/runs/dps_two");
  REQUIRE(a.size() == b.size());
  int compared = 0;
  for (const auto& [key, v] : a) {
    INFO(key);
    REQUIRE(b.count(key) == 1);
    if (key.rfind("clip_zero_shot|", 0) == 0 || key.find("|base|") != std::string::npos) {
      CHECK(b.at(key) == v);  // the same model scored on sharded batches: identical counts
      ++compared;
    } else {
      CHECK(nlohmann::json::parse(b.at(key))["n"] == nlohmann::json::parse(v)["n"]);
    }
  }
  CHECK(compared >= 2);
  auto slurp = [](const std::string& p) {
    std::ifstream in(p);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  for (const char* ds : {"quad", "quad2"}) {
    const std::string pa = w.dir + "/runs/dps_one/predictions/base/" + ds + ".jsonl";
    const std::string pb = w.dir + "/runs/dps_two/predictions/base/" + ds + ".jsonl";
    REQUIRE(fs::exists(pb));
    CHECK(slurp(pa) == slurp(pb));  // every answer, in the one-process order
  }
  CHECK(fs::exists(w.dir + "/runs/dps_two/report/report.html"));
  auto ck = trainer_state(w.dir + "/runs/dps_two/cells/quad__lora__seed0/epoch_1");
  CHECK(ck["data_parallel"]["rank_fingerprints"][0] == ck["data_parallel"]["rank_fingerprints"][1]);
}

TEST_CASE("sweep: ranks_per_task runs each task data-parallel and needs a GPU per rank", "[sweep]") {
  const std::string dir = emt_test::scratch_dir("sweep_ranks");
  std::ofstream(dir + "/base.yaml") << "run: {name: x}\n";
  std::ofstream(dir + "/s.yaml") << "sweep: {name: dp, config: base.yaml, ranks_per_task: 2, grid: {run.seed: [0]}}\n"
                                 << "slurm: {gpus: 2}\n";
  auto s = emt::load_sweep(dir + "/s.yaml");
  const auto argv = emt::sweep_task_argv(s, s.tasks[0], "/x/emt");
  REQUIRE(argv.size() > 7);
  CHECK(std::vector<std::string>(argv.begin(), argv.begin() + 7) ==
        std::vector<std::string>{"/x/emt", "launch", "--nproc", "2", "--", "/x/emt", "study"});
  std::ofstream(dir + "/s.yaml") << "sweep: {name: dp, config: base.yaml, ranks_per_task: 4, grid: {run.seed: [0]}}\n"
                                 << "slurm: {gpus: 2}\n";
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] { emt::load_sweep(dir + "/s.yaml"); }),
             Catch::Contains("sweep.ranks_per_task is 4 but slurm.gpus is 2"));
  std::ofstream(dir + "/s.yaml") << "sweep: {name: dp, config: base.yaml, ranks_per_task: 0, grid: {run.seed: [0]}}\n";
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] { emt::load_sweep(dir + "/s.yaml"); }),
             Catch::Contains("sweep.ranks_per_task must be >= 1"));
}

// Hidden ([.slurm], scripts/slurm-test.sh): ranks started by srun find each other through SLURM_PROCID,
// SLURM_NTASKS and SLURM_LAUNCH_NODE_IPADDR alone.
TEST_CASE("slurm: srun starts data-parallel ranks that meet through Slurm's variables", "[.slurm]") {
  REQUIRE_THAT(shell("sinfo -h -o %t"), Catch::Contains("idle") || Catch::Contains("mix"));
  const auto& w = tiny_world();
  const std::string common = " finetune.lora.dropout=0 finetune.epochs=1 run.threads=1 run.log_level=info";
  auto one = emt_test::run_cli("train " + w.config + common + " finetune.batch_size=8 run.name=srun_one");
  INFO(one.output);
  REQUIRE(one.code == 0);
  const std::string script = w.dir + "/srun_dp.sbatch", out = w.dir + "/srun_dp.out";
  std::ofstream(script) << "#!/usr/bin/env bash\n#SBATCH --job-name=emt-srun-dp\n#SBATCH --ntasks=2\n"
                        << "#SBATCH --cpus-per-task=1\n#SBATCH --time=00:10:00\n#SBATCH --output=" << out << "\n"
                        << "unset MASTER_ADDR MASTER_PORT RANK WORLD_SIZE\n"
                        << "srun --kill-on-bad-exit=1 " << EMT_CLI << " train " << w.config << common
                        << " finetune.batch_size=4 run.name=srun_two\n";
  const std::string job = shell("sbatch --parsable " + script);
  INFO("sbatch: " << job);
  const std::string ck = w.dir + "/runs/srun_two/epoch_1";
  const bool done = wait_for([&] { return fs::exists(ck + "/trainer_state.json"); }, 240) &&
                    wait_for([&] { return read_text(out).find("trained 12 steps") != std::string::npos; }, 60);
  INFO(read_text(out) << shell("squeue"));
  REQUIRE(done);
  const auto log = read_text(out);
  CHECK_THAT(log, Catch::Contains("[dist] rank 0 of 2") && Catch::Contains("from Slurm variables"));
  auto st = trainer_state(ck);
  CHECK(st["data_parallel"]["world_size"] == 2);
  REQUIRE(st["data_parallel"]["rank_fingerprints"].size() == 2);
  CHECK(st["data_parallel"]["rank_fingerprints"][0] == st["data_parallel"]["rank_fingerprints"][1]);
  CHECK(max_trainable_diff(w.dir + "/runs/srun_one/epoch_1", ck) <= 1e-5);
}
