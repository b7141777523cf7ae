// Metrics on a hand-written results matrix: every expected number below was computed by hand from the table.
#include <emt/core/error.h>
#include <emt/eval/metrics.h>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>
#include <fstream>

#include "test/helpers.h"

namespace {

emt::ResultRow row(const std::string& ft, const std::string& method, int64_t seed, int64_t epoch,
                   const std::string& eval, int64_t correct, int64_t intrinsic = 0, int64_t extrinsic = 0) {
  emt::ResultRow r;
  r.finetune_dataset = ft;
  r.method = method;
  r.seed = seed;
  r.epoch = epoch;
  r.eval_dataset = eval;
  r.n = 100;
  r.n_correct = correct;
  r.n_intrinsic = intrinsic;
  r.n_extrinsic = extrinsic;
  r.n_incorrect = 100 - correct - intrinsic - extrinsic;
  r.accuracy = correct / 100.0;
  return r;
}
emt::ResultRow clip_row(const std::string& eval, int64_t correct) {
  emt::ResultRow r = row("", "clip", 0, 0, eval, correct);
  r.kind = "clip_zero_shot";
  r.scorer = "clip_zero_shot";
  return r;
}

// Accuracy (%) by hand:
//              mnist cifar10 shapes
// base           90     80     70      clip: 95 97 90
// lora/mnist s0  e1: 95 85 60   e2: 97 50 40   e3: 99 30 20
// lora/mnist s1  e1: 93 83 62   e2: 97 52 38   e3: 97 34 24
// lora/cifar10 s0 e1: 70 90 72  e2: 50 95 60
std::vector<emt::ResultRow> hand_rows() {
  std::vector<emt::ResultRow> v = {row("", "base", 0, 0, "mnist", 90), row("", "base", 0, 0, "cifar10", 80),
                                   row("", "base", 0, 0, "shapes", 70)};
  const int s0[3][3] = {{95, 85, 60}, {97, 50, 40}, {99, 30, 20}};
  const int s1[3][3] = {{93, 83, 62}, {97, 52, 38}, {97, 34, 24}};
  const char* ev[3] = {"mnist", "cifar10", "shapes"};
  for (int e = 0; e < 3; ++e)
    for (int d = 0; d < 3; ++d) {
      if (e == 2 && d == 1) {
        v.push_back(row("mnist", "lora", 0, 3, ev[d], 30, 20, 40));
        v.push_back(row("mnist", "lora", 1, 3, ev[d], 34, 20, 40));
      } else {
        v.push_back(row("mnist", "lora", 0, e + 1, ev[d], s0[e][d]));
        v.push_back(row("mnist", "lora", 1, e + 1, ev[d], s1[e][d]));
      }
    }
  const int c[2][3] = {{70, 90, 72}, {50, 95, 60}};
  for (int e = 0; e < 2; ++e)
    for (int d = 0; d < 3; ++d) v.push_back(row("cifar10", "lora", 0, e + 1, ev[d], c[e][d]));
  v.push_back(clip_row("mnist", 95));
  v.push_back(clip_row("cifar10", 97));
  v.push_back(clip_row("shapes", 90));
  return v;
}

constexpr double kEps = 1e-12;

}  // namespace

TEST_CASE("wilson_interval matches hand values and identities", "[metrics]") {
  auto [lo, hi] = emt::wilson_interval(8, 10);
  CHECK(lo == Approx(0.49016247153664183).margin(1e-12));
  CHECK(hi == Approx(0.9433178485456247).margin(1e-12));
  auto [lo2, hi2] = emt::wilson_interval(415, 500);
  CHECK(lo2 == Approx(0.7945883013993367).margin(1e-12));
  CHECK(hi2 == Approx(0.8603796338960388).margin(1e-12));
  CHECK(emt::wilson_interval(0, 10).first == 0.0);
  CHECK(emt::wilson_interval(0, 10).second == Approx(0.2775327998628892).margin(1e-12));
  CHECK(emt::wilson_interval(10, 10).second == Approx(1.0).margin(1e-12));
  // Symmetry: lo(k, n) = 1 - hi(n - k, n).
  CHECK(emt::wilson_interval(3, 17).first == Approx(1.0 - emt::wilson_interval(14, 17).second).margin(1e-12));
  CHECK(emt::wilson_interval(0, 0) == std::pair<double, double>{0.0, 1.0});
  CHECK_THROWS_AS(emt::wilson_interval(11, 10), emt::Error);
  CHECK_THROWS_AS(emt::wilson_interval(-1, 10), emt::Error);
}

