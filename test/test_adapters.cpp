// LoRA injection, scaling rules, merge/unmerge/runtime scale, and training policies on a LLaVA-shaped module tree.
#include <emt/adapters/lora.h>
#include <emt/adapters/policy.h>
#include <emt/core/error.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <set>

#include "test_adapters_fake.h"

using emt_test::fake_ids;
using emt_test::fake_image;
using emt_test::make_fake;
using emt_test::max_abs_diff;

namespace {

emt::LoraConfig small_lora() {
  emt::LoraConfig c;
  c.r = 4;
  c.alpha = 8.0;
  c.dropout = 0.05;
  return c;
}

std::string config_error(const std::function<void()>& f) {
  try {
    f();
  } catch (const emt::ConfigError& e) {
    return e.what();
  }
  return "";
}

std::set<std::string> trainable_names(torch::nn::Module& m) {
  std::set<std::string> out;
  for (auto& p : m.named_parameters(true))
    if (p.value().requires_grad()) out.insert(p.key());
  return out;
}

}  // namespace

TEST_CASE("lora: target selection by names, all-linear, regex, exclude, scope", "[adapters]") {
  auto m = make_fake();
  auto cfg = small_lora();
  auto names = emt::select_lora_targets(*m, cfg);
  REQUIRE(names.size() == 14);  // 2 layers x 7 projections, nothing from the vision tower
  CHECK(names.front() == "language_model.model.layers.0.self_attn.q_proj");
  for (const auto& n : names) CHECK(n.rfind("language_model.", 0) == 0);

  auto whole = emt::select_lora_targets(*m, cfg, {});
  CHECK(whole.size() == 17);  // + vision q/k/v_proj (out_proj is not in the list)

  cfg.target_modules = {"all-linear"};
  auto all = emt::select_lora_targets(*m, cfg);
  CHECK(all.size() == 14);
  CHECK(std::find(all.begin(), all.end(), "language_model.lm_head") == all.end());
  auto vision_all = emt::select_lora_targets(*m, cfg, {"vision_tower."});
  CHECK(vision_all.size() == 6);

  cfg.exclude = {"down_proj", "layers.1.self_attn.q_proj"};
  auto ex = emt::select_lora_targets(*m, cfg);
  CHECK(ex.size() == 11);
  CHECK(std::find(ex.begin(), ex.end(), "language_model.model.layers.0.self_attn.q_proj") != ex.end());
  CHECK(std::find(ex.begin(), ex.end(), "language_model.model.layers.1.self_attn.q_proj") == ex.end());

  cfg.exclude.clear();
  cfg.target_regex = R"(.*layers\.1\.self_attn\.(q|v)_proj)";
  auto re = emt::select_lora_targets(*m, cfg);
  REQUIRE(re.size() == 2);
  CHECK(re[0] == "language_model.model.layers.1.self_attn.q_proj");
  CHECK(re[1] == "language_model.model.layers.1.self_attn.v_proj");

  // Names match whole path components only.
  cfg.target_regex.clear();
  cfg.target_modules = {"proj"};
  CHECK_THROWS_AS(emt::select_lora_targets(*m, cfg), emt::ConfigError);
}

TEST_CASE("lora: a hand-built config that breaks LoRA's invariants is rejected before the model changes",
          "[adapters]") {
  // Every finetune.lora key is validated by the config loader (test_config.cpp); the adapter layer only asserts
  // what building layers needs, and names a target that matches nothing.
  auto m = make_fake();
  auto bad = [&](auto edit, const std::string& needle) {
    auto cfg = small_lora();
    edit(cfg);
    auto msg = config_error([&] { emt::inject_lora(*m, cfg); });
    INFO(msg);
    CHECK(msg.find(needle) != std::string::npos);
  };
  bad([](emt::LoraConfig& c) { c.r = 0; }, "finetune.lora.r 0");
  bad([](emt::LoraConfig& c) { c.alpha = 0; }, "alpha 0");
  bad([](emt::LoraConfig& c) { c.dropout = 1.0; }, "dropout 1");
  bad([](emt::LoraConfig& c) { c.target_modules.clear(); }, "0 target_modules");
  bad([](emt::LoraConfig& c) { c.target_regex = "(unclosed"; }, "finetune.lora.target_regex '(unclosed'");
  bad([](emt::LoraConfig& c) { c.target_modules = {"nothing_here"}; }, "nothing_here");
  CHECK(emt::lora_layers(*m).empty());  // failed injections changed nothing
}

