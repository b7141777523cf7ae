// Model unit tests: shapes, causality, KV cache, GQA, RoPE, attention masking, splicing, prompt prefix,
// generation with left padding, activation checkpointing, parameter counts.
#include <catch2/catch.hpp>
#include <emt/core/attention.h>
#include <emt/core/error.h>
#include <emt/core/generate.h>
#include <emt/core/llava.h>
#include <emt/core/model_summary.h>
#include <torch/torch.h>

#include <cmath>

#include "test_models_common.h"

using emt_test::max_diff;
using emt_test::tiny_model_section;

namespace {

emt::LlamaOptions tiny_llama(int64_t kv_heads = 2) {
  auto m = tiny_model_section();
  m.llm.num_kv_heads = static_cast<int>(kv_heads);
  return emt::llama_options(m.llm);
}

emt::LlavaModel tiny_llava(uint64_t seed = 0) {
  torch::manual_seed(seed);
  auto model = emt::build_llava(tiny_model_section(), emt_test::kTinyImageToken);
  model->eval();
  return model;
}

}  // namespace

TEST_CASE("model shapes of CLIP, LLaMA and LLaVA", "[models]") {
  torch::manual_seed(0);
  auto m = tiny_model_section();
  emt::ClipVisionModel vision(emt::clip_vision_options(m.vision));
  auto out = vision->forward(torch::randn({3, 3, 8, 8}));
  CHECK(out.last_hidden_state.sizes() == std::vector<int64_t>{3, 5, 16});
  CHECK(out.pooled.sizes() == std::vector<int64_t>{3, 16});
  CHECK(out.hidden_states.size() == 3);
  // hidden_state(-2) runs one layer fewer and equals the full run's entry
  CHECK(max_diff(vision->vision_model->hidden_state(torch::ones({1, 3, 8, 8}), -2),
                 vision->forward(torch::ones({1, 3, 8, 8})).hidden_states[1]) == 0.0);
  CHECK_THROWS(vision->forward(torch::randn({1, 3, 9, 9})));

  emt::ClipModel clip(emt::clip_options(m.vision, m.clip_text));
  auto ids = torch::randint(0, 512, {4, 6}, torch::kLong);
  CHECK(clip->forward(torch::randn({2, 3, 8, 8}), ids).sizes() == std::vector<int64_t>{2, 4});

  emt::LlamaForCausalLM llm(tiny_llama());
  CHECK(llm->forward(torch::randint(0, 48, {2, 5}, torch::kLong)).sizes() == std::vector<int64_t>{2, 5, 48});

  auto model = tiny_llava();
  auto in = torch::tensor({{1, 47, 3}, {47, 2, 3}}, torch::kLong);
  auto o = model->forward(torch::randn({2, 3, 8, 8}), in, torch::ones({2, 3}, torch::kLong), in.clone());
  CHECK(o.logits.sizes() == std::vector<int64_t>{2, 3 - 1 + 4, 48});
  CHECK(o.labels.sizes() == std::vector<int64_t>{2, 6});
  CHECK(o.loss.dim() == 0);
  CHECK(model->options.num_image_tokens() == 4);
}

TEST_CASE("model validation rules throw ConfigError", "[models]") {
  auto m = tiny_model_section();
  auto bad = m;
  bad.llm.num_kv_heads = 3;
  CHECK_THROWS_AS(emt::llama_options(bad.llm), emt::ConfigError);
  bad = m;
  bad.llm.num_heads = 5;
  CHECK_THROWS_AS(emt::llama_options(bad.llm), emt::ConfigError);
  bad = m;
  bad.vision.patch_size = 3;
  CHECK_THROWS_AS(emt::clip_vision_options(bad.vision), emt::ConfigError);
  bad = m;
  bad.vision.num_heads = 5;
  CHECK_THROWS_AS(emt::clip_vision_options(bad.vision), emt::ConfigError);
  bad = m;
  bad.vision.hidden_act = "swish2";
  CHECK_THROWS_AS(emt::clip_vision_options(bad.vision), emt::ConfigError);
  bad = m;
  bad.projector = "mlp3x";
  CHECK_THROWS_AS(emt::build_llava(bad, 47), emt::ConfigError);
  bad = m;
  bad.vision.select_feature = "cls";
  CHECK_THROWS_AS(emt::build_llava(bad, 47), emt::ConfigError);
  bad = m;
  bad.vision.select_layer = -4;
  CHECK_THROWS_AS(emt::build_llava(bad, 47), emt::ConfigError);
  emt::FinetuneSection f;
  CHECK_THROWS_AS(emt::estimate_memory(m, f, "qlora", "bf16"), emt::ConfigError);
  CHECK_THROWS_AS(emt::estimate_memory(m, f, "lora", "f8"), emt::ConfigError);
}

