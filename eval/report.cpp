// The forgetting report: CSV/JSON tables, the figures (plots.cpp) as PNG, SVG and PDF, a self-contained
// report.html and the plain-text matrix. Everything is computed from results rows, so a report can be rebuilt
// from any set of run directories.
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include <emt/eval/report.h>
#include "core/logging.h"
#include <fmt/format.h>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

namespace emt {

namespace fs = std::filesystem;

namespace {

bool finite(double v) { return std::isfinite(v); }
std::string pct(double v) { return finite(v) ? fmt::format("{:.1f}", 100.0 * v) : "-"; }
std::string num(double v) { return finite(v) ? fmt::format("{:.6f}", v) : ""; }
nlohmann::ordered_json jnum(double v) { return finite(v) ? nlohmann::ordered_json(v) : nlohmann::ordered_json(nullptr); }

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}
std::string csv_row(const std::vector<std::string>& cells) {
  std::string s;
  for (size_t i = 0; i < cells.size(); ++i) s += (i ? "," : "") + csv_field(cells[i]);
  return s + "\n";
}

std::string html_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

std::string file_part(const std::string& s) {
  std::string o;
  for (char c : s) o += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.') ? c : '_';
  return o.empty() ? "_" : o;
}

}  // namespace

std::string base64_encode(const std::string& bytes) {
  static const char* tbl = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8) | uint8_t(bytes[i + 2]);
    out += tbl[v >> 18], out += tbl[(v >> 12) & 63], out += tbl[(v >> 6) & 63], out += tbl[v & 63];
  }
  if (i + 1 == bytes.size()) {
    uint32_t v = uint8_t(bytes[i]) << 16;
    out += tbl[v >> 18], out += tbl[(v >> 12) & 63], out += "==";
  } else if (i + 2 == bytes.size()) {
    uint32_t v = (uint8_t(bytes[i]) << 16) | (uint8_t(bytes[i + 1]) << 8);
    out += tbl[v >> 18], out += tbl[(v >> 12) & 63], out += tbl[(v >> 6) & 63], out += '=';
  }
  return out;
}

// ---- text matrix --------------------------------------------------------------------------------------------------

std::string format_matrix(const AccuracyTensor& R) {
  std::vector<std::string> labels = {"base"};
  for (const auto& f : R.finetune_datasets) labels.push_back(fmt::format("{} e{}", f, R.epochs));
  labels.push_back("clip zero-shot");
  size_t lw = 6;
  for (const auto& l : labels) lw = std::max(lw, l.size());
  std::vector<size_t> cw;
  for (const auto& d : R.eval_datasets) cw.push_back(std::max<size_t>(d.size(), 6));
  auto line = [&](const std::string& label, const std::vector<std::string>& cells) {
    std::string s = fmt::format("  {:<{}}", label, lw);
    for (size_t i = 0; i < cells.size(); ++i) s += fmt::format("  {:>{}}", cells[i], cw[i]);
    return s + "\n";
  };
  std::string out = fmt::format("accuracy (%), {} scorer, mean over seeds\n", R.scorer);
  const int64_t D = R.eval_datasets.size();
  auto row_of = [&](auto get) {
    std::vector<std::string> c;
    for (int64_t d = 0; d < D; ++d) c.push_back(pct(get(d)));
    return c;
  };
  bool clip_any = std::any_of(R.clip.begin(), R.clip.end(), [](double v) { return finite(v); });
  if (R.methods.empty()) {
    out += line("", R.eval_datasets);
    out += line("base", row_of([&](int64_t d) { return R.base[d]; }));
  }
  for (size_t m = 0; m < R.methods.size(); ++m) {
    out += fmt::format("method {}\n", R.methods[m]);
    out += line("", R.eval_datasets);
    out += line("base", row_of([&](int64_t d) { return R.base[d]; }));
    for (size_t f = 0; f < R.finetune_datasets.size(); ++f) {
      const int64_t L = R.last_epoch(m, f);
      for (int64_t e = 1; e <= L; ++e)
        out += line(fmt::format("{} e{}", R.finetune_datasets[f], e),
                    row_of([&](int64_t d) { return R.at(m, f, e, d); }));
    }
  }
  if (clip_any) out += line("clip zero-shot", row_of([&](int64_t d) { return R.clip[d]; }));
  return out;
}