TEST_CASE("lora: at init the adapted model gives exactly the base outputs", "[adapters]") {
  auto m = make_fake();
  auto img = fake_image();
  auto ids = fake_ids();
  torch::NoGradGuard ng;
  auto base = m->forward(img, ids);
  auto cfg = small_lora();
  cfg.target_modules = {"all-linear"};
  auto added = emt::inject_lora(*m, cfg);
  CHECK(added.size() == 14);
  CHECK(torch::equal(m->forward(img, ids), base));
  cfg.init = "gaussian";
  emt::inject_lora(*m, cfg);
  CHECK(torch::equal(m->forward(img, ids), base));
}

TEST_CASE("lora: kaiming and gaussian initialisation of A, B zero", "[adapters]") {
  auto m = make_fake();
  auto cfg = small_lora();
  cfg.r = 8;
  cfg.init = "gaussian";
  torch::manual_seed(3);
  emt::inject_lora(*m, cfg);
  auto& q = *m->decoder[0]->q;
  CHECK(q.lora_B->weight.abs().max().item<double>() == 0.0);
  // PEFT "gaussian": A ~ N(0, std = 1/r). 32 x 7 x 2 draws of all layers pooled.
  std::vector<torch::Tensor> as;
  for (auto& [p, lin] : emt::lora_layers(*m)) as.push_back(lin->lora_A->weight.flatten());
  auto all = torch::cat(as);
  CHECK(std::abs(all.std().item<double>() - 1.0 / 8) < 0.01);
  cfg.init = "kaiming";
  emt::inject_lora(*m, cfg);
  // Kaiming-uniform with a = sqrt(5): U(-b, b), b = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in).
  double bound = 1.0 / std::sqrt(16.0);
  CHECK(q.lora_A->weight.abs().max().item<double>() <= bound);
  CHECK(q.lora_A->weight.abs().max().item<double>() > 0.8 * bound);
  CHECK(q.lora_B->weight.abs().max().item<double>() == 0.0);
}

TEST_CASE("lora: scale alpha/r, rsLoRA alpha/sqrt(r), per-module rank and alpha (PEFT pattern rules)",
          "[adapters]") {
  auto m = make_fake();
  auto cfg = small_lora();
  cfg.rank_pattern = {{"q_proj", 2}, {"layers.1.mlp.down_proj", 8}};
  cfg.alpha_pattern = {{"layers.0.self_attn.v_proj", 32.0}};
  emt::inject_lora(*m, cfg);
  auto& l0 = *m->decoder[0];
  auto& l1 = *m->decoder[1];
  CHECK(l0.q->lora_rank() == 2);
  CHECK(l0.q->lora_scale() == 8.0 / 2);
  CHECK(l0.k->lora_rank() == 4);
  CHECK(l0.k->lora_scale() == 8.0 / 4);
  CHECK(l0.v->lora_scale() == 32.0 / 4);
  CHECK(l1.v->lora_scale() == 8.0 / 4);
  CHECK(l0.down->lora_rank() == 4);
  CHECK(l1.down->lora_rank() == 8);
  CHECK(l1.down->lora_A->weight.sizes() == torch::IntArrayRef({8, 24}));
  CHECK(l1.down->lora_B->weight.sizes() == torch::IntArrayRef({16, 8}));
  // "(.*\.)?(P)$": a pattern must end on a component boundary.
  CHECK(emt::lora_rank_for(cfg, "language_model.model.layers.0.self_attn.xq_proj") == 4);

  cfg.use_rslora = true;
  emt::inject_lora(*m, cfg);
  CHECK(l0.k->lora_scale() == Approx(8.0 / 2.0));  // 8 / sqrt(4)
  CHECK(l0.q->lora_scale() == Approx(8.0 / std::sqrt(2.0)));
  CHECK(l0.v->lora_scale() == Approx(32.0 / 2.0));
  CHECK(emt::lora_scale(64, 16, false) == 0.25);
  CHECK(emt::lora_scale(64, 16, true) == 2.0);

  // The delta is scale * B A: check on one layer against the closed form.
  emt_test::randomize_lora(*m);
  auto x = torch::randn({3, 16});
  torch::NoGradGuard ng;
  auto want = torch::nn::functional::linear(x, l0.q->weight) +
              torch::matmul(torch::matmul(x, l0.q->lora_A->weight.t()), l0.q->lora_B->weight.t()) * (8.0 / std::sqrt(2.0));
  l0.q->eval();
  CHECK(max_abs_diff(l0.q->forward(x), want) < 1e-6);
}

