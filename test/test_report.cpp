// Report: tables parse with the expected numbers, PNGs decode at their fixed sizes, report.html inlines every
// image, split run directories combine to the same tables, and duplicates are handled.
#include <emt/core/error.h>
#include <emt/eval/metrics.h>
#include <emt/eval/report.h>

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <sstream>
#include <algorithm>
#include <cstdlib>
#include <cmath>
#include <map>
#include <tuple>

#include "test/helpers.h"

using emt_test::slurp;

namespace {

namespace fs = std::filesystem;

// 2 methods x 2 fine-tune datasets x 3 epochs x 3 eval datasets + base + CLIP rows. Accuracy (%):
// base mnist 90, cifar10 80, shapes 70; the fine-tuned dataset gains 2 per epoch; every other dataset loses
// 10 per epoch (linear) or 20 per epoch (lora). CLIP zero-shot: 95, 90, 85. Answer drift: the base names a class
// of every other dataset in 1 answer of 100; after epoch e, 5 * e (linear) or 10 * e (lora) answers of every other
// dataset name a class of the fine-tuned one, and 2 answers one of the third dataset.
std::vector<std::string> report_lines() {
  const std::vector<std::string> ev = {"mnist", "cifar10", "shapes"};
  const int base[3] = {90, 80, 70};
  auto line = [](const std::string& kind, const std::string& ft, const std::string& method, int epoch,
                 const std::string& eval, const std::string& scorer, int correct, int intrinsic, int extrinsic) {
    nlohmann::ordered_json j;
    j["kind"] = kind;
    j["finetune_dataset"] = ft;
    j["method"] = method;
    j["seed"] = 0;
    j["epoch"] = epoch;
    j["eval_dataset"] = eval;
    j["scorer"] = scorer;
    j["accuracy"] = correct / 100.0;
    j["n"] = 100;
    j["n_correct"] = correct;
    j["n_incorrect"] = 100 - correct - intrinsic - extrinsic;
    j["n_intrinsic"] = intrinsic;
    j["n_extrinsic"] = extrinsic;
    j["ci_low"] = 0.0;
    j["ci_high"] = 1.0;
    j["run"] = "hand";
    return j.dump();
  };
  std::vector<std::string> out;
  auto with_naming = [&](const std::string& l, const std::string& eval, const std::string& ft, int64_t to_ft) {
    auto j = nlohmann::ordered_json::parse(l);
    for (const auto& other : ev)
      if (other != eval) j["n_naming"][other] = ft.empty() ? 1 : (other == ft ? to_ft : 2);
    return j.dump();
  };
  for (int d = 0; d < 3; ++d)
    out.push_back(with_naming(line("mllm", "", "base", 0, ev[d], "strict", base[d], 2, 3), ev[d], "", 0));
  for (int d = 0; d < 3; ++d) out.push_back(line("clip_zero_shot", "", "clip", 0, ev[d], "clip_zero_shot", 95 - 5 * d, 0, 0));
  for (const std::string method : {"linear", "lora"})
    for (const std::string ft : {"mnist", "cifar10"})
      for (int e = 1; e <= 3; ++e)
        for (int d = 0; d < 3; ++d) {
          const int step = method == "lora" ? 20 : 10;
          const int acc = ev[d] == ft ? base[d] + 2 * e : base[d] - step * e;
          const int lost = 100 - acc;  // failures split: 1/2 extrinsic, 1/4 intrinsic, rest incorrect
          out.push_back(with_naming(line("mllm", ft, method, e, ev[d], "strict", acc, lost / 4, lost / 2), ev[d], ft,
                                    (method == "lora" ? 10 : 5) * e));
        }
  return out;
}

std::string write_run(const std::string& name, const std::vector<std::string>& lines) {
  std::string dir = emt_test::scratch_dir(name);
  std::ofstream f(dir + "/results.jsonl");
  for (const auto& l : lines) f << l << "\n";
  return dir;
}

std::vector<std::vector<std::string>> read_csv(const std::string& path) {
  std::vector<std::vector<std::string>> rows;
  std::istringstream is(slurp(path));
  std::string line;
  while (std::getline(is, line)) {
    std::vector<std::string> cells;
    std::string cell;
    std::istringstream ls(line);
    while (std::getline(ls, cell, ',')) cells.push_back(cell);
    if (!line.empty() && line.back() == ',') cells.push_back("");
    rows.push_back(cells);
  }
  return rows;
}

// The CSV row whose first cells equal `prefix`.
std::vector<std::string> find_row(const std::vector<std::vector<std::string>>& rows,
                                  const std::vector<std::string>& prefix) {
  for (const auto& r : rows)
    if (r.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), r.begin())) return r;
  return {};
}

}  // namespace

