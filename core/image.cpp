// Image decoding (OpenCV, or stb_image in a build without it), PIL-compatible bicubic resampling and the
// CLIPImageProcessor pipeline.
#include <emt/core/error.h>
#include <emt/core/image.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include "core/image_stb.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#ifdef EMT_WITH_OPENCV
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#endif

namespace emt {

ImageProcessorOptions image_options_for_size(int64_t image_size) {
  if (image_size <= 0) throw ConfigError(fmt::format("[image] image size must be positive (got {})", image_size));
  ImageProcessorOptions o;
  o.resize_shortest = image_size;
  o.crop_size = image_size;
  return o;
}

namespace {

using nlohmann::json;

// HF writes sizes as an int, {"shortest_edge": n} or {"height": h, "width": w}.
int64_t json_size(const json& j, const std::string& key, const std::string& path) {
  const json& v = j.at(key);
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_object()) {
    if (v.contains("shortest_edge")) return v.at("shortest_edge").get<int64_t>();
    if (v.contains("height") && v.contains("width")) {
      int64_t h = v.at("height").get<int64_t>(), w = v.at("width").get<int64_t>();
      if (h != w)
        throw FormatError(fmt::format("[image] {}: '{}' is {}x{}; only square sizes are supported", path, key, h, w));
      return h;
    }
  }
  throw FormatError(fmt::format("[image] {}: '{}' must be an integer or an object with shortest_edge or "
                                "height/width (got {})", path, key, v.dump()));
}

std::array<double, 3> json_triple(const json& j, const std::string& key, const std::string& path) {
  const json& v = j.at(key);
  if (!v.is_array() || v.size() != 3)
    throw FormatError(fmt::format("[image] {}: '{}' must be a list of 3 numbers (got {})", path, key, v.dump()));
  return {v[0].get<double>(), v[1].get<double>(), v[2].get<double>()};
}

}  // namespace

ImageProcessorOptions load_hf_preprocessor_config(const std::string& path) {
  std::string text = read_file(path);
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    throw FormatError(fmt::format("[image] {}: not valid JSON: {}", path, e.what()));
  }
  ImageProcessorOptions o;
  try {
    if (j.contains("size")) o.resize_shortest = json_size(j, "size", path);
    if (j.contains("crop_size")) o.crop_size = json_size(j, "crop_size", path);
    if (j.contains("do_resize")) o.do_resize = j.at("do_resize").get<bool>();
    if (j.contains("do_center_crop")) o.do_center_crop = j.at("do_center_crop").get<bool>();
    if (j.contains("rescale_factor")) o.rescale = j.at("rescale_factor").get<double>();
    if (j.contains("do_rescale") && !j.at("do_rescale").get<bool>()) o.rescale = 1.0;
    if (j.contains("image_mean")) o.mean = json_triple(j, "image_mean", path);
    if (j.contains("image_std")) o.std = json_triple(j, "image_std", path);
    if (j.contains("do_normalize") && !j.at("do_normalize").get<bool>()) {
      o.mean = {0.0, 0.0, 0.0};
      o.std = {1.0, 1.0, 1.0};
    }
    if (j.contains("resample") && j.at("resample").get<int>() != 3)
      log_warn("[image] {}: resample={} requested; emt always resamples with bicubic (3)", path,
               j.at("resample").get<int>());
  } catch (const json::exception& e) {
    throw FormatError(fmt::format("[image] {}: bad value type: {}", path, e.what()));
  }
  return o;
}

namespace {

void check_hwc_uint8(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 3 && t.scalar_type() == torch::kUInt8 && (t.size(2) == 1 || t.size(2) == 3),
              what, ": expected uint8 [H, W, 1|3], got ", t.scalar_type(), " ", t.sizes());
}

#ifdef EMT_WITH_OPENCV
torch::Tensor mat_to_rgb_tensor(const cv::Mat& bgr) {
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  auto t = torch::empty({rgb.rows, rgb.cols, 3}, torch::kUInt8);
  for (int r = 0; r < rgb.rows; ++r)
    std::memcpy(t.data_ptr<uint8_t>() + static_cast<int64_t>(r) * rgb.cols * 3, rgb.ptr<uint8_t>(r),
                static_cast<size_t>(rgb.cols) * 3);
  return t;
}
#endif

}  // namespace

