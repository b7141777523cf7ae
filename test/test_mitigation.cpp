// Forgetting mitigations: method names and settings, the subset LoRA recipes, the penalties, distillation, the
// base seen inside a tuned model (lwf's teacher, wise-ft's interpolation), replay's mixed loss, the Fisher and
// the moving average.
#include <catch2/catch.hpp>
#include <emt/adapters/lora.h>
#include <emt/adapters/policy.h>
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/train/finetune.h>
#include <emt/train/mitigation.h>
#include <torch/torch.h>

#include <cmath>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "expect_error.h"
#include "test_batches.h"
#include "test_models_common.h"

namespace {

using emt::NamedTensors;

emt::LlavaModel tiny_lora_model(emt::TrainableSetup* setup_out = nullptr, const std::string& method = "lora") {
  torch::manual_seed(5);
  auto model = emt::build_llava(emt_test::tiny_model_section(), emt_test::kTinyImageToken);
  auto setup = emt::apply_method(*model, emt_test::memorise_section(method));
  if (setup_out) *setup_out = setup;
  model->eval();
  return model;
}

// What training would do: LoRA B and the projector move away from the base.
void perturb(emt::LlavaModelImpl& model, double by = 0.05) {
  torch::NoGradGuard ng;
  torch::manual_seed(9);
  for (auto& p : model.named_parameters(true))
    if (p.value().requires_grad()) p.value().add_(torch::randn_like(p.value()) * by);
}

torch::Tensor logits(emt::LlavaModelImpl& model, const emt::Batch& b) {
  torch::NoGradGuard ng;
  return model.forward(b.images, b.input_ids, b.attention_mask).logits;
}

}  // namespace

TEST_CASE("mitigation: method names split into a mitigation and the method it runs on", "[mitigation]") {
  CHECK(emt::split_method("ewc").base == "lora");
  CHECK(emt::split_method("ewc").mitigation == "ewc");
  CHECK(emt::split_method("wise-ft:linear").base == "linear");
  CHECK(emt::split_method("wise-ft:linear").mitigation == "wise-ft");
  CHECK(emt::split_method("lora-attn").mitigation.empty());
  CHECK(emt::split_method("lora").base == "lora");
  const auto ewc_linear = emt::policy_for_method("ewc:linear"), linear = emt::policy_for_method("linear");
  CHECK(ewc_linear.name == "ewc:linear");
  CHECK(ewc_linear.projector == linear.projector);
  CHECK(ewc_linear.llm == linear.llm);
  CHECK(emt::policy_for_method("lwf").llm == emt::ComponentMode::Lora);

  auto cfg = emt::load_config_string("study: {methods: [lora, l2sp, 'ewc:linear', wise-ft, lora-mlp]}\n");
  CHECK(cfg.study.methods.size() == 5);
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] { emt::load_config_string("study: {methods: ['ewc:lorra']}\n"); }),
             Catch::Contains("study.methods[0]") && Catch::Contains("the method after ':' must be one of"));
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] { emt::load_config_string("study: {methods: ['ewc:lwf']}\n"); }),
             Catch::Contains("the method after ':'"));
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] { emt::load_config_string("study: {methods: ['lora:linear']}\n"); }),
             Catch::Contains("the part before ':' must be a mitigation"));
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] { emt::load_config_string("study: {methods: [ewx]}\n"); }),
             Catch::Contains("did you mean 'ewc'"));
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] {
               emt::load_config_string("finetune: {mitigation: {replay_ratio: 1.0, ema_decay: 0, wise_ft_alphas: [0, 1.5], reference: all}}\n");
             }),
             Catch::Contains("finetune.mitigation.replay_ratio") && Catch::Contains("finetune.mitigation.ema_decay") &&
                 Catch::Contains("finetune.mitigation.wise_ft_alphas[1]") &&
                 Catch::Contains("finetune.mitigation.reference"));
  // wise-ft scores one row label per weight; the others score under their own name
  emt::MitigationConfig m;
  m.wise_ft_alphas = {0, 0.5, 1};
  CHECK(emt::scored_method_labels("wise-ft", m) == std::vector<std::string>{"wise-ft@0", "wise-ft@0.5", "wise-ft@1"});
  CHECK(emt::scored_method_labels("ema", m) == std::vector<std::string>{"ema"});
}