std::string format_matrix(const std::vector<ResultRow>& rows, const std::string& scorer) {
  return format_matrix(accuracy_tensor(rows, scorer));
}

// ---- the report ---------------------------------------------------------------------------------------------------

namespace {

// What every part of the report reads: the tensors, their derived measures, and where files go.
struct ReportContext {
  const LoadedResults& results;
  AccuracyTensor R;
  Forgetting F;
  EncoderGap G;
  torch::Tensor rates;
  int64_t M = 0, NF = 0, D = 0;
  fs::path out;
  ReportFiles files;

  ReportContext(const LoadedResults& res, const std::string& scorer, const std::string& out_dir)
      : results(res), R(accuracy_tensor(res.rows, scorer)), F(forgetting(R)), G(encoder_gap(R)),
        rates(verdict_rates(R)), M(static_cast<int64_t>(R.methods.size())),
        NF(static_cast<int64_t>(R.finetune_datasets.size())), D(static_cast<int64_t>(R.eval_datasets.size())),
        out(out_dir) {}
  void put(const std::string& rel, const std::string& bytes, std::vector<std::string>& list) {
    std::string p = (out / rel).string();
    write_file_atomic(p, bytes);
    list.push_back(p);
  }
};

// accuracy.csv (long form) and one wide matrix per method -> the "accuracy" array of report.json.
nlohmann::ordered_json write_accuracy_tables(ReportContext& c) {
  const auto& R = c.R;
  auto cnt = R.counts.accessor<int64_t, 5>();
  auto ps = R.per_seed.accessor<double, 5>();
  std::string acc_csv = csv_row({"method", "finetune_dataset", "epoch", "eval_dataset", "accuracy", "n_seeds", "n",
                                 "n_correct", "ci_low", "ci_high"});
  nlohmann::ordered_json jacc = nlohmann::ordered_json::array();
  for (int64_t m = 0; m < c.M; ++m) {
    std::vector<std::string> head = {"finetune_dataset", "epoch"};
    head.insert(head.end(), R.eval_datasets.begin(), R.eval_datasets.end());
    std::string wide = csv_row(head);
    for (int64_t f = 0; f < c.NF; ++f) {
      const int64_t L = R.last_epoch(m, f);
      for (int64_t e = 0; e <= L; ++e) {
        std::vector<std::string> wrow = {R.finetune_datasets[f], std::to_string(e)};
        for (int64_t d = 0; d < c.D; ++d) {
          const double a = R.at(m, f, e, d);
          wrow.push_back(num(a));
          if (!finite(a)) continue;
          int64_t seeds = 0;
          nlohmann::ordered_json jseeds = nlohmann::ordered_json::object();
          for (size_t s = 0; s < R.seeds.size(); ++s)
            if (finite(ps[m][f][e][d][s])) ++seeds, jseeds[std::to_string(R.seeds[s])] = ps[m][f][e][d][s];
          const int64_t n = cnt[m][f][e][d][0], k = cnt[m][f][e][d][1];
          auto [lo, hi] = wilson_interval(std::min(k, n), n);
          acc_csv += csv_row({R.methods[m], R.finetune_datasets[f], std::to_string(e), R.eval_datasets[d], num(a),
                              std::to_string(seeds), std::to_string(n), std::to_string(k), num(lo), num(hi)});
          jacc.push_back({{"method", R.methods[m]}, {"finetune_dataset", R.finetune_datasets[f]}, {"epoch", e},
                          {"eval_dataset", R.eval_datasets[d]}, {"accuracy", a}, {"per_seed", jseeds}, {"n", n},
                          {"n_correct", k}, {"ci_low", lo}, {"ci_high", hi}});
        }
        wide += csv_row(wrow);
      }
    }
    c.put(fmt::format("accuracy_matrix_{}.csv", file_part(R.methods[m])), wide, c.files.tables);
  }
  c.put("accuracy.csv", acc_csv, c.files.tables);
  return jacc;
}

// forgetting.csv (per eval dataset) and summary.csv (per cell) -> the "forgetting" and "summary" arrays.
std::pair<nlohmann::ordered_json, nlohmann::ordered_json> write_forgetting_tables(ReportContext& c) {
  const auto& R = c.R;
  const auto& F = c.F;
  std::vector<std::string> fhead = {"method", "finetune_dataset", "eval_dataset", "is_finetuned", "last_epoch",
                                    "base_minus_last", "max_minus_last", "first_minus_last"};
  for (int64_t e = 1; e <= R.epochs; ++e) fhead.push_back(fmt::format("base_minus_epoch_{}", e));
  std::string fcsv = csv_row(fhead);
  std::string scsv = csv_row({"method", "finetune_dataset", "last_epoch", "avg_base_minus_last", "avg_max_minus_last",
                              "avg_first_minus_last", "plasticity"});
  nlohmann::ordered_json jforget = nlohmann::ordered_json::array(), jsum = nlohmann::ordered_json::array();
  auto bme = F.base_minus_epoch.accessor<double, 4>();
  auto bl = F.base_minus_last.accessor<double, 3>();
  auto ml = F.max_minus_last.accessor<double, 3>();
  auto fl = F.first_minus_last.accessor<double, 3>();
  auto pl = F.plasticity.accessor<double, 2>();
  auto le = F.last_epoch.accessor<int64_t, 2>();
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t f = 0; f < c.NF; ++f) {
      if (le[m][f] < 0) continue;
      for (int64_t d = 0; d < c.D; ++d) {
        const bool own = R.eval_datasets[d] == R.finetune_datasets[f];
        std::vector<std::string> row = {R.methods[m], R.finetune_datasets[f], R.eval_datasets[d], own ? "1" : "0",
                                        std::to_string(le[m][f]), num(bl[m][f][d]), num(ml[m][f][d]), num(fl[m][f][d])};
        nlohmann::ordered_json per_epoch = nlohmann::ordered_json::array();
        for (int64_t e = 1; e <= R.epochs; ++e) {
          row.push_back(num(bme[m][f][e][d]));
          per_epoch.push_back(jnum(bme[m][f][e][d]));
        }
        fcsv += csv_row(row);
        jforget.push_back({{"method", R.methods[m]}, {"finetune_dataset", R.finetune_datasets[f]},
                           {"eval_dataset", R.eval_datasets[d]}, {"is_finetuned", own}, {"last_epoch", le[m][f]},
                           {"base_minus_last", jnum(bl[m][f][d])}, {"max_minus_last", jnum(ml[m][f][d])},
                           {"first_minus_last", jnum(fl[m][f][d])}, {"base_minus_epoch", per_epoch}});
      }
      const double a1 = F.average.at("base_minus_last").accessor<double, 2>()[m][f];
      const double a2 = F.average.at("max_minus_last").accessor<double, 2>()[m][f];
      const double a3 = F.average.at("first_minus_last").accessor<double, 2>()[m][f];
      scsv += csv_row({R.methods[m], R.finetune_datasets[f], std::to_string(le[m][f]), num(a1), num(a2), num(a3),
                       num(pl[m][f])});
      jsum.push_back({{"method", R.methods[m]}, {"finetune_dataset", R.finetune_datasets[f]},
                      {"last_epoch", le[m][f]}, {"avg_base_minus_last", jnum(a1)}, {"avg_max_minus_last", jnum(a2)},
                      {"avg_first_minus_last", jnum(a3)}, {"plasticity", jnum(pl[m][f])}});
    }
  }
  c.put("forgetting.csv", fcsv, c.files.tables);
  c.put("summary.csv", scsv, c.files.tables);
  std::string tcsv = csv_row({"method", "finetune_dataset", "epoch", "gain", "gain_low", "gain_high", "change",
                              "change_low", "change_high", "others"});
  for (const auto& p : learning_vs_forgetting(R))
    tcsv += csv_row({p.method, p.finetune, std::to_string(p.epoch), num(p.gain), num(p.gain_low), num(p.gain_high),
                     num(p.change), num(p.change_low), num(p.change_high), std::to_string(p.others)});
  c.put("learning_vs_forgetting.csv", tcsv, c.files.tables);
  return {jforget, jsum};
}