TEST_CASE("accuracy tensor on a hand-written matrix", "[metrics]") {
  auto R = emt::accuracy_tensor(hand_rows(), "strict");
  CHECK(R.methods == std::vector<std::string>{"lora"});
  CHECK(R.finetune_datasets == std::vector<std::string>{"mnist", "cifar10"});
  CHECK(R.eval_datasets == std::vector<std::string>{"mnist", "cifar10", "shapes"});
  CHECK(R.seeds == std::vector<int64_t>{0, 1});
  CHECK(R.epochs == 3);
  CHECK(R.mean.sizes().vec() == std::vector<int64_t>{1, 2, 4, 3});
  CHECK(R.per_seed.sizes().vec() == std::vector<int64_t>{1, 2, 4, 3, 2});
  // Base fills epoch 0 of every cell.
  CHECK(R.at(0, 0, 0, 0) == Approx(0.90).margin(kEps));
  CHECK(R.at(0, 1, 0, 2) == Approx(0.70).margin(kEps));
  // Seed means.
  CHECK(R.at(0, 0, 1, 0) == Approx(0.94).margin(kEps));
  CHECK(R.at(0, 0, 2, 1) == Approx(0.51).margin(kEps));
  CHECK(R.at(0, 0, 3, 2) == Approx(0.22).margin(kEps));
  CHECK(R.per_seed.index({0, 0, 3, 2, 1}).item<double>() == Approx(0.24).margin(kEps));
  // The cifar10 cell has only seed 0 and two epochs.
  CHECK(R.at(0, 1, 2, 1) == Approx(0.95).margin(kEps));
  CHECK(std::isnan(R.per_seed.index({0, 1, 1, 0, 1}).item<double>()));
  CHECK(std::isnan(R.at(0, 1, 3, 0)));
  CHECK(R.last_epoch(0, 0) == 3);
  CHECK(R.last_epoch(0, 1) == 2);
  CHECK(R.base == std::vector<double>{0.90, 0.80, 0.70});
  CHECK(R.clip[1] == Approx(0.97));
  CHECK(R.method_index("lora") == 0);
  CHECK(R.method_index("linear") == -1);
  CHECK(R.eval_index("shapes") == 2);
  CHECK(std::isnan(R.at(5, 0, 0, 0)));
  CHECK_THROWS_AS(emt::accuracy_tensor(hand_rows(), "judge"), emt::Error);
}

TEST_CASE("forgetting under each named definition, averages and plasticity", "[metrics]") {
  auto R = emt::accuracy_tensor(hand_rows(), "strict");
  auto F = emt::forgetting(R);
  CHECK(emt::forgetting_definitions() ==
        std::vector<std::string>{"base_minus_last", "max_minus_last", "first_minus_last"});
  auto bme = F.base_minus_epoch.accessor<double, 4>();
  // lora/mnist: base - epoch e.
  CHECK(bme[0][0][0][1] == Approx(0.0).margin(kEps));
  CHECK(bme[0][0][1][0] == Approx(-0.04).margin(kEps));
  CHECK(bme[0][0][1][2] == Approx(0.09).margin(kEps));
  CHECK(bme[0][0][3][1] == Approx(0.48).margin(kEps));
  auto bl = F.base_minus_last.accessor<double, 3>();
  auto ml = F.max_minus_last.accessor<double, 3>();
  auto fl = F.first_minus_last.accessor<double, 3>();
  // mnist cell (last = 3): base-last -0.08, 0.48, 0.48; max-last 0, 0.52, 0.48; first-last -0.04, 0.52, 0.39.
  CHECK(bl[0][0][0] == Approx(-0.08).margin(kEps));
  CHECK(bl[0][0][1] == Approx(0.48).margin(kEps));
  CHECK(bl[0][0][2] == Approx(0.48).margin(kEps));
  CHECK(ml[0][0][0] == Approx(0.0).margin(kEps));
  CHECK(ml[0][0][1] == Approx(0.52).margin(kEps));
  CHECK(ml[0][0][2] == Approx(0.48).margin(kEps));
  CHECK(fl[0][0][0] == Approx(-0.04).margin(kEps));
  CHECK(fl[0][0][1] == Approx(0.52).margin(kEps));
  CHECK(fl[0][0][2] == Approx(0.39).margin(kEps));
  // cifar10 cell (last = 2): base-last 0.40, -0.15, 0.10; max-last 0.40, 0, 0.12; first-last 0.20, -0.05, 0.12.
  CHECK(bl[0][1][0] == Approx(0.40).margin(kEps));
  CHECK(bl[0][1][1] == Approx(-0.15).margin(kEps));
  CHECK(ml[0][1][2] == Approx(0.12).margin(kEps));
  CHECK(fl[0][1][1] == Approx(-0.05).margin(kEps));
  // Averages exclude the fine-tuned dataset.
  auto avg = [&](const char* name, int f) { return F.average.at(name).accessor<double, 2>()[0][f]; };
  CHECK(avg("base_minus_last", 0) == Approx(0.48).margin(kEps));
  CHECK(avg("max_minus_last", 0) == Approx(0.50).margin(kEps));
  CHECK(avg("first_minus_last", 0) == Approx(0.455).margin(kEps));
  CHECK(avg("base_minus_last", 1) == Approx(0.25).margin(kEps));
  CHECK(avg("max_minus_last", 1) == Approx(0.26).margin(kEps));
  CHECK(avg("first_minus_last", 1) == Approx(0.16).margin(kEps));
  auto pl = F.plasticity.accessor<double, 2>();
  CHECK(pl[0][0] == Approx(0.08).margin(kEps));
  CHECK(pl[0][1] == Approx(0.15).margin(kEps));
  CHECK(F.last_epoch.accessor<int64_t, 2>()[0][1] == 2);
}

