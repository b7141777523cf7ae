// The forgetting report: CSV/JSON tables, OpenCV-drawn PNG plots, a self-contained report.html and the plain-text
// matrix. Everything is computed from results rows, so a report can be rebuilt from any set of run directories.
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include <emt/eval/report.h>
#include <fmt/format.h>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
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

// ---- drawing helpers ----------------------------------------------------------------------------------------------

const cv::Scalar kBlack(30, 30, 30), kGrid(225, 225, 225), kAxis(90, 90, 90), kWhite(255, 255, 255);
constexpr int kFont = cv::FONT_HERSHEY_SIMPLEX;

// Ten well-separated colours (BGR), the usual categorical palette of plotting libraries.
cv::Scalar palette(size_t i) {
  static const cv::Scalar p[] = {{180, 119, 31}, {14, 127, 255}, {44, 160, 44},  {40, 39, 214},   {189, 103, 148},
                                 {75, 86, 140},  {194, 119, 227}, {127, 127, 127}, {34, 189, 188}, {207, 190, 23}};
  return p[i % 10];
}

enum class Align { left, center, right };

int text_width(const std::string& s, double scale, int thick = 1) {
  int base = 0;
  return cv::getTextSize(s, kFont, scale, thick, &base).width;
}

// y is the text's vertical centre.
void text(cv::Mat& img, const std::string& s, int x, int y, double scale, const cv::Scalar& color, Align a = Align::left,
          int thick = 1) {
  int base = 0;
  cv::Size sz = cv::getTextSize(s, kFont, scale, thick, &base);
  int x0 = a == Align::left ? x : a == Align::center ? x - sz.width / 2 : x - sz.width;
  cv::putText(img, s, {x0, y + sz.height / 2}, kFont, scale, color, thick, cv::LINE_AA);
}

std::string shorten(const std::string& s, double scale, int max_px) {
  if (text_width(s, scale) <= max_px) return s;
  std::string t = s;
  while (!t.empty() && text_width(t + "..", scale) > max_px) t.pop_back();
  return t + "..";
}

void vertical_text(cv::Mat& img, const std::string& s, int cx, int cy, double scale, const cv::Scalar& color) {
  int base = 0;
  cv::Size sz = cv::getTextSize(s, kFont, scale, 1, &base);
  cv::Mat t(sz.height + base + 4, sz.width + 4, img.type(), kWhite);
  cv::putText(t, s, {2, sz.height + 2}, kFont, scale, color, 1, cv::LINE_AA);
  cv::Mat r;
  cv::rotate(t, r, cv::ROTATE_90_COUNTERCLOCKWISE);
  int x = std::max(0, cx - r.cols / 2), y = std::max(0, cy - r.rows / 2);
  cv::Rect roi(x, y, std::min(r.cols, img.cols - x), std::min(r.rows, img.rows - y));
  r(cv::Rect(0, 0, roi.width, roi.height)).copyTo(img(roi));
}

void title(cv::Mat& img, const std::string& s) {
  text(img, shorten(s, 0.62, img.cols - 20), img.cols / 2, 24, 0.62, kBlack, Align::center, 1);
}

void dashed_line(cv::Mat& img, cv::Point a, cv::Point b, const cv::Scalar& c, int thick) {
  double len = std::hypot(b.x - a.x, b.y - a.y);
  int n = std::max(1, static_cast<int>(len / 8));
  for (int i = 0; i < n; i += 2) {
    cv::Point p(a.x + (b.x - a.x) * i / n, a.y + (b.y - a.y) * i / n);
    cv::Point q(a.x + (b.x - a.x) * std::min(i + 1, n) / n, a.y + (b.y - a.y) * std::min(i + 1, n) / n);
    cv::line(img, p, q, c, thick, cv::LINE_AA);
  }
}