// encoder_gap.csv -> the "datasets" array of report.json's "encoder_gap".
nlohmann::ordered_json write_encoder_gap_table(ReportContext& c) {
  const auto& G = c.G;
  std::string gcsv = csv_row({"eval_dataset", "clip_zero_shot", "mllm_base", "gap"});
  nlohmann::ordered_json jgap = nlohmann::ordered_json::array();
  for (int64_t d = 0; d < c.D; ++d) {
    gcsv += csv_row({G.datasets[d], num(G.clip[d]), num(G.mllm[d]), num(G.gap[d])});
    jgap.push_back({{"eval_dataset", G.datasets[d]}, {"clip_zero_shot", jnum(G.clip[d])}, {"mllm_base", jnum(G.mllm[d])},
                    {"gap", jnum(G.gap[d])}});
  }
  gcsv += csv_row({"total", "", "", num(G.total)});
  c.put("encoder_gap.csv", gcsv, c.files.tables);
  return jgap;
}

// verdicts.csv: every (method, finetune, epoch, eval) with answers -> the "verdicts" array.
nlohmann::ordered_json write_verdict_table(ReportContext& c) {
  const auto& R = c.R;
  auto cnt = R.counts.accessor<int64_t, 5>();
  auto rt = c.rates.accessor<double, 5>();
  std::string vcsv = csv_row({"method", "finetune_dataset", "epoch", "eval_dataset", "n", "correct", "incorrect",
                              "intrinsic", "extrinsic", "rate_correct", "rate_incorrect", "rate_intrinsic",
                              "rate_extrinsic"});
  nlohmann::ordered_json jver = nlohmann::ordered_json::array();
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t f = 0; f < c.NF; ++f)
      for (int64_t e = 0; e <= R.epochs; ++e)
        for (int64_t d = 0; d < c.D; ++d) {
          if (cnt[m][f][e][d][0] == 0) continue;
          std::vector<std::string> row = {R.methods[m], R.finetune_datasets[f], std::to_string(e), R.eval_datasets[d]};
          for (int k = 0; k < 5; ++k) row.push_back(std::to_string(cnt[m][f][e][d][k]));
          for (int k = 0; k < 4; ++k) row.push_back(num(rt[m][f][e][d][k]));
          vcsv += csv_row(row);
          jver.push_back({{"method", R.methods[m]}, {"finetune_dataset", R.finetune_datasets[f]}, {"epoch", e},
                          {"eval_dataset", R.eval_datasets[d]}, {"n", cnt[m][f][e][d][0]},
                          {"correct", cnt[m][f][e][d][1]}, {"incorrect", cnt[m][f][e][d][2]},
                          {"intrinsic", cnt[m][f][e][d][3]}, {"extrinsic", cnt[m][f][e][d][4]}});
        }
  c.put("verdicts.csv", vcsv, c.files.tables);
  return jver;
}

