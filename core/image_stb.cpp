// stb_image / stb_image_write behind core/image_stb.h. Compiled in a translation unit of its own (CMakeLists.txt):
// the implementations below define many static helpers.
#include "core/image_stb.h"

#include <emt/core/error.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include <climits>
#include <cstring>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_STDIO  // emt reads the file itself, so errors name it
#include <stb_image.h>
#define STB_IMAGE_WRITE_IMPLEMENTATION
#define STBI_WRITE_NO_STDIO
#include <stb_image_write.h>

namespace emt::detail {

torch::Tensor decode_image_stb(const std::string& bytes, const std::string& name) {
  if (bytes.empty()) throw IoError(fmt::format("[image] {}: file is empty", name));
  if (bytes.size() > static_cast<size_t>(INT_MAX))
    throw IoError(fmt::format("[image] {}: {} bytes is more than stb_image reads", name, bytes.size()));
  int w = 0, h = 0, channels = 0;
  stbi_uc* px = stbi_load_from_memory(reinterpret_cast<const stbi_uc*>(bytes.data()), static_cast<int>(bytes.size()),
                                      &w, &h, &channels, 3);
  if (px == nullptr || w <= 0 || h <= 0) {
    const char* why = stbi_failure_reason();
    if (px) stbi_image_free(px);
    throw IoError(fmt::format("[image] {}: cannot decode image ({} bytes): {} (this build decodes with stb_image: "
                              "PNG, JPEG, BMP, GIF, TGA, PNM, PSD, HDR, PIC)",
                              name, bytes.size(), why ? why : "unknown error"));
  }
  auto t = torch::empty({h, w, 3}, torch::kUInt8);
  std::memcpy(t.data_ptr<uint8_t>(), px, static_cast<size_t>(w) * h * 3);
  stbi_image_free(px);
  return t;
}

namespace {

void append(void* out, void* data, int size) {
  static_cast<std::string*>(out)->append(static_cast<const char*>(data), static_cast<size_t>(size));
}

}  // namespace

std::string encode_png_stb(const torch::Tensor& hwc_uint8) {
  TORCH_CHECK(hwc_uint8.dim() == 3 && hwc_uint8.scalar_type() == torch::kUInt8 &&
                  (hwc_uint8.size(2) == 1 || hwc_uint8.size(2) == 3),
              "encode_png: expected uint8 [H, W, 1|3], got ", hwc_uint8.scalar_type(), " ", hwc_uint8.sizes());
  auto t = hwc_uint8.contiguous();
  const int h = static_cast<int>(t.size(0)), w = static_cast<int>(t.size(1)), c = static_cast<int>(t.size(2));
  std::string out;
  if (!stbi_write_png_to_func(append, &out, w, h, c, t.data_ptr<uint8_t>(), w * c))
    throw IoError(fmt::format("[image] PNG encoding of a {}x{}x{} image failed", h, w, c));
  return out;
}

}  // namespace emt::detail
