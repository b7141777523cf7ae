// `emt bench train`: both sides really run (emt's Trainer and the PyTorch reference over its pipe protocol) and
// every row carries figures; a broken reference is an error that names it. Speed itself is never asserted here.
#include <catch2/catch.hpp>

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
    REQUIRE(std::regex_search(out, p, std::regex(m + R"( +python torch 1\.13[^ ]* +([0-9.]+) .* ([0-9.]+)x \(([0-9.]+)\))")));
    CHECK(std::stod(p[1]) > 0.0);
    CHECK(std::stod(p[2]) > 0.0);
  }
  CHECK(r.output.find("matmul peak") != std::string::npos);
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
}