TEST_CASE("LLaMA is causal: later tokens never change earlier logits", "[models]") {
  torch::manual_seed(1);
  emt::LlamaForCausalLM llm(tiny_llama());
  llm->eval();
  torch::NoGradGuard ng;
  auto a = torch::randint(0, 48, {2, 8}, torch::kLong);
  auto b = a.clone();
  b.narrow(1, 5, 3).fill_(7);
  auto la = llm->forward(a), lb = llm->forward(b);
  CHECK(max_diff(la.narrow(1, 0, 5), lb.narrow(1, 0, 5)) <= 1e-6);
  CHECK(max_diff(la.narrow(1, 5, 3), lb.narrow(1, 5, 3)) > 1e-3);
}

TEST_CASE("KV-cache decoding equals full recomputation", "[models]") {
  torch::manual_seed(2);
  emt::LlamaForCausalLM llm(tiny_llama());
  llm->eval();
  torch::NoGradGuard ng;
  auto ids = torch::randint(1, 48, {2, 9}, torch::kLong);
  // row 1 is left-padded by 3
  auto mask = torch::ones({2, 9}, torch::kLong);
  mask[1].narrow(0, 0, 3).zero_();
  auto full = llm->logits(llm->model->forward(llm->embed(ids), mask));
  auto cache = emt::make_kv_cache(llm->options, 2, 12, torch::kFloat32, torch::kCPU);
  std::vector<torch::Tensor> steps{llm->logits(llm->model->forward(llm->embed(ids.narrow(1, 0, 5)),
                                                                   mask.narrow(1, 0, 5), {}, &cache))};
  for (int64_t t = 5; t < 9; ++t)
    steps.push_back(llm->logits(llm->model->forward(llm->embed(ids.narrow(1, t, 1)), mask.narrow(1, 0, t + 1), {},
                                                    &cache)));
  CHECK(cache.length == 9);
  auto inc = torch::cat(steps, 1);
  // padded query slots are ignored; compare every real token
  auto real = mask.to(torch::kBool).unsqueeze(-1).expand_as(full);
  CHECK(max_diff(full.masked_select(real), inc.masked_select(real)) <= 1e-5);
  // overflow is an error
  CHECK_THROWS(llm->model->forward(llm->embed(ids.narrow(1, 0, 4)), torch::ones({2, 13}, torch::kLong), {}, &cache));
}

