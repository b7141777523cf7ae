// Shared by the `emt bench` tables (cli/cmd_bench.cpp: train; cli/bench_tables.cpp: eval, data, memory): medians
// and the reference processes that are timed in turns with emt.
#pragma once
#include <CLI/CLI.hpp>
#include <emt/core/error.h>
#include <emt/core/llava.h>
#include <sys/types.h>

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace emt::cli::bench {

double median(std::vector<double> v);

// A reference process: `python script spec` answers "ready LABEL", then "ok MS_1 ... MS_N" to each "run N" (one
// figure per timed unit: an optimizer step, a generation, an image), "peak MIB" to "peak" (its peak RSS; the train
// and eval references answer it); "quit" ends it. A failure is an error naming the interpreter.
class Reference {
 public:
  Reference(const std::string& python, const std::string& script, const std::string& spec);
  ~Reference();
  Reference(const Reference&) = delete;
  Reference& operator=(const Reference&) = delete;
  std::vector<double> run(int units);
  double peak_mib();
  const std::string& label() const { return label_; }

 private:
  std::string read_line();
  std::string python_, label_;
  pid_t pid_ = -1;
  FILE* to_ = nullptr;
  FILE* from_ = nullptr;
};

// The model part of a reference's spec (vision and decoder shapes, projector, image token id), as
// scripts/bench/train_ref.py reads it.
nlohmann::json model_spec(const LlavaOptions& lo, const std::string& projector, int64_t vocab, int64_t image_token);

// Adds `emt bench eval`, `emt bench data` and `emt bench memory` under `bench`.
void add_tables(CLI::App& bench);

}  // namespace emt::cli::bench
