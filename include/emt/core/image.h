// Image decoding and CLIP preprocessing (the HF CLIPImageProcessor definition: grey -> RGB, shortest-side resize
// with PIL's antialiased bicubic, center crop, rescale, normalize). Images travel as uint8 [H, W, C] tensors.
#pragma once
#include <torch/types.h>

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace emt {

struct ImageProcessorOptions {
  int64_t resize_shortest = 224;  // shortest side after resize (HF size.shortest_edge)
  int64_t crop_size = 224;        // square center crop (HF crop_size)
  bool do_resize = true;
  bool do_center_crop = true;
  double rescale = 1.0 / 255;
  std::array<double, 3> mean = {0.48145466, 0.4578275, 0.40821073};  // CLIP (OpenAI) statistics
  std::array<double, 3> std = {0.26862954, 0.26130258, 0.27577711};
};

// Resize and crop to `image_size` (28/32 for the tiny model, 224 or 336 for real CLIP), CLIP mean/std.
ImageProcessorOptions image_options_for_size(int64_t image_size);
// Reads an HF preprocessor_config.json (size/shortest_edge, crop_size, do_*, rescale_factor, image_mean/std).
// Throws IoError naming the path if unreadable, FormatError naming the key if malformed.
ImageProcessorOptions load_hf_preprocessor_config(const std::string& path);

// Decodes PNG/JPEG/BMP/PPM/... into uint8 [H, W, 3] RGB (grey and grey+alpha become RGB, alpha is dropped).
// Throws IoError naming the path when missing or undecodable.
torch::Tensor decode_image_file(const std::string& path);
// Same for an in-memory encoded image; `name` labels errors.
torch::Tensor decode_image_bytes(const std::string& bytes, const std::string& name);

// uint8 [H, W, 1|3] -> float32 [3, S, S] exactly as CLIPImageProcessor defines it.
torch::Tensor preprocess_image(const torch::Tensor& hwc_uint8, const ImageProcessorOptions& opts);
// PIL-style resampling (Image.resize with BICUBIC): uint8 [H, W, C] -> uint8 [out_h, out_w, C]. Both passes
// round to uint8 like PIL does; downsampling widens the filter support by the scale (antialiasing).
torch::Tensor resize_bicubic_pil(const torch::Tensor& hwc_uint8, int64_t out_h, int64_t out_w);
// Output (height, width) of the shortest-side resize (HF get_resize_output_image_size, default_to_square=False).
std::pair<int64_t, int64_t> shortest_side_size(int64_t height, int64_t width, int64_t shortest);

// A labelled grid of images (each scaled to `cell` pixels, nearest neighbour, caption underneath): uint8 [H, W, 3].
torch::Tensor contact_sheet(const std::vector<torch::Tensor>& hwc_images, const std::vector<std::string>& captions,
                            int64_t cell = 96, int64_t columns = 8);

// Encodes uint8 [H, W, 1|3] as PNG and writes it atomically. Throws IoError naming the path.
void write_png(const std::string& path, const torch::Tensor& hwc_uint8);
// PNG bytes of uint8 [H, W, 1|3] (RGB order).
std::string encode_png(const torch::Tensor& hwc_uint8);

}  // namespace emt
