// Deterministic synthetic classification sets drawn with OpenCV: shapes10 (10 shapes, any colour), objects60
// (6 colours x 10 shapes) and letters (23 capital letters in four typefaces, the tiny base model's generic
// pretraining images). Each image is a pure function of (generator, split, index, seed).
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <fmt/format.h>

#include <torch/torch.h>

#include <cmath>
#ifdef EMT_WITH_OPENCV
#include <opencv2/imgproc.hpp>
#endif

namespace emt {

namespace {

// Chosen to stay distinct at 28 pixels under any rotation (pentagons and hexagons blur into circles there).
const std::vector<std::string> kShapes = {"circle", "square", "triangle", "star",     "cross",
                                          "arrow",  "bar",    "ring",     "crescent", "heart"};
// Hue (OpenCV 0..180 scale) of each colour name in objects60.
const std::vector<std::pair<std::string, int>> kColours = {{"red", 0},   {"orange", 14}, {"yellow", 28},
                                                           {"green", 60}, {"blue", 112},  {"purple", 142}};
// Capital letters but A and I (English words, "a"/"I") and O (the digit 0).
const std::vector<std::string> kLetters = {"B", "C", "D", "E", "F", "G", "H", "J", "K", "L", "M", "N",
                                           "P", "Q", "R", "S", "T", "U", "V", "W", "X", "Y", "Z"};
constexpr int kCanvas = 128;  // drawn at 4x and area-downsampled, so edges are antialiased
constexpr int kOut = 32;

struct Rng {
  uint64_t s;
  uint64_t next() { return s = mix_seed(s, 0x51ed); }
  double uniform(double a = 0.0, double b = 1.0) { return a + (b - a) * (next() >> 11) * (1.0 / 9007199254740992.0); }
  int integer(int n) { return static_cast<int>(next() % static_cast<uint64_t>(n)); }
  double normal() {  // Box-Muller; own code so results do not depend on the standard library
    double u1 = std::max(uniform(), 1e-12), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

#ifdef EMT_WITH_OPENCV
std::vector<cv::Point> polygon(const std::vector<cv::Point2d>& unit, double cx, double cy, double r, double rot) {
  std::vector<cv::Point> pts;
  const double c = std::cos(rot), s = std::sin(rot);
  constexpr int kShift = 4;  // sub-pixel vertices for cv::fillPoly
  for (auto& p : unit) {
    double x = cx + r * (p.x * c - p.y * s), y = cy + r * (p.x * s + p.y * c);
    pts.emplace_back(static_cast<int>(std::lround(x * (1 << kShift))), static_cast<int>(std::lround(y * (1 << kShift))));
  }
  return pts;
}

std::vector<cv::Point2d> regular(int n, double phase = -1.5707963267948966) {
  std::vector<cv::Point2d> v;
  for (int i = 0; i < n; ++i) {
    double a = phase + 6.283185307179586 * i / n;
    v.emplace_back(std::cos(a), std::sin(a));
  }
  return v;
}

void fill(cv::Mat& mask, const std::vector<cv::Point2d>& unit, double cx, double cy, double r, double rot, int value) {
  std::vector<std::vector<cv::Point>> polys = {polygon(unit, cx, cy, r, rot)};
  cv::fillPoly(mask, polys, cv::Scalar(value), cv::LINE_AA, 4);
}

// Shape mask (255 inside) on the kCanvas grid.
cv::Mat shape_mask(int shape, double cx, double cy, double r, double rot) {
  cv::Mat m = cv::Mat::zeros(kCanvas, kCanvas, CV_8UC1);
  switch (shape) {
    case 0: fill(m, regular(72), cx, cy, r, rot, 255); break;
    case 1: fill(m, regular(4, 0.7853981633974483), cx, cy, r, rot, 255); break;
    case 2: fill(m, regular(3), cx, cy, r * 1.1, rot, 255); break;
    case 3: {
      std::vector<cv::Point2d> star;
      for (int i = 0; i < 10; ++i) {
        double a = -1.5707963267948966 + 3.141592653589793 * i / 5, rr = i % 2 ? 0.42 : 1.0;
        star.emplace_back(rr * std::cos(a), rr * std::sin(a));
      }
      fill(m, star, cx, cy, r * 1.1, rot, 255);
      break;
    }
    case 4: {
      const double w = 0.3;
      std::vector<cv::Point2d> cross = {{-w, -1}, {w, -1}, {w, -w}, {1, -w},  {1, w},   {w, w},
                                        {w, 1},   {-w, 1}, {-w, w}, {-1, w}, {-1, -w}, {-w, -w}};
      fill(m, cross, cx, cy, r, rot, 255);
      break;
    }
    case 5: {
      std::vector<cv::Point2d> arrow = {{-1, -0.22}, {0.15, -0.22}, {0.15, -0.62}, {1, 0},
                                        {0.15, 0.62}, {0.15, 0.22}, {-1, 0.22}};
      fill(m, arrow, cx, cy, r, rot, 255);
      break;
    }
    case 6: fill(m, {{-1, -0.32}, {1, -0.32}, {1, 0.32}, {-1, 0.32}}, cx, cy, r, rot, 255); break;
    case 7:
      fill(m, regular(72), cx, cy, r, rot, 255);
      fill(m, regular(72), cx, cy, r * 0.55, rot, 0);
      break;
    case 8: {
      fill(m, regular(72), cx, cy, r, rot, 255);
      const double off = 0.45 * r;
      fill(m, regular(72), cx + off * std::cos(rot), cy + off * std::sin(rot), r * 0.85, rot, 0);
      break;
    }
    default: {
      std::vector<cv::Point2d> heart;
      for (int i = 0; i < 60; ++i) {
        double t = 6.283185307179586 * i / 60;
        double x = 16 * std::pow(std::sin(t), 3);
        double y = -(13 * std::cos(t) - 5 * std::cos(2 * t) - 2 * std::cos(3 * t) - std::cos(4 * t));
        heart.emplace_back(x / 16.5, (y + 2.5) / 16.5);
      }
      fill(m, heart, cx, cy, r * 1.05, rot * 0.35, 255);  // hearts only tilt, upside-down hearts look like spades
      break;
    }
  }
  return m;
}

// Letter mask (255 inside) on the kCanvas grid: one of four typefaces, `weight` the stroke width, the glyph
// `height` pixels tall (the caller draws 46-75% of the canvas), centred near (cx, cy), tilted by `rot` radians.
cv::Mat letter_mask(const std::string& letter, int font, int weight, double height, double cx, double cy, double rot) {
  static const int kFonts[] = {cv::FONT_HERSHEY_SIMPLEX, cv::FONT_HERSHEY_DUPLEX, cv::FONT_HERSHEY_COMPLEX,
                               cv::FONT_HERSHEY_TRIPLEX};
  const int face = kFonts[font % 4];
  int base = 0;
  const cv::Size unit = cv::getTextSize(letter, face, 1.0, weight, &base);
  const double scale = height / std::max(1, unit.height);
  const cv::Size sz = cv::getTextSize(letter, face, scale, weight, &base);
  cv::Mat m = cv::Mat::zeros(kCanvas, kCanvas, CV_8UC1);
  cv::putText(m, letter, cv::Point(static_cast<int>(cx - sz.width / 2.0), static_cast<int>(cy + sz.height / 2.0)),
              face, scale, cv::Scalar(255), weight, cv::LINE_AA);
  cv::Mat rotated;
  cv::warpAffine(m, rotated, cv::getRotationMatrix2D(cv::Point2f(static_cast<float>(cx), static_cast<float>(cy)),
                                                     rot * 57.29577951308232, 1.0),
                 m.size(), cv::INTER_LINEAR);
  return rotated;
}

cv::Vec3b hsv_to_rgb(double h, double s, double v) {
  cv::Mat hsv(1, 1, CV_8UC3, cv::Scalar(std::fmod(h + 180.0, 180.0), s * 255, v * 255)), bgr;
  cv::cvtColor(hsv, bgr, cv::COLOR_HSV2RGB);
  return bgr.at<cv::Vec3b>(0, 0);
}
#endif

// A build without OpenCV cannot draw the sets; a prepared copy (CIFAR-10 binary files) reads anywhere.
void require_drawing(const std::string& generator) {
#ifndef EMT_WITH_OPENCV
  throw ConfigError(fmt::format(
      "[data] the synthetic set '{}' is drawn with OpenCV, and this emt was built without it (EMT_WITH_OPENCV=OFF): "
      "write it with `emt data prepare synthetic` on a build that has OpenCV, copy the folder, and read it with "
      "format: cifar10", generator));
#endif
}

int generator_id(const std::string& g) {
  auto gens = synthetic_generators();
  for (size_t i = 0; i < gens.size(); ++i)
    if (gens[i] == g) return static_cast<int>(i);
  std::string list;
  for (auto& n : gens) list += (list.empty() ? "" : ", ") + n;
  throw ConfigError(fmt::format("[data] unknown synthetic generator '{}' (known: {})", g, list));
}

}  // namespace

std::vector<std::string> synthetic_generators() { return {"shapes10", "objects60", "letters"}; }

std::vector<std::string> synthetic_class_names(const std::string& generator) {
  const int gid = generator_id(generator);
  if (gid == 0) return kShapes;
  if (gid == 2) return kLetters;
  std::vector<std::string> names;
  for (auto& c : kColours)
    for (auto& s : kShapes) names.push_back(c.first + " " + s);
  return names;
}

std::pair<torch::Tensor, int64_t> synthetic_sample(const std::string& generator, Split split, int64_t index,
                                                   uint64_t seed) {
  [[maybe_unused]] const int gid = generator_id(generator);
  require_drawing(generator);
#ifdef EMT_WITH_OPENCV
  const int64_t k = gid == 0 ? 10 : gid == 1 ? 60 : static_cast<int64_t>(kLetters.size());
  const int64_t label = index % k;  // balanced by construction
  Rng rng{mix_seed(mix_seed(mix_seed(seed, gid), split == Split::train ? 11 : 23), static_cast<uint64_t>(index))};
  const int shape = static_cast<int>(gid == 0 ? label : label % 10);

  // Background: a low-saturation colour gradient, so object colour stays the label-bearing signal.
  const double bh = rng.uniform(0, 180), bs = rng.uniform(0.0, 0.3);
  cv::Vec3b b0 = hsv_to_rgb(bh, bs, rng.uniform(0.15, 0.9)), b1 = hsv_to_rgb(bh + rng.uniform(-20, 20), bs,
                                                                             rng.uniform(0.15, 0.9));
  const double ga = rng.uniform(0, 6.283185307179586);
  cv::Mat img(kCanvas, kCanvas, CV_8UC3);
  for (int y = 0; y < kCanvas; ++y)
    for (int x = 0; x < kCanvas; ++x) {
      double t = 0.5 + ((x - 64) * std::cos(ga) + (y - 64) * std::sin(ga)) / 181.0;
      for (int c = 0; c < 3; ++c) img.at<cv::Vec3b>(y, x)[c] = cv::saturate_cast<uint8_t>(b0[c] + t * (b1[c] - b0[c]));
    }
  // Distractor strokes in background tones.
  const int strokes = rng.integer(4) == 0 ? 1 : 0;
  for (int i = 0; i < strokes; ++i) {
    cv::Vec3b col = hsv_to_rgb(bh, bs, rng.uniform(0.1, 0.95));
    cv::line(img, cv::Point(rng.integer(kCanvas), rng.integer(kCanvas)), cv::Point(rng.integer(kCanvas), rng.integer(kCanvas)),
             cv::Scalar(col[0], col[1], col[2]), 2 + rng.integer(3), cv::LINE_AA);
  }

  // Object: random scale, position (fully inside), rotation and colour.
  const double r = rng.uniform(0.32, 0.44) * kCanvas;
  // Position: jittered around the centre by up to 12% of the canvas, kept fully inside.
  const double lo = std::max(r + 2, 0.38 * kCanvas), hi = std::min(kCanvas - r - 2, 0.62 * kCanvas);
  const double cx = rng.uniform(std::min(lo, hi), std::max(lo, hi)), cy = rng.uniform(std::min(lo, hi), std::max(lo, hi));
  const double rot = rng.uniform(-0.5, 0.5);  // a tilt of up to ~29 degrees either way
  cv::Vec3b col;
  if (gid != 1) {
    col = hsv_to_rgb(rng.uniform(0, 180), rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0));
  } else {
    const int hue = kColours[label / 10].second;
    col = hsv_to_rgb(hue + rng.uniform(-5, 5), rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0));
  }
  cv::Mat mask = gid == 2 ? letter_mask(kLetters[static_cast<size_t>(label)], rng.integer(4), 7 + rng.integer(6),
                                        r * rng.uniform(1.45, 1.7), cx, cy, rot * 0.6)
                          : shape_mask(shape, cx, cy, r, rot);
  for (int y = 0; y < kCanvas; ++y)
    for (int x = 0; x < kCanvas; ++x) {
      const double a = mask.at<uint8_t>(y, x) / 255.0;
      if (a == 0.0) continue;
      cv::Vec3b& p = img.at<cv::Vec3b>(y, x);
      for (int c = 0; c < 3; ++c) p[c] = cv::saturate_cast<uint8_t>(p[c] * (1 - a) + col[c] * a);
    }

