// File-per-image formats: ImageFolder (class sub-folders, optional class map), CSV/JSONL manifests and LLaVA
// conversation JSON. Images are decoded lazily on the loader's threads.
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <fmt/format.h>
#include <emt/core/image.h>
#include <emt/core/runtime.h>
#include "core/text.h"

#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace emt {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Samples are files on disk: decoding happens in image(), errors name the file.
class FileDataset : public ImageDataset {
 public:
  FileDataset(std::vector<std::string> files, std::vector<int64_t> labels)
      : files_(std::move(files)), labels_(std::move(labels)) {}
  int64_t size() const override { return static_cast<int64_t>(files_.size()); }
  int64_t label(int64_t i) const override { return labels_.at(i); }
  torch::Tensor image(int64_t i) const override { return decode_image_file(files_.at(i)); }
  std::string source(int64_t i) const override { return files_.at(i); }

 protected:
  std::vector<std::string> files_;
  std::vector<int64_t> labels_;
};

class LlavaDataset : public FileDataset {
 public:
  LlavaDataset(std::vector<std::string> files, std::vector<LlavaSample> samples)
      : FileDataset(std::move(files), std::vector<int64_t>(samples.size(), -1)), samples_(std::move(samples)) {}
  bool has_text() const override { return true; }
  std::pair<std::string, std::string> text(int64_t i) const override {
    const auto& conv = samples_.at(i).conversations;
    std::pair<std::string, std::string> qa;
    for (auto& t : conv) {
      if (qa.first.empty() && t.from == "human") qa.first = t.value;
      else if (!qa.first.empty() && t.from == "gpt") { qa.second = t.value; break; }
    }
    return qa;
  }

 private:
  std::vector<LlavaSample> samples_;
};

bool is_image_file(const fs::path& p) {
  std::string e = p.extension().string();
  std::transform(e.begin(), e.end(), e.begin(), [](unsigned char c) { return std::tolower(c); });
  static const std::set<std::string> exts = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm",
                                             ".pnm", ".webp", ".tif", ".tiff", ".jfif"};
  return exts.count(e) > 0;
}


std::map<std::string, std::string> read_class_map(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw IoError(fmt::format("[data] {}: cannot open class map", path));
  std::map<std::string, std::string> m;
  std::string line;
  for (int ln = 1; std::getline(f, line); ++ln) {
    line = detail::trim(line);
    if (line.empty() || line[0] == '#') continue;
    size_t sp = line.find_first_of(" \t,");
    if (sp == std::string::npos)
      throw FormatError(fmt::format("[data] {}:{}: expected 'folder name', got '{}'", path, ln, line));
    std::string name = detail::trim(line.substr(sp + 1));
    if (!name.empty() && name[0] == ',') name = detail::trim(name.substr(1));
    m[line.substr(0, sp)] = name;
  }
  return m;
}

std::vector<std::string> sorted_images(const fs::path& dir) {
  std::vector<std::string> out;
  for (auto& e : fs::directory_iterator(dir))
    if (e.is_regular_file() && is_image_file(e.path())) out.push_back(e.path().string());
  std::sort(out.begin(), out.end());
  return out;
}

std::string split_file(const std::string& path, Split split) {
  std::string p = path;
  size_t pos = p.find("{split}");
  if (pos != std::string::npos) p.replace(pos, 7, split_name(split));
  return p;
}

}  // namespace

std::shared_ptr<ImageDataset> open_image_folder(const std::string& dir, Split split, const std::string& class_map) {
  if (!fs::is_directory(dir)) throw IoError(fmt::format("[data] {}: ImageFolder directory not found", dir));
  const fs::path train = fs::path(dir) / "train";
  fs::path test = fs::path(dir) / "test";
  if (!fs::is_directory(test)) test = fs::path(dir) / "val";
  const bool has_splits = fs::is_directory(train) && fs::is_directory(test);
  // Classes are the union of both splits' folders so label ids agree between train and test.
  std::set<std::string> folders;
  for (const fs::path& root : has_splits ? std::vector<fs::path>{train, test} : std::vector<fs::path>{dir})
    for (auto& e : fs::directory_iterator(root))
      if (e.is_directory()) folders.insert(e.path().filename().string());
  if (folders.empty()) throw FormatError(fmt::format("[data] {}: ImageFolder has no class sub-folders", dir));
  std::vector<std::string> classes(folders.begin(), folders.end());
  const fs::path root = has_splits ? (split == Split::train ? train : test) : fs::path(dir);
  std::vector<std::string> files;
  std::vector<int64_t> labels;
  for (size_t c = 0; c < classes.size(); ++c) {
    fs::path cdir = root / classes[c];
    if (!fs::is_directory(cdir)) continue;  // class only present in the other split
    auto imgs = sorted_images(cdir);
    if (imgs.empty()) throw FormatError(fmt::format("[data] {}: empty class folder (no image files)", cdir.string()));
    for (size_t k = 0; k < imgs.size(); ++k) {
      // Without split folders every 6th image is the test split (100 of miniImageNet's 600 per class).
      if (!has_splits && ((k % 6 == 5) != (split == Split::test))) continue;
      files.push_back(imgs[k]);
      labels.push_back(static_cast<int64_t>(c));
    }
  }
  std::vector<std::string> names = classes;
  if (!class_map.empty()) {
    auto m = read_class_map(class_map);
    for (auto& n : names) {
      auto it = m.find(n);
      if (it == m.end())
        throw FormatError(fmt::format("[data] {}: no entry for class folder '{}'", class_map, n));
      n = it->second;
    }
  }
  auto ds = std::make_shared<FileDataset>(std::move(files), std::move(labels));
  ds->set_class_names(std::move(names));
  ds->set_name(fs::path(dir).filename().string());
  return ds;
}