TEST_CASE("lora: merged equals unmerged, unmerge restores the base weights, runtime scale", "[adapters]") {
  auto m = make_fake();
  auto img = fake_image();
  auto ids = fake_ids();
  torch::NoGradGuard ng;
  auto base = m->forward(img, ids);
  std::vector<torch::Tensor> base_w;
  for (auto& [p, lin] : emt::linear_layers(*m)) base_w.push_back(lin->weight.clone());
  auto cfg = small_lora();
  cfg.target_modules = {"all-linear"};
  emt::inject_lora(*m, cfg);
  emt_test::randomize_lora(*m);
  auto adapted = m->forward(img, ids);
  REQUIRE(max_abs_diff(adapted, base) > 1e-3);
  // Before any merge, runtime scale 0 skips the delta: exactly the base model.
  emt::set_lora_runtime_scale(*m, 0.0);
  CHECK(torch::equal(m->forward(img, ids), base));
  emt::set_lora_runtime_scale(*m, 1.0);
  CHECK(torch::equal(m->forward(img, ids), adapted));

  emt::merge_lora(*m);
  for (auto& [p, lin] : emt::lora_layers(*m)) CHECK(lin->merged());
  CHECK(max_abs_diff(m->forward(img, ids), adapted) <= 1e-5);
  emt::merge_lora(*m);  // idempotent
  CHECK(max_abs_diff(m->forward(img, ids), adapted) <= 1e-5);
  emt::unmerge_lora(*m);
  size_t i = 0;
  for (auto& [p, lin] : emt::linear_layers(*m)) CHECK(max_abs_diff(lin->weight, base_w[i++]) <= 1e-6);
  CHECK(max_abs_diff(m->forward(img, ids), adapted) <= 1e-6);

  // Runtime scale: 0 is the base model (up to the rounding the merge/unmerge cycle above left in the weights);
  // 1 the adapted one; merged layers follow the scale too.
  emt::set_lora_runtime_scale(*m, 0.0);
  CHECK(max_abs_diff(m->forward(img, ids), base) <= 1e-5);
  emt::set_lora_runtime_scale(*m, 0.5);
  auto half = m->forward(img, ids);
  CHECK(max_abs_diff(half, base) > 1e-4);
  CHECK(max_abs_diff(half, adapted) > 1e-4);
  emt::merge_lora(*m);
  CHECK(max_abs_diff(m->forward(img, ids), half) <= 1e-5);
  emt::set_lora_runtime_scale(*m, 0.0);  // while merged
  CHECK(max_abs_diff(m->forward(img, ids), base) <= 1e-5);
  emt::set_lora_runtime_scale(*m, 1.0);
  CHECK(max_abs_diff(m->forward(img, ids), adapted) <= 1e-5);
  emt::unmerge_lora(*m);
  i = 0;
  for (auto& [p, lin] : emt::linear_layers(*m)) CHECK(max_abs_diff(lin->weight, base_w[i++]) <= 1e-6);

  emt::remove_lora(*m);
  CHECK(emt::lora_layers(*m).empty());
  CHECK(max_abs_diff(m->forward(img, ids), base) <= 1e-6);
  for (auto& p : m->named_parameters(true)) CHECK_FALSE(emt::is_lora_parameter(p.key()));
}

