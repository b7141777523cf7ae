// The report's figures, drawn once with PLplot and rendered by its cairo drivers as PNG, SVG and PDF.
#include <emt/core/error.h>
#include <emt/eval/report.h>
#include <fmt/format.h>
#ifdef EMT_WITH_PLOTS
#include <plplot/plplot.h>
#endif

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <sstream>
#include <unistd.h>

#ifndef EMT_WITH_PLOTS
// A build without PLplot (EMT_WITH_PLOTS=OFF): the report leaves its figures out (eval/report.cpp); asking for
// one is an error.
namespace emt {
namespace {
[[noreturn]] void no_plplot() {
  throw Error("[report] this emt was built without PLplot (EMT_WITH_PLOTS=OFF), so it draws no figures: run "
              "`emt report` on a build that has it");
}
}  // namespace
std::string plot_accuracy(const AccuracyTensor&, int64_t, int64_t, PlotFormat) { no_plplot(); }
std::string plot_drift(const AccuracyTensor&, int64_t, PlotFormat) { no_plplot(); }
std::string plot_tradeoff(const AccuracyTensor&, int64_t, PlotFormat) { no_plplot(); }
std::string plot_radar(const AccuracyTensor&, int64_t, PlotFormat) { no_plplot(); }
std::string plot_heatmap(const AccuracyTensor&, int64_t, PlotFormat) { no_plplot(); }
std::string plot_verdicts(const AccuracyTensor&, int64_t, int64_t, PlotFormat) { no_plplot(); }
}  // namespace emt
#else
namespace emt {

namespace fs = std::filesystem;

namespace {

using Rgb = std::array<int, 3>;
const Rgb kBlack{30, 30, 30}, kAxis{90, 90, 90}, kGrid{225, 225, 225}, kNone{240, 240, 240}, kWhite{255, 255, 255};

// Twenty well-separated colours: the usual categorical palette of plotting libraries, then ten darker or
// stronger hues, so that a study's dozen or more methods (wise-ft@A counts as one each) keep apart.
Rgb palette(size_t i) {
  static const Rgb p[] = {{31, 119, 180}, {255, 127, 14}, {44, 160, 44},   {214, 39, 40},  {148, 103, 189},
                          {140, 86, 75},  {227, 119, 194}, {127, 127, 127}, {188, 189, 34}, {23, 190, 207},
                          {0, 0, 0},      {0, 0, 128},     {128, 128, 0},   {128, 0, 0},    {0, 128, 128},
                          {255, 200, 0},  {75, 0, 130},    {0, 200, 100},   {250, 128, 114}, {112, 128, 144}};
  return p[i % 20];
}

// Viridis at nine evenly spaced points; PLplot's colour map 1 interpolates between them.
const std::array<Rgb, 9> kViridis = {{{68, 1, 84},    {71, 44, 122},  {59, 81, 139},   {44, 113, 142}, {33, 144, 141},
                                      {39, 173, 129}, {92, 200, 99},  {170, 220, 50},  {253, 231, 37}}};

bool known(double v) { return std::isfinite(v); }
std::string percent_text(double v) { return known(v) ? fmt::format("{:.1f}", 100.0 * v) : "-"; }

// PLplot reads '#' as the start of an escape sequence.
std::string esc(const std::string& s) {
  std::string out;
  for (char c : s) out += c == '#' ? std::string("##") : std::string(1, c);
  return out;
}

void colour(const Rgb& c, double alpha = 1.0) {
  plscol0a(15, c[0], c[1], c[2], alpha);
  plcol0(15);
}

const char* device(PlotFormat f) {
  switch (f) {
    case PlotFormat::png: return "pngcairo";
    case PlotFormat::svg: return "svgcairo";
    case PlotFormat::pdf: return "pdfcairo";
  }
  return "";
}

// PLplot keeps one current stream per process: figures are drawn one at a time.
std::mutex g_plot_mutex;
std::atomic<int64_t> g_plot_counter{0};

void check_driver(const char* dev) {
  static std::once_flag once;
  static std::vector<std::string> have;
  std::call_once(once, [] {
    std::vector<const char*> menus(256), names(256);
    const char** mp = menus.data();
    const char** np = names.data();
    PLINT n = static_cast<PLINT>(names.size());
    plgFileDevs(&mp, &np, &n);
    for (PLINT i = 0; i < n; ++i) have.emplace_back(names[static_cast<size_t>(i)]);
  });
  if (std::find(have.begin(), have.end(), dev) == have.end())
    throw Error(fmt::format("[report] the PLplot driver '{}' is not installed (install plplot-driver-cairo)", dev));
}

// One figure: draw() runs on a fresh PLplot stream of the format's cairo device, w x h pixels (points for
// PDF/SVG); the rendered file's bytes come back.
std::string render(PlotFormat fmt_, int w, int h, const std::function<void()>& draw) {
  std::lock_guard<std::mutex> lock(g_plot_mutex);
  const char* dev = device(fmt_);
  check_driver(dev);
  const fs::path tmp = fs::temp_directory_path() /
                       fmt::format("emt-plot-{}-{}.{}", ::getpid(), g_plot_counter++, dev);
  PLINT old = 0, strm = 0;
  plgstrm(&old);
  plmkstrm(&strm);
  if (strm < 0) throw Error("[report] PLplot has no free stream");
  plsdev(dev);
  plsfnam(tmp.c_str());
  plspage(0, 0, w, h, 0, 0);
  plscolbg(kWhite[0], kWhite[1], kWhite[2]);
  plsetopt("drvopt", "text_clipping=1");
  plinit();
  std::string bytes;
  try {
    pladv(0);
    draw();
    plend1();
    plsstrm(old);
    std::ifstream in(tmp, std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  } catch (...) {
    plend1();
    plsstrm(old);
    fs::remove(tmp);
    throw;
  }
  fs::remove(tmp);
  if (bytes.empty()) throw Error(fmt::format("[report] PLplot's {} driver wrote nothing", dev));
  return bytes;
}

// ---- layout helpers: viewports in normalised page coordinates ----------------------------------------------------

void title(const std::string& s) {
  plvpor(0.0, 1.0, 0.0, 1.0);
  plwind(0, 1, 0, 1);
  colour(kBlack);
  plschr(0, 0.95);
  plptex(0.5, 0.945, 1, 0, 0.5, esc(s).c_str());
  plschr(0, 0.8);
}

// A plot frame with a 0..100 % y axis and a grid at every 20 %; x spans [x0, x1]. Leaves the viewport set.
void percent_frame(double vx0, double vx1, double vy0, double vy1, double x0, double x1, const std::string& ylabel) {
  plvpor(vx0, vx1, vy0, vy1);
  plwind(x0, x1, 0, 100);
  colour(kGrid);
  plbox("", 0, 0, "g", 20, 0);
  colour(kAxis);
  plbox("bc", 0, 0, "bcnstv", 20, 0);
  colour(kBlack);
  plmtex("l", 3.6, 0.5, 0.5, esc(ylabel).c_str());
}

// Ticks and labels 0..L (at most about 12) under the frame, the axis title below them.
void epoch_ticks(int64_t L, double x0, double x1, const std::string& label) {
  const int64_t step = std::max<int64_t>(1, L / 12);
  colour(kBlack);
  for (int64_t e = 0; e <= L; e += step) {
    const double pos = (static_cast<double>(e) - x0) / (x1 - x0);
    plmtex("b", 1.4, pos, 0.5, std::to_string(e).c_str());
  }
  plmtex("b", 3.0, 0.5, 0.5, esc(label).c_str());
}

struct LegendItem {
  std::string name;
  Rgb rgb;
  enum Kind { line, dashed, box, hollow } kind = line;
};

// Legend rows in a viewport of its own (the page's right margin by default), a heading first.
void legend(const std::string& heading, const std::vector<LegendItem>& items, double vx0 = 0.755,
            double vx1 = 0.995, double vy1 = 0.88) {
  plvpor(vx0, vx1, 0.05, vy1);
  plwind(0, 1, 0, 1);
  const double row = 0.065;
  colour(kBlack);
  double y = 1.0 - row / 2;
  if (!heading.empty()) {
    plptex(0.02, y, 1, 0, 0, esc(heading).c_str());
    y -= row;
  }
  for (const auto& it : items) {
    colour(it.rgb);
    PLFLT xs[2] = {0.03, 0.15}, ys[2] = {y, y};
    if (it.kind == LegendItem::box) {
      PLFLT bx[4] = {0.04, 0.13, 0.13, 0.04}, by[4] = {y - 0.018, y - 0.018, y + 0.018, y + 0.018};
      plfill(4, bx, by);
    } else if (it.kind == LegendItem::hollow) {
      PLFLT x = 0.09;
      plstring(1, &x, &y, "□");
    } else {
      pllsty(it.kind == LegendItem::dashed ? 2 : 1);
      plwidth(2);
      plline(2, xs, ys);
      pllsty(1);
      plwidth(1);
      PLFLT x = 0.09;
      if (it.kind == LegendItem::line) plstring(1, &x, &y, "●");
    }
    colour(kBlack);
    plptex(0.19, y, 1, 0, 0, esc(it.name).c_str());
    y -= row;
  }
}

// A polyline with filled round markers (the last one larger when `last_big`).
void series(const std::vector<double>& x, const std::vector<double>& y, const Rgb& c, double width,
            bool last_big = false) {
  if (x.empty()) return;
  colour(c);
  plwidth(width);
  if (x.size() > 1) plline(static_cast<PLINT>(x.size()), x.data(), y.data());
  plwidth(1);
  for (size_t i = 0; i < x.size(); ++i) {
    const bool big = last_big && i + 1 == x.size();
    plschr(0, big ? 1.25 : 0.9);
    plstring(1, &x[i], &y[i], "●");
  }
  plschr(0, 0.8);
}

}  // namespace

// ---- the figures ------------------------------------------------------------------------------------------------

std::string plot_accuracy(const AccuracyTensor& R, int64_t m, int64_t f, PlotFormat fmt_) {
  const std::string& ft = R.finetune_datasets.at(f);
  const int64_t L = std::max<int64_t>(R.last_epoch(m, f), 1);
  const bool clip_any = std::any_of(R.clip.begin(), R.clip.end(), [](double v) { return known(v); });
  // With CLIP numbers the x axis gets one extra slot after the last epoch, marked "CLIP", with hollow squares.
  const double xc = L + 0.7, x0 = -0.3, x1 = clip_any ? xc + 0.3 : L + 0.3;
  return render(fmt_, kPlotWidth, kPlotHeight, [&] {
    title(fmt::format("{} fine-tuned on {}: accuracy per epoch ({} scorer)", R.methods.at(m), ft, R.scorer));
    percent_frame(0.09, 0.73, 0.14, 0.88, x0, x1, "accuracy (%)");
    epoch_ticks(L, x0, x1, "epoch (0 = base model)");
    if (clip_any) {
      colour(kGrid);
      pllsty(2);
      PLFLT sx[2] = {(L + xc) / 2, (L + xc) / 2}, sy[2] = {0, 100};
      plline(2, sx, sy);
      pllsty(1);
      colour(kBlack);
      plmtex("b", 1.4, (xc - x0) / (x1 - x0), 0.5, "CLIP");
      for (size_t d = 0; d < R.clip.size(); ++d)
        if (known(R.clip[d])) {
          colour(palette(d));
          PLFLT x = xc, y = 100 * R.clip[d];
          plschr(0, 1.1);
          plstring(1, &x, &y, "□");
          plschr(0, 0.8);
        }
    }
    std::vector<LegendItem> items;
    for (size_t d = 0; d < R.eval_datasets.size(); ++d) {
      const bool own = R.eval_datasets[d] == ft;
      std::vector<double> xs, ys;
      for (int64_t e = 0; e <= L; ++e) {
        const double a = R.at(m, f, e, static_cast<int64_t>(d));
        if (known(a)) xs.push_back(static_cast<double>(e)), ys.push_back(100 * a);
      }
      series(xs, ys, palette(d), own ? 3 : 2);
      items.push_back({R.eval_datasets[d] + (own ? " (tuned)" : ""), palette(d)});
    }
    if (clip_any) items.push_back({"CLIP zero-shot", kAxis, LegendItem::hollow});
    legend("eval dataset", items);
  });
}

std::string plot_drift(const AccuracyTensor& R, int64_t f, PlotFormat fmt_) {
  const std::string& ft = R.finetune_datasets.at(f);
  // One line per method: the pooled share over the other datasets at each epoch.
  std::vector<std::vector<std::array<int64_t, 2>>> sums(R.methods.size(),
                                                        std::vector<std::array<int64_t, 2>>(R.epochs + 1, {0, 0}));
  int64_t L = 1;
  for (const auto& p : answer_drift(R)) {
    if (p.finetune != ft) continue;
    auto& s = sums[R.method_index(p.method)][p.epoch];
    s[0] += p.n, s[1] += p.naming;
    L = std::max(L, p.epoch);
  }
  return render(fmt_, kPlotWidth, kPlotHeight, [&] {
    title(fmt::format("fine-tuned on {}: other datasets' answers naming its classes", ft));
    percent_frame(0.09, 0.73, 0.14, 0.88, -0.3, L + 0.3, "answers naming a class of " + ft + " (%)");
    epoch_ticks(L, -0.3, L + 0.3, "epoch (0 = base model)");
    std::vector<LegendItem> items;
    for (size_t m = 0; m < R.methods.size(); ++m) {
      std::vector<double> xs, ys;
      for (int64_t e = 0; e <= L; ++e)
        if (sums[m][e][0] > 0) xs.push_back(static_cast<double>(e)), ys.push_back(100.0 * sums[m][e][1] / sums[m][e][0]);
      if (xs.empty()) continue;
      series(xs, ys, palette(m), 2);
      items.push_back({R.methods[m], palette(m)});
    }
    legend("method", items);
  });
}

std::string plot_tradeoff(const AccuracyTensor& R, int64_t f, PlotFormat fmt_) {
  const std::string& ft = R.finetune_datasets.at(f);
  std::vector<TradeoffPoint> pts;
  for (const auto& p : learning_vs_forgetting(R))
    if (p.finetune == ft && known(p.gain) && known(p.change)) pts.push_back(p);
  // axes in points, spanning every interval and 0, rounded out to 10
  double x0 = 0, x1 = 0, y0 = 0, y1 = 0;
  for (const auto& p : pts) {
    x0 = std::min(x0, p.gain_low), x1 = std::max(x1, p.gain_high);
    y0 = std::min(y0, p.change_low), y1 = std::max(y1, p.change_high);
  }
  auto out10 = [](double v, bool up) { return (up ? std::ceil(v * 10.0 + 1e-9) : std::floor(v * 10.0 - 1e-9)) * 10.0; };
  x0 = out10(x0, false), x1 = std::max(out10(x1, true), x0 + 10), y0 = out10(y0, false), y1 = std::max(out10(y1, true), y0 + 10);
  return render(fmt_, kPlotWidth, kPlotHeight, [&] {
    title(fmt::format("fine-tuned on {}: learning vs forgetting ({} scorer)", ft, R.scorer));
    plvpor(0.1, 0.73, 0.14, 0.88);
    plwind(x0, x1, y0, y1);
    const double xs = (x1 - x0) > 60 ? 20 : 10, ys = (y1 - y0) > 60 ? 20 : 10;
    colour(kGrid);
    plbox("g", xs, 0, "g", ys, 0);
    colour(kAxis);
    PLFLT zx[2] = {0, 0}, zy[2] = {y0, y1}, hx[2] = {x0, x1}, hy[2] = {0, 0};
    plline(2, zx, zy);
    plline(2, hx, hy);
    plbox("bcnst", xs, 0, "bcnstv", ys, 0);
    colour(kBlack);
    plmtex("b", 3.0, 0.5, 0.5, "gain on the fine-tuned dataset (points, 95% CI); a dot per epoch, large = last");
    plmtex("l", 3.6, 0.5, 0.5, "mean change on the others (points)");
    std::vector<LegendItem> items;
    for (size_t m = 0; m < R.methods.size(); ++m) {
      std::vector<double> gx, gy, lo, hi, clo, chi;
      for (const auto& p : pts) {
        if (p.method != R.methods[m]) continue;
        gx.push_back(100 * p.gain), gy.push_back(100 * p.change);
        lo.push_back(100 * p.gain_low), hi.push_back(100 * p.gain_high);
        clo.push_back(100 * p.change_low), chi.push_back(100 * p.change_high);
      }
      if (gx.empty()) continue;
      colour(palette(m));
      const auto n = static_cast<PLINT>(gx.size());
      plerrx(n, lo.data(), hi.data(), gy.data());
      plerry(n, gx.data(), clo.data(), chi.data());
      series(gx, gy, palette(m), 2, true);
      items.push_back({R.methods[m], palette(m)});
    }
    legend("method", items);
  });
}

std::string plot_radar(const AccuracyTensor& R, int64_t m, PlotFormat fmt_) {
  const int D = static_cast<int>(R.eval_datasets.size());
  const double pi = std::acos(-1.0);
  auto at = [&](int d, double frac, PLFLT& x, PLFLT& y) {
    const double ang = pi / 2 - 2 * pi * d / std::max(D, 1);  // first spoke up, clockwise
    x = frac * std::cos(ang), y = frac * std::sin(ang);
  };
  return render(fmt_, kRadarSize, kRadarSize, [&] {
    title(fmt::format("{}: accuracy at the last epoch ({} scorer)", R.methods.at(m), R.scorer));
    plvpor(0.1, 0.9, 0.02, 0.82);
    plwind(-1.3, 1.3, -1.3, 1.3);
    colour(kGrid);
    for (int t = 20; t <= 100; t += 20) {
      std::vector<PLFLT> xs, ys;
      const int k = D >= 3 ? D : 72;  // polygons for 3+ spokes, circles otherwise
      for (int i = 0; i <= k; ++i) {
        PLFLT x, y;
        if (D >= 3) at(i % D, t / 100.0, x, y);
        else x = t / 100.0 * std::cos(2 * pi * i / k), y = t / 100.0 * std::sin(2 * pi * i / k);
        xs.push_back(x), ys.push_back(y);
      }
      plline(static_cast<PLINT>(xs.size()), xs.data(), ys.data());
    }
    // Ring values along the bisector of the first two spokes, where no series vertex sits.
    const double lab_ang = pi / 2 - pi / std::max(D, 2), side = D >= 3 ? std::cos(pi / D) : 1.0;
    colour(kAxis);
    plschr(0, 0.65);
    for (int t = 20; t <= 100; t += 20)
      plptex(side * t / 100 * std::cos(lab_ang) + 0.03, side * t / 100 * std::sin(lab_ang), 1, 0, 0,
             std::to_string(t).c_str());
    plschr(0, 0.8);
    for (int d = 0; d < D; ++d) {
      PLFLT x, y;
      at(d, 1.0, x, y);
      PLFLT sx[2] = {0, x}, sy[2] = {0, y};
      colour(kGrid);
      plline(2, sx, sy);
      at(d, 1.12, x, y);
      colour(kBlack);
      plptex(x, y, 1, 0, x > 0.2 ? 0.0 : x < -0.2 ? 1.0 : 0.5, esc(R.eval_datasets[d]).c_str());
    }
    std::vector<LegendItem> items;
    auto one = [&](const std::vector<double>& vals, const Rgb& c, bool dash) {
      std::vector<PLFLT> xs, ys;
      for (int d = 0; d < D; ++d) {
        PLFLT x, y;
        at(d, known(vals[d]) ? vals[d] : 0.0, x, y);
        xs.push_back(x), ys.push_back(y);
      }
      if (D >= 3 && !dash) {
        colour(c, 0.12);
        plfill(D, xs.data(), ys.data());
      }
      if (D >= 3) xs.push_back(xs[0]), ys.push_back(ys[0]);
      colour(c);
      pllsty(dash ? 2 : 1);
      plwidth(2);
      if (D >= 2) plline(static_cast<PLINT>(xs.size()), xs.data(), ys.data());
      pllsty(1);
      plwidth(1);
      plschr(0, 0.8);
      for (int d = 0; d < D; ++d)
        if (known(vals[d])) plstring(1, &xs[d], &ys[d], "●");
    };
    one(R.base, kAxis, true);
    items.push_back({"base model", kAxis, LegendItem::dashed});
    for (size_t f = 0; f < R.finetune_datasets.size(); ++f) {
      const int64_t L = R.last_epoch(m, static_cast<int64_t>(f));
      if (L < 0) continue;
      std::vector<double> vals(D);
      for (int d = 0; d < D; ++d) vals[d] = R.at(m, static_cast<int64_t>(f), L, d);
      one(vals, palette(f), false);
      items.push_back({fmt::format("tuned on {} (e{})", R.finetune_datasets[f], L), palette(f)});
    }
    plschr(0, 0.7);
    legend("", items, 0.01, 0.45, 0.91);
  });
}

std::string plot_heatmap(const AccuracyTensor& R, int64_t m, PlotFormat fmt_) {
  const int64_t F = R.finetune_datasets.size(), D = R.eval_datasets.size();
  const int64_t rows = F + 1;
  return render(fmt_, kPlotWidth, kPlotHeight, [&] {
    std::vector<PLFLT> pos, r, g, b;
    for (size_t i = 0; i < kViridis.size(); ++i) {
      pos.push_back(static_cast<double>(i) / (kViridis.size() - 1));
      r.push_back(kViridis[i][0] / 255.0), g.push_back(kViridis[i][1] / 255.0), b.push_back(kViridis[i][2] / 255.0);
    }
    plscmap1n(256);
    plscmap1l(1, static_cast<PLINT>(pos.size()), pos.data(), r.data(), g.data(), b.data(), nullptr);
    title(fmt::format("{}: accuracy (%) at the last epoch, fine-tune x eval ({} scorer)", R.methods.at(m), R.scorer));
    plvpor(0.22, 0.84, 0.12, 0.82);
    plwind(0, static_cast<double>(D), 0, static_cast<double>(rows));
    for (int64_t d = 0; d < D; ++d)
      plmtex("t", 0.8, (d + 0.5) / std::max<int64_t>(D, 1), 0.5, esc(R.eval_datasets[d]).c_str());
    colour(kAxis);
    plmtex("t", 0.8, -0.02, 1.0, "eval dataset ->");
    for (int64_t row = 0; row < rows; ++row) {
      const std::string name =
          row == 0 ? "base model" : fmt::format("{} (e{})", R.finetune_datasets[row - 1], R.last_epoch(m, row - 1));
      const double y = static_cast<double>(rows - 1 - row);  // the base model on top
      colour(kBlack);
      plmtex("lv", 0.8, (y + 0.5) / rows, 1.0, esc(name).c_str());
      for (int64_t d = 0; d < D; ++d) {
        const double v = row == 0 ? R.base[d] : R.at(m, row - 1, std::max<int64_t>(R.last_epoch(m, row - 1), 0), d);
        PLFLT cx[4] = {d + 0.02, d + 0.98, d + 0.98, d + 0.02}, cy[4] = {y + 0.02, y + 0.02, y + 0.98, y + 0.98};
        if (known(v)) plcol1(std::clamp(v, 0.0, 1.0));
        else colour(kNone);
        plfill(4, cx, cy);
        const bool own = row > 0 && R.eval_datasets[d] == R.finetune_datasets[row - 1];
        colour(known(v) && v < 0.62 ? kWhite : kBlack);
        plschr(0, own ? 1.05 : 0.9);
        plptex(d + 0.5, y + 0.45, 1, 0, 0.5, (known(v) ? percent_text(v) : std::string("n/a")).c_str());
        plschr(0, 0.8);
      }
    }
    colour(kAxis);
    plmtex("b", 2.0, 0.0, 0.0, "rows: fine-tuned on (last epoch); larger numbers: its own dataset");
    // Colour bar.
    plvpor(0.88, 0.91, 0.12, 0.82);
    plwind(0, 1, 0, 100);
    for (int i = 0; i < 100; ++i) {
      PLFLT bx[4] = {0, 1, 1, 0}, by[4] = {double(i), double(i), i + 1.0, i + 1.0};
      plcol1((i + 0.5) / 100.0);
      plfill(4, bx, by);
    }
    colour(kBlack);
    plbox("", 0, 0, "cmstv", 25, 0);
  });
}

std::string plot_verdicts(const AccuracyTensor& R, int64_t m, int64_t f, PlotFormat fmt_) {
  const int64_t L = std::max<int64_t>(R.last_epoch(m, f), 0);
  const std::vector<LegendItem> kinds = {{"correct", {44, 160, 44}, LegendItem::box},
                                         {"incorrect", {255, 127, 14}, LegendItem::box},
                                         {"intrinsic halluc.", {214, 39, 40}, LegendItem::box},
                                         {"extrinsic halluc.", {148, 103, 189}, LegendItem::box}};
  auto cnt = R.counts.accessor<int64_t, 5>();
  const int64_t D = R.eval_datasets.size();
  return render(fmt_, kPlotWidth, kPlotHeight, [&] {
    title(fmt::format("{} fine-tuned on {}, epoch {}: answer verdicts ({} scorer)", R.methods.at(m),
                      R.finetune_datasets.at(f), L, R.scorer));
    percent_frame(0.09, 0.75, 0.14, 0.88, 0, static_cast<double>(std::max<int64_t>(D, 1)), "share of answers (%)");
    colour(kBlack);
    plmtex("b", 3.0, 0.5, 0.5, "eval dataset");
    for (int64_t d = 0; d < D; ++d) {
      const double cx = d + 0.5;
      colour(kBlack);
      plmtex("b", 1.4, cx / std::max<int64_t>(D, 1), 0.5, esc(R.eval_datasets[d]).c_str());
      const int64_t n = cnt[m][f][L][d][0];
      if (n == 0) {
        colour(kAxis);
        plptex(cx, 4, 1, 0, 0.5, "n/a");
        colour(kBlack);
        continue;
      }
      double acc = 0.0;
      for (int k = 0; k < 4; ++k) {
        const double share = 100.0 * static_cast<double>(cnt[m][f][L][d][k + 1]) / static_cast<double>(n);
        PLFLT bx[4] = {cx - 0.3, cx + 0.3, cx + 0.3, cx - 0.3}, by[4] = {acc, acc, acc + share, acc + share};
        colour(kinds[k].rgb);
        if (share > 0) plfill(4, bx, by);
        if (share >= 6) {
          colour(kWhite);
          plptex(cx, acc + share / 2 - 1.2, 1, 0, 0.5, fmt::format("{:.0f}", share).c_str());
        }
        acc += share;
      }
    }
    legend("verdict", kinds, 0.775);
  });
}

}  // namespace emt
#endif  // EMT_WITH_PLOTS
