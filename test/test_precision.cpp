// Mixed precision: frozen weights in bf16 with fp32 master copies of every trained tensor, bf16 autocast on CPU,
// gradient checkpointing that recomputes under the forward's autocast, fp16 loss scaling, generator states.
#include <emt/adapters/policy.h>
#include <emt/core/config.h>
#include <emt/core/llava.h>
#include <emt/core/runtime.h>
#include <emt/core/safetensors.h>
#include <emt/train/finetune.h>
#include <emt/train/grad_scaler.h>
#include <emt/train/trainer.h>
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "expect_error.h"
#include "helpers.h"
#include "test_batches.h"
#include "test_models_common.h"

using emt_test::quiet_options;

namespace {
emt::FinetuneSection lora_section(const std::string& method = "lora") { return emt_test::memorise_section(method); }
}  // namespace

TEST_CASE("precision: bf16 frozen weights train through fp32 master tensors under bf16 autocast", "[precision]") {
  const int64_t img = emt_test::kTinyImageToken;
  torch::manual_seed(5);
  auto model = emt::build_llava(emt_test::tiny_model_section(), img);
  model->to(torch::kBFloat16);  // run.dtype: bf16
  auto ft = lora_section();
  auto setup = emt::apply_method(*model, ft);
  int64_t trained = 0, frozen_bf16 = 0;
  for (const auto& p : model->named_parameters()) {
    if (p.value().requires_grad()) {
      INFO(p.key());
      CHECK(p.value().scalar_type() == torch::kFloat32);
      ++trained;
    } else {
      frozen_bf16 += p.value().scalar_type() == torch::kBFloat16;
    }
  }
  CHECK(trained > 4);         // projector weights and biases, LoRA A/B of every target
  CHECK(frozen_bf16 > 10);    // the frozen tower and decoder stay in run.dtype
  // The trained LoRA B starts at zero: the bf16 model's logits are unchanged by applying the method.
  emt_test::FixedBatchSource src(emt_test::memorise_batch(img));
  emt::LlavaObjective obj(model, torch::kCPU);
  auto dir = emt_test::scratch_dir("precision_bf16");
  auto o = quiet_options(40, "bf16");
  o.run_dir = dir;
  o.keep_last_n = 1;
  emt::TrainableIO io;
  io.get = [&] { return emt::trainable_tensors(*model, setup.prompt_embeddings); };
  io.set = [](const emt::NamedTensors&) {};
  emt::Trainer t(obj, src, setup.groups, io, o);
  auto s = t.fit();
  REQUIRE(s.losses.size() == 40);
  INFO("bf16 loss: first " << s.losses.front() << ", last " << s.losses.back());
  CHECK(s.losses.back() < 0.5 * s.losses.front());
  for (const auto& p : model->parameters())
    if (p.requires_grad()) CHECK(p.scalar_type() == torch::kFloat32);
  // The checkpoint holds fp32 trained tensors and fp32 AdamW moments.
  emt::SafetensorsReader tr(dir + "/epoch_40/trainable.safetensors");
  REQUIRE(!tr.names().empty());
  for (const auto& n : tr.names()) CHECK(tr.info(n).dtype == "F32");
  emt::SafetensorsReader opt(dir + "/epoch_40/optimizer.safetensors");
  int64_t moments = 0;
  for (const auto& n : opt.names())
    if (n.find("exp_avg") != std::string::npos) {
      INFO(n);
      CHECK(opt.info(n).dtype == "F32");
      ++moments;
    }
  CHECK(moments == 2 * trained);  // exp_avg and exp_avg_sq per trained tensor
}

TEST_CASE("precision: a gradient-checkpointed decoder recomputes under the forward's autocast", "[precision]") {
  const int64_t img = emt_test::kTinyImageToken;
  auto grads = [&](bool checkpointing, bool autocast) {
    torch::manual_seed(9);
    auto model = emt::build_llava(emt_test::tiny_model_section(), img);
    auto setup = emt::apply_method(*model, lora_section("full"));
    model->language_model->model->grad_checkpointing = checkpointing;
    model->train();
    emt::LlavaObjective obj(model, torch::kCPU);
    obj.set_train(true);
    auto b = emt_test::memorise_batch(img);
    emt::AutocastState ac;
    ac.enabled = autocast;
    torch::Tensor loss;
    {
      emt::AutocastScope scope(torch::kCPU, ac);
      loss = obj.loss(b).loss;
    }
    loss.to(torch::kFloat32).backward();
    std::vector<torch::Tensor> g;
    for (const auto& p : model->language_model->parameters())
      if (p.requires_grad() && p.grad().defined()) g.push_back(p.grad().flatten());
    return torch::cat(g);
  };
  auto plain_bf16 = grads(false, true), ckpt_bf16 = grads(true, true), plain_f32 = grads(false, false);
  const double scale = plain_bf16.abs().max().item<double>();
  const double ckpt_err = emt_test::max_diff(ckpt_bf16, plain_bf16);
  const double f32_gap = emt_test::max_diff(plain_f32, plain_bf16);
  INFO("grad max " << scale << ": checkpointed vs plain (bf16) " << ckpt_err << ", f32 vs bf16 " << f32_gap);
  CHECK(ckpt_err <= 1e-6 * scale);
  // The check can fail: a recompute in f32 would differ from the bf16 forward by the bf16 rounding gap.
  CHECK(f32_gap > 1e-3 * scale);
}

