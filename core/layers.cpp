// Linear with an optional low-rank delta, RMSNorm, activations.
#include <emt/core/error.h>
#include <emt/core/layers.h>
#include <torch/torch.h>

#include <cmath>

namespace emt {

LinearImpl::LinearImpl(const LinearOptions& o) : options(o) {
  TORCH_CHECK(o.in > 0 && o.out > 0, "Linear: in/out must be positive, got ", o.in, "x", o.out);
  weight = register_parameter("weight", torch::empty({o.out, o.in}));
  // Same default init as torch.nn.Linear: kaiming_uniform(a=sqrt(5)) and U(-1/sqrt(in), 1/sqrt(in)) bias.
  torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  if (o.bias) {
    double bound = 1.0 / std::sqrt(static_cast<double>(o.in));
    bias = register_parameter("bias", torch::empty({o.out}).uniform_(-bound, bound));
  }
}

torch::Tensor LinearImpl::forward(const torch::Tensor& x) {
  // x: [..., in] -> [..., out]
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == options.in, "Linear: expected last dim ", options.in, ", got ",
              x.sizes());
  // A trained layer keeps fp32 master weights beside frozen bf16/fp16 ones: its input is cast to the weight's
  // dtype and its output back to the input's, so the activations keep the model's dtype.
  const bool cast = x.scalar_type() != weight.scalar_type();
  auto y = torch::nn::functional::linear(cast ? x.to(weight.scalar_type()) : x, weight, bias);
  if (cast) y = y.to(x.scalar_type());
  if (has_low_rank() && !merged_ && runtime_scale_ != 0.0) {
    auto h = lora_dropout ? lora_dropout->forward(x) : x;
    y = y + lora_B->forward(lora_A->forward(h.to(lora_A->weight.scalar_type())))
                    .mul(scale_ * runtime_scale_)
                    .to(y.scalar_type());
  }
  return y;
}

void LinearImpl::attach_low_rank(int64_t r, double scale, double dropout) {
  TORCH_CHECK(r > 0, "LoRA rank must be positive, got ", r);
  if (has_low_rank()) detach_low_rank();
  // The low-rank factors are trained tensors: fp32 whatever the base weight's dtype (forward casts to and fro).
  auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(weight.device());
  lora_A = register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(options.in, r).bias(false)));
  lora_B = register_module("lora_B", torch::nn::Linear(torch::nn::LinearOptions(r, options.out).bias(false)));
  lora_A->to(opts.device(), opts.dtype().toScalarType());
  lora_B->to(opts.device(), opts.dtype().toScalarType());
  {
    torch::NoGradGuard ng;
    lora_B->weight.zero_();  // delta starts at exactly zero
  }
  if (dropout > 0.0) {
    lora_dropout = register_module("lora_dropout", torch::nn::Dropout(dropout));
    lora_dropout->train(is_training());  // a new child starts in training mode; follow the layer's mode
  }
  scale_ = scale;
  merged_ = false;
}

void LinearImpl::detach_low_rank() {
  if (!has_low_rank()) return;
  TORCH_CHECK(!merged_, "Linear: unmerge before detaching the low-rank delta");
  unregister_module("lora_A");
  unregister_module("lora_B");
  if (lora_dropout) unregister_module("lora_dropout");
  lora_A = nullptr;
  lora_B = nullptr;
  lora_dropout = nullptr;
  scale_ = 0.0;
}

void LinearImpl::merge() {
  if (!has_low_rank() || merged_) return;
  torch::NoGradGuard ng;
  auto delta = torch::matmul(lora_B->weight.to(torch::kFloat32), lora_A->weight.to(torch::kFloat32))
                   .mul(scale_ * runtime_scale_);
  weight.copy_(weight.to(torch::kFloat32).add(delta).to(weight.scalar_type()));
  merged_ = true;
}

void LinearImpl::unmerge() {
  if (!has_low_rank() || !merged_) return;
  torch::NoGradGuard ng;
  auto delta = torch::matmul(lora_B->weight.to(torch::kFloat32), lora_A->weight.to(torch::kFloat32))
                   .mul(scale_ * runtime_scale_);
  weight.copy_(weight.to(torch::kFloat32).sub(delta).to(weight.scalar_type()));
  merged_ = false;
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) {
  // x: [..., D] -> [..., D]
  TORCH_CHECK(x.size(-1) == weight.size(0), "RMSNorm: expected last dim ", weight.size(0), ", got ", x.sizes());
  auto xf = x.to(torch::kFloat32);
  auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * normed.to(x.scalar_type());
}

torch::Tensor activation(const std::string& name, const torch::Tensor& x) {
  if (name == "quick_gelu") return x * torch::sigmoid(1.702 * x);
  if (name == "gelu") return torch::gelu(x);
  if (name == "gelu_new" || name == "gelu_pytorch_tanh") return torch::gelu(x, "tanh");
  if (name == "silu") return torch::silu(x);
  if (name == "relu") return torch::relu(x);
  throw ConfigError("[layers] unknown activation '" + name + "' (expected quick_gelu, gelu, gelu_new, silu, relu)");
}

void check_activation_name(const std::string& name) {
  static const char* known[] = {"quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "relu"};
  for (auto* k : known)
    if (name == k) return;
  throw ConfigError("[layers] unknown activation '" + name + "' (expected quick_gelu, gelu, gelu_new, silu, relu)");
}

}  // namespace emt
