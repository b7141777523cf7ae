// The multimodal projector (vision features -> LLM embeddings): `linear` (LLaVA v0) or `mlp2x_gelu` (LLaVA-1.5),
// with the HF llava child names `linear_1` / `linear_2`, built from emt::Linear so LoRA can attach anywhere.
#pragma once
#include <emt/core/layers.h>

#include <string>

namespace emt {

struct ModelSection;

struct ProjectorOptions {
  std::string type = "linear";  // linear | mlp2x_gelu
  int64_t in = 0;               // vision width
  int64_t out = 0;              // LLM width
  std::string act = "gelu";     // between linear_1 and linear_2
};
// ConfigError on an unknown projector type.
ProjectorOptions projector_options(const ModelSection& m);

struct ProjectorImpl : torch::nn::Module {
  explicit ProjectorImpl(const ProjectorOptions& o);
  // x: [B, N, D_vision] -> [B, N, D_llm]
  torch::Tensor forward(const torch::Tensor& x);
  ProjectorOptions options;
  Linear linear_1{nullptr}, linear_2{nullptr};
};
TORCH_MODULE(Projector);

}  // namespace emt
