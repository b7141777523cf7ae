// Forgetting metrics over a study's results.jsonl rows: loading and combining run directories, Wilson intervals,
// the accuracy tensor R[method][finetune][epoch][eval], forgetting under each named definition, plasticity, the
// encoder gap and verdict rates. Definitions and formulas: docs/report.md.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <array>
#include <string>
#include <utility>
#include <vector>

namespace emt {

// One results.jsonl line (the schema the study writes; docs/report.md).
struct ResultRow {
  std::string kind = "mllm";     // mllm | clip_zero_shot
  std::string finetune_dataset;  // "" for the base model and CLIP rows
  std::string method = "base";   // linear | lora | ... | base | clip
  int64_t seed = 0;
  int64_t epoch = 0;  // 0 = base model
  std::string eval_dataset;
  std::string scorer = "strict";  // strict | clip | likelihood | judge | clip_zero_shot
  double accuracy = 0.0;
  int64_t n = 0, n_correct = 0, n_incorrect = 0, n_intrinsic = 0, n_extrinsic = 0;
  double ci_low = 0.0, ci_high = 1.0;
  // Answer drift ("n_naming", optional): per other eval dataset, how many of the n answers name one of its
  // classes; empty when not counted (CLIP rows, rows written before it was counted).
  std::map<std::string, int64_t> n_naming;
  std::string run;
  std::string source;  // "path:line" it was read from (not written)

  // Identity of a row: later rows with the same key replace earlier ones.
  std::string key() const;
  bool is_base() const { return method == "base"; }
};

struct LoadedResults {
  std::vector<ResultRow> rows;  // unique keys, in order of first appearance; later duplicates replace values
  int64_t duplicates = 0;       // rows that replaced an earlier row with the same key
  std::vector<std::string> duplicate_keys;
  std::vector<std::string> run_dirs;
};

// Parses one results.jsonl line; `where` ("file:line") labels FormatErrors (missing field, wrong type, value out
// of range: accuracy outside [0,1], negative counts, verdict counts above n).
ResultRow parse_result_line(const std::string& line, const std::string& where);
std::string result_to_json_line(const ResultRow& r);  // inverse of parse_result_line, no newline
// Reads RUN_DIR/results.jsonl of each directory in order (a path to a .jsonl file is read as is); duplicates are
// counted and warned about once. IoError when a directory has no results.jsonl.
LoadedResults load_results(const std::vector<std::string>& run_dirs);
LoadedResults combine_rows(const std::vector<ResultRow>& rows);  // the same dedup over rows in memory

// Cell directory names under predictions/: "base" for the base model, else "<finetune>__<method>__seed<seed>".
std::string cell_name(const std::string& finetune_dataset, const std::string& method, int64_t seed);
struct CellId {
  std::string finetune_dataset, method;
  int64_t seed = 0;
};
CellId parse_cell_name(const std::string& name);  // FormatError on anything cell_name cannot produce

// Wilson score interval (z = 1.96) for k successes out of n; n = 0 gives {0, 1}. Throws emt::Error unless
// 0 <= k <= n.
std::pair<double, double> wilson_interval(int64_t k, int64_t n);

// R[method][finetune][epoch][eval] for one scorer. Base rows (method "base", epoch 0) fill epoch 0 of every
// (finetune, method, seed) cell unless that cell has its own epoch-0 row. Missing entries are NaN.
struct AccuracyTensor {
  std::string scorer;
  std::vector<std::string> methods;            // in order of first appearance, "base" and "clip" excluded
  std::vector<std::string> finetune_datasets;  // in order of first appearance
  std::vector<std::string> eval_datasets;      // in order of first appearance
  std::vector<int64_t> seeds;                  // sorted
  int64_t epochs = 0;                          // largest epoch seen (the epoch axis is 0..epochs)
  torch::Tensor mean;      // [M, F, E+1, D] float64: mean over the seeds present, NaN when none
  torch::Tensor per_seed;  // [M, F, E+1, D, S] float64, NaN when missing
  // Pooled verdict counts over seeds: [M, F, E+1, D, 5] int64 = n, correct, incorrect, intrinsic, extrinsic.
  torch::Tensor counts;
  // Answer drift pooled over seeds: [M, F, E+1, D, 2] int64 = answers of rows that counted it, and how many of
  // them name a class of the fine-tuning dataset f (ResultRow::n_naming[f]); epoch 0 from the base rows.
  torch::Tensor naming;
  std::vector<double> base;  // [D] base-model accuracy (NaN when absent)
  std::vector<double> clip;  // [D] CLIP zero-shot accuracy (NaN when absent)

