// Images per second for decode + CLIP preprocessing (PIL-style bicubic resize, crop, normalize) to 224 and 336,
// one thread, median of repeats. Inputs: a 500x375 photo-sized PNG and a 32x32 CIFAR-sized PNG.
#include <emt/core/image.h>
#include <emt/core/runtime.h>

#include <torch/torch.h>

#include "bench_common.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

namespace {

torch::Tensor test_image(int64_t h, int64_t w) {
  torch::manual_seed(0);
  auto y = torch::arange(h, torch::kFloat).view({h, 1, 1}), x = torch::arange(w, torch::kFloat).view({1, w, 1});
  auto c = torch::arange(3, torch::kFloat).view({1, 1, 3});
  auto v = 128 + 90 * torch::sin(x / (7 + c) + y / 11) + 20 * torch::randn({h, w, 3});
  return v.clamp(0, 255).to(torch::kUInt8);
}

using emt_bench::median;

// Median images/s over `repeats` timed runs of `n` images each.
template <class Fn>
double rate(Fn fn, int n, int repeats) {
  fn();  // warm-up
  std::vector<double> r;
  for (int k = 0; k < repeats; ++k) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; ++i) fn();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.push_back(n / s);
  }
  return median(r);
}

}  // namespace

int main() {
  emt::set_threads(1);
  std::printf("%-28s %8s %14s %14s\n", "input", "size", "decode+prep/s", "prep only/s");
  for (auto [h, w] : {std::pair<int64_t, int64_t>{375, 500}, {32, 32}}) {
    const auto img = test_image(h, w);
    const std::string png = emt::encode_png(img);
    for (int64_t size : {224, 336}) {
      const auto opts = emt::image_options_for_size(size);
      const int n = h > 100 ? 20 : 50;
      double full = rate([&] { emt::preprocess_image(emt::decode_image_bytes(png, "bench.png"), opts); }, n, 5);
      double prep = rate([&] { emt::preprocess_image(img, opts); }, n, 5);
      std::printf("%-28s %8lld %14.1f %14.1f\n", (std::to_string(w) + "x" + std::to_string(h) + " PNG").c_str(),
                  static_cast<long long>(size), full, prep);
    }
  }
  return 0;
}
