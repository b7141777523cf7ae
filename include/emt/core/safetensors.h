// safetensors I/O: memory-mapped reader (one tensor at a time), atomic writer, sharded checkpoints through
// `model.safetensors.index.json`. Byte-compatible with the published format: 8-byte little-endian header length,
// a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the data buffer.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace emt {

struct TensorInfo {
  std::string name;
  std::string dtype;             // F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;   // byte offsets into the data buffer
};

// Parses and validates a header (the JSON text only). Throws FormatError naming `file` and the tensor.
// `data_size` is the byte length of the data buffer that follows the header.
std::vector<TensorInfo> parse_safetensors_header(const std::string& json, uint64_t data_size,
                                                 const std::string& file,
                                                 std::map<std::string, std::string>* metadata = nullptr);

class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);  // mmaps and validates; IoError / FormatError
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;  // in file order (sorted by offset)
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;  // FormatError if absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Copies one tensor out of the mapping (CPU, contiguous, the file's dtype).
  torch::Tensor load(const std::string& name) const;

 private:
  std::string path_;
  int fd_ = -1;
  void* map_ = nullptr;
  uint64_t map_size_ = 0;
  uint64_t data_offset_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Writes one file atomically (temp + fsync + rename). Tensors are moved to CPU and made contiguous.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// A model directory: `model.safetensors`, or shards listed by `model.safetensors.index.json` (weight_map).
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& dir_or_file);
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;
  torch::Tensor load(const std::string& name) const;
  std::string file_of(const std::string& name) const;

 private:
  std::vector<std::unique_ptr<SafetensorsReader>> files_;
  std::map<std::string, size_t> where_;
};

// Writes `dir/model.safetensors`, or, when the tensors exceed `max_shard_bytes`, shards named
// `model-00001-of-0000N.safetensors` plus `model.safetensors.index.json` (metadata.total_size, weight_map).
void save_checkpoint(const std::string& dir, const NamedTensors& tensors, uint64_t max_shard_bytes = 5ull << 30,
                     const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

}  // namespace emt