TEST_CASE("lora: base frozen; after backward only LoRA parameters have gradients", "[adapters]") {
  auto m = make_fake();
  m->train();
  emt::inject_lora(*m, small_lora());
  emt_test::randomize_lora(*m);
  auto logits = m->forward(fake_image(), fake_ids());
  logits.square().mean().backward();
  int lora_with_grad = 0;
  for (auto& p : m->named_parameters(true)) {
    bool lora = emt::is_lora_parameter(p.key());
    INFO(p.key());
    CHECK(p.value().requires_grad() == lora);
    if (lora) {
      REQUIRE(p.value().grad().defined());
      lora_with_grad += p.value().grad().abs().sum().item<double>() > 0;
    } else {
      CHECK_FALSE(p.value().grad().defined());
    }
  }
  CHECK(lora_with_grad == 28);
}

TEST_CASE("policy: named methods map onto component modes", "[adapters]") {
  using M = emt::ComponentMode;
  auto p = emt::policy_for_method("linear");
  CHECK((p.vision == M::Frozen && p.projector == M::Full && p.llm == M::Frozen && !p.prompt));
  p = emt::policy_for_method("lora");
  CHECK((p.vision == M::Frozen && p.projector == M::Full && p.llm == M::Lora && !p.prompt));
  p = emt::policy_for_method("lora-only");
  CHECK((p.vision == M::Frozen && p.projector == M::Frozen && p.llm == M::Lora && !p.prompt));
  p = emt::policy_for_method("prompt");
  CHECK((p.vision == M::Frozen && p.projector == M::Frozen && p.llm == M::Frozen && p.prompt));
  p = emt::policy_for_method("linear+prompt");
  CHECK((p.vision == M::Frozen && p.projector == M::Full && p.llm == M::Frozen && p.prompt));
  p = emt::policy_for_method("full");
  CHECK((p.vision == M::Frozen && p.projector == M::Full && p.llm == M::Full && !p.prompt));
  p = emt::policy_for_method("vision=full,projector=lora,llm=frozen,prompt");
  CHECK((p.vision == M::Full && p.projector == M::Lora && p.llm == M::Frozen && p.prompt));
  CHECK(p.name == "custom");
  CHECK(emt::describe_policy(p) == "vision=full projector=lora llm=frozen prompt=yes");
  CHECK(emt::method_names().size() == 8);  // lora-attn and lora-mlp: lora on a subset of the layers
  CHECK(config_error([] { emt::policy_for_method("qlora"); }).find("wise-ft") != std::string::npos);

  CHECK(config_error([] { emt::policy_for_method("qlora"); }).find("linear | lora") != std::string::npos);
  CHECK(config_error([] { emt::policy_for_method("vision=half"); }).find("'half'") != std::string::npos);
  CHECK(config_error([] { emt::policy_for_method("eyes=full"); }).find("'eyes'") != std::string::npos);
  CHECK(config_error([] { emt::policy_for_method("llm=full,llm=lora"); }).find("twice") != std::string::npos);
  CHECK(config_error([] { emt::policy_for_method("vision=frozen"); }).find("trains nothing") != std::string::npos);
}

