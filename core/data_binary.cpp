// Binary dataset formats: IDX (MNIST, Fashion-MNIST; raw or gzip) and CIFAR-10/100 binary batches.
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <fmt/format.h>
#include <emt/core/runtime.h>

#include <torch/torch.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>

namespace emt {

namespace fs = std::filesystem;

std::string read_maybe_gzip(const std::string& path) {
  if (!fs::exists(path)) throw IoError(fmt::format("[data] {}: no such file", path));
  gzFile f = gzopen(path.c_str(), "rb");  // zlib reads plain files transparently
  if (!f) throw IoError(fmt::format("[data] {}: cannot open file", path));
  std::string out;
  char buf[1 << 16];
  for (;;) {
    int n = gzread(f, buf, sizeof buf);
    if (n < 0) {
      int err = 0;
      std::string msg = gzerror(f, &err);
      gzclose(f);
      throw IoError(fmt::format("[data] {}: read failed after {} bytes: {}", path, out.size(), msg));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  int err = 0;
  const char* msg = gzerror(f, &err);
  std::string m = msg ? msg : "";
  gzclose(f);
  if (err != Z_OK && err != Z_STREAM_END)
    throw IoError(fmt::format("[data] {}: gzip stream is damaged after {} bytes: {}", path, out.size(), m));
  return out;
}

IdxArray parse_idx(const uint8_t* b, size_t size, const std::string& name) {
  if (size < 4)
    throw FormatError(fmt::format("[data] {}: IDX file has {} bytes, the header alone needs at least 4", name, size));
  if (b[0] != 0 || b[1] != 0)
    throw FormatError(fmt::format("[data] {}: bad IDX magic 0x{:02x}{:02x}{:02x}{:02x} (expected 0x0000TTDD)", name,
                                  b[0], b[1], b[2], b[3]));
  if (b[2] != 0x08)
    throw FormatError(fmt::format("[data] {}: IDX element type 0x{:02x} is not supported (only unsigned byte 0x08)",
                                  name, b[2]));
  const int nd = b[3];
  if (nd < 1 || nd > 4)
    throw FormatError(fmt::format("[data] {}: IDX has {} dimensions (expected 1..4)", name, nd));
  const size_t header = 4 + 4 * static_cast<size_t>(nd);
  if (size < header)
    throw FormatError(fmt::format("[data] {}: IDX header for {} dimensions needs {} bytes, file has {}", name, nd,
                                  header, size));
  IdxArray a;
  uint64_t total = 1;
  for (int d = 0; d < nd; ++d) {
    const uint8_t* p = b + 4 + 4 * d;
    uint64_t v = (uint64_t{p[0]} << 24) | (uint64_t{p[1]} << 16) | (uint64_t{p[2]} << 8) | p[3];
    a.dims.push_back(static_cast<int64_t>(v));
    if (v != 0 && total > (uint64_t{1} << 40) / v)  // checked before multiplying, so it cannot overflow
      throw FormatError(fmt::format("[data] {}: IDX dimensions are implausibly large", name));
    total *= v;
  }
  if (size - header < total)
    throw FormatError(fmt::format("[data] {}: truncated IDX: header says {} bytes of data, file has {} "
                                  "(record {} is incomplete)",
                                  name, total, size - header,
                                  a.dims[0] ? (size - header) / std::max<uint64_t>(1, total / a.dims[0]) : 0));
  if (size - header > total)
    throw FormatError(fmt::format("[data] {}: IDX has {} trailing bytes after the {} the header describes", name,
                                  size - header - total, total));
  a.data.assign(b + header, b + header + total);
  return a;
}

std::string encode_idx(const std::vector<int64_t>& dims, const uint8_t* data) {
  TORCH_CHECK(!dims.empty() && dims.size() <= 4, "encode_idx: 1..4 dimensions, got ", dims.size());
  std::string out = {0, 0, 0x08, static_cast<char>(dims.size())};
  size_t total = 1;
  for (int64_t d : dims) {
    TORCH_CHECK(d >= 0 && d < (int64_t{1} << 32), "encode_idx: dimension ", d, " out of range");
    for (int s = 24; s >= 0; s -= 8) out.push_back(static_cast<char>((d >> s) & 0xff));
    total *= static_cast<size_t>(d);
  }
  out.append(reinterpret_cast<const char*>(data), total);
  return out;
}

namespace {

// Pixels shared by IDX and CIFAR sets: contiguous [N, H, W, C] bytes (CIFAR is converted once at load).
class DenseDataset : public ImageDataset {
 public:
  DenseDataset(std::vector<uint8_t> pixels, int64_t h, int64_t w, int64_t c, std::vector<int64_t> labels,
               std::string file)
      : pixels_(std::move(pixels)), h_(h), w_(w), c_(c), labels_(std::move(labels)), file_(std::move(file)) {}
  int64_t size() const override { return static_cast<int64_t>(labels_.size()); }
  int64_t label(int64_t i) const override { return labels_.at(i); }
  torch::Tensor image(int64_t i) const override {
    TORCH_CHECK(i >= 0 && i < size(), "dataset ", name_, ": index ", i, " out of range ", size());
    auto t = torch::empty({h_, w_, c_}, torch::kUInt8);
    std::memcpy(t.data_ptr<uint8_t>(), pixels_.data() + i * h_ * w_ * c_, static_cast<size_t>(h_ * w_ * c_));
    return t;
  }
  std::string source(int64_t i) const override { return fmt::format("{} record {}", file_, i); }

 private:
  std::vector<uint8_t> pixels_;
  int64_t h_, w_, c_;
  std::vector<int64_t> labels_;
  std::string file_;
};

std::string first_existing(const std::string& dir, const std::vector<std::string>& names) {
  for (auto& n : names) {
    fs::path p = fs::path(dir) / n;
    if (fs::exists(p)) return p.string();
  }
  std::string list;
  for (auto& n : names) list += (list.empty() ? "" : ", ") + n;
  throw IoError(fmt::format("[data] {}: none of {} found", dir, list));
}

std::vector<std::string> idx_names(const std::string& prefix, const std::string& kind, int nd) {
  std::vector<std::string> out;
  for (const char* sep : {"-", "."})
    for (const char* gz : {"", ".gz"})
      out.push_back(fmt::format("{}-{}{}idx{}-ubyte{}", prefix, kind, sep, nd, gz));
  return out;
}

std::vector<std::string> read_name_lines(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw IoError(fmt::format("[data] {}: cannot open file", path));
  std::vector<std::string> names;
  std::string line;
  while (std::getline(f, line)) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.pop_back();
    if (!line.empty()) names.push_back(line);
  }
  return names;
}

std::vector<std::string> numeric_names(int64_t k) {
  std::vector<std::string> v;
  for (int64_t i = 0; i < k; ++i) v.push_back(std::to_string(i));
  return v;
}

}  // namespace

std::shared_ptr<ImageDataset> open_idx_dataset(const std::string& dir, Split split) {
  if (!fs::is_directory(dir)) throw IoError(fmt::format("[data] {}: IDX dataset directory not found", dir));
  const std::string prefix = split == Split::train ? "train" : "t10k";
  const std::string img_path = first_existing(dir, idx_names(prefix, "images", 3));
  const std::string lab_path = first_existing(dir, idx_names(prefix, "labels", 1));
  std::string ib = read_maybe_gzip(img_path), lb = read_maybe_gzip(lab_path);
  IdxArray img = parse_idx(reinterpret_cast<const uint8_t*>(ib.data()), ib.size(), img_path);
  IdxArray lab = parse_idx(reinterpret_cast<const uint8_t*>(lb.data()), lb.size(), lab_path);
  if (img.dims.size() != 3 && img.dims.size() != 4)
    throw FormatError(fmt::format("[data] {}: images must be [N, H, W] or [N, H, W, C], got {} dimensions", img_path,
                                  img.dims.size()));
  if (lab.dims.size() != 1)
    throw FormatError(fmt::format("[data] {}: labels must be 1-dimensional, got {}", lab_path, lab.dims.size()));
  if (img.dims[0] != lab.dims[0])
    throw FormatError(fmt::format("[data] {} has {} images but {} has {} labels", img_path, img.dims[0], lab_path,
                                  lab.dims[0]));
  const fs::path classes = fs::path(dir) / "classes.txt";
  std::vector<std::string> names;
  int64_t max_label = -1;
  for (uint8_t l : lab.data) max_label = std::max<int64_t>(max_label, l);
  if (fs::exists(classes)) {
    names = read_name_lines(classes.string());
    for (size_t i = 0; i < lab.data.size(); ++i)
      if (lab.data[i] >= names.size())
        throw FormatError(fmt::format("[data] {} record {}: label {} but {} names only {} classes", lab_path, i,
                                      lab.data[i], classes.string(), names.size()));
  } else {
    names = numeric_names(std::max<int64_t>(10, max_label + 1));
  }
  std::vector<int64_t> labels(lab.data.begin(), lab.data.end());
  const int64_t c = img.dims.size() == 4 ? img.dims[3] : 1;
  auto ds = std::make_shared<DenseDataset>(std::move(img.data), img.dims[1], img.dims[2], c, std::move(labels),
                                           img_path);
  ds->set_class_names(std::move(names));
  ds->set_name(fs::path(dir).filename().string());
  return ds;
}

CifarRecords parse_cifar(const uint8_t* bytes, size_t size, int label_bytes, const std::string& name) {
  TORCH_CHECK(label_bytes == 1 || label_bytes == 2, "parse_cifar: label_bytes must be 1 or 2");
  const size_t rec = 3072 + static_cast<size_t>(label_bytes);
  if (size == 0) throw FormatError(fmt::format("[data] {}: CIFAR file is empty", name));
  if (size % rec != 0)
    throw FormatError(fmt::format("[data] {}: size {} is not a multiple of the {}-byte record ({} full records, "
                                  "record {} has only {} bytes)",
                                  name, size, rec, size / rec, size / rec, size % rec));
  CifarRecords r;
  r.count = static_cast<int64_t>(size / rec);
  r.labels.resize(static_cast<size_t>(r.count) * label_bytes);
  r.pixels.resize(static_cast<size_t>(r.count) * 3072);
  for (int64_t i = 0; i < r.count; ++i) {
    const uint8_t* p = bytes + i * rec;
    std::memcpy(&r.labels[i * label_bytes], p, label_bytes);
    std::memcpy(&r.pixels[i * 3072], p + label_bytes, 3072);
  }
  return r;
}

std::string encode_cifar10(const torch::Tensor& nhwc_uint8, const std::vector<int64_t>& labels) {
  TORCH_CHECK(nhwc_uint8.dim() == 4 && nhwc_uint8.size(1) == 32 && nhwc_uint8.size(2) == 32 &&
                  nhwc_uint8.size(3) == 3 && nhwc_uint8.scalar_type() == torch::kUInt8,
              "encode_cifar10: expected uint8 [N, 32, 32, 3], got ", nhwc_uint8.sizes());
  TORCH_CHECK(nhwc_uint8.size(0) == static_cast<int64_t>(labels.size()), "encode_cifar10: count mismatch");
  auto planar = nhwc_uint8.permute({0, 3, 1, 2}).contiguous();  // [N, 3, 32, 32]
  const uint8_t* px = planar.data_ptr<uint8_t>();
  std::string out;
  out.reserve(labels.size() * 3073);
  for (size_t i = 0; i < labels.size(); ++i) {
    TORCH_CHECK(labels[i] >= 0 && labels[i] < 256, "encode_cifar10: label ", labels[i], " does not fit a byte");
    out.push_back(static_cast<char>(labels[i]));
    out.append(reinterpret_cast<const char*>(px + i * 3072), 3072);
  }
  return out;
}

std::shared_ptr<ImageDataset> open_cifar_dataset(const std::string& dir_in, Split split, bool cifar100) {
  std::string dir = dir_in;
  const char* sub = cifar100 ? "cifar-100-binary" : "cifar-10-batches-bin";
  if (fs::is_directory(fs::path(dir) / sub)) dir = (fs::path(dir) / sub).string();
  if (!fs::is_directory(dir)) throw IoError(fmt::format("[data] {}: CIFAR dataset directory not found", dir));
  std::vector<std::string> files;
  if (cifar100) {
    files.push_back(first_existing(dir, {split == Split::train ? "train.bin" : "test.bin"}));
  } else if (split == Split::test) {
    files.push_back(first_existing(dir, {"test_batch.bin"}));
  } else {
    for (int b = 1;; ++b) {
      fs::path p = fs::path(dir) / fmt::format("data_batch_{}.bin", b);
      if (!fs::exists(p)) break;
      files.push_back(p.string());
    }
    if (files.empty()) throw IoError(fmt::format("[data] {}: no data_batch_1.bin found", dir));
  }
  const std::string names_file = first_existing(dir, {cifar100 ? "fine_label_names.txt" : "batches.meta.txt"});
  std::vector<std::string> names = read_name_lines(names_file);
  const int label_bytes = cifar100 ? 2 : 1;
  std::vector<uint8_t> pixels;
  std::vector<int64_t> labels;
  for (auto& file : files) {
    std::string bytes = read_file(file);
    CifarRecords r = parse_cifar(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), label_bytes, file);
    const size_t base = pixels.size();
    pixels.resize(base + static_cast<size_t>(r.count) * 3072);
    for (int64_t i = 0; i < r.count; ++i) {
      const int64_t l = r.labels[i * label_bytes + label_bytes - 1];  // CIFAR-100: fine label is the 2nd byte
      if (l >= static_cast<int64_t>(names.size()))
        throw FormatError(fmt::format("[data] {} record {}: label {} but {} names only {} classes", file, i, l,
                                      names_file, names.size()));
      labels.push_back(l);
      // planar RGB -> interleaved HWC
      const uint8_t* src = &r.pixels[i * 3072];
      uint8_t* dst = &pixels[base + i * 3072];
      for (int p = 0; p < 1024; ++p)
        for (int ch = 0; ch < 3; ++ch) dst[p * 3 + ch] = src[ch * 1024 + p];
    }
  }
  auto ds = std::make_shared<DenseDataset>(std::move(pixels), 32, 32, 3, std::move(labels),
                                           files.size() == 1 ? files[0] : dir);
  ds->set_class_names(std::move(names));
  ds->set_name(fs::path(dir_in).filename().string());
  return ds;
}

}  // namespace emt
