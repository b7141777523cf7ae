// A small LLaVA-shaped module tree built from emt::Linear, with the exact llava-hf (old layout) module paths, for
// adapter tests that do not need the real model: vision_tower.vision_model.encoder.layers.0.{self_attn,mlp},
// multi_modal_projector.linear_{1,2}, language_model.model.{embed_tokens,layers.N,norm}, language_model.lm_head.
#pragma once
#include <emt/core/layers.h>
#include <torch/torch.h>

namespace emt_test {

struct FakeDims {
  int64_t dv = 12, d = 16, mlp = 24, vocab = 20, layers = 2;
};

struct FakeVisionLayer : torch::nn::Module {
  explicit FakeVisionLayer(int64_t dv) {
    auto attn = register_module("self_attn", std::make_shared<torch::nn::Module>());
    q = attn->register_module("q_proj", emt::Linear(emt::LinearOptions{dv, dv, true}));
    k = attn->register_module("k_proj", emt::Linear(emt::LinearOptions{dv, dv, true}));
    v = attn->register_module("v_proj", emt::Linear(emt::LinearOptions{dv, dv, true}));
    o = attn->register_module("out_proj", emt::Linear(emt::LinearOptions{dv, dv, true}));
    auto mlp = register_module("mlp", std::make_shared<torch::nn::Module>());
    fc1 = mlp->register_module("fc1", emt::Linear(emt::LinearOptions{dv, 2 * dv, true}));
    fc2 = mlp->register_module("fc2", emt::Linear(emt::LinearOptions{2 * dv, dv, true}));
  }
  // x: [B, N, Dv] -> [B, N, Dv]
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = x + o->forward(torch::tanh(q->forward(x)) * v->forward(x) + k->forward(x));
    return h + fc2->forward(torch::gelu(fc1->forward(h)));
  }
  emt::Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr}, fc1{nullptr}, fc2{nullptr};
};

struct FakeDecoderLayer : torch::nn::Module {
  FakeDecoderLayer(int64_t d, int64_t mlp) {
    auto attn = register_module("self_attn", std::make_shared<torch::nn::Module>());
    q = attn->register_module("q_proj", emt::Linear(emt::LinearOptions{d, d, false}));
    k = attn->register_module("k_proj", emt::Linear(emt::LinearOptions{d, d, false}));
    v = attn->register_module("v_proj", emt::Linear(emt::LinearOptions{d, d, false}));
    o = attn->register_module("o_proj", emt::Linear(emt::LinearOptions{d, d, false}));
    auto m = register_module("mlp", std::make_shared<torch::nn::Module>());
    gate = m->register_module("gate_proj", emt::Linear(emt::LinearOptions{d, mlp, false}));
    up = m->register_module("up_proj", emt::Linear(emt::LinearOptions{d, mlp, false}));
    down = m->register_module("down_proj", emt::Linear(emt::LinearOptions{mlp, d, false}));
    norm = register_module("input_layernorm", emt::RMSNorm(d, 1e-6));
  }
  // x: [B, T, D] -> [B, T, D]
  torch::Tensor forward(const torch::Tensor& x) {
    auto n = norm->forward(x);
    auto h = x + o->forward(torch::tanh(q->forward(n)) * v->forward(n) + k->forward(n));
    return h + down->forward(torch::silu(gate->forward(h)) * up->forward(h));
  }
  emt::Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr}, gate{nullptr}, up{nullptr}, down{nullptr};
  emt::RMSNorm norm{nullptr};
};

struct FakeLlava : torch::nn::Module {
  explicit FakeLlava(const FakeDims& dims = {}) : dims_(dims) {
    auto vt = register_module("vision_tower", std::make_shared<torch::nn::Module>());
    auto vm = vt->register_module("vision_model", std::make_shared<torch::nn::Module>());
    auto enc = vm->register_module("encoder", std::make_shared<torch::nn::Module>());
    auto vlayers = enc->register_module("layers", torch::nn::ModuleList());
    vision = std::make_shared<FakeVisionLayer>(dims.dv);
    vlayers->push_back(vision);
    auto proj = register_module("multi_modal_projector", std::make_shared<torch::nn::Module>());
    projector = proj;
    linear_1 = proj->register_module("linear_1", emt::Linear(emt::LinearOptions{dims.dv, dims.d, true}));
    linear_2 = proj->register_module("linear_2", emt::Linear(emt::LinearOptions{dims.d, dims.d, true}));
    auto lm = register_module("language_model", std::make_shared<torch::nn::Module>());
    auto model = lm->register_module("model", std::make_shared<torch::nn::Module>());
    embed = model->register_module("embed_tokens", torch::nn::Embedding(dims.vocab, dims.d));
    auto layers = model->register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < dims.layers; ++i) {
      decoder.push_back(std::make_shared<FakeDecoderLayer>(dims.d, dims.mlp));
      layers->push_back(decoder.back());
    }
    norm = model->register_module("norm", emt::RMSNorm(dims.d, 1e-6));
    lm_head = lm->register_module("lm_head", emt::Linear(emt::LinearOptions{dims.d, dims.vocab, false}));
  }
  // image: [B, N, Dv], ids: [B, T] -> logits [B, K + N + T, V]
  torch::Tensor forward(const torch::Tensor& image, const torch::Tensor& ids) {
    auto img = linear_2->forward(torch::gelu(linear_1->forward(vision->forward(image))));
    auto h = torch::cat({img, embed->forward(ids)}, 1);
    if (prefix.defined()) h = torch::cat({prefix.unsqueeze(0).expand({h.size(0), -1, -1}), h}, 1);
    for (auto& l : decoder) h = l->forward(h);
    return lm_head->forward(norm->forward(h));
  }
  void set_prompt_prefix(const torch::Tensor& t) { prefix = t; }

  FakeDims dims_;
  std::shared_ptr<FakeVisionLayer> vision;
  std::shared_ptr<torch::nn::Module> projector;
  emt::Linear linear_1{nullptr}, linear_2{nullptr}, lm_head{nullptr};
  torch::nn::Embedding embed{nullptr};
  std::vector<std::shared_ptr<FakeDecoderLayer>> decoder;
  emt::RMSNorm norm{nullptr};
  torch::Tensor prefix;
};

// Same seed -> identical base weights (used to build a "fresh" copy of the base model).
inline std::shared_ptr<FakeLlava> make_fake(uint64_t seed = 1, const FakeDims& dims = {}) {
  torch::manual_seed(seed);
  auto m = std::make_shared<FakeLlava>(dims);
  m->eval();
  return m;
}

inline torch::Tensor fake_image(int64_t b = 2, int64_t n = 3, int64_t dv = 12) {
  torch::manual_seed(77);
  return torch::randn({b, n, dv});
}
inline torch::Tensor fake_ids(int64_t b = 2, int64_t t = 5, int64_t vocab = 20) {
  torch::manual_seed(78);
  return torch::randint(0, vocab, {b, t}, torch::kLong);
}

// Makes every LoRA B non-zero so the adapted model differs from the base.
inline void randomize_lora(torch::nn::Module& m, uint64_t seed = 5) {
  torch::manual_seed(seed);
  torch::NoGradGuard ng;
  for (auto& p : m.named_parameters(true))
    if (p.key().find("lora_B") != std::string::npos) p.value().copy_(torch::randn(p.value().sizes()) * 0.1);
}

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

}  // namespace emt_test
