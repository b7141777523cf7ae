// Adapters on the real (tiny) LLaVA model: LoRA identities, methods, PEFT round trip, `emt adapters` CLI.
#include <emt/adapters/lora.h>
#include <emt/adapters/peft.h>
#include <emt/adapters/policy.h>
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/core/llava.h>
#include <emt/core/safetensors.h>

#include <catch2/catch.hpp>
#include <set>

#include "helpers.h"
#include "test_adapters_fake.h"

using emt_test::max_abs_diff;

namespace {

constexpr int64_t kImageToken = 511;

emt::ModelSection tiny_section() {
  emt::ModelSection m;
  m.projector = "mlp2x_gelu";
  m.llm.num_layers = 2;
  return m;
}

emt::LlavaModel tiny(uint64_t seed = 11) {
  torch::manual_seed(seed);
  auto model = emt::build_llava(tiny_section(), kImageToken);
  model->eval();
  return model;
}

struct LlavaBatch {
  torch::Tensor images, ids, labels;
};

LlavaBatch batch() {
  torch::manual_seed(99);
  LlavaBatch b;
  b.images = torch::rand({2, 3, 28, 28});
  b.ids = torch::randint(1, 500, {2, 7}, torch::kLong);
  b.ids.index_put_({torch::indexing::Slice(), 2}, kImageToken);
  b.labels = b.ids.clone();
  b.labels.index_put_({torch::indexing::Slice(), torch::indexing::Slice(0, 3)}, -100);
  return b;
}

torch::Tensor logits(emt::LlavaModel& m, const LlavaBatch& b) {
  torch::NoGradGuard ng;
  return m->forward(b.images, b.ids, {}).logits;
}

emt::FinetuneSection lora_ft() {
  emt::FinetuneSection ft;
  ft.lora.r = 4;
  ft.lora.alpha = 8;
  ft.lora.dropout = 0.0;
  return ft;
}

void randomize_lora(torch::nn::Module& m) {
  torch::manual_seed(5);
  torch::NoGradGuard ng;
  for (auto& [path, lin] : emt::lora_layers(m)) lin->lora_B->weight.copy_(torch::randn(lin->lora_B->weight.sizes()) * 0.05);
}

}  // namespace

TEST_CASE("adapters on LLaVA: LoRA at init == base, merged == unmerged, unmerge restores, scale 0 == base",
          "[adapters]") {
  auto m = tiny();
  auto b = batch();
  auto base = logits(m, b);
  std::vector<torch::Tensor> base_w;
  for (auto& [p, lin] : emt::linear_layers(*m)) base_w.push_back(lin->weight.detach().clone());

  auto ft = lora_ft();
  auto added = emt::inject_lora(*m, ft.lora);
  CHECK(added.size() == 2 * 7);
  for (const auto& p : added) CHECK(p.rfind("language_model.model.layers.", 0) == 0);
  CHECK(torch::equal(logits(m, b), base));

  randomize_lora(*m);
  auto adapted = logits(m, b);
  REQUIRE(max_abs_diff(adapted, base) > 1e-3);
  emt::set_lora_runtime_scale(*m, 0.0);
  CHECK(torch::equal(logits(m, b), base));  // before any merge, scale 0 skips the delta exactly
  emt::set_lora_runtime_scale(*m, 1.0);
  emt::merge_lora(*m);
  CHECK(max_abs_diff(logits(m, b), adapted) <= 1e-5);
  emt::unmerge_lora(*m);
  size_t i = 0;
  for (auto& [p, lin] : emt::linear_layers(*m)) CHECK(max_abs_diff(lin->weight, base_w[i++]) <= 1e-6);
  emt::set_lora_runtime_scale(*m, 0.0);  // the base model, up to the merge/unmerge rounding in the weights
  CHECK(max_abs_diff(logits(m, b), base) <= 1e-5);

  ft.lora.target_modules = {"all-linear"};
  auto all = emt::inject_lora(*m, ft.lora);
  CHECK(all.size() == 2 * 7);  // every decoder Linear; lm_head and the vision tower are left alone
}