TEST_CASE("report writes tables with the expected values", "[report]") {
  std::string run = write_run("report-one", report_lines());
  std::string out = emt_test::scratch_dir("report-one-out");
  auto files = emt::write_report(emt::load_results({run}), {out, "strict", "test"});
  for (const char* f : {"accuracy.csv", "accuracy_matrix_linear.csv", "accuracy_matrix_lora.csv", "forgetting.csv",
                        "summary.csv", "encoder_gap.csv", "verdicts.csv", "report.json", "report.html"})
    CHECK(fs::exists(out + "/" + f));
  CHECK(files.tables.size() == 10);
  // 4 accuracy + 2 radar + 2 heatmap + 4 verdict + 2 learning-vs-forgetting + 2 answer-drift plots
  CHECK(files.plots.size() == 16);

  // answer drift: the share of another dataset's answers naming a class of the fine-tuned one, epoch 0 = base
  auto drift = read_csv(out + "/answer_drift.csv");
  CHECK(drift[0] == std::vector<std::string>{"method", "finetune_dataset", "epoch", "eval_dataset", "n",
                                              "naming_finetuned", "rate", "ci_low", "ci_high"});
  CHECK(drift.size() == 1 + 2 * 2 * 4 * 2);  // epochs 0..3 x the two other datasets of each cell
  auto dr = find_row(drift, {"lora", "mnist", "2", "shapes"});
  REQUIRE(dr.size() == 9);
  CHECK(dr[4] == "100");
  CHECK(dr[5] == "20");
  CHECK(std::stod(dr[6]) == Approx(0.20));
  auto [dlo, dhi] = emt::wilson_interval(20, 100);
  CHECK(std::stod(dr[7]) == Approx(dlo).margin(1e-6));
  CHECK(std::stod(dr[8]) == Approx(dhi).margin(1e-6));
  CHECK(find_row(drift, {"linear", "cifar10", "3", "mnist"})[5] == "15");
  CHECK(find_row(drift, {"linear", "cifar10", "0", "mnist"})[5] == "1");  // the base's own drift
  CHECK(find_row(drift, {"lora", "mnist", "1", "mnist"}).empty());       // never the fine-tuned dataset itself

  // learning vs forgetting: lora on mnist gained 6 points by epoch 3 and the other two datasets lost 60 each
  auto lvf = read_csv(out + "/learning_vs_forgetting.csv");
  auto t = find_row(lvf, {"lora", "mnist", "3"});
  REQUIRE(t.size() == 10);
  CHECK(std::stod(t[3]) == Approx(0.06));
  CHECK(std::stod(t[4]) < 0.06);
  CHECK(std::stod(t[5]) > 0.06);
  CHECK(std::stod(t[6]) == Approx(-0.60));
  CHECK(std::stod(t[7]) < -0.60);
  CHECK(std::stod(t[8]) > -0.60);
  CHECK(t[9] == "2");
  CHECK(lvf.size() == 1 + 2 * 2 * 3);  // epochs 1..3 of each cell

  auto acc = read_csv(out + "/accuracy.csv");
  CHECK(acc[0][0] == "method");
  CHECK(acc.size() == 1 + 2 * 2 * 4 * 3);  // epochs 0..3 for each cell
  auto r = find_row(acc, {"lora", "mnist", "3", "cifar10"});
  REQUIRE(r.size() == 10);
  CHECK(std::stod(r[4]) == Approx(0.20));  // 80 - 3 * 20
  CHECK(r[6] == "100");
  CHECK(r[7] == "20");
  CHECK(std::stod(find_row(acc, {"linear", "cifar10", "2", "cifar10"})[4]) == Approx(0.84));
  CHECK(std::stod(find_row(acc, {"linear", "cifar10", "0", "shapes"})[4]) == Approx(0.70));  // base as epoch 0

  auto wide = read_csv(out + "/accuracy_matrix_lora.csv");
  CHECK(wide[0] == std::vector<std::string>{"finetune_dataset", "epoch", "mnist", "cifar10", "shapes"});
  CHECK(std::stod(find_row(wide, {"cifar10", "3"})[2]) == Approx(0.30));  // mnist: 90 - 60

  auto sum = read_csv(out + "/summary.csv");
  auto s = find_row(sum, {"lora", "mnist"});
  REQUIRE(s.size() == 7);
  CHECK(s[2] == "3");
  CHECK(std::stod(s[3]) == Approx(0.60));  // both other datasets lost 60 points
  CHECK(std::stod(s[4]) == Approx(0.60));  // the max is the base
  CHECK(std::stod(s[5]) == Approx(0.40));  // epoch 1 - epoch 3 = 40 points
  CHECK(std::stod(s[6]) == Approx(0.06));  // plasticity: 3 epochs x 2
  CHECK(std::stod(find_row(sum, {"linear", "cifar10"})[3]) == Approx(0.30));

  auto fg = read_csv(out + "/forgetting.csv");
  CHECK(fg[0].back() == "base_minus_epoch_3");
  auto f = find_row(fg, {"linear", "mnist", "mnist"});
  CHECK(f[3] == "1");
  CHECK(std::stod(f[5]) == Approx(-0.06));

  auto gap = read_csv(out + "/encoder_gap.csv");
  CHECK(std::stod(find_row(gap, {"mnist"})[3]) == Approx(0.05));
  CHECK(std::stod(find_row(gap, {"total"})[3]) == Approx(0.05 + 0.10 + 0.15));

  auto ver = read_csv(out + "/verdicts.csv");
  auto v = find_row(ver, {"lora", "mnist", "3", "shapes"});  // acc 10: lost 90 -> 45 extr, 22 intr, 23 incorrect
  REQUIRE(v.size() == 13);
  CHECK(v[5] == "10");
  CHECK(v[6] == "23");
  CHECK(v[7] == "22");
  CHECK(v[8] == "45");
  CHECK(std::stod(v[12]) == Approx(0.45));

  auto j = nlohmann::json::parse(slurp(out + "/report.json"));
  CHECK(j["scorer"] == "strict");
  CHECK(j["methods"] == nlohmann::json({"linear", "lora"}));
  CHECK(j["eval_datasets"] == nlohmann::json({"mnist", "cifar10", "shapes"}));
  CHECK(j["epochs"] == 3);
  CHECK(j["encoder_gap"]["total"].get<double>() == Approx(0.30));
  CHECK(j["base"]["shapes"].get<double>() == Approx(0.70));
  bool found = false;
  for (const auto& s2 : j["summary"])
    if (s2["method"] == "lora" && s2["finetune_dataset"] == "cifar10") {
      found = true;
      CHECK(s2["avg_base_minus_last"].get<double>() == Approx(0.60));
      CHECK(s2["plasticity"].get<double>() == Approx(0.06));
    }
  CHECK(found);
  CHECK(j["accuracy"].size() == 48);
  CHECK(j["accuracy"][0]["per_seed"]["0"].is_number());
  REQUIRE(j["answer_drift"].size() == 32);
  CHECK(j["answer_drift"][0]["epoch"] == 0);
  CHECK(j["answer_drift"][0]["naming_finetuned"] == 1);

  CHECK(files.matrix.find("method lora") != std::string::npos);
  CHECK(files.matrix.find("clip zero-shot") != std::string::npos);
  CHECK(files.matrix.find("20.0") != std::string::npos);
}