TEST_CASE("GQA with kv_heads == heads equals hand-computed multi-head attention", "[models]") {
  torch::manual_seed(3);
  auto o = tiny_llama(4);
  emt::LlamaAttention attn(o);
  torch::NoGradGuard ng;
  int64_t b = 2, t = 5, d = o.hidden_size, h = o.num_heads, hd = o.head_dim();
  auto x = torch::randn({b, t, d});
  auto pos = torch::arange(t).expand({b, t});
  auto cs = emt::rope_cos_sin(pos, hd, o.rope_theta);
  auto mask = emt::causal_mask({}, b, 0, t, t, torch::kCPU);
  auto y = attn->forward(x, cs.first, cs.second, mask);

  auto expect = torch::zeros({b, t, h * hd});
  auto q = torch::matmul(x, attn->q_proj->weight.t()), k = torch::matmul(x, attn->k_proj->weight.t()),
       v = torch::matmul(x, attn->v_proj->weight.t());
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t hi = 0; hi < h; ++hi) {
      auto qh = q[bi].narrow(1, hi * hd, hd), kh = k[bi].narrow(1, hi * hd, hd), vh = v[bi].narrow(1, hi * hd, hd);
      qh = emt::apply_rope(qh.view({1, 1, t, hd}), cs.first.narrow(0, bi, 1), cs.second.narrow(0, bi, 1)).view({t, hd});
      kh = emt::apply_rope(kh.view({1, 1, t, hd}), cs.first.narrow(0, bi, 1), cs.second.narrow(0, bi, 1)).view({t, hd});
      for (int64_t i = 0; i < t; ++i) {
        auto s = torch::matmul(kh.narrow(0, 0, i + 1), qh[i]) / std::sqrt(double(hd));  // keys 0..i
        auto p = torch::softmax(s, 0);
        expect[bi][i].narrow(0, hi * hd, hd).copy_(torch::matmul(p, vh.narrow(0, 0, i + 1)));
      }
    }
  expect = torch::matmul(expect, attn->o_proj->weight.t());
  CHECK(max_diff(y, expect) <= 1e-5);

  // GQA (2 kv heads) equals MHA whose k/v weights repeat each kv head for its group of query heads
  auto og = tiny_llama(2);
  emt::LlamaAttention gqa(og);
  {
    auto kw = gqa->k_proj->weight.view({2, hd, d}).repeat_interleave(2, 0).reshape({4 * hd, d});
    auto vw = gqa->v_proj->weight.view({2, hd, d}).repeat_interleave(2, 0).reshape({4 * hd, d});
    attn->q_proj->weight.copy_(gqa->q_proj->weight);
    attn->k_proj->weight.copy_(kw);
    attn->v_proj->weight.copy_(vw);
    attn->o_proj->weight.copy_(gqa->o_proj->weight);
  }
  CHECK(max_diff(gqa->forward(x, cs.first, cs.second, mask), attn->forward(x, cs.first, cs.second, mask)) <= 1e-6);
}

TEST_CASE("RoPE matches its closed form", "[models]") {
  int64_t hd = 6;
  double theta = 500.0;
  auto x = torch::randn({1, 2, 3, hd}, torch::kFloat64).to(torch::kFloat32);
  auto pos = torch::tensor({{0, 4, 11}}, torch::kLong);
  auto cs = emt::rope_cos_sin(pos, hd, theta);
  auto y = emt::apply_rope(x, cs.first, cs.second);
  double worst = 0;
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t t = 0; t < 3; ++t)
      for (int64_t i = 0; i < hd / 2; ++i) {
        double ang = pos[0][t].item<double>() * std::pow(theta, -2.0 * i / hd);
        double a = x[0][h][t][i].item<double>(), b = x[0][h][t][i + hd / 2].item<double>();
        worst = std::max(worst, std::abs(y[0][h][t][i].item<double>() - (a * std::cos(ang) - b * std::sin(ang))));
        worst = std::max(worst, std::abs(y[0][h][t][i + hd / 2].item<double>() - (b * std::cos(ang) + a * std::sin(ang))));
      }
  CHECK(worst <= 1e-5);
  // position 0 is the identity
  CHECK(max_diff(y.select(2, 0), x.select(2, 0)) <= 1e-7);
}

TEST_CASE("plain attention masks exactly like a hand-computed softmax", "[models]") {
  torch::manual_seed(4);
  auto q = torch::randn({1, 1, 2, 3}), k = torch::randn({1, 1, 3, 3}), v = torch::randn({1, 1, 3, 3});
  auto mask = torch::tensor({true, false, true, false, false, false}, torch::kBool).view({1, 1, 2, 3});
  auto y = emt::attention_plain(q, k, v, mask);
  // row 0 sees keys 0 and 2 only
  double s0 = (q[0][0][0] * k[0][0][0]).sum().item<double>() / std::sqrt(3.0);
  double s2 = (q[0][0][0] * k[0][0][2]).sum().item<double>() / std::sqrt(3.0);
  double p0 = std::exp(s0) / (std::exp(s0) + std::exp(s2)), p2 = 1 - p0;
  auto expect = v[0][0][0] * p0 + v[0][0][2] * p2;
  CHECK(max_diff(y[0][0][0], expect) <= 1e-6);
  // a row that sees nothing yields zeros, not NaN
  CHECK(y[0][0][1].abs().max().item<double>() == 0.0);
  // unmasked equals softmax over all keys; and the dispatching entry point agrees where both paths exist
  auto full = emt::attention_plain(q, k, v, {});
  auto expect_full = torch::matmul(torch::softmax(torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(3.0), -1), v);
  CHECK(max_diff(full, expect_full) <= 1e-6);
  auto m2 = emt::causal_mask(torch::tensor({{0, 1, 1}}, torch::kLong), 1, 0, 3, 3, torch::kCPU);
  auto q3 = torch::randn({1, 2, 3, 4}), k3 = torch::randn({1, 2, 3, 4}), v3 = torch::randn({1, 2, 3, 4});
  CHECK(max_diff(emt::attention(q3, k3, v3, m2), emt::attention_plain(q3, k3, v3, m2)) <= 1e-5);
  INFO("SDPA compiled in: " << emt::has_sdpa());
  // the slot mask: causal, key padding removed, a query always sees itself
  auto expect_mask = torch::tensor({true, false, false, false, true, false, false, true, true}, torch::kBool).view({1, 1, 3, 3});
  CHECK(torch::equal(m2, expect_mask));
}

