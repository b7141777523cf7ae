// safetensors reader (mmap, header validated before any use), writer (reference byte layout, atomic) and
// sharded checkpoints with `model.safetensors.index.json`.
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include <emt/core/safetensors.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

namespace emt {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // same limit as the reference implementation

struct DtypeEntry {
  const char* name;
  torch::ScalarType type;
  uint64_t size;
  int rank;  // the reference writer orders tensors by this (descending), then by name
};

// `rank` follows the declaration order of the reference Dtype enum, which is "increasing alignment".
const DtypeEntry kDtypes[] = {
    {"BOOL", torch::kBool, 1, 0},    {"U8", torch::kByte, 1, 1},    {"I8", torch::kChar, 1, 2},
    {"I16", torch::kShort, 2, 5},    {"F16", torch::kHalf, 2, 7},   {"BF16", torch::kBFloat16, 2, 8},
    {"I32", torch::kInt, 4, 9},      {"F32", torch::kFloat, 4, 11}, {"F64", torch::kDouble, 8, 12},
    {"I64", torch::kLong, 8, 13},
};

const DtypeEntry* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

const DtypeEntry* find_dtype(torch::ScalarType t) {
  for (const auto& d : kDtypes)
    if (t == d.type) return &d;
  return nullptr;
}

std::string base_name(const std::string& path) { return fs::path(path).filename().string(); }

[[noreturn]] void fail(const std::string& file, const std::string& msg) {
  throw FormatError("[safetensors] " + file + ": " + msg);
}

std::string tensor_label(const std::string& name) { return "tensor '" + name + "'"; }

TensorInfo parse_entry(const std::string& name, const json& v, uint64_t data_size, const std::string& file) {
  if (!v.is_object()) fail(file, tensor_label(name) + " entry is not a JSON object (got " + v.type_name() + ")");
  TensorInfo ti;
  ti.name = name;

  auto dt = v.find("dtype");
  if (dt == v.end() || !dt->is_string()) fail(file, tensor_label(name) + " has no string 'dtype'");
  ti.dtype = dt->get<std::string>();
  const DtypeEntry* d = find_dtype(ti.dtype);
  if (!d)
    fail(file, tensor_label(name) + " has unsupported dtype '" + ti.dtype +
                   "' (expected F32, F16, BF16, F64, I64, I32, I16, I8, U8 or BOOL)");

  auto sh = v.find("shape");
  if (sh == v.end() || !sh->is_array()) fail(file, tensor_label(name) + " has no list 'shape'");
  uint64_t numel = 1;
  bool overflow = false, has_zero = false;
  for (const auto& s : *sh) {
    if (!s.is_number_unsigned())
      fail(file, tensor_label(name) + " has a shape entry that is not a non-negative integer (got " + s.dump() + ")");
    uint64_t dim = s.get<uint64_t>();
    if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      fail(file, tensor_label(name) + " has shape entry " + std::to_string(dim) + " beyond int64");
    ti.shape.push_back(static_cast<int64_t>(dim));
    if (dim == 0) {
      has_zero = true;  // a 0 anywhere makes the tensor legal and empty, whatever the other dims say
    } else if (!overflow) {
      if (numel > std::numeric_limits<uint64_t>::max() / dim) overflow = true;
      else numel *= dim;
    }
  }
  if (has_zero) numel = 0, overflow = false;
  if (overflow || numel > std::numeric_limits<uint64_t>::max() / d->size)
    fail(file, tensor_label(name) + " has a shape whose byte size overflows 64 bits");
  const uint64_t nbytes = numel * d->size;

  auto off = v.find("data_offsets");
  if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned())
    fail(file, tensor_label(name) + " needs 'data_offsets' as [begin, end] of non-negative integers");
  ti.begin = (*off)[0].get<uint64_t>();
  ti.end = (*off)[1].get<uint64_t>();
  if (ti.begin > ti.end)
    fail(file, tensor_label(name) + " has data_offsets begin " + std::to_string(ti.begin) + " > end " +
                   std::to_string(ti.end));
  if (ti.end > data_size)
    fail(file, tensor_label(name) + " ends at byte " + std::to_string(ti.end) + " but the data buffer has " +
                   std::to_string(data_size) + " bytes");
  if (ti.end - ti.begin != nbytes)
    fail(file, tensor_label(name) + " needs " + std::to_string(nbytes) + " bytes, data_offsets span " +
                   std::to_string(ti.end - ti.begin));
  return ti;
}

