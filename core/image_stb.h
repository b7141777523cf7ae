// The stb_image codec (core/image_stb.cpp): what decodes and encodes images in a build without OpenCV
// (EMT_WITH_OPENCV=OFF), and, in a build with OpenCV, the second codec that test_image compares with OpenCV's.
#pragma once

#include <torch/types.h>

#include <string>

namespace emt::detail {

// Image file bytes (PNG, JPEG, BMP, GIF, TGA, PNM, PSD, HDR, PIC) -> uint8 [H, W, 3] RGB. Like OpenCV's
// IMREAD_COLOR | IMREAD_IGNORE_ORIENTATION: grey is replicated, alpha dropped, 16-bit samples keep their high
// byte, EXIF orientation is ignored. `name` goes into errors.
torch::Tensor decode_image_stb(const std::string& bytes, const std::string& name);

// uint8 [H, W, 1|3] -> PNG bytes.
std::string encode_png_stb(const torch::Tensor& hwc_uint8);

}  // namespace emt::detail