TEST_CASE("the attention entry point equals the plain path on padded causal batches", "[models]") {
  // On LibTorch >= 2 emt::attention is torch::scaled_dot_product_attention; on 1.13 it is the plain path and
  // this test only checks the dispatch. Shapes of a real decoder step: batch 3, 4 heads, left padding.
  if (!emt::has_sdpa()) WARN("LibTorch < 2: SDPA is not compiled in, so both sides are the plain path");
  torch::manual_seed(11);
  const int64_t B = 3, H = 4, T = 9, hd = 16;
  auto q = torch::randn({B, H, T, hd}), k = torch::randn({B, H, T, hd}), v = torch::randn({B, H, T, hd});
  auto key_mask = torch::ones({B, T}, torch::kLong);
  key_mask.index_put_({1, torch::indexing::Slice(0, 3)}, 0);  // row 1: three pad slots on the left
  key_mask.index_put_({2, torch::indexing::Slice(0, 8)}, 0);  // row 2: one real token
  auto mask = emt::causal_mask(key_mask, B, 0, T, T, torch::kCPU);
  CHECK(max_diff(emt::attention(q, k, v, mask), emt::attention_plain(q, k, v, mask)) <= 1e-5);
  CHECK(max_diff(emt::attention(q, k, v, {}), emt::attention_plain(q, k, v, {})) <= 1e-5);
  // decoding with a KV cache: one query at slot T-1 against all T keys
  auto m1 = emt::causal_mask(key_mask, B, T - 1, 1, T, torch::kCPU);
  auto q1 = q.narrow(2, T - 1, 1);
  CHECK(max_diff(emt::attention(q1, k, v, m1), emt::attention_plain(q1, k, v, m1)) <= 1e-5);
  // and the comparison is sensitive: a different mask gives a different result
  CHECK(max_diff(emt::attention(q, k, v, {}), emt::attention_plain(q, k, v, mask)) > 1e-2);
}

TEST_CASE("positions come from the padding mask", "[models]") {
  auto pos = emt::positions_from_mask(torch::tensor({{0, 0, 1, 1, 1}, {1, 1, 1, 1, 0}}, torch::kLong));
  CHECK(torch::equal(pos, torch::tensor({{0, 0, 0, 1, 2}, {0, 1, 2, 3, 0}}, torch::kLong)));
}

