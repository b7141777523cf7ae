// Forgetting mitigations: penalties, distillation, the base seen inside a tuned model, reference data, the Fisher,
// the moving average.
#include <emt/adapters/lora.h>
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include <emt/train/finetune.h>
#include <emt/train/mitigation.h>
#include <emt/train/pretrain.h>
#include <torch/torch.h>

#include "core/logging.h"

#include <cmath>
#include <map>

namespace emt {

const char* const kEmaPrefix = "ema/";

std::string wise_ft_label(const std::string& method, double alpha) { return fmt::format("{}@{:g}", method, alpha); }

std::vector<std::string> scored_method_labels(const std::string& method, const MitigationConfig& m) {
  if (split_method(method).mitigation != "wise-ft") return {method};
  std::vector<std::string> out;
  for (double a : m.wise_ft_alphas) out.push_back(wise_ft_label(method, a));
  return out;
}

namespace {
std::map<std::string, torch::Tensor> by_name(const NamedTensors& t) {
  std::map<std::string, torch::Tensor> m;
  for (const auto& [n, v] : t) m[n] = v;
  return m;
}
}  // namespace

torch::Tensor weighted_sq_distance(const NamedTensors& live, const NamedTensors& initial, const NamedTensors& weights) {
  const auto init = by_name(initial), w = by_name(weights);
  torch::Tensor sum;
  for (const auto& [n, t] : live) {
    auto it = init.find(n);
    if (it == init.end()) throw FormatError("[mitigation] no initial value for trained tensor '" + n + "'");
    if (!it->second.sizes().equals(t.sizes()))
      throw FormatError("[mitigation] trained tensor '" + n + "': initial value has another shape");
    torch::Tensor d = (t - it->second.to(t.device(), t.scalar_type())).pow(2);
    if (!weights.empty()) {
      auto wi = w.find(n);
      if (wi == w.end() || !wi->second.sizes().equals(t.sizes()))
        throw FormatError("[mitigation] trained tensor '" + n + "': no Fisher weight of its shape");
      d = d * wi->second.to(t.device(), t.scalar_type());
    }
    torch::Tensor s = d.sum();
    sum = sum.defined() ? sum + s : s;
  }
  return sum.defined() ? sum : torch::zeros({});
}

torch::Tensor distillation_kl(const torch::Tensor& student, const torch::Tensor& teacher, const torch::Tensor& labels,
                              double temperature) {
  if (!student.sizes().equals(teacher.sizes()) || student.dim() != 3 || labels.dim() != 2 ||
      labels.size(0) != student.size(0) || labels.size(1) != student.size(1))
    throw FormatError("[mitigation] distillation_kl: student, teacher [B, T, V] and labels [B, T] must agree");
  // the logits at t predict token t + 1: positions whose next token is supervised
  const auto mask = labels.narrow(1, 1, labels.size(1) - 1).ne(-100).to(student.device());
  const int64_t n = mask.sum().item<int64_t>();
  if (n == 0) return (student.sum() * 0.0).to(torch::kFloat);
  const auto s = student.narrow(1, 0, student.size(1) - 1).index({mask}).to(torch::kFloat) / temperature;
  const auto t = teacher.narrow(1, 0, teacher.size(1) - 1).index({mask}).to(torch::kFloat) / temperature;
  const auto log_p = torch::log_softmax(t, -1), log_q = torch::log_softmax(s, -1);
  return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * (temperature * temperature);
}

BaseView::BaseView(LlavaModelImpl& model) : model_(model) {
  torch::NoGradGuard ng;
  // Making the copy draws a random initialisation (overwritten below); the generators are put back, so a method
  // that holds a base view (wise-ft, lwf) trains from the same seed exactly as its plain method does.
  const auto rng = generator_states();
  const auto& src = *model.multi_modal_projector;
  base_projector_ = Projector(src.options);
  set_generator_states(rng);
  auto theirs = model.multi_modal_projector->named_parameters(true);
  for (auto& p : base_projector_->named_parameters(true)) {
    const auto* t = theirs.find(p.key());
    if (!t) throw FormatError("[mitigation] the projector has no parameter '" + p.key() + "'");
    p.value().set_data(t->detach().clone());
  }
  for (auto& p : base_projector_->parameters()) p.set_requires_grad(false);
  base_projector_->eval();
}

torch::Tensor BaseView::base_logits(const torch::Tensor& images, const torch::Tensor& input_ids,
                                    const torch::Tensor& attention_mask) {
  torch::NoGradGuard ng;
  struct Restore {  // the tuned model as it was, on any exit
    LlavaModelImpl& m;
    Projector tuned;
    torch::Tensor prefix;
    double alpha;
    bool training;
    ~Restore() {
      m.multi_modal_projector = tuned;
      m.set_prompt_prefix(prefix);
      set_lora_runtime_scale(m, alpha);
      m.train(training);
    }
  } restore{model_, model_.multi_modal_projector, model_.prompt_prefix(), alpha_, model_.is_training()};
  model_.eval();
  set_lora_runtime_scale(model_, 0.0);
  model_.multi_modal_projector = base_projector_;
  model_.set_prompt_prefix(torch::Tensor());
  return model_.forward(images, input_ids, attention_mask).logits;
}

void BaseView::interpolate(double a) {
  torch::NoGradGuard ng;
  auto proj = model_.multi_modal_projector->named_parameters(true);
  if (tuned_.empty()) {
    for (const auto& p : base_projector_->named_parameters(true)) tuned_.emplace_back(p.key(), proj[p.key()].detach().clone());
  }
  for (const auto& [n, tuned] : tuned_) {
    const auto base = base_projector_->named_parameters(true)[n];
    proj[n].copy_(base + a * (tuned - base));
  }
  set_lora_runtime_scale(model_, a);
  alpha_ = a;
  if (a == 1.0) {  // the tuned model exactly, not base + 1 * (tuned - base) up to rounding
    for (const auto& [n, tuned] : tuned_) proj[n].copy_(tuned);
    tuned_.clear();
  }
}

// ---- reference data ---------------------------------------------------------------------------------------------

ReferenceStream::ReferenceStream(const RunConfig& cfg, const BaseModel& base, int64_t batch_size, uint64_t seed) {
  const auto& ref = cfg.finetune.mitigation.reference;
  const LoaderOptions lo = training_loader_options(cfg, base, batch_size, seed);
  if (ref == "generic") {
    // the tiny base's instruction stage: generic visual instructions over the pretraining pool (leak-checked)
    const auto sets = pretrain_language_sets(cfg, pretrain_sources(cfg), /*captions_only=*/false);
    for (const auto& s : sets)
      if (s->size() > 0) loaders_.push_back(std::make_unique<DataLoader>(s, base.tokenizer, PromptSpec{}, lo));
  } else {
    for (const auto& [name, dcfg] : cfg.data.datasets) {
      if (name == cfg.finetune.dataset) continue;
      auto ds = open_dataset(name, dcfg, cfg.data.root, Split::train, seed);
      PromptSpec ps{{cfg.finetune.question}, dcfg.answer};
      if (ds->size() > 0) loaders_.push_back(std::make_unique<DataLoader>(ds, base.tokenizer, ps, lo));
    }
  }
  if (loaders_.empty())
    throw ConfigError("[mitigation] finetune.mitigation.reference '" + ref + "': no reference data" +
                      (ref == "datasets" ? " (the study has no dataset besides '" + cfg.finetune.dataset + "')" : ""));
  for (auto& l : loaders_) {
    if (l->num_batches() == 0) throw ConfigError("[mitigation] a reference source yields no batches of " + std::to_string(batch_size));
    l->start_epoch(0);
  }
  pos_.assign(loaders_.size(), {0, 0});
}

ReferenceStream::~ReferenceStream() = default;

Batch ReferenceStream::at(int64_t g) {
  const int64_t s = static_cast<int64_t>(loaders_.size());
  const auto k = static_cast<size_t>(g % s);
  const int64_t j = g / s, per_epoch = loaders_[k]->num_batches();
  const std::pair<int64_t, int64_t> want{j / per_epoch, j % per_epoch};
  if (pos_[k] != want) loaders_[k]->start_epoch(want.first, want.second);  // only after a resume
  Batch b;
  if (!loaders_[k]->next(b)) throw Error("[mitigation] reference source " + std::to_string(k) + " ended early");
  pos_[k] = want.second + 1 == per_epoch ? std::make_pair(want.first + 1, int64_t{0}) : std::make_pair(want.first, want.second + 1);
  if (pos_[k].second == 0) loaders_[k]->start_epoch(pos_[k].first);
  next_ = g + 1;
  return b;
}

std::vector<std::string> ReferenceStream::sample_texts(int64_t n) const {
  std::vector<std::string> out;
  for (const auto& l : loaders_) {
    const auto& ds = l->dataset();
    for (int64_t i = 0; i < std::min<int64_t>(n, ds.size()); ++i)
      if (ds.has_text()) {
        auto [q, a] = ds.text(i);
        out.push_back(q + "\n" + a);
      }
  }
  return out;
}

int64_t replay_batch_size(double ratio, int64_t batch) {
  return std::max<int64_t>(1, std::llround(ratio / (1.0 - ratio) * static_cast<double>(batch)));
}

NamedTensors diagonal_fisher(LlavaModelImpl& model, const NamedTensors& live, const std::function<Batch()>& next,
                             int64_t batches, torch::Device device) {
  model.eval();
  std::vector<torch::Tensor> sq;
  for (const auto& [n, t] : live) sq.push_back(torch::zeros_like(t, torch::kFloat));
  for (int64_t b = 0; b < batches; ++b) {
    Batch batch = next();
    for (const auto& [n, t] : live) t.mutable_grad() = torch::Tensor();
    torch::Tensor loss = model.loss(batch.images.to(device), batch.input_ids.to(device),
                                    batch.attention_mask.to(device), batch.labels.to(device));
    loss.backward();
    torch::NoGradGuard ng;
    for (size_t i = 0; i < live.size(); ++i)
      if (live[i].second.grad().defined()) sq[i].add_(live[i].second.grad().to(torch::kFloat).pow(2));
  }
  double total = 0.0;
  int64_t elems = 0;
  for (auto& s : sq) {
    s.div_(static_cast<double>(batches));
    total += s.sum().item<double>();
    elems += s.numel();
  }
  const double mean = elems > 0 ? total / static_cast<double>(elems) : 0.0;
  NamedTensors out;
  for (size_t i = 0; i < live.size(); ++i) {
    live[i].second.mutable_grad() = torch::Tensor();
    out.emplace_back(live[i].first, mean > 0 ? sq[i] / mean : torch::ones_like(sq[i]));
  }
  return out;
}

// ---- moving average -----------------------------------------------------------------------------------------------

WeightAverage::WeightAverage(const NamedTensors& live, double decay) : live_(live), decay_(decay) {
  torch::NoGradGuard ng;
  for (const auto& [n, t] : live) avg_.emplace_back(n, t.detach().clone());
}

void WeightAverage::update() {
  torch::NoGradGuard ng;
  for (size_t i = 0; i < live_.size(); ++i) avg_[i].second.mul_(decay_).add_(live_[i].second.detach(), 1.0 - decay_);
}

void WeightAverage::swap() {
  torch::NoGradGuard ng;
  for (size_t i = 0; i < live_.size(); ++i) {
    torch::Tensor keep = live_[i].second.detach().clone();
    live_[i].second.detach().copy_(avg_[i].second);
    avg_[i].second.copy_(keep);
  }
}

NamedTensors WeightAverage::state() const {
  NamedTensors out;
  for (const auto& [n, t] : avg_) out.emplace_back(kEmaPrefix + n, t);
  return out;
}

NamedTensors WeightAverage::load_state(const NamedTensors& tensors, const std::string& source) {
  NamedTensors rest;
  std::map<std::string, torch::Tensor> ema;
  const std::string prefix = kEmaPrefix;
  for (const auto& [n, t] : tensors) {
    if (n.rfind(prefix, 0) == 0)
      ema[n.substr(prefix.size())] = t;
    else
      rest.emplace_back(n, t);
  }
  torch::NoGradGuard ng;
  for (auto& [n, t] : avg_) {
    auto it = ema.find(n);
    if (it == ema.end())
      throw FormatError("[mitigation] " + source + ": no moving average '" + prefix + n +
                        "' (a checkpoint of the ema method holds one per trained tensor)");
    if (!it->second.sizes().equals(t.sizes()))
      throw FormatError("[mitigation] " + source + ": '" + prefix + n + "' has another shape than the tensor");
    t.copy_(it->second);
  }
  return rest;
}

}  // namespace emt