TEST_CASE("policy: applying each method sets exactly the trainable parameters and groups", "[adapters]") {
  emt::FinetuneSection ft;
  ft.learning_rate = 2e-4;
  ft.projector_lr = 2e-3;
  ft.lora = small_lora();
  auto under = [](const std::string& n, const std::string& root) { return n.rfind(root + ".", 0) == 0; };

  SECTION("linear") {
    auto m = make_fake();
    auto s = emt::apply_training_policy(*m, emt::policy_for_method("linear"), ft);
    for (const auto& n : trainable_names(*m)) CHECK(under(n, "multi_modal_projector"));
    CHECK(trainable_names(*m).size() == 4);
    REQUIRE(s.groups.size() == 2);
    CHECK(s.groups[0].name == "projector");
    CHECK(s.groups[0].lr == 2e-3);
    CHECK(s.groups[0].weight_decay);
    CHECK(s.groups[0].params.size() == 2);  // two weights
    CHECK(s.groups[1].name == "projector_no_decay");
    CHECK_FALSE(s.groups[1].weight_decay);
    CHECK(s.groups[1].params.size() == 2);  // two biases
    CHECK(s.trainable == 12 * 16 + 16 + 16 * 16 + 16);
    CHECK(s.lora_modules.empty());
  }
  SECTION("lora: projector full + LLM LoRA; backward reaches only those") {
    auto m = make_fake();
    m->train();
    auto s = emt::apply_training_policy(*m, emt::policy_for_method("lora"), ft);
    CHECK(s.lora_modules.size() == 14);
    auto names = trainable_names(*m);
    CHECK(names.size() == 4 + 28);
    for (const auto& n : names) CHECK((under(n, "multi_modal_projector") || emt::is_lora_parameter(n)));
    REQUIRE(s.groups.size() == 3);
    CHECK(s.groups[2].name == "default");
    CHECK(s.groups[2].lr == 2e-4);
    CHECK(s.groups[2].params.size() == 28);
    emt_test::randomize_lora(*m);
    m->forward(fake_image(), fake_ids()).square().mean().backward();
    for (auto& p : m->named_parameters(true)) {
      INFO(p.key());
      CHECK((p.value().grad().defined() == (names.count(p.key()) > 0)));
    }
  }
  SECTION("lora-only freezes the projector; projector_lr 0 falls back to lr") {
    auto m = make_fake();
    ft.projector_lr = 0;
    auto s = emt::apply_training_policy(*m, emt::policy_for_method("lora-only"), ft);
    auto names = trainable_names(*m);
    CHECK(names.size() == 28);
    for (const auto& n : names) CHECK(emt::is_lora_parameter(n));
  }
  SECTION("full: projector + whole LLM (embeddings, norms, lm_head), vision frozen; norms in no_decay") {
    auto m = make_fake();
    auto s = emt::apply_training_policy(*m, emt::policy_for_method("full"), ft);
    auto names = trainable_names(*m);
    CHECK(names.count("language_model.model.embed_tokens.weight"));
    CHECK(names.count("language_model.lm_head.weight"));
    CHECK(names.count("language_model.model.norm.weight"));
    for (const auto& n : names) CHECK_FALSE(under(n, "vision_tower"));
    bool norm_in_nd = false;
    for (const auto& g : s.groups)
      if (g.name == "no_decay")
        for (const auto& t : g.params) norm_in_nd = norm_in_nd || t.is_same(m->norm->weight);
    CHECK(norm_in_nd);
  }
  SECTION("explicit policy can train the vision tower and put LoRA on it") {
    auto m = make_fake();
    emt::FinetuneSection f2 = ft;
    f2.lora.target_modules = {"all-linear"};
    auto s = emt::apply_training_policy(*m, emt::policy_for_method("vision=lora,projector=frozen,llm=frozen"), f2);
    CHECK(s.lora_modules.size() == 6);
    for (const auto& n : trainable_names(*m)) CHECK((under(n, "vision_tower") && emt::is_lora_parameter(n)));
    auto s2 = emt::apply_training_policy(*m, emt::policy_for_method("vision=full,projector=frozen,llm=frozen"), f2);
    CHECK(trainable_names(*m).count("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"));
  }
  SECTION("prompt: K embeddings handed to the model, the only trainable tensor") {
    auto m = make_fake();
    ft.prompt_tuning.num_virtual_tokens = 3;
    emt::PolicyHooks hooks;
    hooks.set_prompt_prefix = [&](const torch::Tensor& t) { m->set_prompt_prefix(t); };
    auto s = emt::apply_training_policy(*m, emt::policy_for_method("prompt"), ft, hooks);
    REQUIRE(s.prompt_embeddings.defined());
    CHECK(s.prompt_embeddings.sizes() == torch::IntArrayRef({3, 16}));
    CHECK(s.prompt_embeddings.requires_grad());
    CHECK(m->prefix.is_same(s.prompt_embeddings));
    CHECK(trainable_names(*m).empty());
    REQUIRE(s.groups.size() == 1);
    CHECK(s.groups[0].name == "no_decay");
    CHECK(s.trainable == 3 * 16);
    auto logits = m->forward(fake_image(), fake_ids());
    CHECK(logits.size(1) == 3 + 3 + 5);
    logits.square().mean().backward();
    CHECK(s.prompt_embeddings.grad().defined());
    for (auto& p : m->parameters(true)) CHECK_FALSE(p.grad().defined());

    auto tensors = emt::trainable_tensors(*m, s.prompt_embeddings);
    REQUIRE(tensors.size() == 1);
    CHECK(tensors[0].first == "prompt_embeddings");

    // Without a hook a prompt policy cannot be applied.
    CHECK(config_error([&] { emt::apply_training_policy(*m, emt::policy_for_method("prompt"), ft); })
              .find("prompt") != std::string::npos);
    ft.prompt_tuning.num_virtual_tokens = 0;
    CHECK(config_error([&] { emt::apply_training_policy(*m, emt::policy_for_method("prompt"), ft, hooks); })
              .find("num_virtual_tokens") != std::string::npos);
    ft.prompt_tuning.num_virtual_tokens = 2;
    ft.prompt_tuning.init = "text";
    CHECK(config_error([&] { emt::apply_training_policy(*m, emt::policy_for_method("prompt"), ft, hooks); })
              .find("init_text") != std::string::npos);
  }
}