// answer_drift.csv: every (method, finetune, epoch, other eval dataset) with counted answers -> "answer_drift".
nlohmann::ordered_json write_drift_table(ReportContext& c) {
  std::string csv = csv_row({"method", "finetune_dataset", "epoch", "eval_dataset", "n", "naming_finetuned",
                             "rate", "ci_low", "ci_high"});
  nlohmann::ordered_json j = nlohmann::ordered_json::array();
  for (const auto& p : answer_drift(c.R)) {
    csv += csv_row({p.method, p.finetune, std::to_string(p.epoch), p.eval, std::to_string(p.n),
                    std::to_string(p.naming), num(p.rate), num(p.ci_low), num(p.ci_high)});
    j.push_back({{"method", p.method}, {"finetune_dataset", p.finetune}, {"epoch", p.epoch}, {"eval_dataset", p.eval},
                 {"n", p.n}, {"naming_finetuned", p.naming}, {"rate", p.rate}, {"ci_low", p.ci_low},
                 {"ci_high", p.ci_high}});
  }
  c.put("answer_drift.csv", csv, c.files.tables);
  return j;
}

// Every table in one file, with the grid's axes and the base/CLIP rows.
void write_report_json(ReportContext& c, const nlohmann::ordered_json& jacc, const nlohmann::ordered_json& jforget,
                       const nlohmann::ordered_json& jsum, const nlohmann::ordered_json& jgap,
                       const nlohmann::ordered_json& jver, const nlohmann::ordered_json& jdrift) {
  const auto& R = c.R;
  nlohmann::ordered_json j;
  j["scorer"] = R.scorer;
  j["runs"] = c.results.run_dirs;
  j["rows"] = c.results.rows.size();
  j["duplicates"] = c.results.duplicates;
  j["methods"] = R.methods;
  j["finetune_datasets"] = R.finetune_datasets;
  j["eval_datasets"] = R.eval_datasets;
  j["seeds"] = R.seeds;
  j["epochs"] = R.epochs;
  nlohmann::ordered_json jbase = nlohmann::ordered_json::object(), jclip = nlohmann::ordered_json::object();
  for (int64_t d = 0; d < c.D; ++d) jbase[R.eval_datasets[d]] = jnum(R.base[d]), jclip[R.eval_datasets[d]] = jnum(R.clip[d]);
  j["base"] = jbase;
  j["clip_zero_shot"] = jclip;
  j["accuracy"] = jacc;
  j["forgetting"] = jforget;
  j["summary"] = jsum;
  j["encoder_gap"] = {{"datasets", jgap}, {"total", c.G.total}, {"summed", c.G.summed}};
  j["verdicts"] = jver;
  j["answer_drift"] = jdrift;
  c.put("report.json", j.dump(2) + "\n", c.files.tables);
}