TEST_CASE("encoder gap and verdict rates", "[metrics]") {
  auto R = emt::accuracy_tensor(hand_rows(), "strict");
  auto g = emt::encoder_gap(R);
  CHECK(g.gap[0] == Approx(0.05).margin(kEps));
  CHECK(g.gap[1] == Approx(0.17).margin(kEps));
  CHECK(g.gap[2] == Approx(0.20).margin(kEps));
  CHECK(g.total == Approx(0.42).margin(kEps));
  CHECK(g.summed == 3);
  // lora/mnist epoch 3 on cifar10, pooled over both seeds: n 200, correct 64, incorrect 16, intrinsic 40, extr 80.
  auto c = R.counts.accessor<int64_t, 5>();
  CHECK(c[0][0][3][1][0] == 200);
  CHECK(c[0][0][3][1][2] == 16);
  const torch::Tensor rate_t = emt::verdict_rates(R);
  auto rates = rate_t.accessor<double, 5>();
  CHECK(rates[0][0][3][1][0] == Approx(0.32).margin(kEps));
  CHECK(rates[0][0][3][1][1] == Approx(0.08).margin(kEps));
  CHECK(rates[0][0][3][1][2] == Approx(0.20).margin(kEps));
  CHECK(rates[0][0][3][1][3] == Approx(0.40).margin(kEps));
  // Epoch 0 counts come from the base model; missing cells are NaN.
  CHECK(c[0][1][0][0][1] == 90);
  CHECK(std::isnan(rates[0][1][3][0][0]));
}

TEST_CASE("a cell's own epoch-0 row wins over the base row", "[metrics]") {
  auto rows = hand_rows();
  rows.push_back(row("cifar10", "lora", 0, 0, "mnist", 88));
  auto R = emt::accuracy_tensor(rows, "strict");
  CHECK(R.at(0, 1, 0, 0) == Approx(0.88).margin(kEps));
  CHECK(R.at(0, 0, 0, 0) == Approx(0.90).margin(kEps));
}