TEST_CASE("policy: trainable tensors round trip by name; mismatches are all named", "[adapters]") {
  emt::FinetuneSection ft;
  ft.lora = small_lora();
  auto a = make_fake();
  auto sa = emt::apply_training_policy(*a, emt::policy_for_method("lora"), ft);
  emt_test::randomize_lora(*a, 9);
  {
    torch::NoGradGuard ng;
    a->linear_1->weight.add_(1.0);
  }
  auto saved = emt::trainable_tensors(*a);
  CHECK(saved.size() == 32);
  std::vector<std::pair<std::string, torch::Tensor>> copy;
  for (auto& [n, t] : saved) copy.emplace_back(n, t.clone());

  auto b = make_fake();
  emt::apply_training_policy(*b, emt::policy_for_method("lora"), ft);
  emt::load_trainable_tensors(*b, copy, {}, "ckpt");
  auto img = fake_image();
  auto ids = fake_ids();
  torch::NoGradGuard ng;
  CHECK(torch::equal(a->forward(img, ids), b->forward(img, ids)));

  auto bad = copy;
  bad.erase(bad.begin());                                          // a missing trainable tensor
  bad[0].second = torch::zeros({3, 3});                            // a wrong shape
  bad.emplace_back("language_model.nope.weight", torch::zeros(1));  // an unknown name
  bad.emplace_back("prompt_embeddings", torch::zeros({2, 16}));    // no prompt in this model
  try {
    emt::load_trainable_tensors(*b, bad, {}, "ckpt");
    FAIL("expected FormatError");
  } catch (const emt::FormatError& e) {
    std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find("4 problems") != std::string::npos);
    CHECK(msg.find(copy[0].first + "' is missing") != std::string::npos);
    CHECK(msg.find(bad[0].first + "' has shape [3, 3]") != std::string::npos);
    CHECK(msg.find("language_model.nope.weight") != std::string::npos);
    CHECK(msg.find("no prompt embeddings") != std::string::npos);
  }
  CHECK(torch::equal(a->forward(img, ids), b->forward(img, ids)));  // nothing was copied

  auto counts = emt::count_parameters(*b);
  int64_t lora_trainable = 0, proj_trainable = 0, vision_trainable = 0;
  for (const auto& c : counts) {
    if (c.component == "lora") lora_trainable = c.trainable;
    if (c.component == "projector") proj_trainable = c.trainable;
    if (c.component == "vision") vision_trainable = c.trainable;
  }
  CHECK(proj_trainable == 12 * 16 + 16 + 16 * 16 + 16);
  CHECK(lora_trainable == 2 * (4 * (4 * 16 + 16 * 4) + 2 * (4 * 16 + 24 * 4) + (4 * 24 + 16 * 4)));
  CHECK(vision_trainable == 0);
}