// Every figure as PNG, SVG and PDF files; its caption, PNG bytes and file stem in order, for report.html.
struct Image {
  std::string caption, png, stem;  // stem: the files' path under out_dir without extension
};

std::vector<Image> write_plots(ReportContext& c) {
  const auto& R = c.R;
  std::vector<Image> images;
  if (!built_with_plots()) {
    log_warn("[report] this emt was built without PLplot (EMT_WITH_PLOTS=OFF): {} has tables but no figures",
             c.out.string());
    return images;
  }
  auto plot = [&](const std::string& stem, const std::string& caption,
                  const std::function<std::string(PlotFormat)>& draw) {
    const std::string png = draw(PlotFormat::png);
    c.put(stem + ".png", png, c.files.plots);
    c.put(stem + ".svg", draw(PlotFormat::svg), c.files.vector_plots);
    c.put(stem + ".pdf", draw(PlotFormat::pdf), c.files.vector_plots);
    images.push_back({caption, png, stem});
  };
  for (int64_t m = 0; m < c.M; ++m) {
    const std::string mp = file_part(R.methods[m]);
    for (int64_t f = 0; f < c.NF; ++f) {
      if (R.last_epoch(m, f) < 0) continue;
      plot(fmt::format("plots/accuracy_{}_{}", mp, file_part(R.finetune_datasets[f])),
           fmt::format("{} on {}: accuracy per epoch", R.methods[m], R.finetune_datasets[f]),
           [&](PlotFormat pf) { return plot_accuracy(R, m, f, pf); });
    }
    plot(fmt::format("plots/radar_{}", mp), fmt::format("{}: radar at the last epoch", R.methods[m]),
         [&](PlotFormat pf) { return plot_radar(R, m, pf); });
    plot(fmt::format("plots/heatmap_{}", mp), fmt::format("{}: fine-tune x eval at the last epoch", R.methods[m]),
         [&](PlotFormat pf) { return plot_heatmap(R, m, pf); });
    for (int64_t f = 0; f < c.NF; ++f) {
      if (R.last_epoch(m, f) < 0) continue;
      plot(fmt::format("plots/verdicts_{}_{}", mp, file_part(R.finetune_datasets[f])),
           fmt::format("{} on {}: verdicts at the last epoch", R.methods[m], R.finetune_datasets[f]),
           [&](PlotFormat pf) { return plot_verdicts(R, m, f, pf); });
    }
  }
  const auto drift = answer_drift(R);
  for (int64_t f = 0; f < c.NF; ++f) {
    const std::string fp = file_part(R.finetune_datasets[f]);
    plot("plots/tradeoff_" + fp,
         fmt::format("fine-tuned on {}: learning vs forgetting, every method and epoch", R.finetune_datasets[f]),
         [&](PlotFormat pf) { return plot_tradeoff(R, f, pf); });
    if (std::any_of(drift.begin(), drift.end(), [&](const DriftPoint& p) { return p.finetune == R.finetune_datasets[f]; }))
      plot("plots/drift_" + fp, fmt::format("fine-tuned on {}: answers naming its classes, per epoch", R.finetune_datasets[f]),
           [&](PlotFormat pf) { return plot_drift(R, f, pf); });
  }
  return images;
}

