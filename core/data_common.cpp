// Dataset plumbing shared by every format: the base class, subsets, seeded choices, dispatch from config,
// the EMT paper's prompts and the built-in dataset list.
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include "core/logging.h"
#include "core/text.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <mutex>

namespace emt {

namespace fs = std::filesystem;

const char* split_name(Split s) { return s == Split::train ? "train" : "test"; }

ImageDataset::~ImageDataset() = default;

std::string ImageDataset::source(int64_t i) const { return fmt::format("{} sample {}", name_, i); }

std::pair<std::string, std::string> ImageDataset::text(int64_t) const {
  throw ConfigError(fmt::format("[data] dataset '{}' is classification data and has no conversations", name_));
}

std::vector<int64_t> ImageDataset::class_counts() const {
  std::vector<int64_t> counts(class_names_.size(), 0);
  for (int64_t i = 0; i < size(); ++i) {
    int64_t l = label(i);
    if (l >= 0 && l < static_cast<int64_t>(counts.size())) ++counts[l];
  }
  return counts;
}

uint64_t mix_seed(uint64_t a, uint64_t b) {
  uint64_t z = a + 0x9E3779B97F4A7C15ull * (b + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = i;
  uint64_t state = seed;
  for (int64_t i = n - 1; i > 0; --i) {
    state = mix_seed(state, static_cast<uint64_t>(i));
    // Modulo bias is below 2^-40 for any realistic n; determinism is what matters here.
    int64_t j = static_cast<int64_t>(state % static_cast<uint64_t>(i + 1));
    std::swap(p[i], p[j]);
  }
  return p;
}

namespace {

class SubsetDataset : public ImageDataset {
 public:
  SubsetDataset(std::shared_ptr<ImageDataset> base, std::vector<int64_t> idx)
      : base_(std::move(base)), idx_(std::move(idx)) {
    name_ = base_->name();
    class_names_ = base_->class_names();
  }
  int64_t size() const override { return static_cast<int64_t>(idx_.size()); }
  int64_t label(int64_t i) const override { return base_->label(idx_.at(i)); }
  torch::Tensor image(int64_t i) const override { return base_->image(idx_.at(i)); }
  std::string source(int64_t i) const override { return base_->source(idx_.at(i)); }
  bool has_text() const override { return base_->has_text(); }
  std::pair<std::string, std::string> text(int64_t i) const override { return base_->text(idx_.at(i)); }

 private:
  std::shared_ptr<ImageDataset> base_;
  std::vector<int64_t> idx_;
};

class MemoryDataset : public ImageDataset {
 public:
  MemoryDataset(torch::Tensor images, std::vector<int64_t> labels, std::vector<std::string> names, std::string n)
      : images_(std::move(images)), labels_(std::move(labels)) {
    class_names_ = std::move(names);
    name_ = std::move(n);
  }
  int64_t size() const override { return static_cast<int64_t>(labels_.size()); }
  int64_t label(int64_t i) const override { return labels_.at(i); }
  torch::Tensor image(int64_t i) const override {
    TORCH_CHECK(i >= 0 && i < size(), "MemoryDataset: index ", i, " out of range ", size());
    return images_[i].clone();
  }

 private:
  torch::Tensor images_;
  std::vector<int64_t> labels_;
};

}  // namespace

std::shared_ptr<ImageDataset> make_memory_dataset(torch::Tensor nhwc_uint8, std::vector<int64_t> labels,
                                                  std::vector<std::string> class_names, std::string name) {
  TORCH_CHECK(nhwc_uint8.dim() == 4 && nhwc_uint8.scalar_type() == torch::kUInt8,
              "make_memory_dataset: expected uint8 [N, H, W, C], got ", nhwc_uint8.sizes());
  TORCH_CHECK(nhwc_uint8.size(0) == static_cast<int64_t>(labels.size()), "make_memory_dataset: ",
              nhwc_uint8.size(0), " images but ", labels.size(), " labels");
  for (size_t i = 0; i < labels.size(); ++i)
    TORCH_CHECK(labels[i] >= -1 && labels[i] < static_cast<int64_t>(class_names.size()),
                "make_memory_dataset: label ", labels[i], " of sample ", i, " outside ", class_names.size(),
                " classes");
  return std::make_shared<MemoryDataset>(nhwc_uint8.contiguous(), std::move(labels), std::move(class_names),
                                         std::move(name));
}

std::shared_ptr<ImageDataset> subset(std::shared_ptr<ImageDataset> base, std::vector<int64_t> indices) {
  if (!base) throw ConfigError("[data] subset: base dataset is null");
  const int64_t n = base->size();
  for (size_t k = 0; k < indices.size(); ++k)
    if (indices[k] < 0 || indices[k] >= n)
      throw ConfigError(fmt::format("[data] subset of '{}': index {} (position {}) outside [0, {})", base->name(),
                                    indices[k], k, n));
  return std::make_shared<SubsetDataset>(std::move(base), std::move(indices));
}

std::vector<int64_t> choose_subset(const ImageDataset& ds, int64_t count, bool balanced, uint64_t seed) {
  const int64_t n = ds.size();
  if (count < 0) throw ConfigError(fmt::format("[data] '{}': subset size must be >= 0 (got {})", ds.name(), count));
  if (count == 0 || count >= n) {
    std::vector<int64_t> all(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) all[i] = i;
    return all;
  }
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(count));
  if (!balanced) {
    auto p = seeded_permutation(n, seed);
    out.assign(p.begin(), p.begin() + count);
  } else {
    const int64_t k = static_cast<int64_t>(ds.class_names().size());
    if (k == 0)
      throw ConfigError(fmt::format("[data] '{}': balanced subsets need class labels (dataset has none)", ds.name()));
    std::vector<std::vector<int64_t>> by_class(static_cast<size_t>(k));
    for (int64_t i = 0; i < n; ++i) {
      int64_t l = ds.label(i);
      if (l < 0 || l >= k)
        throw ConfigError(fmt::format("[data] '{}': balanced subsets need class labels ({} has label {})",
                                      ds.name(), ds.source(i), l));
      by_class[l].push_back(i);
    }
    for (int64_t c = 0; c < k; ++c) {
      auto p = seeded_permutation(static_cast<int64_t>(by_class[c].size()), mix_seed(seed, c));
      std::vector<int64_t> shuffled;
      for (int64_t j : p) shuffled.push_back(by_class[c][j]);
      by_class[c] = std::move(shuffled);
    }
    // Round robin over classes: equal counts, the remainder to the lowest class ids, and classes that run out
    // leave their share to the others.
    for (size_t round = 0; static_cast<int64_t>(out.size()) < count; ++round)
      for (int64_t c = 0; c < k && static_cast<int64_t>(out.size()) < count; ++c)
        if (round < by_class[c].size()) out.push_back(by_class[c][round]);
  }
  std::sort(out.begin(), out.end());
  return out;
}

namespace {

std::string resolve(const std::string& p, const std::string& root) {
  if (p.empty() || fs::path(p).is_absolute() || root.empty()) return p;
  return (fs::path(root) / p).string();
}

const std::vector<std::string>& known_formats() {
  static const std::vector<std::string> f = {"idx",      "cifar10",    "cifar100", "imagefolder",
                                             "manifest", "llava_json", "synthetic"};
  return f;
}

std::mutex g_formats_mutex;
std::map<std::string, DatasetFactory>& registered_formats() {
  static std::map<std::string, DatasetFactory> m;
  return m;
}

DatasetFactory registered_format(const std::string& format) {
  std::lock_guard<std::mutex> l(g_formats_mutex);
  auto it = registered_formats().find(format);
  return it == registered_formats().end() ? DatasetFactory() : it->second;
}

}  // namespace

void register_dataset_format(const std::string& format, DatasetFactory factory) {
  if (!factory) throw ConfigError("[data] register_dataset_format('" + format + "'): the factory is empty");
  add_extension_name(ExtensionKind::dataset_format, format);  // validates the name
  std::lock_guard<std::mutex> l(g_formats_mutex);
  registered_formats()[format] = std::move(factory);
}

std::shared_ptr<ImageDataset> open_dataset_full(const std::string& name, const DatasetConfig& cfg,
                                                const std::string& data_root, Split split) {
  const std::string rel = cfg.path.empty() ? name : cfg.path;
  const std::string path = resolve(rel, data_root);
  std::shared_ptr<ImageDataset> ds;
  if (cfg.format == "idx") {
    ds = open_idx_dataset(path, split);
  } else if (cfg.format == "cifar10" || cfg.format == "cifar100") {
    ds = open_cifar_dataset(path, split, cfg.format == "cifar100");
  } else if (cfg.format == "imagefolder") {
    ds = open_image_folder(path, split, resolve(cfg.class_map, data_root));
  } else if (cfg.format == "manifest") {
    ds = open_manifest(path, split, cfg.class_names);
  } else if (cfg.format == "llava_json") {
    ds = open_llava_dataset(path, split);
  } else if (cfg.format == "synthetic") {
    ds = open_synthetic_dataset(rel, split);  // the path names the generator
  } else if (auto factory = registered_format(cfg.format)) {
    DatasetConfig resolved = cfg;
    resolved.path = cfg.path.empty() ? "" : path;
    ds = factory(name, resolved, split);
    if (!ds)
      throw IoError(fmt::format("[data] dataset '{}': the registered format '{}' returned no {} split", name,
                                cfg.format, split_name(split)));
  } else {
    std::string list;
    for (auto& f : known_formats()) list += (list.empty() ? "" : ", ") + f;
    for (auto& f : extension_names(ExtensionKind::dataset_format)) list += ", " + f;
    throw ConfigError(fmt::format("[data] dataset '{}': unknown format '{}' (known: {})", name, cfg.format, list));
  }
  if (!cfg.class_names.empty()) {
    if (!ds->class_names().empty() && ds->class_names().size() != cfg.class_names.size())
      throw ConfigError(fmt::format("[data] dataset '{}': class_names lists {} names but {} has {} classes", name,
                                    cfg.class_names.size(), path, ds->class_names().size()));
    ds->set_class_names(cfg.class_names);
  }
  ds->set_name(name);
  return ds;
}

std::shared_ptr<ImageDataset> open_dataset(const std::string& name, const DatasetConfig& cfg,
                                           const std::string& data_root, Split split, uint64_t seed) {
  if (cfg.test_fraction <= 0.0 || cfg.test_fraction > 1.0)
    throw ConfigError(fmt::format("[data] dataset '{}': test_fraction must be in (0, 1] (got {})", name,
                                  cfg.test_fraction));
  auto ds = open_dataset_full(name, cfg, data_root, split);
  const int64_t n = ds->size();
  int64_t count = 0;  // 0 = all
  if (split == Split::train) {
    count = cfg.train_max_samples;
  } else {
    if (cfg.test_fraction < 1.0) count = std::max<int64_t>(1, std::llround(cfg.test_fraction * n));
    if (cfg.test_max_samples > 0) count = count == 0 ? cfg.test_max_samples : std::min(count, cfg.test_max_samples);
  }
  if (count <= 0 || count >= n) return ds;
  // FNV-1a of the name: std::hash differs between standard libraries, subsets must not.
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  uint64_t s = mix_seed(mix_seed(seed, h), split == Split::train ? 1 : 2);
  return subset(ds, choose_subset(*ds, count, cfg.balanced, s));
}

bool is_digit_dataset(const DatasetConfig& cfg, const std::vector<std::string>& class_names) {
  if (cfg.format != "idx" || class_names.size() != 10) return false;
  for (int d = 0; d < 10; ++d)
    if (class_names[d] != std::to_string(d)) return false;
  return true;
}

namespace {
std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size()))
    s.replace(pos, from.size(), to);
  return s;
}
}  // namespace