  cv::Mat small;
  cv::resize(img, small, cv::Size(kOut, kOut), 0, 0, cv::INTER_AREA);
  auto t = torch::empty({kOut, kOut, 3}, torch::kUInt8);
  uint8_t* d = t.data_ptr<uint8_t>();
  const double sigma = rng.uniform(2.0, 8.0);  // sensor-like pixel noise
  for (int y = 0; y < kOut; ++y)
    for (int x = 0; x < kOut; ++x)
      for (int c = 0; c < 3; ++c)
        *d++ = cv::saturate_cast<uint8_t>(small.at<cv::Vec3b>(y, x)[c] + sigma * rng.normal());
  return {t, label};
#else
  return {};
#endif
}

namespace {

class SyntheticDataset : public ImageDataset {
 public:
  SyntheticDataset(std::string gen, Split split, int64_t n, uint64_t seed)
      : gen_(std::move(gen)), split_(split), n_(n), seed_(seed) {
    class_names_ = synthetic_class_names(gen_);
    name_ = gen_;
  }
  int64_t size() const override { return n_; }
  int64_t label(int64_t i) const override { return i % static_cast<int64_t>(class_names_.size()); }
  torch::Tensor image(int64_t i) const override {
    TORCH_CHECK(i >= 0 && i < n_, "synthetic ", gen_, ": index ", i, " out of range ", n_);
    return synthetic_sample(gen_, split_, i, seed_).first;
  }
  std::string source(int64_t i) const override {
    return fmt::format("synthetic {} {} #{}", gen_, split_name(split_), i);
  }

 private:
  std::string gen_;
  Split split_;
  int64_t n_;
  uint64_t seed_;
};

}  // namespace

std::shared_ptr<ImageDataset> open_synthetic_dataset(const std::string& generator, Split split, uint64_t seed,
                                                     int64_t size) {
  generator_id(generator);
  require_drawing(generator);
  if (size < 0) throw ConfigError(fmt::format("[data] synthetic set '{}': size {} is negative", generator, size));
  return std::make_shared<SyntheticDataset>(generator, split, size > 0 ? size : split == Split::train ? 5000 : 1000,
                                            seed);
}

}  // namespace emt