// report.html: every table and image inline, readable offline.
class HtmlReport {
 public:
  explicit HtmlReport(const ReportContext& c) : c_(c) {}

  std::string render(const std::string& title, const nlohmann::ordered_json& jforget, const nlohmann::ordered_json& jsum,
                     const std::vector<Image>& images) {
    head(title);
    accuracy();
    forgetting(jforget, jsum);
    encoder_gap();
    verdicts();
    drift();
    h_ << "</table>\n<h2>Plots</h2>\n";
    if (!built_with_plots())
      h_ << "<p>This emt was built without PLplot (EMT_WITH_PLOTS=OFF), so the report has no figures: run "
            "<code>emt report</code> on a build that has it.</p>\n";
    for (const auto& im : images)
      h_ << "<figure><img alt=\"" << html_escape(im.caption) << "\" src=\"data:image/png;base64,"
         << base64_encode(im.png) << "\"><figcaption>" << html_escape(im.caption) << " (<a href=\""
         << html_escape(im.stem) << ".svg\">SVG</a>, <a href=\"" << html_escape(im.stem) << ".pdf\">PDF</a>)"
         << "</figcaption></figure>\n";
    h_ << "<h2>Matrix</h2>\n<pre>" << html_escape(c_.files.matrix) << "</pre>\n</body></html>\n";
    return h_.str();
  }

 private:
  void th_row(const std::vector<std::string>& cells, size_t left_cols) {
    h_ << "<tr>";
    for (size_t i = 0; i < cells.size(); ++i) h_ << "<th" << (i < left_cols ? " class=\"l\"" : "") << ">" << html_escape(cells[i]) << "</th>";
    h_ << "</tr>\n";
  }
  void td_row(const std::vector<std::string>& cells, size_t left_cols, bool own = false) {
    h_ << "<tr" << (own ? " class=\"own\"" : "") << ">";
    for (size_t i = 0; i < cells.size(); ++i) h_ << "<td" << (i < left_cols ? " class=\"l\"" : "") << ">" << html_escape(cells[i]) << "</td>";
    h_ << "</tr>\n";
  }
  static std::string points(const nlohmann::ordered_json& s, const char* k) {
    return s[k].is_null() ? std::string("-") : fmt::format("{:.1f}", 100 * s[k].get<double>());
  }