TEST_CASE("report PNGs decode at their fixed sizes and are inlined in report.html", "[report]") {
  std::string run = write_run("report-png", report_lines());
  std::string out = emt_test::scratch_dir("report-png-out");
  auto files = emt::write_report(emt::load_results({run}), {out, "strict", "test"});
  const std::string html = slurp(files.html);
  CHECK(html.find("<table>") != std::string::npos);
  size_t uris = 0;
  for (size_t p = html.find("data:image/png;base64,"); p != std::string::npos;
       p = html.find("data:image/png;base64,", p + 1))
    ++uris;
  CHECK(uris == files.plots.size());
  for (const auto& p : files.plots) {
    cv::Mat img = cv::imread(p, cv::IMREAD_COLOR);
    INFO(p);
    REQUIRE_FALSE(img.empty());
    const bool radar = fs::path(p).filename().string().rfind("radar_", 0) == 0;
    CHECK(img.cols == (radar ? emt::kRadarSize : emt::kPlotWidth));
    CHECK(img.rows == (radar ? emt::kRadarSize : emt::kPlotHeight));
    // Not blank: a plot has many non-white pixels.
    cv::Mat gray;
    cv::cvtColor(img, gray, cv::COLOR_BGR2GRAY);
    CHECK(cv::countNonZero(gray < 250) > 2000);
    CHECK(html.find(emt::base64_encode(slurp(p))) != std::string::npos);
  }
  for (const char* name : {"plots/accuracy_lora_mnist.png", "plots/radar_linear.png", "plots/heatmap_lora.png",
                           "plots/verdicts_linear_cifar10.png"})
    CHECK(fs::exists(out + "/" + name));
  // Every figure also as SVG and PDF, beside its PNG, linked from the HTML.
  REQUIRE(files.vector_plots.size() == 2 * files.plots.size());
  for (const auto& png : files.plots) {
    INFO(png);
    const fs::path stem = fs::path(png).replace_extension();
    const std::string svg = slurp(stem.string() + ".svg"), pdf = slurp(stem.string() + ".pdf");
    CHECK(svg.find("<svg") != std::string::npos);
    CHECK(svg.find("</svg>") != std::string::npos);
    CHECK(svg.find("width=\"" + std::to_string(fs::path(png).filename().string().rfind("radar_", 0) == 0
                                                    ? emt::kRadarSize : emt::kPlotWidth)) != std::string::npos);
    CHECK(pdf.rfind("%PDF-", 0) == 0);
    CHECK(pdf.find("%%EOF") != std::string::npos);
    const std::string rel = "plots/" + stem.filename().string();
    CHECK(html.find("href=\"" + rel + ".svg\"") != std::string::npos);
    CHECK(html.find("href=\"" + rel + ".pdf\"") != std::string::npos);
  }
}