torch::Tensor decode_image_bytes(const std::string& bytes, const std::string& name) {
#ifdef EMT_WITH_OPENCV
  if (bytes.empty()) throw IoError(fmt::format("[image] {}: file is empty", name));
  cv::Mat buf(1, static_cast<int>(bytes.size()), CV_8UC1, const_cast<char*>(bytes.data()));
  cv::Mat bgr;
  try {
    // PIL (what HF uses) ignores EXIF orientation unless asked, so OpenCV must too.
    bgr = cv::imdecode(buf, cv::IMREAD_COLOR | cv::IMREAD_IGNORE_ORIENTATION);
  } catch (const cv::Exception& e) {
    throw IoError(fmt::format("[image] {}: cannot decode image: {}", name, e.what()));
  }
  if (bgr.empty() || bgr.rows == 0 || bgr.cols == 0)
    throw IoError(fmt::format("[image] {}: cannot decode image ({} bytes, not a supported image format)", name,
                              bytes.size()));
  return mat_to_rgb_tensor(bgr);
#else
  return detail::decode_image_stb(bytes, name);
#endif
}

torch::Tensor decode_image_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::error_code ec;
    bool exists = std::filesystem::exists(path, ec);
    throw IoError(fmt::format("[image] {}: {}", path, exists ? "cannot open file" : "no such file"));
  }
  std::ostringstream ss;
  ss << f.rdbuf();
  return decode_image_bytes(ss.str(), path);
}

std::pair<int64_t, int64_t> shortest_side_size(int64_t height, int64_t width, int64_t shortest) {
  int64_t short_side = std::min(height, width), long_side = std::max(height, width);
  if (short_side == shortest) return {height, width};
  // HF truncates (int(size * long / short)), it does not round.
  int64_t new_long = static_cast<int64_t>(static_cast<double>(shortest) * long_side / short_side);
  return height <= width ? std::make_pair(shortest, new_long) : std::make_pair(new_long, shortest);
}

namespace {

// Keys' bicubic kernel with a = -0.5, the one PIL uses.
double bicubic(double x) {
  constexpr double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
  if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a;
  return 0.0;
}

constexpr int kPrecisionBits = 32 - 8 - 2;

// Per output position: first input index and fixed-point weights (PIL's 8-bit path).
struct Taps {
  std::vector<int> first;
  std::vector<int> count;
  int ksize = 0;
  std::vector<int32_t> w;  // [out, ksize]
};

Taps make_taps(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 2.0 * filterscale;
  Taps t;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.w.assign(static_cast<size_t>(out_size) * t.ksize, 0);
  std::vector<double> k(t.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    int xmin = static_cast<int>(center - support + 0.5);  // truncation toward zero, as in C
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = bicubic((x + xmin - center + 0.5) / filterscale);
      ww += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      double v = ww != 0.0 ? k[x] / ww : k[x];
      double s = v * (1 << kPrecisionBits);
      t.w[static_cast<size_t>(xx) * t.ksize + x] = static_cast<int32_t>(v < 0 ? -0.5 + s : 0.5 + s);
    }
    t.first[xx] = xmin;
    t.count[xx] = xmax;
  }
  return t;
}

inline uint8_t clip8(int64_t acc) {
  int64_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// One separable pass along `axis` (1 = width, 0 = height) of a contiguous uint8 [H, W, C] buffer.
torch::Tensor resample_axis(const torch::Tensor& src, int axis, int out) {
  const int64_t H = src.size(0), W = src.size(1), C = src.size(2);
  const int in = static_cast<int>(axis == 1 ? W : H);
  Taps taps = make_taps(in, out);
  auto dst = torch::empty(axis == 1 ? std::vector<int64_t>{H, out, C} : std::vector<int64_t>{out, W, C},
                          torch::kUInt8);
  const uint8_t* s = src.data_ptr<uint8_t>();
  uint8_t* d = dst.data_ptr<uint8_t>();
  const int64_t half = int64_t{1} << (kPrecisionBits - 1);
  if (axis == 1) {
    for (int64_t y = 0; y < H; ++y) {
      const uint8_t* row = s + y * W * C;
      uint8_t* orow = d + y * out * C;
      for (int xx = 0; xx < out; ++xx) {
        const int32_t* k = &taps.w[static_cast<size_t>(xx) * taps.ksize];
        const uint8_t* p = row + static_cast<int64_t>(taps.first[xx]) * C;
        for (int64_t c = 0; c < C; ++c) {
          int64_t acc = half;
          for (int x = 0; x < taps.count[xx]; ++x) acc += static_cast<int64_t>(p[x * C + c]) * k[x];
          orow[xx * C + c] = clip8(acc);
        }
      }
    }
  } else {
    const int64_t rowlen = W * C;
    std::vector<int64_t> acc(rowlen);
    for (int yy = 0; yy < out; ++yy) {
      const int32_t* k = &taps.w[static_cast<size_t>(yy) * taps.ksize];
      std::fill(acc.begin(), acc.end(), half);
      for (int y = 0; y < taps.count[yy]; ++y) {
        const uint8_t* row = s + (taps.first[yy] + y) * rowlen;
        const int64_t ky = k[y];
        for (int64_t i = 0; i < rowlen; ++i) acc[i] += row[i] * ky;
      }
      uint8_t* orow = d + yy * rowlen;
      for (int64_t i = 0; i < rowlen; ++i) orow[i] = clip8(acc[i]);
    }
  }
  return dst;
}

}  // namespace