namespace {

std::vector<std::string> split_csv_line(const std::string& line, const std::string& file, int ln) {
  std::vector<std::string> cells;
  std::string cur;
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    char ch = line[i];
    if (quoted) {
      if (ch == '"' && i + 1 < line.size() && line[i + 1] == '"') cur += '"', ++i;
      else if (ch == '"') quoted = false;
      else cur += ch;
    } else if (ch == '"') {
      quoted = true;
    } else if (ch == ',') {
      cells.push_back(cur);
      cur.clear();
    } else if (ch != '\r') {
      cur += ch;
    }
  }
  if (quoted) throw FormatError(fmt::format("[data] {}:{}: unterminated quote", file, ln));
  cells.push_back(cur);
  return cells;
}

bool is_integer(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); });
}

const std::vector<std::string> kImageKeys = {"image", "path", "filename", "file"};
const std::vector<std::string> kLabelKeys = {"label", "class"};

}  // namespace

namespace {

// A directory manifest names its split's file: train.csv|jsonl, or test / val for the test split.
std::string manifest_file(std::string path, Split split) {
  if (!fs::is_directory(path)) return path;
  std::vector<std::string> cands;
  for (const char* stem : split == Split::train ? std::vector<const char*>{"train"}
                                                : std::vector<const char*>{"test", "val"})
    for (const char* ext : {".csv", ".jsonl"}) cands.push_back((fs::path(path) / (std::string(stem) + ext)).string());
  auto it = std::find_if(cands.begin(), cands.end(), [](auto& c) { return fs::exists(c); });
  if (it == cands.end())
    throw IoError(fmt::format("[data] {}: no {} manifest ({}.csv or {}.jsonl)", path, split_name(split),
                              split_name(split), split_name(split)));
  return *it;
}

// The (image, label text) rows of a CSV (header naming the columns) or JSONL manifest, with their line numbers.
struct ManifestRows {
  std::vector<std::pair<std::string, std::string>> rows;
  std::vector<int> line;
};

ManifestRows read_manifest_rows(const std::string& path) {
  const std::string text = read_file(path);
  const bool jsonl = fs::path(path).extension() == ".jsonl";
  ManifestRows out;
  std::istringstream in(text);
  std::string line;
  int image_col = -1, label_col = -1;
  for (int ln = 1; std::getline(in, line); ++ln) {
    if (detail::trim(line).empty()) continue;
    if (jsonl) {
      json j;
      try {
        j = json::parse(line);
      } catch (const std::exception& e) {
        throw FormatError(fmt::format("[data] {}:{}: not valid JSON: {}", path, ln, e.what()));
      }
      std::string img, lab;
      for (auto& k : kImageKeys)
        if (j.contains(k) && j[k].is_string()) { img = j[k].get<std::string>(); break; }
      for (auto& k : kLabelKeys)
        if (j.contains(k)) { lab = j[k].is_string() ? j[k].get<std::string>() : j[k].dump(); break; }
      if (img.empty() || lab.empty())
        throw FormatError(fmt::format("[data] {}:{}: needs an image (image|path|filename|file) and a label "
                                      "(label|class) field", path, ln));
      out.rows.emplace_back(img, lab);
      out.line.push_back(ln);
      continue;
    }
    auto cells = split_csv_line(line, path, ln);
    if (image_col < 0) {
      for (size_t c = 0; c < cells.size(); ++c) {
        std::string h = detail::trim(cells[c]);
        std::transform(h.begin(), h.end(), h.begin(), [](unsigned char ch) { return std::tolower(ch); });
        if (image_col < 0 && std::count(kImageKeys.begin(), kImageKeys.end(), h)) image_col = static_cast<int>(c);
        if (label_col < 0 && std::count(kLabelKeys.begin(), kLabelKeys.end(), h)) label_col = static_cast<int>(c);
      }
      if (image_col < 0 || label_col < 0)
        throw FormatError(fmt::format("[data] {}:{}: CSV header must name an image column (image|path|filename|file) "
                                      "and a label column (label|class), got '{}'", path, ln, detail::trim(line)));
      continue;
    }
    if (static_cast<int>(cells.size()) <= std::max(image_col, label_col))
      throw FormatError(fmt::format("[data] {}:{}: expected at least {} columns, got {}", path, ln,
                                    std::max(image_col, label_col) + 1, cells.size()));
    out.rows.emplace_back(detail::trim(cells[image_col]), detail::trim(cells[label_col]));
    out.line.push_back(ln);
  }
  if (out.rows.empty()) throw FormatError(fmt::format("[data] {}: manifest has no samples", path));
  return out;
}

}  // namespace