uint64_t read_u64_le(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void put_u64_le(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

struct Prepared {
  std::string name;
  torch::Tensor t;
  const DtypeEntry* d;
  uint64_t nbytes;
};

Prepared prepare(const std::string& name, const torch::Tensor& tensor, const std::string& file) {
  if (!tensor.defined()) fail(file, tensor_label(name) + " is undefined");
  const DtypeEntry* d = find_dtype(tensor.scalar_type());
  if (!d) fail(file, tensor_label(name) + " has dtype " + std::string(c10::toString(tensor.scalar_type())) +
                         ", which safetensors cannot store here");
  torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
  return {name, t, d, static_cast<uint64_t>(t.numel()) * d->size};
}

// The reference writer's order: descending dtype alignment rank, then name. Keeps every tensor aligned.
void sort_like_reference(std::vector<Prepared>& ts) {
  std::stable_sort(ts.begin(), ts.end(), [](const Prepared& a, const Prepared& b) {
    if (a.d->rank != b.d->rank) return a.d->rank > b.d->rank;
    return a.name < b.name;
  });
}

std::string serialize(std::vector<Prepared> ts, const std::map<std::string, std::string>& metadata) {
  sort_like_reference(ts);
  // Written by hand rather than through json::dump() so that key order matches the reference exactly:
  // "__metadata__" first, then tensors in data order, fields dtype/shape/data_offsets.
  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":" + json(metadata).dump();
    first = false;
  }
  uint64_t offset = 0;
  for (const auto& p : ts) {
    if (!first) header += ',';
    first = false;
    header += json(p.name).dump() + ":{\"dtype\":\"" + p.d->name + "\",\"shape\":[";
    for (int64_t i = 0; i < p.t.dim(); ++i) header += (i ? "," : "") + std::to_string(p.t.size(i));
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + p.nbytes) + "]}";
    offset += p.nbytes;
  }
  header += '}';
  header.append((8 - header.size() % 8) % 8, ' ');

  std::string out;
  out.reserve(8 + header.size() + offset);
  put_u64_le(out, header.size());
  out += header;
  for (const auto& p : ts)
    if (p.nbytes) out.append(static_cast<const char*>(p.t.data_ptr()), p.nbytes);
  return out;
}

std::vector<Prepared> prepare_all(const NamedTensors& tensors, const std::string& file) {
  std::vector<Prepared> out;
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") fail(file, "'__metadata__' is reserved and cannot name a tensor");
    if (!seen.insert(name).second) fail(file, tensor_label(name) + " appears twice");
    out.push_back(prepare(name, t, file));
  }
  return out;
}

}  // namespace