  int64_t method_index(const std::string& m) const;    // -1 when absent
  int64_t finetune_index(const std::string& f) const;  // -1 when absent
  int64_t eval_index(const std::string& d) const;      // -1 when absent
  double at(int64_t m, int64_t f, int64_t e, int64_t d) const;
  // Largest epoch with any value for (m, f); 0 when only the base is known, -1 when nothing.
  int64_t last_epoch(int64_t m, int64_t f) const;
};
// Throws emt::Error when no row has this scorer.
AccuracyTensor accuracy_tensor(const std::vector<ResultRow>& rows, const std::string& scorer);

// Named forgetting definitions (positive = forgot), per (method, finetune, eval):
//   base_minus_epoch[e] = R[.., 0, d] - R[.., e, d] for every e (e = 0 gives 0);
//   max_minus_last      = max_{e in 0..L} R[.., e, d] - R[.., L, d],  L = last epoch of the cell;
//   first_minus_last    = R[.., 1, d] - R[.., L, d].
std::vector<std::string> forgetting_definitions();  // base_minus_last, max_minus_last, first_minus_last
struct Forgetting {
  torch::Tensor base_minus_epoch;  // [M, F, E+1, D]
  torch::Tensor base_minus_last;   // [M, F, D]
  torch::Tensor max_minus_last;    // [M, F, D]
  torch::Tensor first_minus_last;  // [M, F, D]
  // Mean over eval datasets other than the fine-tuned one (NaNs skipped): [M, F] per definition name.
  std::map<std::string, torch::Tensor> average;
  torch::Tensor plasticity;  // [M, F]: R[L] - R[0] on the fine-tuned dataset (NaN when not evaluated)
  torch::Tensor last_epoch;  // [M, F] int64
};
Forgetting forgetting(const AccuracyTensor& R);

// Learning against forgetting, one point per (method, fine-tuning dataset, epoch >= 1) from the pooled verdict
// counts: gain = accuracy on the fine-tuned dataset minus the base's, with Newcombe's hybrid-score 95% interval
// for a difference of two independent proportions (from the two Wilson intervals); change = mean over the other
// datasets of (accuracy - base accuracy), its interval the per-dataset Newcombe half-widths combined in quadrature
// and divided by their number (datasets treated as independent). NaN where a count is missing.
struct TradeoffPoint {
  std::string method, finetune;
  int64_t epoch = 0;
  double gain = 0, gain_low = 0, gain_high = 0;
  double change = 0, change_low = 0, change_high = 0;
  int64_t others = 0;  // other datasets in the mean
};
std::vector<TradeoffPoint> learning_vs_forgetting(const AccuracyTensor& R);
// Newcombe's interval of p1 - p2 (k1 of n1 against k2 of n2): {difference, low, high}.
std::array<double, 3> difference_interval(int64_t k1, int64_t n1, int64_t k2, int64_t n2);

// Answer drift, one point per (method, fine-tuning dataset f, epoch 0..L, eval dataset d != f) with counted
// answers: the share of d's answers that name a class of f (the paper's "answers with the fine-tuned task's
// labels"), from the pooled counts, with its Wilson 95% interval.
struct DriftPoint {
  std::string method, finetune, eval;
  int64_t epoch = 0, n = 0, naming = 0;
  double rate = 0, ci_low = 0, ci_high = 0;
};
std::vector<DriftPoint> answer_drift(const AccuracyTensor& R);

// CLIP zero-shot minus the base MLLM per eval dataset, and the sum over datasets that have both (the paper's
// "total accuracy difference").
struct EncoderGap {
  std::vector<std::string> datasets;
  std::vector<double> clip, mllm, gap;  // NaN where one side is missing
  double total = 0.0;
  int64_t summed = 0;  // datasets in the total
};
EncoderGap encoder_gap(const AccuracyTensor& R);

// Verdict rates from pooled counts: [M, F, E+1, D, 4] float64 = correct, incorrect, intrinsic, extrinsic over n
// (NaN where n = 0).
torch::Tensor verdict_rates(const AccuracyTensor& R);

}  // namespace emt