TEST_CASE("precision: fp16 is refused on CPU and trained tensors must be fp32", "[precision]") {
  const int64_t img = emt_test::kTinyImageToken;
  auto model = emt::build_llava(emt_test::tiny_model_section(), img);
  auto setup = emt::apply_method(*model, lora_section());
  emt_test::FixedBatchSource src(emt_test::memorise_batch(img));
  emt::LlavaObjective obj(model, torch::kCPU);
  emt::TrainableIO io;
  io.get = [] { return emt::NamedTensors{}; };
  io.set = [](const emt::NamedTensors&) {};
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] {
               emt::Trainer(obj, src, setup.groups, io, quiet_options(1, "fp16"));
             }),
             Catch::Contains("fp16 needs a CUDA device"));
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] {
               emt::Trainer(obj, src, setup.groups, io, quiet_options(1, "f8"));
             }),
             Catch::Contains("must be f32, bf16 or fp16"));
  auto groups = setup.groups;
  groups.front().params.push_back(torch::zeros({3, 2}, torch::kBFloat16).requires_grad_(true));
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] {
               emt::Trainer(obj, src, groups, io, quiet_options(1, "bf16"));
             }),
             Catch::Contains("trained tensors must be fp32"));
}

TEST_CASE("grad scaler: overflow skips and backs off, good steps grow the scale, a checkpoint restores it",
          "[precision]") {
  emt::GradScalerOptions o;
  o.init_scale = 1024;
  o.growth_interval = 3;
  emt::GradScaler s(o);
  CHECK(s.scale() == 1024);
  CHECK_FALSE(s.update(false));  // overflow: skip the step
  CHECK(s.scale() == 512);
  CHECK(s.update(true));
  CHECK(s.update(true));
  CHECK(s.scale() == 512);
  CHECK(s.update(true));  // third good step in a row
  CHECK(s.scale() == 1024);
  CHECK(s.good_steps() == 0);
  CHECK(s.update(true));
  CHECK_FALSE(s.update(false));
  CHECK(s.good_steps() == 0);  // an overflow restarts the count
  s.restore(2.0, 1);
  CHECK(s.scale() == 2.0);
  CHECK_FALSE(s.update(false));
  CHECK(s.scale() == 1.0);  // min_scale
  CHECK_FALSE(s.exhausted());
  CHECK_FALSE(s.update(false));
  CHECK(s.exhausted());  // overflowing at scale 1: not a range problem, the caller treats it as non-finite
  CHECK_THAT(emt_test::error_of<emt::FormatError>([&] { s.restore(-1.0, 0); }),
             Catch::Contains("invalid loss scale"));
  o.backoff_factor = 1.5;
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] { emt::GradScaler{o}; }),
             Catch::Contains("backoff_factor"));
}

TEST_CASE("generator states: saved and restored for every device this process sees", "[precision]") {
  auto states = emt::generator_states();
  REQUIRE(!states.empty());
  CHECK(states.front().first == "cpu");
  CHECK(states.size() == 1 + torch::cuda::device_count());
  auto a = torch::rand({5});
  emt::set_generator_states(states);
  auto b = torch::rand({5});
  CHECK(torch::equal(a, b));
  // A state of a device this process does not see is reported, not applied.
  std::vector<std::pair<std::string, torch::Tensor>> extra = {{"cuda:63", states.front().second}};
  auto missing = emt::set_generator_states(extra);
  REQUIRE(missing.size() == 1);
  CHECK(missing.front() == "cuda:63");
  CHECK_THAT(emt_test::error_of<emt::FormatError>([&] {
               emt::set_generator_states({{"tpu:0", states.front().second}});
             }),
             Catch::Contains("tpu:0"));
}