std::vector<TensorInfo> parse_safetensors_header(const std::string& text, uint64_t data_size,
                                                 const std::string& file,
                                                 std::map<std::string, std::string>* metadata) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) fail(file, "header is not valid JSON");
  if (!j.is_object()) fail(file, std::string("header is not a JSON object (got ") + j.type_name() + ")");

  std::vector<TensorInfo> out;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) fail(file, "'__metadata__' is not an object of strings");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string())
          fail(file, "'__metadata__' key '" + m.key() + "' is not a string (got " + m->type_name() + ")");
        if (metadata) (*metadata)[m.key()] = m->get<std::string>();
      }
      continue;
    }
    out.push_back(parse_entry(it.key(), *it, data_size, file));
  }

  std::sort(out.begin(), out.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // Empty tensors take no bytes and may sit anywhere; non-empty ones must not share a byte.
  const TensorInfo* prev = nullptr;
  for (const auto& t : out) {
    if (t.begin == t.end) continue;
    if (prev && t.begin < prev->end)
      fail(file, tensor_label(t.name) + " [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                     ") overlaps " + tensor_label(prev->name) + " [" + std::to_string(prev->begin) + ", " +
                     std::to_string(prev->end) + ")");
    prev = &t;
  }
  return out;
}

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  const std::string file = base_name(path);
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw IoError("[safetensors] cannot open " + path + ": " + std::strerror(errno));
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) throw IoError("[safetensors] cannot stat " + path + ": " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) throw IoError("[safetensors] " + path + " is not a regular file");
    map_size_ = static_cast<uint64_t>(st.st_size);
    if (map_size_ < 8)
      fail(path, "file has " + std::to_string(map_size_) + " bytes, too short for the 8-byte header length");
    map_ = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd_, 0);
    if (map_ == MAP_FAILED) {
      map_ = nullptr;
      throw IoError("[safetensors] cannot mmap " + path + ": " + std::strerror(errno));
    }
    const auto* bytes = static_cast<const unsigned char*>(map_);
    const uint64_t n = read_u64_le(bytes);
    if (n > kMaxHeaderBytes)
      fail(path, "header length " + std::to_string(n) + " exceeds the 100 MB limit");
    if (n > map_size_ - 8)
      fail(path, "header length " + std::to_string(n) + " exceeds the " + std::to_string(map_size_ - 8) +
                     " bytes after the length field");
    data_offset_ = 8 + n;
    std::string header(reinterpret_cast<const char*>(bytes + 8), n);
    for (auto& t : parse_safetensors_header(header, map_size_ - data_offset_, path, &metadata_))
      tensors_.emplace(t.name, std::move(t));
  } catch (...) {
    if (map_) ::munmap(map_, map_size_);
    ::close(fd_);
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() {
  if (map_) ::munmap(map_, map_size_);
  if (fd_ >= 0) ::close(fd_);
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<const TensorInfo*> v;
  for (const auto& kv : tensors_) v.push_back(&kv.second);
  std::sort(v.begin(), v.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  std::vector<std::string> out;
  for (auto* t : v) out.push_back(t->name);
  return out;
}

bool SafetensorsReader::contains(const std::string& name) const { return tensors_.count(name) > 0; }

const TensorInfo& SafetensorsReader::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail(path_, "no " + tensor_label(name));
  return it->second;
}

torch::Tensor SafetensorsReader::load(const std::string& name) const {
  const TensorInfo& ti = info(name);
  const DtypeEntry* d = find_dtype(ti.dtype);  // validated at open
  torch::Tensor t = torch::empty(ti.shape, torch::TensorOptions().dtype(d->type));
  const uint64_t n = ti.end - ti.begin;
  if (n) std::memcpy(t.data_ptr(), static_cast<const char*>(map_) + data_offset_ + ti.begin, n);
  return t;
}

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  write_file_atomic(path, serialize(prepare_all(tensors, path), metadata));
}

// ---- sharded checkpoints -------------------------------------------------------------------------------------

namespace {

const char* kSingleName = "model.safetensors";
const char* kIndexName = "model.safetensors.index.json";

std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i, n);
  return buf;
}

bool is_shard_name(const std::string& f) {
  unsigned a = 0, b = 0;
  char tail[16] = {0};
  return f.size() == std::strlen("model-00001-of-00001.safetensors") &&
         std::sscanf(f.c_str(), "model-%5u-of-%5u.%11s", &a, &b, tail) == 3 &&
         std::string(tail) == "safetensors";
}

}  // namespace