TEST_CASE("base64 encoding matches RFC 4648 vectors", "[report]") {
  CHECK(emt::base64_encode("") == "");
  CHECK(emt::base64_encode("f") == "Zg==");
  CHECK(emt::base64_encode("fo") == "Zm8=");
  CHECK(emt::base64_encode("foo") == "Zm9v");
  CHECK(emt::base64_encode("foobar") == "Zm9vYmFy");
  CHECK(emt::base64_encode(std::string("\xff\x00\x10", 3)) == "/wAQ");
}

TEST_CASE("combining split run directories gives the same tables; duplicates are replaced", "[report]") {
  auto lines = report_lines();
  std::vector<std::string> a(lines.begin(), lines.begin() + lines.size() / 2),
      b(lines.begin() + lines.size() / 2, lines.end());
  std::string one = write_run("report-all", lines), h1 = write_run("report-h1", a), h2 = write_run("report-h2", b);
  std::string o1 = emt_test::scratch_dir("report-all-out"), o2 = emt_test::scratch_dir("report-split-out");
  emt::write_report(emt::load_results({one}), {o1, "strict", "t"});
  emt::write_report(emt::load_results({h1, h2}), {o2, "strict", "t"});
  for (const char* f : {"accuracy.csv", "accuracy_matrix_lora.csv", "forgetting.csv", "summary.csv",
                        "encoder_gap.csv", "verdicts.csv"})
    CHECK(slurp(o1 + "/" + f) == slurp(o2 + "/" + f));
  auto j1 = nlohmann::json::parse(slurp(o1 + "/report.json")), j2 = nlohmann::json::parse(slurp(o2 + "/report.json"));
  j1.erase("runs");
  j2.erase("runs");
  CHECK(j1 == j2);

  // A third task re-ran one cell: its row replaces the earlier one, and the report says so.
  auto redo = nlohmann::json::parse(lines[6]);  // linear/mnist epoch 1 on mnist
  REQUIRE(redo["method"] == "linear");
  redo["accuracy"] = 0.5;
  redo["n_correct"] = 50;
  redo["n_incorrect"] = 50 - redo["n_intrinsic"].get<int>() - redo["n_extrinsic"].get<int>();
  std::string h3 = write_run("report-h3", {redo.dump()});
  auto loaded = emt::load_results({h1, h2, h3});
  CHECK(loaded.duplicates == 1);
  std::string o3 = emt_test::scratch_dir("report-dup-out");
  emt::write_report(loaded, {o3, "strict", "t"});
  auto acc = read_csv(o3 + "/accuracy.csv");
  CHECK(std::stod(find_row(acc, {"linear", "mnist", "1", "mnist"})[4]) == Approx(0.50));
  CHECK(nlohmann::json::parse(slurp(o3 + "/report.json"))["duplicates"] == 1);
}