TEST_CASE("a batch with its image tokens at one position splices as its rows one at a time", "[models]") {
  // the whole-batch path (same position everywhere) against the per-row path (one row: trivially the same
  // position, so compared against rows of a batch whose positions differ)
  auto model = tiny_llava(5);
  torch::NoGradGuard ng;
  auto feats = torch::randn({3, 4, 32});
  auto ids = torch::tensor({{5, 47, 6, 7, 0}, {5, 47, 9, 10, 11}, {5, 47, 12, 0, 0}}, torch::kLong);
  auto mask = torch::tensor({{1, 1, 1, 1, 0}, {1, 1, 1, 1, 1}, {1, 1, 1, 0, 0}}, torch::kLong);
  auto labels = torch::tensor({{-100, -100, 6, 7, -100}, {-100, -100, 9, 10, 11}, {-100, -100, 12, -100, -100}},
                              torch::kLong);
  auto whole = model->splice(feats, ids, mask, labels);
  for (int64_t i = 0; i < 3; ++i) {
    // row i beside a row whose image token sits elsewhere: the per-row path
    auto other = torch::tensor({{47, 5, 5, 5, 5}}, torch::kLong);
    auto pair = model->splice(torch::cat({feats.narrow(0, i, 1), feats.narrow(0, 0, 1)}),
                              torch::cat({ids.narrow(0, i, 1), other}), torch::cat({mask.narrow(0, i, 1), torch::ones({1, 5}, torch::kLong)}),
                              torch::cat({labels.narrow(0, i, 1), torch::full({1, 5}, -100, torch::kLong)}));
    CHECK(torch::equal(whole.embeds[i], pair.embeds[0]));
    CHECK(torch::equal(whole.attention_mask[i], pair.attention_mask[0]));
    CHECK(torch::equal(whole.labels[i], pair.labels[0]));
  }
  CHECK(torch::equal(whole.image_starts, torch::tensor({1, 1, 1}, torch::kLong)));
}

TEST_CASE("image embeddings are spliced at the placeholder with labels and masks", "[models]") {
  auto model = tiny_llava(5);
  torch::NoGradGuard ng;
  int64_t n = 4;
  auto feats = torch::randn({3, n, 32});
  // row 0: image at 1, right-padded; row 1: image first; row 2: left-padded by 2, image at 3
  auto ids = torch::tensor({{5, 47, 6, 7, 0}, {47, 8, 9, 10, 11}, {0, 0, 12, 47, 13}}, torch::kLong);
  auto mask = torch::tensor({{1, 1, 1, 1, 0}, {1, 1, 1, 1, 1}, {0, 0, 1, 1, 1}}, torch::kLong);
  auto labels = torch::tensor({{-100, -100, 6, 7, -100}, {-100, -100, 9, 10, 11}, {-100, -100, -100, -100, 13}},
                              torch::kLong);
  auto s = model->splice(feats, ids, mask, labels);
  CHECK(s.embeds.sizes() == std::vector<int64_t>{3, 8, 32});
  CHECK(torch::equal(s.image_starts, torch::tensor({1, 0, 3}, torch::kLong)));
  CHECK(torch::equal(s.attention_mask, torch::tensor({{1, 1, 1, 1, 1, 1, 1, 0},
                                                      {1, 1, 1, 1, 1, 1, 1, 1},
                                                      {0, 0, 1, 1, 1, 1, 1, 1}}, torch::kLong)));
  CHECK(torch::equal(s.labels, torch::tensor({{-100, -100, -100, -100, -100, 6, 7, -100},
                                              {-100, -100, -100, -100, -100, 9, 10, 11},
                                              {-100, -100, -100, -100, -100, -100, -100, 13}}, torch::kLong)));
  auto emb = model->language_model->model->embed_tokens->weight;
  CHECK(torch::equal(s.embeds[0].narrow(0, 1, n), feats[0]));
  CHECK(torch::equal(s.embeds[1].narrow(0, 0, n), feats[1]));
  CHECK(torch::equal(s.embeds[2].narrow(0, 3, n), feats[2]));
  CHECK(torch::equal(s.embeds[0][0], emb[5]));
  CHECK(torch::equal(s.embeds[0][5], emb[6]));
  CHECK(torch::equal(s.embeds[2][7], emb[13]));
  CHECK(torch::equal(s.embeds[1][7], emb[11]));
  // every row needs exactly one placeholder when images are given, none without images
  CHECK_THROWS(model->splice(feats, torch::tensor({{5, 47, 47, 7, 0}, {47, 8, 9, 10, 11}, {0, 0, 12, 47, 13}}), mask));
  CHECK_THROWS(model->splice(feats, torch::tensor({{5, 6, 6, 7, 0}, {47, 8, 9, 10, 11}, {0, 0, 12, 47, 13}}), mask));
  CHECK_THROWS(model->splice({}, ids, mask));
  CHECK(model->splice({}, torch::tensor({{5, 6}}), {}).embeds.sizes() == std::vector<int64_t>{1, 2, 32});
}

