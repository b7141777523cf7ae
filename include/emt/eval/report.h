// The forgetting report: CSV/JSON tables, PNG plots (accuracy vs epoch, radar, heatmap, verdict bars), one
// self-contained report.html and the plain-text accuracy matrix. Files and formulas: docs/report.md.
#pragma once
#include <emt/eval/metrics.h>

#include <string>
#include <vector>

namespace emt {

struct ReportOptions {
  std::string out_dir;
  std::string scorer = "strict";
  std::string title = "EMT forgetting report";
};

struct ReportFiles {
  std::vector<std::string> tables;  // CSV + JSON, paths under out_dir
  std::vector<std::string> plots;   // PNG
  std::string html;                 // out_dir/report.html
  std::string matrix;               // format_matrix() of the report's tensor
};

// Fixed plot sizes (tests check them).
constexpr int kPlotWidth = 800;
constexpr int kPlotHeight = 500;
constexpr int kRadarSize = 600;

// Writes every table, plot and report.html into opts.out_dir (created). Throws emt::Error when no row has the
// scorer, IoError on write failures.
ReportFiles write_report(const LoadedResults& results, const ReportOptions& opts);

// Plain-text matrix: one block per method, rows "base" then "<finetune> e<k>", columns eval datasets, accuracy
// in percent with one decimal ("-" when missing), then the CLIP zero-shot row when known.
std::string format_matrix(const AccuracyTensor& R);
std::string format_matrix(const std::vector<ResultRow>& rows, const std::string& scorer = "strict");

// Single plots, also usable on their own (PNG bytes come back encoded; sizes as above).
std::string plot_accuracy_png(const AccuracyTensor& R, int64_t method, int64_t finetune);
std::string plot_radar_png(const AccuracyTensor& R, int64_t method);
std::string plot_heatmap_png(const AccuracyTensor& R, int64_t method);
std::string plot_verdicts_png(const AccuracyTensor& R, int64_t method, int64_t finetune);
// Learning vs forgetting for one fine-tuning dataset: x = gain on it, y = mean change on the others (points, 95%
// intervals as error bars; learning_vs_forgetting), one coloured line per method through its epochs.
std::string plot_tradeoff_png(const AccuracyTensor& R, int64_t finetune);
// Answer drift for one fine-tuning dataset: per method, the pooled share of the other datasets' answers that name
// one of its classes, per epoch (answer_drift in metrics.h).
std::string plot_drift_png(const AccuracyTensor& R, int64_t finetune);

std::string base64_encode(const std::string& bytes);

}  // namespace emt
