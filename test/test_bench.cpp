// `emt bench train`: both sides really run (emt's Trainer and the PyTorch reference over its pipe protocol) and
// every row carries figures; a broken reference is an error that names it. Speed itself is never asserted here.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "helpers.h"

namespace {

const std::string kBench = std::string("bench train --model ") + EMT_SOURCE_DIR + "/configs/models/tiny.yaml --script " +
                           EMT_SOURCE_DIR + "/scripts/bench/train_ref.py --batch 4 --text-tokens 12 --warmup 1 "
                           "--rounds 2 --steps 1 --threads 1";

}  // namespace

TEST_CASE("bench: the train step table has an emt row and a reference row per method, with figures", "[bench]") {
  auto r = emt_test::run_cli(kBench + " --methods linear,lora --python /usr/bin/python3");
  INFO(r.output);
  REQUIRE(r.code == 0);
  for (const std::string m : {"linear", "lora"}) {
    std::smatch e, p;
    const std::string out = r.output;
    REQUIRE(std::regex_search(out, e, std::regex(m + R"( +emt \(LibTorch [0-9.]+\) +([0-9.]+) +([0-9.]+) +([0-9]+))")));
    CHECK(std::stod(e[1]) > 0.0);
    CHECK(std::stod(e[3]) > 0.0);
    REQUIRE(std::regex_search(out, p, std::regex(m + R"( +python torch 1\.13[^ ]* +([0-9.]+) .* ([0-9]+) +([0-9.]+)x \(([0-9.]+)\))")));
    CHECK(std::stod(p[1]) > 0.0);
    CHECK(std::stod(p[2]) > 50.0);  // the reference's own peak RSS: a Python process with torch loaded
    CHECK(std::stod(p[3]) > 0.0);
  }
  CHECK(r.output.find("matmul peak") != std::string::npos);
}

TEST_CASE("bench: train's MFU follows --peak-tflops; 4N MFU and peak memory are printed; bf16 runs", "[bench]") {
  // A 1 GFLOP/s peak: MFU in percent is then 100 x the achieved GFLOP/s.
  auto r = emt_test::run_cli(kBench + " --methods lora --no-reference --peak-tflops 0.001 run.dtype=bf16 "
                                      "finetune.precision=bf16");
  INFO(r.output);
  REQUIRE(r.code == 0);
  std::smatch m;
  const std::string out = r.output;
  REQUIRE(std::regex_search(out, m, std::regex(R"(lora +emt \(LibTorch [0-9.]+\) +([0-9.]+) +([0-9.]+) +([0-9]+) +)"
                                               R"(([0-9.]+) +([0-9.]+)% +([0-9.]+)% +([0-9]+))")));
  const double gflops = std::stod(m[4]), mfu = std::stod(m[5]), mfu_4n = std::stod(m[6]), mib = std::stod(m[7]);
  CHECK(mfu == Approx(100.0 * gflops).epsilon(0.02).margin(0.2));
  CHECK(mfu_4n > 0.0);
  // The model's FLOP count holds the decoder's forward and input gradients (4N per token) and more besides.
  CHECK(mfu >= mfu_4n - 0.1);
  CHECK(mib > 0.0);
  CHECK(out.find("frozen weights bf16, precision bf16") != std::string::npos);
  CHECK(out.find("the given 0.001 TFLOP/s") != std::string::npos);
  r = emt_test::run_cli(kBench + " --methods lora --no-reference --device cuda:99");
  CHECK(r.code != 0);
}

TEST_CASE("bench: train --profile lists the ops by self time and writes a Chrome trace per method", "[bench]") {
  const std::string dir = emt_test::scratch_dir("bench-profile");
  auto r = emt_test::run_cli(kBench + " --methods linear --no-reference --profile " + dir + " --profile-top 8");
  INFO(r.output);
  REQUIRE(r.code == 0);
  const std::string out = r.output;
  std::smatch head;
  REQUIRE(std::regex_search(out, head, std::regex(R"(profile of linear \(1 steps .*: ([0-9.]+) ms per step in ops, ([0-9.]+) ms per step wall)")));
  const double in_ops = std::stod(head[1]), wall = std::stod(head[2]);
  CHECK(in_ops > 0.0);
  CHECK(in_ops <= wall * 1.05);  // self times do not count nested time twice
  // The rows: op, ms per step, share; the shares of the listed ops add up to at most 100%, largest first.
  std::regex row(R"(\n(aten::[a-z_0-9]+) +([0-9.]+) +([0-9.]+)% +([0-9.]+))");
  double shares = 0.0, last = 1e30;
  int rows = 0;
  bool mm = false;
  for (auto it = std::sregex_iterator(out.begin(), out.end(), row); it != std::sregex_iterator(); ++it) {
    const double ms = std::stod((*it)[2]);
    CHECK(ms <= last + 1e-9);
    last = ms;
    shares += std::stod((*it)[3]);
    mm = mm || (*it)[1] == "aten::mm";
    ++rows;
  }
  CHECK(rows >= 4);
  CHECK(rows <= 8);
  CHECK(shares <= 100.5);
  CHECK(mm);  // the step's matrix products
  const auto trace = nlohmann::json::parse(emt_test::slurp(dir + "/profile_linear.json"));
  REQUIRE(trace.is_array());
  CHECK(trace.size() > 50);
}