CheckpointReader::CheckpointReader(const std::string& dir_or_file) {
  std::error_code ec;
  fs::path p(dir_or_file);
  fs::path index;
  if (fs::is_directory(p, ec)) {
    if (fs::exists(p / kSingleName, ec)) {
      p = p / kSingleName;
    } else if (fs::exists(p / kIndexName, ec)) {
      index = p / kIndexName;
    } else {
      throw IoError("[safetensors] " + dir_or_file + ": no " + kSingleName + " or " + kIndexName);
    }
  } else if (p.extension() == ".json") {
    index = p;
  }

  if (index.empty()) {
    files_.push_back(std::make_unique<SafetensorsReader>(p.string()));
    for (const auto& n : files_[0]->names()) where_[n] = 0;
    return;
  }

  const std::string ifile = index.string();
  const std::string text = read_file(ifile);
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail(ifile, "index is not a JSON object");
  if (j.contains("metadata")) {
    const json& m = j["metadata"];
    if (!m.is_object()) fail(ifile, "'metadata' is not an object");
    if (m.contains("total_size") && !m["total_size"].is_number_unsigned())
      fail(ifile, "'metadata.total_size' is not a non-negative integer");
  }
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) fail(ifile, "index has no 'weight_map' object");

  std::map<std::string, size_t> file_slot;
  const fs::path dir = index.parent_path();
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it->is_string()) fail(ifile, "weight_map entry for " + tensor_label(it.key()) + " is not a file name");
    const std::string shard = it->get<std::string>();
    fs::path sp(shard);
    if (shard.empty() || sp.is_absolute() || sp.filename() != sp)
      fail(ifile, "weight_map entry for " + tensor_label(it.key()) + " names '" + shard +
                      "', expected a file name in the same directory");
    auto slot = file_slot.find(shard);
    if (slot == file_slot.end()) {
      const fs::path full = dir / sp;
      if (!fs::is_regular_file(full, ec))
        throw IoError("[safetensors] " + ifile + ": shard '" + shard + "' (for " + tensor_label(it.key()) +
                      ") does not exist");
      files_.push_back(std::make_unique<SafetensorsReader>(full.string()));
      slot = file_slot.emplace(shard, files_.size() - 1).first;
    }
    if (!files_[slot->second]->contains(it.key()))
      fail(ifile, "weight_map puts " + tensor_label(it.key()) + " in '" + shard + "', which has no such tensor");
    where_[it.key()] = slot->second;
  }
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> out;
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

bool CheckpointReader::contains(const std::string& name) const { return where_.count(name) > 0; }

std::string CheckpointReader::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    std::string src = files_.empty() ? std::string("checkpoint") : files_[0]->path();
    fail(src, "checkpoint has no " + tensor_label(name));
  }
  return files_[it->second]->path();
}

const TensorInfo& CheckpointReader::info(const std::string& name) const {
  file_of(name);
  return files_[where_.at(name)]->info(name);
}

torch::Tensor CheckpointReader::load(const std::string& name) const {
  file_of(name);
  return files_[where_.at(name)]->load(name);
}

void save_checkpoint(const std::string& dir, const NamedTensors& tensors, uint64_t max_shard_bytes,
                     const std::map<std::string, std::string>& metadata) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw IoError("[safetensors] cannot create directory " + dir + ": " + ec.message());
  if (max_shard_bytes == 0) throw ConfigError("[safetensors] " + dir + ": max_shard_bytes must be > 0");

  std::vector<Prepared> all = prepare_all(tensors, dir);
  uint64_t total = 0;
  for (const auto& p : all) total += p.nbytes;

  // Greedy in caller order (as HF's splitter does); a tensor larger than the limit gets a shard of its own.
  std::vector<std::vector<Prepared>> shards;
  uint64_t cur = 0;
  for (auto& p : all) {
    if (shards.empty() || (cur + p.nbytes > max_shard_bytes && cur > 0)) {
      shards.emplace_back();
      cur = 0;
    }
    cur += p.nbytes;
    shards.back().push_back(std::move(p));
  }

  std::set<std::string> written;
  if (shards.size() <= 1) {
    write_file_atomic((fs::path(dir) / kSingleName).string(),
                      serialize(shards.empty() ? std::vector<Prepared>{} : std::move(shards[0]), metadata));
    written.insert(kSingleName);
  } else {
    json wm = json::object();
    for (size_t i = 0; i < shards.size(); ++i) {
      const std::string name = shard_name(i + 1, shards.size());
      for (const auto& p : shards[i]) wm[p.name] = name;
      write_file_atomic((fs::path(dir) / name).string(), serialize(std::move(shards[i]), metadata));
      written.insert(name);
    }
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", wm}};
    // The index is written last: its presence means every shard it names is complete.
    write_file_atomic((fs::path(dir) / kIndexName).string(), index.dump(2) + "\n");
    written.insert(kIndexName);
  }

  // Stale files from an earlier save with a different layout would make the directory ambiguous.
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string f = e.path().filename().string();
    if (written.count(f)) continue;
    if (f == kSingleName || f == kIndexName || is_shard_name(f)) fs::remove(e.path(), ec);
  }
}

}  // namespace emt