TEST_CASE("format_matrix prints base, epochs and CLIP rows", "[report]") {
  std::vector<emt::ResultRow> rows;
  for (const auto& l : report_lines()) rows.push_back(emt::parse_result_line(l, "mem"));
  std::string m = emt::format_matrix(rows, "strict");
  CHECK(m.find("accuracy (%), strict scorer") != std::string::npos);
  CHECK(m.find("method linear") < m.find("method lora"));
  CHECK(m.find("cifar10 e3") != std::string::npos);
  CHECK(m.find("90.0") != std::string::npos);
  CHECK_THROWS_AS(emt::format_matrix(rows, "judge"), emt::Error);
}

TEST_CASE("emt report CLI combines runs and reports errors with exit codes", "[report]") {
  auto lines = report_lines();
  std::string h1 = write_run("report-cli-h1", std::vector<std::string>(lines.begin(), lines.begin() + 20));
  std::string h2 = write_run("report-cli-h2", std::vector<std::string>(lines.begin() + 20, lines.end()));
  std::string out = emt_test::scratch_dir("report-cli-out");
  auto r = emt_test::run_cli("report " + h1 + " " + h2 + " --out " + out);
  INFO(r.output);
  CHECK(r.code == 0);
  CHECK(r.output.find("report: " + out + "/report.html") != std::string::npos);
  CHECK(r.output.find("method lora") != std::string::npos);
  CHECK(fs::exists(out + "/plots/radar_lora.png"));
  CHECK(emt_test::run_cli("report " + h1 + " --out " + out + " --scorer judge").code == 1);
  CHECK(emt_test::run_cli("report " + h1 + "/missing --out " + out).code == 1);
  CHECK(emt_test::run_cli("report " + h1).code == 2);  // --out is required
  std::string bad = write_run("report-cli-bad", {R"({"kind":"mllm"})"});
  auto rb = emt_test::run_cli("report " + bad + " --out " + out);
  CHECK(rb.code == 1);
  CHECK(rb.output.find("results.jsonl:1") != std::string::npos);
}

namespace {
// Centroid (x, y) of the pixels of one colour (BGR, exact) inside [0, x_max) of a decoded plot; count in .z.
cv::Point3d colour_centroid(const cv::Mat& img, const cv::Vec3b& colour, int x_max) {
  double sx = 0, sy = 0, n = 0;
  for (int y = 0; y < img.rows; ++y)
    for (int x = 0; x < x_max; ++x)
      if (img.at<cv::Vec3b>(y, x) == colour) sx += x, sy += y, n += 1;
  return {n ? sx / n : -1, n ? sy / n : -1, n};
}
}  // namespace

