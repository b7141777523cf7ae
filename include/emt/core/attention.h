// Reusable attention math shared by the CLIP encoders and the LLaMA decoder: the attention core (SDPA on
// LibTorch >= 2, a plain implementation everywhere), slot-based causal/padding masks and rotate-half RoPE.
#pragma once
#include <torch/types.h>

#include <utility>

namespace emt {

// True when this build calls torch::scaled_dot_product_attention (LibTorch >= 2).
bool has_sdpa();

// q: [B, H, Tq, hd], k/v: [B, H, Tk, hd], mask: bool, broadcastable to [B, H, Tq, Tk], true = may attend
// (undefined = attend everywhere) -> [B, H, Tq, hd]. Softmax scale is 1/sqrt(hd). Uses SDPA when available.
torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& mask);
// Same contract, always the explicit softmax(q k^T / sqrt(hd) + mask) v, softmax in f32. Rows whose mask is all
// false return zeros instead of NaN.
torch::Tensor attention_plain(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& mask);

// Attention mask for a causal decoder whose queries occupy cache slots [past, past + Tq) and whose keys are
// slots [0, Tk): query i may see key j when j <= past + i and key_mask[b, j] != 0. A query always sees its own
// slot, so fully padded rows stay finite (their outputs are ignored). key_mask: [B, Tk] (undefined = all 1)
// -> bool [B, 1, Tq, Tk].
torch::Tensor causal_mask(const torch::Tensor& key_mask, int64_t batch, int64_t past, int64_t tq, int64_t tk,
                          torch::Device device);

// Positions of the tokens from a padding mask [B, T] (1 = token): cumsum - 1, 0 on padding. Left padding
// therefore starts every row's first real token at position 0, as HF generate does.
torch::Tensor positions_from_mask(const torch::Tensor& mask);

// Rotate-half RoPE (HF LLaMA). positions: [B, T] int64 -> cos, sin: [B, 1, T, hd] in f32, with
// inv_freq_i = theta^(-2i/hd) and both halves carrying the same frequencies.
std::pair<torch::Tensor, torch::Tensor> rope_cos_sin(const torch::Tensor& positions, int64_t head_dim,
                                                     double theta);
torch::Tensor rotate_half(const torch::Tensor& x);  // [..., hd] -> cat(-x2, x1)
// x: [B, H, T, hd] -> x cos + rotate_half(x) sin (computed in f32, returned in x's dtype)
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);

}  // namespace emt