TEST_CASE("adapters on LLaVA: methods train exactly their parameters", "[adapters]") {
  auto b = batch();
  for (const std::string method : {"linear", "lora", "lora-only", "prompt", "linear+prompt", "full"}) {
    DYNAMIC_SECTION(method) {
      auto m = tiny();
      m->train();
      auto ft = lora_ft();
      ft.method = method;
      ft.projector_lr = 1e-3;
      ft.prompt_tuning.num_virtual_tokens = 3;
      auto setup = emt::apply_method(*m, ft);
      auto policy = emt::policy_for_method(method);
      std::set<std::string> trainable;
      for (auto& p : m->named_parameters(true))
        if (p.value().requires_grad()) trainable.insert(p.key());
      for (const auto& n : trainable) {
        INFO(n);
        bool proj = n.rfind("multi_modal_projector.", 0) == 0;
        bool llm = n.rfind("language_model.", 0) == 0;
        bool lora = emt::is_lora_parameter(n);
        CHECK(n.rfind("vision_tower.", 0) != 0);
        CHECK(((proj && policy.projector == emt::ComponentMode::Full) ||
               (llm && lora && policy.llm == emt::ComponentMode::Lora) ||
               (llm && !lora && policy.llm == emt::ComponentMode::Full)));
      }
      CHECK(setup.prompt_embeddings.defined() == policy.prompt);
      if (policy.prompt) CHECK(m->prompt_prefix().is_same(setup.prompt_embeddings));
      int64_t in_groups = 0;
      for (const auto& g : setup.groups) {
        for (const auto& t : g.params) in_groups += t.numel();
        if (g.name.rfind("projector", 0) == 0) CHECK(g.lr == 1e-3);
      }
      CHECK(in_groups == setup.trainable);
      if (method == "lora") randomize_lora(*m);
      auto out = m->forward(b.images, b.ids, {}, b.labels);
      CHECK(out.logits.size(1) == 7 - 1 + 16 + (policy.prompt ? 3 : 0));
      out.loss.backward();
      for (auto& p : m->named_parameters(true)) {
        INFO(p.key());
        CHECK(p.value().grad().defined() == (trainable.count(p.key()) > 0));
      }
      if (policy.prompt) CHECK(setup.prompt_embeddings.grad().defined());
      // What a checkpoint stores is exactly the trained set.
      auto tensors = emt::trainable_tensors(*m, setup.prompt_embeddings);
      CHECK(tensors.size() == trainable.size() + (policy.prompt ? 1 : 0));
    }
  }
}

TEST_CASE("adapters on LLaVA: PEFT round trip into a fresh model (both key styles)", "[adapters]") {
  auto m = tiny();
  auto ft = lora_ft();
  ft.method = "lora";
  emt::apply_method(*m, ft);
  randomize_lora(*m);
  {
    torch::NoGradGuard ng;
    m->multi_modal_projector->linear_2->bias.add_(0.1);
  }
  auto b = batch();
  auto want = logits(m, b);
  for (const std::string style : {"old", "new"}) {
    auto dir = emt_test::scratch_dir("adapters_llava_" + style);
    emt::LoraSaveOptions opts;
    opts.key_style = style;
    opts.modules_to_save = {"multi_modal_projector"};
    emt::save_lora_adapter(*m, ft.lora, dir, opts);
    emt::SafetensorsReader r(dir + "/adapter_model.safetensors");
    std::string lm = style == "old" ? "language_model.model" : "model.language_model";
    std::string proj = style == "old" ? "multi_modal_projector" : "model.multi_modal_projector";
    CHECK(r.contains("base_model.model." + lm + ".layers.1.mlp.down_proj.lora_B.weight"));
    CHECK(r.contains("base_model.model." + proj + ".linear_2.bias"));
    CHECK(r.names().size() == 2 * 7 * 2 + 4);
    auto fresh = tiny();
    auto loaded = emt::load_lora_adapter(*fresh, dir);
    CHECK(emt::to_string(loaded.key_style) == style);
    CHECK(torch::equal(logits(fresh, b), want));
  }
}

TEST_CASE("adapters CLI: info, and merge writes an HF model that reproduces the adapted logits", "[adapters]") {
  auto root = emt_test::scratch_dir("adapters_cli");
  auto base = tiny();
  emt::save_llava(base, root + "/base");
  auto m = tiny();
  auto ft = lora_ft();
  emt::inject_lora(*m, ft.lora);
  randomize_lora(*m);
  {
    torch::NoGradGuard ng;
    m->multi_modal_projector->linear_1->weight.mul_(0.5);
  }
  emt::LoraSaveOptions opts;
  opts.modules_to_save = {"multi_modal_projector"};
  opts.key_style = "new";
  emt::save_lora_adapter(*m, ft.lora, root + "/adapter", opts);

  auto info = emt_test::run_cli("adapters info " + root + "/adapter");
  CHECK(info.code == 0);
  CHECK(info.output.find("\"peft_type\": \"LORA\"") != std::string::npos);
  CHECK(info.output.find("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight  F32  [4, 128]") !=
        std::string::npos);

  auto res = emt_test::run_cli("adapters merge --model " + root + "/base --adapter " + root + "/adapter --out " + root +
                               "/merged");
  INFO(res.output);
  REQUIRE(res.code == 0);
  auto merged = emt::load_llava(root + "/merged");
  merged->eval();
  auto b = batch();
  CHECK(max_abs_diff(logits(merged, b), logits(m, b)) <= 1e-5);
  for (auto& [p, lin] : emt::linear_layers(*merged)) CHECK_FALSE(lin->has_low_rank());

  // Usage errors exit 2; a mismatched adapter exits 1 naming the problem.
  CHECK(emt_test::run_cli("adapters merge --model " + root + "/base --adapter " + root + "/adapter --out " + root +
                          "/merged")
            .code == 2);  // --out not empty
  CHECK(emt_test::run_cli("adapters info " + root + "/nothing").code == 1);
}