TEST_CASE("mitigation: lora-attn adapts the attention projections only, lora-mlp gate and up only", "[mitigation]") {
  for (const std::string method : {"lora-attn", "lora-mlp", "lora"}) {
    emt::TrainableSetup setup;
    auto model = tiny_lora_model(&setup, method);
    std::set<std::string> kinds;
    for (const auto& path : setup.lora_modules) kinds.insert(path.substr(path.rfind('.') + 1));
    INFO(method);
    if (method == "lora-attn") CHECK(kinds == std::set<std::string>{"q_proj", "k_proj", "v_proj", "o_proj"});
    if (method == "lora-mlp") CHECK(kinds == std::set<std::string>{"gate_proj", "up_proj"});
    if (method == "lora") CHECK(kinds.size() == 7);
    const size_t layers = static_cast<size_t>(emt_test::tiny_model_section().llm.num_layers);
    CHECK(setup.lora_modules.size() == kinds.size() * layers);
    CHECK(setup.policy.projector == emt::ComponentMode::Full);  // as lora: projector + LoRA
  }
}

TEST_CASE("mitigation: the L2 pull is zero at the start, sum w (theta - theta_0)^2 after, with its gradient",
          "[mitigation]") {
  torch::Tensor a = torch::tensor({1.0, 2.0, 3.0}).requires_grad_(true), b = torch::tensor({{0.5, -1.0}}).requires_grad_(true);
  NamedTensors live{{"a", a}, {"b", b}}, initial{{"a", a.detach().clone()}, {"b", b.detach().clone()}};
  CHECK(emt::weighted_sq_distance(live, initial).item<double>() == 0.0);
  {
    torch::NoGradGuard ng;
    a.add_(torch::tensor({0.1, 0.0, -0.2}));
    b.add_(torch::tensor({{0.0, 0.3}}));
  }
  auto d = emt::weighted_sq_distance(live, initial);
  CHECK(d.item<double>() == Approx(0.01 + 0.04 + 0.09));
  d.backward();
  CHECK(emt_test::max_diff(a.grad(), torch::tensor({0.2, 0.0, -0.4})) < 1e-6);
  NamedTensors fisher{{"a", torch::tensor({2.0, 1.0, 0.0})}, {"b", torch::tensor({{1.0, 10.0}})}};
  CHECK(emt::weighted_sq_distance(live, initial, fisher).item<double>() == Approx(0.02 + 0.0 + 0.9));
  CHECK_THAT(emt_test::error_of<emt::FormatError>([&] { emt::weighted_sq_distance(live, {{"a", initial[0].second}}); }),
             Catch::Contains("'b'"));
}

TEST_CASE("mitigation: distillation is zero for the base's own logits and counts only supervised positions",
          "[mitigation]") {
  torch::manual_seed(1);
  auto student = torch::randn({2, 5, 7}), labels = torch::full({2, 5}, -100, torch::kLong);
  labels.index_put_({0, 3}, 4);  // predicted at position 2
  labels.index_put_({1, 4}, 1);  // predicted at position 3
  CHECK(emt::distillation_kl(student, student.clone(), labels, 2.0).item<double>() == Approx(0.0).margin(1e-7));
  auto teacher = torch::randn({2, 5, 7});
  const double kl = emt::distillation_kl(student, teacher, labels, 2.0).item<double>();
  CHECK(kl > 0);
  // by hand: T^2 * mean over the two positions of KL(p_teacher || p_student) at temperature T
  double sum = 0;
  for (auto [row, pos] : {std::pair<int, int>{0, 2}, {1, 3}}) {
    auto p = torch::softmax(teacher[row][pos] / 2.0, -1), q = torch::softmax(student[row][pos] / 2.0, -1);
    sum += (p * (p.log() - q.log())).sum().item<double>();
  }
  CHECK(kl == Approx(4.0 * sum / 2).epsilon(1e-5));
  auto other = teacher.clone();
  other.index_put_({0, 0}, torch::randn({7}));  // an unsupervised position changes nothing
  CHECK(emt::distillation_kl(student, other, labels, 2.0).item<double>() == Approx(kl));
}