std::shared_ptr<ImageDataset> open_manifest(const std::string& path_in, Split split,
                                            const std::vector<std::string>& class_names) {
  const std::string path = manifest_file(split_file(path_in, split), split);
  const ManifestRows m = read_manifest_rows(path);
  const auto& rows = m.rows;
  // Labels: all integers -> ids; otherwise names (positions in class_names when given, else sorted).
  const bool numeric = std::all_of(rows.begin(), rows.end(), [](auto& r) { return is_integer(r.second); });
  std::vector<std::string> names = class_names;
  std::map<std::string, int64_t> id_of;
  if (!numeric) {
    if (names.empty()) {
      std::set<std::string> uniq;
      for (auto& r : rows) uniq.insert(r.second);
      names.assign(uniq.begin(), uniq.end());
    }
    for (size_t i = 0; i < names.size(); ++i) id_of[names[i]] = static_cast<int64_t>(i);
  }
  const fs::path base = fs::path(path).parent_path();
  std::vector<std::string> files;
  std::vector<int64_t> labels;
  int64_t max_id = -1;
  for (size_t r = 0; r < rows.size(); ++r) {
    int64_t id;
    if (numeric) {
      id = std::stoll(rows[r].second);
    } else {
      auto it = id_of.find(rows[r].second);
      if (it == id_of.end())
        throw FormatError(fmt::format("[data] {}:{}: label '{}' is not one of the {} class_names", path, m.line[r],
                                      rows[r].second, names.size()));
      id = it->second;
    }
    max_id = std::max(max_id, id);
    fs::path img = rows[r].first;
    if (img.is_relative()) {
      fs::path direct = base / img, nested = base / "images" / img;  // miniImageNet csv + images/ layout
      img = !fs::exists(direct) && fs::exists(nested) ? nested : direct;
    }
    files.push_back(img.string());
    labels.push_back(id);
  }
  if (numeric) {
    if (names.empty()) {
      for (int64_t i = 0; i <= max_id; ++i) names.push_back(std::to_string(i));
    } else if (max_id >= static_cast<int64_t>(names.size())) {
      throw FormatError(fmt::format("[data] {}: label id {} but only {} class_names", path, max_id, names.size()));
    }
  }
  auto ds = std::make_shared<FileDataset>(std::move(files), std::move(labels));
  ds->set_class_names(std::move(names));
  ds->set_name(fs::path(path).stem().string());
  return ds;
}

std::vector<LlavaSample> parse_llava_json(const std::string& text, const std::string& name) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    throw FormatError(fmt::format("[data] {}: not valid JSON: {}", name, e.what()));
  }
  if (!j.is_array()) throw FormatError(fmt::format("[data] {}: LLaVA data must be a JSON array of samples", name));
  std::vector<LlavaSample> out;
  for (size_t i = 0; i < j.size(); ++i) {
    const json& s = j[i];
    auto bad = [&](const std::string& what) {
      return FormatError(fmt::format("[data] {}: sample {}: {}", name, i, what));
    };
    if (!s.is_object()) throw bad("not an object");
    LlavaSample ls;
    if (s.contains("id")) ls.id = s["id"].is_string() ? s["id"].get<std::string>() : s["id"].dump();
    if (!s.contains("image") || !s["image"].is_string()) throw bad("missing string field 'image'");
    ls.image = s["image"].get<std::string>();
    if (!s.contains("conversations") || !s["conversations"].is_array()) throw bad("missing array 'conversations'");
    for (auto& t : s["conversations"]) {
      if (!t.is_object() || !t.contains("from") || !t.contains("value") || !t["from"].is_string() ||
          !t["value"].is_string())
        throw bad("each conversation turn needs string 'from' and 'value'");
      ls.conversations.push_back({t["from"].get<std::string>(), t["value"].get<std::string>()});
    }
    out.push_back(std::move(ls));
  }
  return out;
}

std::vector<LlavaSample> read_llava_json(const std::string& path) { return parse_llava_json(read_file(path), path); }

std::shared_ptr<ImageDataset> open_llava_dataset(const std::string& path_in, Split split) {
  const std::string path = split_file(path_in, split);
  auto samples = read_llava_json(path);
  const fs::path base = fs::path(path).parent_path();
  std::vector<std::string> files;
  for (auto& s : samples) files.push_back(fs::path(s.image).is_absolute() ? s.image : (base / s.image).string());
  auto ds = std::make_shared<LlavaDataset>(std::move(files), std::move(samples));
  ds->set_name(fs::path(path).stem().string());
  return ds;
}

}  // namespace emt
