// Shared fixtures of the model tests: a tiny ModelSection, max-abs-diff, fixture paths.
#pragma once
#include <emt/core/config.h>
#include <torch/torch.h>

#include <string>

namespace emt_test {

inline emt::ModelSection tiny_model_section(const std::string& projector = "mlp2x_gelu") {
  emt::ModelSection m;
  m.projector = projector;
  m.vision.image_size = 8;
  m.vision.patch_size = 4;
  m.vision.hidden_size = 16;
  m.vision.num_layers = 2;
  m.vision.num_heads = 2;
  m.vision.intermediate_size = 24;
  m.llm.vocab_size = 48;
  m.llm.hidden_size = 32;
  m.llm.num_layers = 2;
  m.llm.num_heads = 4;
  m.llm.num_kv_heads = 2;
  m.llm.intermediate_size = 40;
  m.llm.max_position_embeddings = 64;
  return m;
}
constexpr int64_t kTinyImageToken = 47;

inline double max_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

inline std::string model_fixture(const std::string& name) {
  return std::string(EMT_SOURCE_DIR) + "/test/fixtures/models/" + name;
}

}  // namespace emt_test