torch::Tensor resize_bicubic_pil(const torch::Tensor& hwc_uint8, int64_t out_h, int64_t out_w) {
  // hwc_uint8: [H, W, C] uint8 -> [out_h, out_w, C] uint8
  TORCH_CHECK(hwc_uint8.dim() == 3 && hwc_uint8.scalar_type() == torch::kUInt8,
              "resize_bicubic_pil: expected uint8 [H, W, C], got ", hwc_uint8.sizes());
  TORCH_CHECK(out_h > 0 && out_w > 0, "resize_bicubic_pil: output size must be positive, got ", out_h, "x", out_w);
  torch::Tensor x = hwc_uint8.contiguous();
  // PIL resamples horizontally first, then vertically, each pass rounding to uint8.
  if (out_w != x.size(1)) x = resample_axis(x, 1, static_cast<int>(out_w));
  if (out_h != x.size(0)) x = resample_axis(x, 0, static_cast<int>(out_h));
  return x;
}

namespace {

// HF center_crop: floor offsets; a crop larger than the image zero-pads, centred with ceil on the pad.
torch::Tensor center_crop_u8(const torch::Tensor& x, int64_t crop) {
  const int64_t H = x.size(0), W = x.size(1);
  if (H >= crop && W >= crop) {
    int64_t top = (H - crop) / 2, left = (W - crop) / 2;
    return x.slice(0, top, top + crop).slice(1, left, left + crop);
  }
  const int64_t nh = std::max(crop, H), nw = std::max(crop, W);
  auto canvas = torch::zeros({nh, nw, x.size(2)}, torch::kUInt8);
  const int64_t tp = (nh - H + 1) / 2, lp = (nw - W + 1) / 2;
  canvas.slice(0, tp, tp + H).slice(1, lp, lp + W).copy_(x);
  auto floordiv2 = [](int64_t v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); };
  int64_t top = floordiv2(H - crop) + tp, left = floordiv2(W - crop) + lp;
  return canvas.slice(0, std::max<int64_t>(0, top), std::min(nh, top + crop))
      .slice(1, std::max<int64_t>(0, left), std::min(nw, left + crop));
}

}  // namespace

torch::Tensor preprocess_image(const torch::Tensor& hwc_uint8, const ImageProcessorOptions& opts) {
  // hwc_uint8: [H, W, 1|3] uint8 -> [3, S, S] float32
  check_hwc_uint8(hwc_uint8, "preprocess_image");
  torch::Tensor x = hwc_uint8;
  if (x.size(2) == 1) x = x.expand({x.size(0), x.size(1), 3});
  if (opts.do_resize) {
    auto [h, w] = shortest_side_size(x.size(0), x.size(1), opts.resize_shortest);
    if (h != x.size(0) || w != x.size(1)) x = resize_bicubic_pil(x, h, w);
  }
  if (opts.do_center_crop) x = center_crop_u8(x, opts.crop_size);
  auto f = x.permute({2, 0, 1}).to(torch::kFloat32).mul_(static_cast<float>(opts.rescale));
  auto mean = torch::tensor({opts.mean[0], opts.mean[1], opts.mean[2]}, torch::kFloat32).view({3, 1, 1});
  auto stdv = torch::tensor({opts.std[0], opts.std[1], opts.std[2]}, torch::kFloat32).view({3, 1, 1});
  return f.sub_(mean).div_(stdv).contiguous();
}