TEST_CASE("Llava::loss equals the loss of the full logits, gradients included", "[models]") {
  auto model = tiny_llava(5);
  const int64_t s = model->options.vision.image_size;
  torch::manual_seed(3);
  auto images = torch::randn({3, 3, s, s});
  auto ids = torch::tensor({{5, 47, 6, 7, 0}, {47, 8, 9, 10, 11}, {0, 0, 12, 47, 13}}, torch::kLong);
  auto mask = torch::tensor({{1, 1, 1, 1, 0}, {1, 1, 1, 1, 1}, {0, 0, 1, 1, 1}}, torch::kLong);
  auto labels = torch::tensor({{-100, -100, 6, 7, -100}, {-100, -100, 9, 10, 11}, {-100, -100, -100, -100, 13}},
                              torch::kLong);
  auto grads = [&](const torch::Tensor& loss) {
    for (auto& p : model->parameters()) p.mutable_grad() = torch::Tensor();
    loss.backward();
    return std::make_pair(model->language_model->model->embed_tokens->weight.grad().clone(),
                          model->multi_modal_projector->parameters()[0].grad().clone());
  };
  auto full = model->forward(images, ids, mask, labels).loss;
  auto fast = model->loss(images, ids, mask, labels);
  CHECK(std::abs(full.item<double>() - fast.item<double>()) <= 1e-6);
  auto [g_head_full, g_proj_full] = grads(full);
  auto [g_head_fast, g_proj_fast] = grads(fast);
  CHECK(max_diff(g_head_full, g_head_fast) <= 1e-6);
  CHECK(max_diff(g_proj_full, g_proj_fast) <= 1e-6);
  CHECK(model->loss(images, ids, mask, torch::full_like(labels, -100)).item<double>() == 0.0);
}

TEST_CASE("prompt prefix is prepended with mask 1 and labels -100", "[models]") {
  auto model = tiny_llava(6);
  torch::NoGradGuard ng;
  auto prefix = torch::randn({3, 32});
  model->set_prompt_prefix(prefix);
  auto ids = torch::tensor({{47, 5, 6}}, torch::kLong);
  auto labels = torch::tensor({{-100, 5, 6}}, torch::kLong);
  auto s = model->splice(torch::zeros({1, 4, 32}), ids, torch::tensor({{1, 1, 0}}), labels);
  CHECK(s.embeds.sizes() == std::vector<int64_t>{1, 9, 32});
  CHECK(torch::equal(s.embeds[0].narrow(0, 0, 3), prefix));
  CHECK(torch::equal(s.attention_mask, torch::tensor({{1, 1, 1, 1, 1, 1, 1, 1, 0}}, torch::kLong)));
  CHECK(torch::equal(s.labels, torch::tensor({{-100, -100, -100, -100, -100, -100, -100, 5, 6}}, torch::kLong)));
  CHECK(s.image_starts[0].item<int64_t>() == 3);
  auto o = model->forward(torch::zeros({1, 3, 8, 8}), ids, {}, labels);
  CHECK(o.logits.size(1) == 9);
  CHECK_THROWS(model->set_prompt_prefix(torch::zeros({3, 31})));
  model->set_prompt_prefix({});
  CHECK(model->splice({}, torch::tensor({{5}}), {}).embeds.size(1) == 1);
}

TEST_CASE("loss and answer log-probs agree with a hand computation", "[models]") {
  torch::manual_seed(7);
  auto logits = torch::randn({2, 4, 5});
  auto labels = torch::tensor({{-100, 2, 3, -100}, {-100, -100, -100, 4}}, torch::kLong);
  auto lp = torch::log_softmax(logits, -1);
  double a = lp[0][0][2].item<double>() + lp[0][1][3].item<double>();
  double b = lp[1][2][4].item<double>();
  auto got = emt::answer_logprobs(logits, labels);
  CHECK(std::abs(got[0].item<double>() - a) <= 1e-5);
  CHECK(std::abs(got[1].item<double>() - b) <= 1e-5);
  CHECK(std::abs(emt::causal_lm_loss(logits, labels).item<double>() + (a + b) / 3.0) <= 1e-5);
  CHECK(emt::causal_lm_loss(logits, torch::full({2, 4}, -100, torch::kLong)).item<double>() == 0.0);
}