TEST_CASE("mitigation: the base inside a tuned model gives the base's logits and interpolates back exactly",
          "[mitigation]") {
  auto model = tiny_lora_model();
  const emt::Batch b = emt_test::memorise_batch(emt_test::kTinyImageToken);
  const auto base = logits(*model, b);  // LoRA B = 0 and the projector untouched: this is the base
  emt::BaseView view(*model);
  perturb(*model);
  const auto tuned = logits(*model, b);
  REQUIRE(emt_test::max_diff(tuned, base) > 1e-3);
  model->train();
  CHECK(emt_test::max_diff(view.base_logits(b.images, b.input_ids, b.attention_mask), base) < 1e-6);
  CHECK(model->is_training());  // left as it was
  model->eval();
  CHECK(emt_test::max_diff(logits(*model, b), tuned) == 0.0);

  view.interpolate(0.0);
  CHECK(emt_test::max_diff(logits(*model, b), base) < 1e-6);  // wise-ft at a = 0 is the base
  view.interpolate(0.5);
  const auto half = logits(*model, b);
  CHECK(emt_test::max_diff(half, base) > 1e-4);
  CHECK(emt_test::max_diff(half, tuned) > 1e-4);
  view.interpolate(1.0);
  CHECK(emt_test::max_diff(logits(*model, b), tuned) == 0.0);  // exactly the tuned model again
}

TEST_CASE("mitigation: making a base view draws nothing from the random generator", "[mitigation]") {
  // wise-ft and lwf hold a base view made after seeding and before LoRA's initialisation: drawing from the
  // generator there would train them from other initial weights than their plain method from the same seed.
  auto model = tiny_lora_model();
  torch::manual_seed(7);
  const auto expected = torch::rand({8});
  torch::manual_seed(7);
  emt::BaseView view(*model);
  CHECK(emt_test::max_diff(torch::rand({8}), expected) == 0.0);
}

TEST_CASE("mitigation: lwf adds nothing while the model is the base and pulls back once it moves", "[mitigation]") {
  auto model = tiny_lora_model();
  const emt::Batch b = emt_test::memorise_batch(emt_test::kTinyImageToken);
  auto view = std::make_shared<emt::BaseView>(*model);
  emt::LlavaObjective plain(model, torch::kCPU), lwf(model, torch::kCPU);
  lwf.set_distillation(view, 1.0, 2.0);
  CHECK(lwf.loss(b).loss.item<double>() == Approx(plain.loss(b).loss.item<double>()).epsilon(1e-6));
  perturb(*model, 0.2);
  const double p = plain.loss(b).loss.item<double>(), l = lwf.loss(b).loss.item<double>();
  CHECK(l > p + 1e-4);
}

TEST_CASE("mitigation: replay mixes (1 - r) of the fine-tuning loss with r of the reference batch's, and resumes",
          "[mitigation]") {
  CHECK(emt::replay_batch_size(0.25, 32) == 11);
  CHECK(emt::replay_batch_size(0.5, 32) == 32);
  CHECK(emt::replay_batch_size(0.01, 8) == 1);
  auto model = tiny_lora_model();
  perturb(*model);
  emt::Batch b = emt_test::memorise_batch(emt_test::kTinyImageToken), ref = emt_test::memorise_batch(emt_test::kTinyImageToken, 77);
  ref.labels.narrow(1, 5, 1).fill_(-100);  // another batch with other targets
  std::vector<int64_t> asked;
  emt::LlavaObjective plain(model, torch::kCPU), replay(model, torch::kCPU);
  replay.set_replay([&](int64_t g) { asked.push_back(g); return ref; }, 0.25, 10);
  const double lf = plain.loss(b).loss.item<double>(), lr = plain.loss(ref).loss.item<double>();
  REQUIRE(std::abs(lf - lr) > 1e-3);
  b.epoch = 2;
  b.number = 3;
  const auto s = replay.loss(b);
  CHECK(s.loss.item<double>() == Approx(0.75 * lf + 0.25 * lr).epsilon(1e-6));
  CHECK(asked == std::vector<int64_t>{23});  // epoch * batches per epoch + batch number: the same after a resume
  CHECK(s.tokens == (b.labels != -100).sum().item<int64_t>());  // the data-parallel weight stays the fine-tuning tokens
}