std::string encode_png(const torch::Tensor& hwc_uint8) {
  check_hwc_uint8(hwc_uint8, "encode_png");
#ifdef EMT_WITH_OPENCV
  auto t = hwc_uint8.contiguous();
  const int h = static_cast<int>(t.size(0)), w = static_cast<int>(t.size(1)), c = static_cast<int>(t.size(2));
  cv::Mat m(h, w, c == 1 ? CV_8UC1 : CV_8UC3, t.data_ptr<uint8_t>());
  cv::Mat out;
  if (c == 3)
    cv::cvtColor(m, out, cv::COLOR_RGB2BGR);
  else
    out = m;
  std::vector<uchar> buf;
  if (!cv::imencode(".png", out, buf)) throw IoError("[image] PNG encoding failed");
  return std::string(buf.begin(), buf.end());
#else
  return detail::encode_png_stb(hwc_uint8);
#endif
}

void write_png(const std::string& path, const torch::Tensor& hwc_uint8) {
  write_file_atomic(path, encode_png(hwc_uint8));
}

}  // namespace emt

namespace emt {

torch::Tensor contact_sheet(const std::vector<torch::Tensor>& images, const std::vector<std::string>& captions,
                            int64_t cell, int64_t columns) {
#ifndef EMT_WITH_OPENCV
  throw ConfigError("[image] contact sheets are drawn with OpenCV, and this emt was built without it "
                    "(EMT_WITH_OPENCV=OFF): draw them with a build that has it");
#else
  TORCH_CHECK(!images.empty() && images.size() == captions.size(), "contact_sheet: ", images.size(), " images, ",
              captions.size(), " captions");
  TORCH_CHECK(cell >= 16 && columns >= 1, "contact_sheet: cell >= 16 and columns >= 1 required");
  const int n = static_cast<int>(images.size());
  const int cols = static_cast<int>(std::min<int64_t>(columns, n)), rows = (n + cols - 1) / cols;
  const int pad = 4, text_h = 16, cw = static_cast<int>(cell) + 2 * pad, ch = static_cast<int>(cell) + text_h + 2 * pad;
  cv::Mat sheet(rows * ch, cols * cw, CV_8UC3, cv::Scalar(255, 255, 255));
  for (int i = 0; i < n; ++i) {
    check_hwc_uint8(images[i], "contact_sheet");
    torch::Tensor img = images[i].size(2) == 1 ? images[i].expand({-1, -1, 3}) : images[i];
    img = img.contiguous();
    cv::Mat m(static_cast<int>(img.size(0)), static_cast<int>(img.size(1)), CV_8UC3, img.data_ptr<uint8_t>());
    // Keep the aspect ratio; small images are enlarged with nearest neighbour so pixels stay visible.
    const double s = static_cast<double>(cell) / std::max(m.rows, m.cols);
    cv::Mat scaled;
    cv::resize(m, scaled, cv::Size(std::max(1, static_cast<int>(m.cols * s)), std::max(1, static_cast<int>(m.rows * s))),
               0, 0, s >= 1 ? cv::INTER_NEAREST : cv::INTER_AREA);
    const int x0 = (i % cols) * cw + pad, y0 = (i / cols) * ch + pad;
    scaled.copyTo(sheet(cv::Rect(x0 + (static_cast<int>(cell) - scaled.cols) / 2,
                                 y0 + (static_cast<int>(cell) - scaled.rows) / 2, scaled.cols, scaled.rows)));
    // Shrink the font until the caption fits the cell width.
    double fs = 0.4;
    int base = 0;
    cv::Size ts = cv::getTextSize(captions[i], cv::FONT_HERSHEY_SIMPLEX, fs, 1, &base);
    while (ts.width > cw - 2 && fs > 0.22) ts = cv::getTextSize(captions[i], cv::FONT_HERSHEY_SIMPLEX, fs -= 0.02, 1, &base);
    cv::putText(sheet, captions[i], cv::Point(x0 - pad + std::max(1, (cw - ts.width) / 2), y0 + static_cast<int>(cell) + 12),
                cv::FONT_HERSHEY_SIMPLEX, fs, cv::Scalar(20, 20, 20), 1, cv::LINE_AA);
  }
  auto out = torch::empty({sheet.rows, sheet.cols, 3}, torch::kUInt8);
  std::memcpy(out.data_ptr<uint8_t>(), sheet.data, static_cast<size_t>(sheet.rows) * sheet.cols * 3);
  return out;
#endif
}

}  // namespace emt