TEST_CASE("left-padded batched generation equals unpadded single-sample generation", "[models]") {
  auto model = tiny_llava(8);
  auto images = torch::randn({2, 3, 8, 8});
  auto a = torch::tensor({{3, 47, 9, 4, 12, 30}}, torch::kLong);
  auto b = torch::tensor({{47, 20, 7}}, torch::kLong);
  emt::GenerateOptions opt;
  opt.max_new_tokens = 6;
  auto ga = emt::generate(model, images.narrow(0, 0, 1), a, torch::ones_like(a), opt);
  auto gb = emt::generate(model, images.narrow(0, 1, 1), b, torch::ones_like(b), opt);
  auto batch = torch::tensor({{3, 47, 9, 4, 12, 30}, {0, 0, 0, 47, 20, 7}}, torch::kLong);
  auto mask = torch::tensor({{1, 1, 1, 1, 1, 1}, {0, 0, 0, 1, 1, 1}}, torch::kLong);
  auto g = emt::generate(model, images, batch, mask, opt);
  REQUIRE(g.size() == 2);
  CHECK(g[0] == ga[0]);
  CHECK(g[1] == gb[0]);
  CHECK(g[0].size() == 6);
  // recomputation gives the same tokens as the cache
  opt.use_cache = false;
  CHECK(emt::generate(model, images, batch, mask, opt) == g);
  // the first generated token is the argmax of the next-token logits
  auto nl = emt::next_token_logits(model, images, batch, mask);
  CHECK(nl.argmax(-1)[1].item<int64_t>() == g[1][0]);
  // EOS stops a row and is not returned
  emt::GenerateOptions stop;
  stop.max_new_tokens = 6;
  stop.eos_id = g[0][2];
  auto gs = emt::generate(model, images.narrow(0, 0, 1), a, torch::ones_like(a), stop);
  CHECK(gs[0] == std::vector<int64_t>(g[0].begin(), g[0].begin() + 2));
  // sampling is reproducible from the seed, and the seed matters: of four other seeds at least one differs
  emt::GenerateOptions s1;
  s1.max_new_tokens = 8;
  s1.temperature = 1.5;
  s1.top_p = 0.9;
  s1.seed = 11;
  const auto sampled = emt::generate(model, images, batch, mask, s1);
  CHECK(emt::generate(model, images, batch, mask, s1) == sampled);
  int differ = 0;
  for (uint64_t seed : {12, 13, 14, 15}) {
    auto o = s1;
    o.seed = seed;
    differ += emt::generate(model, images, batch, mask, o) != sampled;
  }
  CHECK(differ >= 1);
  // temperature 0 is greedy whatever the seed and top_p
  auto greedy = s1;
  greedy.temperature = 0.0;
  greedy.max_new_tokens = 6;
  CHECK(emt::generate(model, images, batch, mask, greedy) == g);
  greedy.seed = 99;
  CHECK(emt::generate(model, images, batch, mask, greedy) == g);
}

TEST_CASE("activation checkpointing gives the same gradients", "[models]") {
  torch::manual_seed(9);
  emt::LlamaForCausalLM llm(tiny_llama());
  llm->train();
  auto ids = torch::randint(0, 48, {2, 6}, torch::kLong);
  auto grads = [&](bool ckpt) {
    llm->zero_grad();
    llm->model->grad_checkpointing = ckpt;
    auto loss = emt::causal_lm_loss(llm->forward(ids), ids);
    loss.backward();
    std::vector<torch::Tensor> g;
    for (auto& p : llm->parameters()) g.push_back(p.grad().clone());
    return g;
  };
  auto plain = grads(false), ckpt = grads(true);
  REQUIRE(plain.size() == ckpt.size());
  double worst = 0;
  for (size_t i = 0; i < plain.size(); ++i) worst = std::max(worst, max_diff(plain[i], ckpt[i]));
  CHECK(worst <= 1e-6);
  CHECK(plain[1].abs().sum().item<double>() > 0);
  // frozen parameters are left alone (only trainable ones flow through the checkpoint)
  for (auto& p : llm->model->parameters()) p.set_requires_grad(false);
  llm->model->grad_checkpointing = true;
  auto x = llm->embed(ids).detach().requires_grad_(true);
  llm->logits(llm->model->forward(x)).sum().backward();
  CHECK(x.grad().defined());
}

