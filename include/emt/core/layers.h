// Building blocks shared by every model: a Linear layer that can carry a low-rank (LoRA) delta, RMSNorm, and
// activation lookup. Submodule names follow HF/PEFT keys: `weight`, `bias`, `lora_A.weight`, `lora_B.weight`.
#pragma once
#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <string>

namespace emt {

struct LinearOptions {
  int64_t in = 0, out = 0;
  bool bias = true;
};

// y = x W^T + b (+ scale * B(A(dropout(x))) when a low-rank delta is attached and not merged).
// The low-rank parameters are registered as children `lora_A` and `lora_B` (torch::nn::Linear without bias) so
// state-dict keys are exactly PEFT's (`<path>.lora_A.weight`). The adapters layer decides where to attach them.
struct LinearImpl : torch::nn::Module {
  explicit LinearImpl(const LinearOptions& o);
  // x: [..., in] -> [..., out]
  torch::Tensor forward(const torch::Tensor& x);

  // Low-rank delta (LoRA). A: [r, in], B: [out, r]; scale multiplies B A; runtime_scale (default 1) scales
  // the delta again at evaluation (0 = base model, 1 = adapted) without touching the weights.
  void attach_low_rank(int64_t r, double scale, double dropout);
  bool has_low_rank() const { return !lora_A.is_empty(); }
  void detach_low_rank();
  void set_runtime_scale(double s) { runtime_scale_ = s; }
  double runtime_scale() const { return runtime_scale_; }
  double lora_scale() const { return scale_; }
  int64_t lora_rank() const { return has_low_rank() ? lora_A->weight.size(0) : 0; }
  // W += runtime_scale * scale * B A (and back). Exact up to floating-point rounding; merged state is tracked.
  void merge();
  void unmerge();
  bool merged() const { return merged_; }

  LinearOptions options;
  torch::Tensor weight, bias;
  torch::nn::Linear lora_A{nullptr}, lora_B{nullptr};
  torch::nn::Dropout lora_dropout{nullptr};

 private:
  double scale_ = 0.0;
  double runtime_scale_ = 1.0;
  bool merged_ = false;
};
TORCH_MODULE(Linear);

struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t dim, double eps);
  // x: [..., D] -> [..., D]; computed in f32, returned in x's dtype (as HF LlamaRMSNorm does)
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

// quick_gelu (x * sigmoid(1.702 x)), gelu (erf), gelu_new/gelu_pytorch_tanh (tanh approx.), silu, relu.
torch::Tensor activation(const std::string& name, const torch::Tensor& x);
void check_activation_name(const std::string& name);  // ConfigError if unknown

}  // namespace emt