TEST_CASE("results rows: parse, validate, round-trip, combine duplicates", "[metrics]") {
  auto r = row("mnist", "lora", 1, 2, "cifar10", 42, 3, 4);
  r.ci_low = 0.3;
  r.ci_high = 0.5;
  r.run = "task-7";
  auto back = emt::parse_result_line(emt::result_to_json_line(r), "x:1");
  CHECK(back.key() == r.key());
  CHECK(back.accuracy == r.accuracy);
  CHECK(back.n_extrinsic == 4);
  CHECK(back.ci_high == 0.5);
  CHECK(back.run == "task-7");
  CHECK(back.source == "x:1");

  const std::string good =
      R"({"kind":"mllm","finetune_dataset":"mnist","method":"lora","seed":0,"epoch":1,"eval_dataset":"c","scorer":"strict","accuracy":0.5,"n":10,"n_correct":5,"n_incorrect":5,"n_intrinsic":0,"n_extrinsic":0})";
  auto g = emt::parse_result_line(good, "f:3");
  CHECK(g.ci_low == Approx(emt::wilson_interval(5, 10).first));  // missing interval computed
  auto bad = [&](const std::string& from, const std::string& to) {
    std::string s = good;
    s.replace(s.find(from), from.size(), to);
    return s;
  };
  CHECK_THROWS_AS(emt::parse_result_line("{not json", "f:1"), emt::FormatError);
  CHECK_THROWS_AS(emt::parse_result_line("[1,2]", "f:1"), emt::FormatError);
  CHECK_THROWS_AS(emt::parse_result_line(bad("\"n\":10,", ""), "f:1"), emt::FormatError);
  CHECK_THROWS_AS(emt::parse_result_line(bad("\"seed\":0", "\"seed\":\"0\""), "f:1"), emt::FormatError);
  CHECK_THROWS_AS(emt::parse_result_line(bad("\"accuracy\":0.5", "\"accuracy\":1.5"), "f:1"), emt::FormatError);
  CHECK_THROWS_AS(emt::parse_result_line(bad("\"n_correct\":5", "\"n_correct\":-1"), "f:1"), emt::FormatError);
  CHECK_THROWS_AS(emt::parse_result_line(bad("\"n_correct\":5", "\"n_correct\":6"), "f:1"), emt::FormatError);
  CHECK_THROWS_AS(emt::parse_result_line(bad("\"epoch\":1", "\"epoch\":-1"), "f:1"), emt::FormatError);
  CHECK_THROWS_AS(emt::parse_result_line(bad("\"kind\":\"mllm\"", "\"kind\":\"vlm\""), "f:1"), emt::FormatError);
  CHECK_THROWS_AS(emt::parse_result_line(bad("\"eval_dataset\":\"c\"", "\"eval_dataset\":\"\""), "f:1"),
                  emt::FormatError);
  CHECK_THROWS_AS(emt::parse_result_line(bad("\"finetune_dataset\":\"mnist\"", "\"finetune_dataset\":\"\""), "f:1"),
                  emt::FormatError);
  try {
    emt::parse_result_line(bad("\"n\":10,", ""), "results.jsonl:12");
  } catch (const emt::FormatError& e) {
    CHECK_THAT(e.what(), Catch::Contains("results.jsonl:12") && Catch::Contains("'n'"));
  }

  auto a = row("mnist", "lora", 0, 1, "c", 40), b = row("mnist", "lora", 0, 1, "c", 60);
  auto other = row("mnist", "lora", 1, 1, "c", 10);
  auto combined = emt::combine_rows({a, other, b});
  CHECK(combined.rows.size() == 2);
  CHECK(combined.duplicates == 1);
  CHECK(combined.rows[0].accuracy == Approx(0.60));  // the later row replaced the earlier one, in place
  CHECK(combined.duplicate_keys.size() == 1);
}

TEST_CASE("load_results reads run directories in order", "[metrics]") {
  std::string d1 = emt_test::scratch_dir("metrics-run1"), d2 = emt_test::scratch_dir("metrics-run2");
  auto rows = hand_rows();
  {
    std::ofstream f1(d1 + "/results.jsonl"), f2(d2 + "/results.jsonl");
    for (size_t i = 0; i < rows.size(); ++i) (i % 2 ? f2 : f1) << emt::result_to_json_line(rows[i]) << "\n\n";
    auto changed = rows[0];
    changed.accuracy = 0.5;
    changed.n_correct = 50;
    changed.n_incorrect = 50;
    f2 << emt::result_to_json_line(changed) << "\n";  // replaces the base mnist row from run 1
  }
  auto loaded = emt::load_results({d1, d2});
  CHECK(loaded.rows.size() == rows.size());
  CHECK(loaded.duplicates == 1);
  auto R = emt::accuracy_tensor(loaded.rows, "strict");
  CHECK(R.base[0] == Approx(0.5));
  CHECK(loaded.rows[0].source.find("metrics-run2/results.jsonl") != std::string::npos);
  CHECK_THROWS_AS(emt::load_results({d1 + "/missing"}), emt::IoError);
  CHECK_THROWS_AS(emt::load_results({}), emt::ConfigError);
}

TEST_CASE("cell names round-trip", "[metrics]") {
  CHECK(emt::cell_name("fashion-mnist", "lora", 3) == "fashion-mnist__lora__seed3");
  CHECK(emt::cell_name("", "base", 0) == "base");
  auto c = emt::parse_cell_name("fashion-mnist__lora__seed3");
  CHECK(c.finetune_dataset == "fashion-mnist");
  CHECK(c.method == "lora");
  CHECK(c.seed == 3);
  CHECK(emt::parse_cell_name("base").method == "base");
  for (const char* bad : {"", "mnist", "mnist__lora", "mnist__lora__3", "__lora__seed0", "mnist____seed0",
                          "mnist__lora__seed", "mnist__lora__seedX"})
    CHECK_THROWS_AS(emt::parse_cell_name(bad), emt::FormatError);
}