TEST_CASE("analytic parameter counts equal the built model's", "[models]") {
  for (auto proj : {"linear", "mlp2x_gelu"}) {
    auto m = tiny_model_section(proj);
    auto model = emt::build_llava(m, 47);
    int64_t vt = 0, pr = 0, lm = 0;
    for (auto& p : model->vision_tower->parameters()) vt += p.numel();
    for (auto& p : model->multi_modal_projector->parameters()) pr += p.numel();
    for (auto& p : model->language_model->parameters()) lm += p.numel();
    auto c = emt::count_params(m);
    CHECK(c.vision_tower == vt);
    CHECK(c.projector == pr);
    CHECK(c.language_model == lm);
    CHECK(c.total == vt + pr + lm);
    emt::ClipModel clip(emt::clip_options(m.vision, m.clip_text));
    int64_t ct = 0;
    for (auto& p : clip->parameters()) ct += p.numel();
    CHECK(c.clip_text == ct - vt);
  }
  auto tied = tiny_model_section();
  tied.llm.tie_word_embeddings = true;
  int64_t lm = 0;
  for (auto& p : emt::build_llava(tied, 47)->language_model->parameters()) lm += p.numel();
  CHECK(emt::count_params(tied).language_model == lm);
}

TEST_CASE("LLaVA-1.5 7B and 13B parameter counts", "[models]") {
  emt::ModelSection m;
  m.projector = "mlp2x_gelu";
  m.vision.image_size = 336;
  m.vision.patch_size = 14;
  m.vision.hidden_size = 1024;
  m.vision.num_layers = 24;
  m.vision.num_heads = 16;
  m.vision.intermediate_size = 4096;
  m.llm.vocab_size = 32064;
  m.llm.hidden_size = 4096;
  m.llm.num_layers = 32;
  m.llm.num_heads = 32;
  m.llm.num_kv_heads = 32;
  m.llm.intermediate_size = 11008;
  auto c = emt::count_params(m);
  CHECK(c.vision_tower == 303507456);
  CHECK(c.projector == 20979712);
  CHECK(c.language_model == 6738939904);
  CHECK(c.total == 7063427072);
  // LoRA r=64 on q,k,v,o,gate,up,down: 32 layers x 64 x (4 x 8192 + 3 x 15104)
  emt::FinetuneSection f;
  auto e = emt::estimate_memory(m, f, "lora", "bf16");
  CHECK(e.added_params == 32LL * 64 * (4 * 8192 + 3 * 15104));
  CHECK(e.trainable_params == e.added_params + 20979712);
  CHECK(e.gradient_bytes == 4.0 * e.trainable_params);
  CHECK(e.optimizer_bytes == 8.0 * e.trainable_params);
  CHECK(e.weight_bytes == 2.0 * (7063427072LL - 20979712) + 4.0 * e.trainable_params);
  f.lora.target_modules = {"q_proj", "v_proj"};
  f.lora.rank_pattern = {{"v_proj", 8}};
  CHECK(emt::estimate_memory(m, f, "lora-only", "f32").trainable_params == 32LL * (64 * 8192 + 8 * 8192));
  f.lora.exclude = {"layers.0."};
  CHECK(emt::estimate_memory(m, f, "lora-only", "f32").trainable_params == 31LL * (64 * 8192 + 8 * 8192));
  CHECK(emt::estimate_memory(m, f, "prompt", "f32").trainable_params == 8 * 4096);
  CHECK(emt::estimate_memory(m, f, "full", "f32").trainable_params == 20979712 + 6738939904);

  m.llm.hidden_size = 5120;
  m.llm.num_layers = 40;
  m.llm.num_heads = 40;
  m.llm.num_kv_heads = 40;
  m.llm.intermediate_size = 13824;
  c = emt::count_params(m);
  CHECK(c.projector == 31467520);
  CHECK(c.language_model == 13016519680);
  CHECK(c.total == 13351494656);
  auto text = emt::format_model_summary(m, f, "bf16", emt::training_methods());
  CHECK(text.find("13,351,494,656") != std::string::npos);
  CHECK(text.find("linear+prompt") != std::string::npos);
}