TEST_CASE("bench: a missing interpreter is left out, a failing reference is an error naming it", "[bench]") {
  auto r = emt_test::run_cli(kBench + " --methods linear --python /nonexistent/python3");
  INFO(r.output);
  CHECK(r.code == 0);
  CHECK(r.output.find("no /nonexistent/python3") != std::string::npos);
  r = emt_test::run_cli(kBench + " --methods linear --python /bin/false");
  INFO(r.output);
  CHECK(r.code != 0);
  CHECK(r.output.find("/bin/false") != std::string::npos);
  r = emt_test::run_cli(kBench + " --methods lora-only --python /usr/bin/python3");
  INFO(r.output);
  CHECK(r.code != 0);
  CHECK(r.output.find("linear, lora or full") != std::string::npos);
  // a list option takes one (comma-separated) argument: an override after it stays an override
  r = emt_test::run_cli(kBench + " --methods linear --python /nonexistent/python3 model.no_such_key=1");
  INFO(r.output);
  CHECK(r.code != 0);
  CHECK(r.output.find("no_such_key") != std::string::npos);
  CHECK(r.output.find("has no reference") == std::string::npos);
}

namespace {

// A stand-in for scripts/bench/data_ref.py under Debian's Python (no Pillow there): it speaks the protocol and writes
// zeros (or, as fake_ref_short.py, too few bytes) as its preprocessed image.
std::string fake_data_reference(const std::string& dir, bool short_output = false) {
  const std::string path = dir + (short_output ? "/fake_ref_short.py" : "/fake_ref.py");
  emt_test::spit(path, R"(import json, sys
spec = json.load(open(sys.argv[1]))
n = 3 * spec["size"] * spec["size"] * 4
open(spec["out"], "wb").write(b"\0" * (n // 2 if "short" in sys.argv[0] else n))
print("ready fake reference", flush=True)
for line in sys.stdin:
    w = line.split()
    if not w or w[0] == "quit":
        break
    print("ok " + " ".join(["0.5"] * int(w[1])), flush=True)
)");
  return path;
}

}  // namespace

TEST_CASE("bench data: emt and reference rows per input and size; outputs compared; bad references named", "[bench]") {
  const std::string dir = emt_test::scratch_dir("bench_data");
  const std::string cmd = "bench data --images 2 --rounds 1 --sizes 32,48 --script " + fake_data_reference(dir);
  auto r = emt_test::run_cli(cmd + " --python /usr/bin/python3,/nonexistent/python3");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("no /nonexistent/python3") != std::string::npos);
  for (const std::string input : {"500x375 PNG", "32x32 PNG"})
    for (const std::string size : {"32", "48"}) {
      std::smatch e, f;
      const std::string out = r.output;
      REQUIRE(std::regex_search(out, e, std::regex(input + " +" + size + R"( +emt +([0-9.]+) +([0-9.]+))")));
      CHECK(std::stod(e[1]) > 0.0);
      // the fake answers 0.5 ms per image and wrote zeros: emt's normalized image differs from zero by > 1
      REQUIRE(std::regex_search(out, f, std::regex(input + " +" + size + R"( +fake reference +0\.500 +2000\.0 +([0-9.]+)x +([0-9.e+-]+))")));
      CHECK(std::stod(f[1]) > 0.0);
      CHECK(std::stod(f[2]) > 1.0);
    }
  // a reference whose output has the wrong size, and one that does not start
  r = emt_test::run_cli("bench data --images 1 --rounds 1 --sizes 32 --python /usr/bin/python3 --script " +
                        fake_data_reference(dir, true));
  INFO(r.output);
  CHECK(r.code != 0);
  CHECK(r.output.find("expected 12288") != std::string::npos);
  r = emt_test::run_cli("bench data --images 1 --rounds 1 --sizes 32 --python /bin/false");
  CHECK(r.code != 0);
  CHECK(r.output.find("/bin/false") != std::string::npos);
}

TEST_CASE("bench eval: generation and evaluator rows with figures", "[bench]") {
  auto r = emt_test::run_cli(std::string("bench eval --model ") + EMT_SOURCE_DIR +
                             "/configs/models/tiny.yaml --batch 2 --prompt 8 --new-tokens 4 --repeats 1 --images 4 "
                             "--threads 1 --python /usr/bin/python3,/nonexistent/python3 --script " + EMT_SOURCE_DIR +
                             "/scripts/bench/eval_ref.py");
  INFO(r.output);
  REQUIRE(r.code == 0);
  const std::string out = r.output;
  for (const std::string row : {"KV cache, whole batch", "recompute every step, whole batch",
                                "KV cache, one row at a time \\(batch 1\\)"}) {
    INFO(row);
    std::smatch m;
    REQUIRE(std::regex_search(out, m, std::regex(row + R"( +([0-9.]+) +([0-9.]+) +([0-9.]+) +([0-9.]+)x)")));
    const double ms = std::stod(m[1]), samples = std::stod(m[2]), tokens = std::stod(m[3]);
    CHECK(ms > 0.0);
    // batch 2 in ms, which is printed to 0.1 ms; 4 new tokens per row
    CHECK(samples >= 2e3 / (ms + 0.05) * 0.999);
    CHECK(samples <= 2e3 / std::max(ms - 0.05, 1e-3) * 1.001);
    CHECK(tokens == Approx(4 * samples).epsilon(0.01).margin(0.1));
  }
  // the PyTorch reference: a KV-cache and a recompute row, each with its own peak RSS, and emt's ratio per mode
  for (const std::string mode : {"KV cache", "recompute"}) {
    INFO(mode);
    std::smatch m;
    REQUIRE(std::regex_search(out, m, std::regex("python torch 1\\.13[^ ]*, " + mode +
                                                 R"( +([0-9.]+) +([0-9.]+) +([0-9.]+) +([0-9.]+)x +([0-9]+))")));
    CHECK(std::stod(m[1]) > 0.0);
    CHECK(std::stod(m[5]) > 50.0);  // a Python process with torch loaded holds more than 50 MiB
    REQUIRE(std::regex_search(out, m, std::regex("python torch 1\\.13[^ ]*, " + mode + R"( ([0-9.]+)x;)")));
    CHECK(std::stod(m[1]) > 0.0);
  }
  CHECK(out.find("no /nonexistent/python3") != std::string::npos);
  for (const std::string row : {"batch 1, strict", "batch 32, strict"}) {
    std::smatch m;
    REQUIRE(std::regex_search(out, m, std::regex(row + R"( +([0-9.]+) +([0-9.]+)x)")));
    CHECK(std::stod(m[1]) > 0.0);
  }
  // a reference that fails is an error naming its interpreter
  r = emt_test::run_cli(std::string("bench eval --model ") + EMT_SOURCE_DIR +
                        "/configs/models/tiny.yaml --batch 1 --prompt 4 --new-tokens 1 --repeats 1 --no-evaluator "
                        "--python /bin/false");
  CHECK(r.code != 0);
  CHECK(r.output.find("/bin/false") != std::string::npos);
  r = emt_test::run_cli("bench eval --new-tokens 0");
  CHECK(r.code != 0);
  CHECK(r.output.find("--new-tokens") != std::string::npos);
  r = emt_test::run_cli(std::string("bench eval --model ") + EMT_SOURCE_DIR + "/configs/models/tiny.yaml --device tpu");
  CHECK(r.code != 0);
  CHECK(r.output.find("tpu") != std::string::npos);
}

TEST_CASE("bench memory: a peak RSS per method above the program's baseline; bad methods refused first", "[bench]") {
  const std::string model = std::string(EMT_SOURCE_DIR) + "/configs/models/tiny.yaml";
  auto r = emt_test::run_cli("bench memory --model " + model +
                             " --methods linear,full --steps 1 --batch 2 --text-tokens 12 --threads 1");
  INFO(r.output);
  REQUIRE(r.code == 0);
  std::smatch b;
  const std::string out = r.output;
  REQUIRE(std::regex_search(out, b, std::regex(R"(baseline +([0-9]+))")));
  for (const std::string m : {"linear", "full"}) {
    std::smatch p;
    REQUIRE(std::regex_search(out, p, std::regex("\n" + m + R"( +([0-9]+) +(-?[0-9]+))")));
    CHECK(std::stod(p[1]) > std::stod(b[1]));
  }
  r = emt_test::run_cli("bench memory --model " + model + " --methods linear,prompt");
  CHECK(r.code != 0);
  CHECK(r.output.find("'prompt' is not linear, lora or full") != std::string::npos);
  CHECK(r.output.find("baseline") == std::string::npos);
}