TEST_CASE("the accuracy plot puts each point at its accuracy", "[report]") {
  // One eval dataset, base and one epoch: two filled markers of the first palette colour. Their centres must sit
  // on a linear 0..100 % scale (found from three renders) and the higher accuracy higher up the image.
  auto row = [](const std::string& method, int64_t epoch, double acc) {
    emt::ResultRow r;
    r.method = method;
    r.finetune_dataset = method == "base" ? "" : "d";
    r.epoch = epoch;
    r.eval_dataset = "d";
    r.n = 100;
    r.n_correct = static_cast<int64_t>(std::lround(100 * acc));
    r.n_incorrect = r.n - r.n_correct;
    r.accuracy = acc;
    return r;
  };
  auto render = [&](double base, double epoch1) {
    emt::ResultRow b = row("base", 0, base), e = row("lora", 1, epoch1);
    auto R = emt::accuracy_tensor({b, e}, "strict");
    auto png = emt::plot_accuracy(R, 0, 0);
    return cv::imdecode(std::vector<uchar>(png.begin(), png.end()), cv::IMREAD_COLOR);
  };
  // the marker colour: the most frequent non-grey colour left of the legend in a plot with one series
  auto probe = render(0.5, 0.5);
  std::map<std::tuple<int, int, int>, int> freq;
  for (int y = 0; y < probe.rows; ++y)
    for (int x = 0; x < emt::kPlotWidth - 220; ++x) {
      auto p = probe.at<cv::Vec3b>(y, x);
      if (p[0] == p[1] && p[1] == p[2]) continue;  // white, black, grey grid and axes
      ++freq[{p[0], p[1], p[2]}];
    }
  REQUIRE_FALSE(freq.empty());
  auto best = std::max_element(freq.begin(), freq.end(), [](auto& a, auto& b) { return a.second < b.second; });
  const cv::Vec3b colour(std::get<0>(best->first), std::get<1>(best->first), std::get<2>(best->first));
  // With both points at one accuracy the series is a horizontal line through two markers, all centred on the
  // accuracy's y: the colour's centroid is that y.
  auto y_of = [&](double a) {
    auto img = render(a, a);
    auto c = colour_centroid(img, colour, emt::kPlotWidth - 220);
    REQUIRE(c.z > 100);
    return c.y;
  };
  const double y0 = y_of(0.0), y25 = y_of(0.25), y75 = y_of(0.75), y100 = y_of(1.0);
  INFO("y(0%) " << y0 << ", y(25%) " << y25 << ", y(75%) " << y75 << ", y(100%) " << y100);
  CHECK(y100 < y0 - 200);                               // 100 % far above 0 % (the plot area is 390 px high)
  CHECK(std::abs(y25 - (y0 + 0.25 * (y100 - y0))) <= 1.5);  // 25 % a quarter of the way up
  CHECK(std::abs(y75 - (y0 + 0.75 * (y100 - y0))) <= 1.5);  // 75 % three quarters
}

namespace {
// A report file as the golden holds it: the run directory (a scratch path) as <run>, and each inlined PNG as
// its length (the pixels are the plot tests' business; their bytes follow the PNG encoder's version).
std::string golden_form(std::string text, const std::string& run_dir) {
  for (size_t p; (p = text.find(run_dir)) != std::string::npos;) text.replace(p, run_dir.size(), "<run>");
  const std::string tag = "data:image/png;base64,";
  for (size_t p = text.find(tag); p != std::string::npos; p = text.find(tag, p + 1)) {
    size_t b = p + tag.size(), e = text.find('"', b);
    text.replace(b, e - b, "<" + std::to_string(e - b) + " base64 chars>");
  }
  return text;
}
}  // namespace

TEST_CASE("report output equals the golden files byte for byte", "[report]") {
  // The golden files in test/fixtures/report were written by this code and equal, file for file, what the
  // report wrote before its writer was split into steps. EMT_UPDATE_GOLDEN=1 rewrites them.
  std::string run = write_run("report-golden", report_lines());
  std::string out = emt_test::scratch_dir("report-golden-out");
  emt::write_report(emt::load_results({run}), {out, "strict", "golden"});
  const std::string golden = std::string(EMT_SOURCE_DIR) + "/test/fixtures/report/";
  const bool update = std::getenv("EMT_UPDATE_GOLDEN") && std::string(std::getenv("EMT_UPDATE_GOLDEN")) == "1";
  for (const char* f : {"accuracy.csv", "accuracy_matrix_linear.csv", "accuracy_matrix_lora.csv", "forgetting.csv",
                        "summary.csv", "encoder_gap.csv", "verdicts.csv", "report.json", "report.html",
                        "learning_vs_forgetting.csv", "answer_drift.csv"}) {
    INFO(f);
    const std::string got = golden_form(slurp(out + "/" + f), run);
    if (update) {
      fs::create_directories(golden);
      std::ofstream(golden + f, std::ios::binary) << got;
    }
    REQUIRE(fs::exists(golden + f));
    CHECK(got == slurp(golden + f));
  }
}

TEST_CASE("report: the interval of a difference of two proportions is Newcombe's hybrid score interval", "[report]") {
  // Newcombe (1998), method 10, example (a): 56/70 - 48/80 = 0.2000, 95% CI 0.0524 to 0.3339
  const auto d = emt::difference_interval(56, 70, 48, 80);
  CHECK(d[0] == Approx(0.2));
  CHECK(d[1] == Approx(0.0524).margin(5e-4));
  CHECK(d[2] == Approx(0.3339).margin(5e-4));
  CHECK(std::isnan(emt::difference_interval(1, 0, 1, 2)[0]));
}