  void head(const std::string& title) {
    const auto& R = c_.R;
    h_ << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>" << html_escape(title)
       << "</title>\n<style>\n"
          "body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;"
          "padding:0 1em;color:#222;line-height:1.45}\n"
          "h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}\n"
          "table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.92em}\n"
          "th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f3f3f3}\n"
          "td.l,th.l{text-align:left}tr.own td{font-weight:600}\n"
          "figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:.85em;color:#555}\n"
          "img{max-width:100%;border:1px solid #eee}.meta{color:#555;font-size:.9em}pre{background:#f7f7f7;padding:.8em;"
          "overflow-x:auto}\n</style></head><body>\n";
    h_ << "<h1>" << html_escape(title) << "</h1>\n<p class=\"meta\">Scorer: <b>" << html_escape(R.scorer)
       << "</b> &middot; " << c_.results.rows.size() << " result rows from " << c_.results.run_dirs.size()
       << " run(s) &middot; " << c_.results.duplicates << " duplicate row(s) replaced &middot; seeds:";
    for (auto s : R.seeds) h_ << " " << s;
    h_ << "</p>\n<p class=\"meta\">Runs:";
    for (const auto& r : c_.results.run_dirs) h_ << " <code>" << html_escape(r) << "</code>";
    h_ << "</p>\n<h2>Accuracy (%)</h2>\n";
  }

  void accuracy() {
    const auto& R = c_.R;
    for (int64_t m = 0; m < c_.M; ++m) {
      h_ << "<h3>Method " << html_escape(R.methods[m]) << "</h3>\n<table>\n";
      std::vector<std::string> head = {"fine-tuned on", "epoch"};
      head.insert(head.end(), R.eval_datasets.begin(), R.eval_datasets.end());
      th_row(head, 2);
      std::vector<std::string> base = {"(base model)", "0"};
      for (int64_t d = 0; d < c_.D; ++d) base.push_back(pct(R.base[d]));
      td_row(base, 2);
      for (int64_t f = 0; f < c_.NF; ++f)
        for (int64_t e = 1; e <= R.last_epoch(m, f); ++e) {
          std::vector<std::string> row = {R.finetune_datasets[f], std::to_string(e)};
          for (int64_t d = 0; d < c_.D; ++d) row.push_back(pct(R.at(m, f, e, d)));
          td_row(row, 2);
        }
      if (std::any_of(R.clip.begin(), R.clip.end(), [](double v) { return finite(v); })) {
        std::vector<std::string> row = {"CLIP zero-shot", "-"};
        for (int64_t d = 0; d < c_.D; ++d) row.push_back(pct(R.clip[d]));
        td_row(row, 2);
      }
      h_ << "</table>\n";
    }
  }

  void forgetting(const nlohmann::ordered_json& jforget, const nlohmann::ordered_json& jsum) {
    h_ << "<h2>Forgetting (percentage points; positive = forgot)</h2>\n<p class=\"meta\">Averages exclude the fine-tuned "
          "dataset; plasticity = last epoch minus base on the fine-tuned dataset. Definitions in docs/report.md.</p>\n"
          "<table>\n";
    th_row({"method", "fine-tuned on", "last epoch", "avg base-last", "avg max-last", "avg first-last", "plasticity"}, 2);
    for (const auto& s : jsum)
      td_row({s["method"].get<std::string>(), s["finetune_dataset"].get<std::string>(),
              std::to_string(s["last_epoch"].get<int64_t>()), points(s, "avg_base_minus_last"),
              points(s, "avg_max_minus_last"), points(s, "avg_first_minus_last"), points(s, "plasticity")}, 2);
    h_ << "</table>\n<table>\n";
    th_row({"method", "fine-tuned on", "eval dataset", "base-last", "max-last", "first-last"}, 3);
    for (const auto& s : jforget)
      td_row({s["method"].get<std::string>(), s["finetune_dataset"].get<std::string>(),
              s["eval_dataset"].get<std::string>(), points(s, "base_minus_last"), points(s, "max_minus_last"),
              points(s, "first_minus_last")},
             3, s["is_finetuned"].get<bool>());
  }