TEST_CASE("mitigation: the diagonal Fisher is the mean squared gradient, scaled to mean 1", "[mitigation]") {
  emt::TrainableSetup setup;
  auto model = tiny_lora_model(&setup);
  perturb(*model);
  NamedTensors live;
  for (const auto& p : model->named_parameters(true))
    if (p.value().requires_grad()) live.emplace_back(p.key(), p.value());
  const emt::Batch b1 = emt_test::memorise_batch(emt_test::kTinyImageToken, 1),
                   b2 = emt_test::memorise_batch(emt_test::kTinyImageToken, 2);
  int k = 0;
  auto fisher = emt::diagonal_fisher(*model, live, [&] { return (k++ % 2) ? b2 : b1; }, 2, torch::kCPU);
  REQUIRE(fisher.size() == live.size());
  CHECK_FALSE(model->is_training());
  for (const auto& [name, t] : live) CHECK_FALSE(t.grad().defined());  // no gradient left for the optimizer
  // by hand
  std::vector<torch::Tensor> sq;
  for (const auto& [n, t] : live) sq.push_back(torch::zeros_like(t));
  for (const auto* b : {&b1, &b2}) {
    for (auto& [n, t] : live) t.mutable_grad() = torch::Tensor();
    model->loss(b->images, b->input_ids, b->attention_mask, b->labels).backward();
    for (size_t i = 0; i < live.size(); ++i) sq[i] += live[i].second.grad().pow(2) / 2;
  }
  double total = 0;
  int64_t n = 0;
  for (const auto& s : sq) {
    total += s.sum().item<double>();
    n += s.numel();
  }
  double mean = 0;
  for (size_t i = 0; i < live.size(); ++i) {
    CHECK(emt_test::max_diff(fisher[i].second, sq[i] / (total / n)) < 1e-4);
    CHECK(fisher[i].second.min().item<double>() >= 0);
    mean += fisher[i].second.sum().item<double>();
  }
  CHECK(mean / n == Approx(1.0).epsilon(1e-5));
}

TEST_CASE("mitigation: the moving average follows d * avg + (1 - d) * theta, swaps and checkpoints", "[mitigation]") {
  torch::Tensor w = torch::tensor({1.0, -1.0}).requires_grad_(true);
  NamedTensors live{{"w", w}};
  emt::WeightAverage avg(live, 0.9);
  {
    torch::NoGradGuard ng;
    w.copy_(torch::tensor({2.0, 0.0}));
  }
  avg.update();  // 0.9 * [1, -1] + 0.1 * [2, 0]
  CHECK(emt_test::max_diff(avg.average()[0].second, torch::tensor({1.1, -0.9})) < 1e-6);
  {
    torch::NoGradGuard ng;
    w.copy_(torch::tensor({3.0, 1.0}));
  }
  avg.update();
  CHECK(emt_test::max_diff(avg.average()[0].second, torch::tensor({0.9 * 1.1 + 0.3, 0.9 * -0.9 + 0.1})) < 1e-6);
  const auto kept = avg.average()[0].second.clone();
  avg.swap();
  CHECK(emt_test::max_diff(w, kept) == 0.0);
  CHECK(emt_test::max_diff(avg.average()[0].second, torch::tensor({3.0, 1.0})) == 0.0);
  avg.swap();
  auto state = avg.state();
  REQUIRE(state.size() == 1);
  CHECK(state[0].first == "ema/w");
  emt::WeightAverage other(live, 0.9);
  auto rest = other.load_state({{"w", w.detach()}, state[0]}, "ckpt");
  CHECK(rest.size() == 1);
  CHECK(rest[0].first == "w");
  CHECK(emt_test::max_diff(other.average()[0].second, kept) == 0.0);
  CHECK_THAT(emt_test::error_of<emt::FormatError>([&] { other.load_state({{"w", w.detach()}}, "ckpt/trainable.safetensors"); }),
             Catch::Contains("ckpt/trainable.safetensors") && Catch::Contains("ema/w"));
}