std::string dataset_question(const std::string& name, const DatasetConfig& cfg,
                             const std::vector<std::string>& class_names) {
  const std::string labels = detail::join(class_names, ", ");
  if (!cfg.prompt.empty()) return replace_all(cfg.prompt, "{labels}", labels);
  if (is_digit_dataset(cfg, class_names))
    return "What is the number in the image? Please only answer a single number in 0, 1, 2, 3, 4, 5, 6, 7, 8, 9.";
  if (class_names.empty())
    throw ConfigError(fmt::format("[data] dataset '{}' has no class names: set data.datasets.{}.prompt", name, name));
  return "What is the object in the image? Please only answer a single object in " + labels + ".";
}

std::string fill_label(const std::string& tmpl, const std::string& label_name) {
  return replace_all(tmpl, "{label}", label_name);
}

std::string answer_text(const DatasetConfig& cfg, const std::string& label_name) {
  return fill_label(cfg.answer, label_name);
}

const std::vector<std::string>& fashion_mnist_class_names() {
  static const std::vector<std::string> names = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                 "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return names;
}

std::vector<std::string> builtin_dataset_names() { return {"mnist", "fashion-mnist", "shapes10", "objects60"}; }

std::map<std::string, DatasetConfig> builtin_dataset_configs() {
  std::map<std::string, DatasetConfig> m;
  DatasetConfig mnist;
  mnist.format = "idx";
  mnist.path = "mnist";
  m["mnist"] = mnist;
  DatasetConfig fashion;
  fashion.format = "idx";
  fashion.path = "fashion-mnist";
  fashion.class_names = fashion_mnist_class_names();
  m["fashion-mnist"] = fashion;
  for (const char* g : {"shapes10", "objects60"}) {
    DatasetConfig c;
    c.format = "cifar10";
    c.path = std::string("synthetic/") + g;
    m[g] = c;
  }
  return m;
}

}  // namespace emt