  void encoder_gap() {
    const auto& G = c_.G;
    h_ << "</table>\n<h2>Encoder gap: CLIP zero-shot minus the base MLLM (%)</h2>\n<table>\n";
    th_row({"eval dataset", "CLIP zero-shot", "MLLM (base)", "gap"}, 1);
    for (int64_t d = 0; d < c_.D; ++d) td_row({G.datasets[d], pct(G.clip[d]), pct(G.mllm[d]), pct(G.gap[d])}, 1);
    td_row({fmt::format("total accuracy difference ({} datasets)", G.summed), "", "", pct(G.total)}, 1, true);
  }

  void verdicts() {
    const auto& R = c_.R;
    auto cnt = R.counts.accessor<int64_t, 5>();
    auto rt = c_.rates.accessor<double, 5>();
    h_ << "</table>\n<h2>Verdicts at the last epoch (% of answers)</h2>\n<table>\n";
    th_row({"method", "fine-tuned on", "eval dataset", "n", "correct", "incorrect", "intrinsic", "extrinsic"}, 3);
    for (int64_t m = 0; m < c_.M; ++m)
      for (int64_t f = 0; f < c_.NF; ++f) {
        const int64_t L = R.last_epoch(m, f);
        if (L < 0) continue;
        for (int64_t d = 0; d < c_.D; ++d) {
          if (cnt[m][f][L][d][0] == 0) continue;
          td_row({R.methods[m], R.finetune_datasets[f], R.eval_datasets[d], std::to_string(cnt[m][f][L][d][0]),
                  pct(rt[m][f][L][d][0]), pct(rt[m][f][L][d][1]), pct(rt[m][f][L][d][2]), pct(rt[m][f][L][d][3])},
                 3);
        }
      }
  }

  void drift() {
    const auto points = answer_drift(c_.R);
    if (points.empty()) return;
    h_ << "</table>\n<h2>Answer drift (% of answers naming a class of the fine-tuned dataset)</h2>\n"
          "<p class=\"meta\">Per other eval dataset: the share of its answers that name one of the fine-tuned "
          "dataset's classes, pooled over seeds, Wilson 95% interval; epoch 0 is the base model.</p>\n<table>\n";
    th_row({"method", "fine-tuned on", "eval dataset", "epoch", "n", "drift", "95% CI"}, 3);
    for (const auto& p : points)
      td_row({p.method, p.finetune, p.eval, std::to_string(p.epoch), std::to_string(p.n), pct(p.rate),
              pct(p.ci_low) + " - " + pct(p.ci_high)}, 3);
  }

  const ReportContext& c_;
  std::ostringstream h_;
};

}  // namespace

ReportFiles write_report(const LoadedResults& results, const ReportOptions& opts) {
  if (opts.out_dir.empty()) throw ConfigError("[report] no output directory (--out)");
  ReportContext c(results, opts.scorer, opts.out_dir);
  std::error_code ec;
  fs::create_directories(c.out / "plots", ec);
  if (ec) throw IoError(fmt::format("[report] cannot create '{}': {}", (c.out / "plots").string(), ec.message()));
  const auto jacc = write_accuracy_tables(c);
  const auto [jforget, jsum] = write_forgetting_tables(c);
  const auto jgap = write_encoder_gap_table(c);
  const auto jver = write_verdict_table(c);
  const auto jdrift = write_drift_table(c);
  write_report_json(c, jacc, jforget, jsum, jgap, jver, jdrift);
  const auto images = write_plots(c);
  c.files.matrix = format_matrix(c.R);
  c.files.html = (c.out / "report.html").string();
  write_file_atomic(c.files.html, HtmlReport(c).render(opts.title, jforget, jsum, images));
  return c.files;
}

}  // namespace emt