std::string encode_png(const cv::Mat& img) {
  std::vector<uchar> buf;
  if (!cv::imencode(".png", img, buf)) throw Error("[report] PNG encoding failed");
  return std::string(buf.begin(), buf.end());
}

// Legend rows in the right margin: a colour swatch (line or box) and a name.
void legend(cv::Mat& img, int x, int y, const std::vector<std::pair<std::string, cv::Scalar>>& items, bool boxes,
            int max_px, const std::vector<bool>& dashed = {}) {
  for (size_t i = 0; i < items.size(); ++i) {
    int yy = y + static_cast<int>(i) * 24;
    if (boxes) {
      cv::rectangle(img, {x, yy - 7}, {x + 18, yy + 7}, items[i].second, cv::FILLED);
    } else if (i < dashed.size() && dashed[i]) {
      dashed_line(img, {x, yy}, {x + 24, yy}, items[i].second, 2);
    } else {
      cv::line(img, {x, yy}, {x + 24, yy}, items[i].second, 2, cv::LINE_AA);
      cv::circle(img, {x + 12, yy}, 4, items[i].second, cv::FILLED, cv::LINE_AA);
    }
    text(img, shorten(items[i].first, 0.45, max_px - 32), x + 30, yy, 0.45, kBlack);
  }
}

// Plot frame with a 0..100 % y axis; returns the plot rectangle.
cv::Rect y_percent_frame(cv::Mat& img, int left, int right, int top, int bottom, const std::string& ylabel) {
  cv::Rect r(left, top, img.cols - left - right, img.rows - top - bottom);
  for (int t = 0; t <= 100; t += 20) {
    int y = r.y + r.height - r.height * t / 100;
    cv::line(img, {r.x, y}, {r.x + r.width, y}, kGrid, 1);
    cv::line(img, {r.x - 5, y}, {r.x, y}, kAxis, 1);
    text(img, std::to_string(t), r.x - 9, y, 0.45, kBlack, Align::right);
  }
  cv::line(img, {r.x, r.y}, {r.x, r.y + r.height}, kAxis, 1);
  cv::line(img, {r.x, r.y + r.height}, {r.x + r.width, r.y + r.height}, kAxis, 1);
  vertical_text(img, ylabel, 16, r.y + r.height / 2, 0.5, kBlack);
  return r;
}

