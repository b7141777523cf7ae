// The forgetting study (`emt study`): base model -> score every dataset (epoch 0) -> for each fine-tuning dataset
// x method x seed: train N epochs with the one Trainer and re-score EVERY dataset after each epoch. Results append
// to RUN_DIR/results.jsonl; a killed study resumes where it stopped and never recomputes a finished cell.
#pragma once
#include <emt/core/config.h>
#include <emt/core/distributed.h>
#include <emt/eval/metrics.h>
#include <emt/train/pretrain.h>

#include <string>
#include <vector>

namespace emt {

struct StudyOptions {
  bool progress = true;
  bool report = true;  // write RUN_DIR/report at the end
  // Data parallel (null = one process): every rank runs the study together; rank 0 builds the tiny base model
  // (the others wait), every cell trains data-parallel, every evaluation is sharded and gathered, and only rank 0
  // writes config.yaml, results.jsonl, predictions and the report. A preemption notice on any rank stops all of
  // them at the same safe point.
  std::shared_ptr<Communicator> comm;
};

struct StudySummary {
  std::string run_dir;
  std::string report_html;  // empty without a report
  std::string matrix;       // plain-text accuracy matrix (primary scorer)
  int64_t rows_written = 0, cells_trained = 0, cells_skipped = 0, epochs_recovered = 0;
  double seconds = 0.0;
};

// Cell directory name: "<finetune dataset>__<method>__seed<seed>" with '/' and '+' made file-name safe.
std::string study_cell_name(const std::string& dataset, const std::string& method, int64_t seed);

StudySummary run_study(const RunConfig& cfg, const StudyOptions& opts = {});

// The tiny base model with its closing check: pretrain_tiny, then (when the model was just built, or its
// pretrain_report.json is missing) the one Evaluator scores every pretrained dataset's EMT question (strict
// scorer) and the CLIP zero-shot baseline on opts.check_samples test images each, and writes
// <cache_dir>/pretrain_report.json atomically: per dataset n, classes, chance, accuracy and Wilson 95% interval.
// A reused model reads its report back.
PretrainReport build_base_model(const RunConfig& cfg, const PretrainOptions& opts = {});
// The report as the printout of `emt pretrain` shows it (one line per dataset).
std::string format_base_checks(const PretrainReport& r);

}  // namespace emt
