// The forgetting report: CSV/JSON tables, figures (accuracy vs epoch, radar, heatmap, verdict bars, learning vs
// forgetting, answer drift) as PNG, SVG and PDF drawn with PLplot, one self-contained report.html and the
// plain-text accuracy matrix. Files and formulas: docs/report.md.
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
  std::vector<std::string> plots;   // PNG, one per figure
  std::vector<std::string> vector_plots;  // SVG and PDF of every figure, beside its PNG
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

// Single figures, also usable on their own: the file's bytes in the format asked for (PNG and SVG at the sizes
// above, in pixels; PDF in points). Drawn with PLplot's cairo drivers; emt::Error when the driver is missing.
enum class PlotFormat { png, svg, pdf };
std::string plot_accuracy(const AccuracyTensor& R, int64_t method, int64_t finetune, PlotFormat f = PlotFormat::png);
std::string plot_radar(const AccuracyTensor& R, int64_t method, PlotFormat f = PlotFormat::png);
std::string plot_heatmap(const AccuracyTensor& R, int64_t method, PlotFormat f = PlotFormat::png);
std::string plot_verdicts(const AccuracyTensor& R, int64_t method, int64_t finetune, PlotFormat f = PlotFormat::png);
// Learning vs forgetting for one fine-tuning dataset: x = gain on it, y = mean change on the others (points, 95%
// intervals as error bars; learning_vs_forgetting), one coloured line per method through its epochs.
std::string plot_tradeoff(const AccuracyTensor& R, int64_t finetune, PlotFormat f = PlotFormat::png);
// Answer drift for one fine-tuning dataset: per method, the pooled share of the other datasets' answers that name
// one of its classes, per epoch (answer_drift in metrics.h).
std::string plot_drift(const AccuracyTensor& R, int64_t finetune, PlotFormat f = PlotFormat::png);

std::string base64_encode(const std::string& bytes);

}  // namespace emt