// Ticks 0..L (at most about 12 of them) under the plot rectangle and the epoch axis title.
template <class XOf>
void epoch_axis(cv::Mat& img, const cv::Rect& r, int64_t L, const XOf& xof) {
  const int64_t step = std::max<int64_t>(1, L / 12);
  for (int64_t e = 0; e <= L; e += step) {
    cv::line(img, {xof(e), r.y + r.height}, {xof(e), r.y + r.height + 5}, kAxis, 1);
    text(img, std::to_string(e), xof(e), r.y + r.height + 16, 0.45, kBlack, Align::center);
  }
  text(img, "epoch (0 = base model)", r.x + r.width / 2, img.rows - 18, 0.5, kBlack, Align::center);
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

// ---- plots ------------------------------------------------------------------------------------------------------

std::string plot_accuracy_png(const AccuracyTensor& R, int64_t m, int64_t f) {
  cv::Mat img(kPlotHeight, kPlotWidth, CV_8UC3, kWhite);
  const std::string& ft = R.finetune_datasets.at(f);
  title(img, fmt::format("{} fine-tuned on {}: accuracy per epoch ({} scorer)", R.methods.at(m), ft, R.scorer));
  cv::Rect r = y_percent_frame(img, 70, 210, 50, 60, "accuracy (%)");
  const int64_t L = std::max<int64_t>(R.last_epoch(m, f), 1);
  const bool clip_any = std::any_of(R.clip.begin(), R.clip.end(), [](double v) { return finite(v); });
  // With CLIP numbers the x axis gets one extra slot after the last epoch, marked "CLIP", with hollow squares.
  const double x_span = clip_any ? L + 0.7 : static_cast<double>(L);
  auto xof = [&](double e) { return r.x + 20 + static_cast<int>(std::lround((r.width - 40) * e / x_span)); };
  auto yof = [&](double a) { return r.y + r.height - static_cast<int>(std::lround(r.height * a)); };
  epoch_axis(img, r, L, xof);
  if (clip_any) {
    const int xc = xof(L + 0.7);
    dashed_line(img, {(xof(L) + xc) / 2, r.y}, {(xof(L) + xc) / 2, r.y + r.height}, kGrid, 1);
    text(img, "CLIP", xc, r.y + r.height + 16, 0.45, kBlack, Align::center);
    for (size_t d = 0; d < R.clip.size(); ++d)
      if (finite(R.clip[d]))
        cv::rectangle(img, {xc - 5, yof(R.clip[d]) - 5}, {xc + 5, yof(R.clip[d]) + 5}, palette(d), 2, cv::LINE_AA);
  }
  std::vector<std::pair<std::string, cv::Scalar>> items;
  for (size_t d = 0; d < R.eval_datasets.size(); ++d) {
    const bool own = R.eval_datasets[d] == ft;
    const cv::Scalar c = palette(d);
    std::vector<cv::Point> pts;
    for (int64_t e = 0; e <= L; ++e) {
      double a = R.at(m, f, e, d);
      if (finite(a)) pts.emplace_back(xof(e), yof(a));
    }
    for (size_t i = 1; i < pts.size(); ++i) cv::line(img, pts[i - 1], pts[i], c, own ? 3 : 2, cv::LINE_AA);
    for (auto& p : pts) cv::circle(img, p, own ? 6 : 5, c, cv::FILLED, cv::LINE_AA);
    items.push_back({R.eval_datasets[d] + (own ? " (tuned)" : ""), c});
  }
  text(img, "eval dataset", r.x + r.width + 18, r.y + 4, 0.5, kBlack);
  legend(img, r.x + r.width + 18, r.y + 30, items, false, 200);
  if (clip_any) {
    const int y = r.y + 30 + 24 * static_cast<int>(items.size());
    cv::rectangle(img, {r.x + r.width + 25, y - 5}, {r.x + r.width + 35, y + 5}, kAxis, 2, cv::LINE_AA);
    text(img, "CLIP zero-shot", r.x + r.width + 48, y, 0.45, kBlack);
  }
  return encode_png(img);
}

std::string plot_tradeoff_png(const AccuracyTensor& R, int64_t f) {
  cv::Mat img(kPlotHeight, kPlotWidth, CV_8UC3, kWhite);
  const std::string& ft = R.finetune_datasets.at(f);
  title(img, fmt::format("fine-tuned on {}: learning vs forgetting ({} scorer)", ft, R.scorer));
  std::vector<TradeoffPoint> pts;
  for (const auto& p : learning_vs_forgetting(R))
    if (p.finetune == ft && std::isfinite(p.gain) && std::isfinite(p.change)) pts.push_back(p);
  const cv::Rect r(80, 50, kPlotWidth - 80 - 210, kPlotHeight - 50 - 70);
  // axes in points, spanning every interval and 0, rounded out to 10
  double x0 = 0, x1 = 0, y0 = 0, y1 = 0;
  for (const auto& p : pts) {
    x0 = std::min(x0, p.gain_low), x1 = std::max(x1, p.gain_high);
    y0 = std::min(y0, p.change_low), y1 = std::max(y1, p.change_high);
  }
  auto out10 = [](double v, bool up) { return (up ? std::ceil(v * 10.0 + 1e-9) : std::floor(v * 10.0 - 1e-9)) * 10.0; };
  x0 = out10(x0, false), x1 = std::max(out10(x1, true), x0 + 10), y0 = out10(y0, false), y1 = std::max(out10(y1, true), y0 + 10);
  auto xof = [&](double v) { return r.x + static_cast<int>(std::lround(r.width * (100.0 * v - x0) / (x1 - x0))); };
  auto yof = [&](double v) { return r.y + r.height - static_cast<int>(std::lround(r.height * (100.0 * v - y0) / (y1 - y0))); };
  const double xs = (x1 - x0) > 60 ? 20 : 10, ys = (y1 - y0) > 60 ? 20 : 10;
  for (double t = std::ceil(x0 / xs - 1e-9) * xs; t <= x1 + 1e-9; t += xs) {
    cv::line(img, {xof(t / 100), r.y}, {xof(t / 100), r.y + r.height}, t == 0 ? kAxis : kGrid, 1);
    text(img, t == 0 ? std::string("0") : fmt::format("{:+.0f}", t), xof(t / 100), r.y + r.height + 14, 0.45, kBlack, Align::center);
  }
  for (double t = std::ceil(y0 / ys - 1e-9) * ys; t <= y1 + 1e-9; t += ys) {
    cv::line(img, {r.x, yof(t / 100)}, {r.x + r.width, yof(t / 100)}, t == 0 ? kAxis : kGrid, 1);
    text(img, t == 0 ? std::string("0") : fmt::format("{:+.0f}", t), r.x - 8, yof(t / 100), 0.45, kBlack, Align::right);
  }
  cv::rectangle(img, r, kAxis, 1);
  text(img, "gain on the fine-tuned dataset (points, 95% CI)", r.x + r.width / 2, img.rows - 22, 0.5, kBlack, Align::center);
  vertical_text(img, "mean change on the others (points)", 20, r.y + r.height / 2, 0.5, kBlack);
  std::vector<std::pair<std::string, cv::Scalar>> items;
  for (size_t m = 0; m < R.methods.size(); ++m) {
    const cv::Scalar c = palette(m);
    std::vector<cv::Point> line;
    for (const auto& p : pts) {
      if (p.method != R.methods[m]) continue;
      const cv::Point q(xof(p.gain), yof(p.change));
      cv::line(img, {xof(p.gain_low), q.y}, {xof(p.gain_high), q.y}, c, 1, cv::LINE_AA);
      cv::line(img, {q.x, yof(p.change_low)}, {q.x, yof(p.change_high)}, c, 1, cv::LINE_AA);
      line.push_back(q);
    }
    if (line.empty()) continue;
    for (size_t i = 1; i < line.size(); ++i) cv::line(img, line[i - 1], line[i], c, 2, cv::LINE_AA);
    for (size_t i = 0; i < line.size(); ++i) cv::circle(img, line[i], i + 1 == line.size() ? 6 : 4, c, cv::FILLED, cv::LINE_AA);
    items.push_back({R.methods[m], c});
  }
  text(img, "method (dot per epoch,", r.x + r.width + 18, r.y + 4, 0.45, kBlack);
  text(img, "large = last)", r.x + r.width + 18, r.y + 20, 0.45, kBlack);
  legend(img, r.x + r.width + 18, r.y + 46, items, false, 190);
  return encode_png(img);
}

std::string plot_drift_png(const AccuracyTensor& R, int64_t f) {
  cv::Mat img(kPlotHeight, kPlotWidth, CV_8UC3, kWhite);
  const std::string& ft = R.finetune_datasets.at(f);
  title(img, fmt::format("fine-tuned on {}: other datasets' answers naming its classes", ft));
  cv::Rect r = y_percent_frame(img, 70, 210, 50, 60, "answers naming a class of " + shorten(ft, 0.5, 140) + " (%)");
  // One line per method: the pooled share over the other datasets at each epoch.
  std::vector<std::vector<std::array<int64_t, 2>>> sums(R.methods.size(), std::vector<std::array<int64_t, 2>>(R.epochs + 1, {0, 0}));
  int64_t L = 1;
  for (const auto& p : answer_drift(R)) {
    if (p.finetune != ft) continue;
    auto& s = sums[R.method_index(p.method)][p.epoch];
    s[0] += p.n, s[1] += p.naming;
    L = std::max(L, p.epoch);
  }
  auto xof = [&](double e) { return r.x + 20 + static_cast<int>(std::lround((r.width - 40) * e / L)); };
  auto yof = [&](double a) { return r.y + r.height - static_cast<int>(std::lround(r.height * a)); };
  epoch_axis(img, r, L, xof);
  std::vector<std::pair<std::string, cv::Scalar>> items;
  for (size_t m = 0; m < R.methods.size(); ++m) {
    const cv::Scalar c = palette(m);
    std::vector<cv::Point> pts;
    for (int64_t e = 0; e <= L; ++e)
      if (sums[m][e][0] > 0) pts.emplace_back(xof(e), yof(static_cast<double>(sums[m][e][1]) / sums[m][e][0]));
    if (pts.empty()) continue;
    for (size_t i = 1; i < pts.size(); ++i) cv::line(img, pts[i - 1], pts[i], c, 2, cv::LINE_AA);
    for (auto& p : pts) cv::circle(img, p, 5, c, cv::FILLED, cv::LINE_AA);
    items.push_back({R.methods[m], c});
  }
  text(img, "method", r.x + r.width + 18, r.y + 4, 0.5, kBlack);
  legend(img, r.x + r.width + 18, r.y + 30, items, false, 200);
  return encode_png(img);
}

std::string plot_radar_png(const AccuracyTensor& R, int64_t m) {
  cv::Mat img(kRadarSize, kRadarSize, CV_8UC3, kWhite);
  title(img, fmt::format("{}: accuracy at the last epoch ({} scorer)", R.methods.at(m), R.scorer));
  const int D = static_cast<int>(R.eval_datasets.size());
  const double radius = D == 3 ? 185 : 155;  // a triangle leaves room below, so it may be drawn larger
  // Centre the polygon's vertical extent (a triangle reaches 1 radius up but only 0.5 down) in the free area.
  double lo = -1.0, hi = D >= 2 ? -1.0 : 0.0;
  for (int d = 0; d < D; ++d) hi = std::max(hi, std::sin(-CV_PI / 2 + 2 * CV_PI * d / D));
  const cv::Point c(kRadarSize / 2, static_cast<int>(std::lround(325 - radius * (lo + hi) / 2)));
  auto spoke = [&](int d, double frac) {
    double ang = -CV_PI / 2 + 2 * CV_PI * d / std::max(D, 1);
    return cv::Point(c.x + static_cast<int>(std::lround(radius * frac * std::cos(ang))),
                     c.y + static_cast<int>(std::lround(radius * frac * std::sin(ang))));
  };
  for (int t = 20; t <= 100; t += 20) {
    std::vector<cv::Point> ring;
    for (int d = 0; d < std::max(D, 3); ++d) ring.push_back(D >= 3 ? spoke(d, t / 100.0) : cv::Point());
    if (D >= 3) cv::polylines(img, ring, true, kGrid, 1, cv::LINE_AA);
    else cv::circle(img, c, static_cast<int>(radius * t / 100), kGrid, 1, cv::LINE_AA);
  }
  // Ring values along the bisector of the first two spokes, where no series vertex sits.
  const double lab_ang = -CV_PI / 2 + CV_PI / std::max(D, 2);
  const double side = D >= 3 ? std::cos(CV_PI / D) : 1.0;  // bisector distance to a ring's side, per radius
  for (int t = 20; t <= 100; t += 20)
    text(img, std::to_string(t), c.x + static_cast<int>(radius * side * t / 100 * std::cos(lab_ang)) + 3,
         c.y + static_cast<int>(radius * side * t / 100 * std::sin(lab_ang)), 0.38, kAxis);
  for (int d = 0; d < D; ++d) {
    cv::line(img, c, spoke(d, 1.0), kGrid, 1, cv::LINE_AA);
    cv::Point p = spoke(d, 1.1);
    double dx = p.x - c.x;
    Align a = dx > 20 ? Align::left : dx < -20 ? Align::right : Align::center;
    const int room = a == Align::left ? kRadarSize - p.x - 6 : a == Align::right ? p.x - 6
                                                              : 2 * std::min(p.x, kRadarSize - p.x) - 12;
    text(img, shorten(R.eval_datasets[d], 0.48, room), p.x, p.y, 0.48, kBlack, a);
  }
  std::vector<std::pair<std::string, cv::Scalar>> items;
  std::vector<bool> dashed;
  auto series = [&](const std::vector<double>& vals, const cv::Scalar& col, bool dash) {
    std::vector<cv::Point> pts;
    for (int d = 0; d < D; ++d) pts.push_back(spoke(d, finite(vals[d]) ? vals[d] : 0.0));
    if (D >= 3 && !dash) {
      cv::Mat overlay = img.clone();
      cv::fillPoly(overlay, std::vector<std::vector<cv::Point>>{pts}, col, cv::LINE_AA);
      cv::addWeighted(overlay, 0.12, img, 0.88, 0, img);
    }
    for (int d = 0; d < D; ++d) {
      cv::Point a = pts[d], b = pts[(d + 1) % D];
      if (D < 2 || (D == 2 && d == 1)) break;
      if (dash) dashed_line(img, a, b, col, 2);
      else cv::line(img, a, b, col, 2, cv::LINE_AA);
    }
    for (int d = 0; d < D; ++d)
      if (finite(vals[d])) cv::circle(img, pts[d], 4, col, cv::FILLED, cv::LINE_AA);
  };
  series(R.base, kAxis, true);
  items.push_back({"base model", kAxis});
  dashed.push_back(true);
  for (size_t f = 0; f < R.finetune_datasets.size(); ++f) {
    int64_t L = R.last_epoch(m, static_cast<int64_t>(f));
    if (L < 0) continue;
    std::vector<double> vals(D);
    for (int d = 0; d < D; ++d) vals[d] = R.at(m, static_cast<int64_t>(f), L, d);
    series(vals, palette(f), false);
    items.push_back({fmt::format("tuned on {} (e{})", R.finetune_datasets[f], L), palette(f)});
    dashed.push_back(false);
  }
  legend(img, 12, 56, items, false, 250, dashed);
  return encode_png(img);
}

std::string plot_heatmap_png(const AccuracyTensor& R, int64_t m) {
  cv::Mat img(kPlotHeight, kPlotWidth, CV_8UC3, kWhite);
  title(img, fmt::format("{}: accuracy (%) at the last epoch, fine-tune x eval ({} scorer)", R.methods.at(m), R.scorer));
  const int64_t F = R.finetune_datasets.size(), D = R.eval_datasets.size();
  const int left = 170, top = 80, right = 110, bottom = 50;
  const int rows = static_cast<int>(F) + 1;
  const int cw = (kPlotWidth - left - right) / std::max<int64_t>(D, 1);
  const int ch = std::min(110, (kPlotHeight - top - bottom) / rows);
  auto colour = [](double v) {
    cv::Mat g(1, 1, CV_8UC1, cv::Scalar(std::clamp(v, 0.0, 1.0) * 255.0)), out;
    cv::applyColorMap(g, out, cv::COLORMAP_VIRIDIS);
    auto p = out.at<cv::Vec3b>(0, 0);
    return cv::Scalar(p[0], p[1], p[2]);
  };
  for (int64_t d = 0; d < D; ++d)
    text(img, shorten(R.eval_datasets[d], 0.5, cw - 6), left + static_cast<int>(d) * cw + cw / 2, top - 14, 0.5, kBlack,
         Align::center);
  text(img, "eval dataset ->", left - 10, top - 14, 0.45, kAxis, Align::right);
  for (int row = 0; row < rows; ++row) {
    std::string name = row == 0 ? "base model" : fmt::format("{} (e{})", R.finetune_datasets[row - 1],
                                                             R.last_epoch(m, row - 1));
    int y = top + row * ch;
    text(img, shorten(name, 0.5, left - 16), left - 10, y + ch / 2, 0.5, kBlack, Align::right);
    for (int64_t d = 0; d < D; ++d) {
      double v = row == 0 ? R.base[d] : R.at(m, row - 1, std::max<int64_t>(R.last_epoch(m, row - 1), 0), d);
      cv::Rect cell(left + static_cast<int>(d) * cw, y, cw, ch);
      cv::rectangle(img, cell, finite(v) ? colour(v) : cv::Scalar(240, 240, 240), cv::FILLED);
      cv::rectangle(img, cell, kWhite, 2);
      bool own = row > 0 && R.eval_datasets[d] == R.finetune_datasets[row - 1];
      text(img, finite(v) ? pct(v) : "n/a", cell.x + cw / 2, y + ch / 2, own ? 0.6 : 0.55,
           finite(v) && v < 0.62 ? kWhite : kBlack, Align::center, own ? 2 : 1);
    }
  }
  text(img, "fine-tuned on (last epoch); bold = its own dataset", left, top + rows * ch + 18, 0.42, kAxis);
  // Colour bar.
  const int bx = kPlotWidth - right + 30, by = top, bh = rows * ch;
  for (int i = 0; i < bh; ++i) cv::line(img, {bx, by + i}, {bx + 18, by + i}, colour(1.0 - double(i) / bh), 1);
  for (int t = 0; t <= 100; t += 25)
    text(img, std::to_string(t), bx + 24, by + bh - bh * t / 100, 0.4, kBlack);
  return encode_png(img);
}

std::string plot_verdicts_png(const AccuracyTensor& R, int64_t m, int64_t f) {
  cv::Mat img(kPlotHeight, kPlotWidth, CV_8UC3, kWhite);
  const int64_t L = std::max<int64_t>(R.last_epoch(m, f), 0);
  title(img, fmt::format("{} fine-tuned on {}, epoch {}: answer verdicts ({} scorer)", R.methods.at(m),
                         R.finetune_datasets.at(f), L, R.scorer));
  cv::Rect r = y_percent_frame(img, 70, 190, 50, 60, "share of answers (%)");
  const std::vector<std::pair<std::string, cv::Scalar>> kinds = {{"correct", {44, 160, 44}},
                                                                 {"incorrect", {14, 127, 255}},
                                                                 {"intrinsic halluc.", {40, 39, 214}},
                                                                 {"extrinsic halluc.", {189, 103, 148}}};
  auto cnt = R.counts.accessor<int64_t, 5>();
  const int64_t D = R.eval_datasets.size();
  const int slot = r.width / std::max<int64_t>(D, 1), bw = std::min(90, slot * 6 / 10);
  for (int64_t d = 0; d < D; ++d) {
    const int cx = r.x + slot * static_cast<int>(d) + slot / 2;
    const int64_t n = cnt[m][f][L][d][0];
    text(img, shorten(R.eval_datasets[d], 0.45, slot - 4), cx, r.y + r.height + 16, 0.45, kBlack, Align::center);
    if (n == 0) {
      text(img, "n/a", cx, r.y + r.height - 12, 0.45, kAxis, Align::center);
      continue;
    }
    double acc = 0.0;
    for (int k = 0; k < 4; ++k) {
      const double share = static_cast<double>(cnt[m][f][L][d][k + 1]) / static_cast<double>(n);
      const int y_lo = r.y + r.height - static_cast<int>(std::lround(r.height * acc));
      const int y_hi = r.y + r.height - static_cast<int>(std::lround(r.height * (acc + share)));
      if (y_lo > y_hi) cv::rectangle(img, {cx - bw / 2, y_hi}, {cx + bw / 2, y_lo - 1}, kinds[k].second, cv::FILLED);
      if (share >= 0.06)
        text(img, fmt::format("{:.0f}", 100 * share), cx, (y_lo + y_hi) / 2, 0.45, kWhite, Align::center);
      acc += share;
    }
  }
  text(img, "eval dataset", r.x + r.width / 2, img.rows - 18, 0.5, kBlack, Align::center);
  text(img, "verdict", r.x + r.width + 18, r.y + 4, 0.5, kBlack);
  legend(img, r.x + r.width + 18, r.y + 30, kinds, true, 180);
  return encode_png(img);
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

// Every plot as a PNG file -> (caption, png bytes) in order, for report.html.
std::vector<std::pair<std::string, std::string>> write_plots(ReportContext& c) {
  const auto& R = c.R;
  std::vector<std::pair<std::string, std::string>> images;
  auto plot = [&](const std::string& rel, const std::string& caption, const std::string& png) {
    c.put(rel, png, c.files.plots);
    images.push_back({caption, png});
  };
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t f = 0; f < c.NF; ++f) {
      if (R.last_epoch(m, f) < 0) continue;
      plot(fmt::format("plots/accuracy_{}_{}.png", file_part(R.methods[m]), file_part(R.finetune_datasets[f])),
           fmt::format("{} on {}: accuracy per epoch", R.methods[m], R.finetune_datasets[f]),
           plot_accuracy_png(R, m, f));
    }
    plot(fmt::format("plots/radar_{}.png", file_part(R.methods[m])), fmt::format("{}: radar at the last epoch", R.methods[m]),
         plot_radar_png(R, m));
    plot(fmt::format("plots/heatmap_{}.png", file_part(R.methods[m])),
         fmt::format("{}: fine-tune x eval at the last epoch", R.methods[m]), plot_heatmap_png(R, m));
    for (int64_t f = 0; f < c.NF; ++f) {
      if (R.last_epoch(m, f) < 0) continue;
      plot(fmt::format("plots/verdicts_{}_{}.png", file_part(R.methods[m]), file_part(R.finetune_datasets[f])),
           fmt::format("{} on {}: verdicts at the last epoch", R.methods[m], R.finetune_datasets[f]),
           plot_verdicts_png(R, m, f));
    }
  }
  const auto drift = answer_drift(R);
  for (int64_t f = 0; f < c.NF; ++f) {
    plot(fmt::format("plots/tradeoff_{}.png", file_part(R.finetune_datasets[f])),
         fmt::format("fine-tuned on {}: learning vs forgetting, every method and epoch", R.finetune_datasets[f]),
         plot_tradeoff_png(R, f));
    if (std::any_of(drift.begin(), drift.end(), [&](const DriftPoint& p) { return p.finetune == R.finetune_datasets[f]; }))
      plot(fmt::format("plots/drift_{}.png", file_part(R.finetune_datasets[f])),
           fmt::format("fine-tuned on {}: answers naming its classes, per epoch", R.finetune_datasets[f]),
           plot_drift_png(R, f));
  }
  return images;
}

// report.html: every table and image inline, readable offline.
class HtmlReport {
 public:
  explicit HtmlReport(const ReportContext& c) : c_(c) {}

  std::string render(const std::string& title, const nlohmann::ordered_json& jforget, const nlohmann::ordered_json& jsum,
                     const std::vector<std::pair<std::string, std::string>>& images) {
    head(title);
    accuracy();
    forgetting(jforget, jsum);
    encoder_gap();
    verdicts();
    drift();
    h_ << "</table>\n<h2>Plots</h2>\n";
    for (const auto& [caption, png] : images)
      h_ << "<figure><img alt=\"" << html_escape(caption) << "\" src=\"data:image/png;base64," << base64_encode(png)
         << "\"><figcaption>" << html_escape(caption) << "</figcaption></figure>\n";
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
