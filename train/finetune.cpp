// Base-model loading, the causal-LM objective, and fine-tuning with the one Trainer.
#include <emt/adapters/peft.h>
#include <emt/core/dataset.h>
#include <emt/core/hf_checkpoint.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <emt/train/finetune.h>
#include <emt/train/mitigation.h>
#include <emt/train/pretrain.h>
#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <mutex>
#include <optional>

namespace emt {
namespace fs = std::filesystem;

std::string base_model_dir(const RunConfig& cfg) {
  return cfg.model.pretrained.empty() ? cfg.pretrain.cache_dir : cfg.model.pretrained;
}

BaseModel load_base_model(const RunConfig& cfg) {
  BaseModel b;
  b.dir = base_model_dir(cfg);
  if (!fs::exists(fs::path(b.dir) / "config.json")) {
    if (cfg.model.pretrained.empty())
      throw IoError("[finetune] the tiny base model is missing: '" + b.dir +
                    "/config.json' not found; build it with `emt pretrain CONFIG` (emt study does it for you)");
    throw IoError("[finetune] model.pretrained: '" + b.dir + "' has no config.json (expected an HF model directory)");
  }
  // A cached base built from another recipe is used as it is (scoring it under other settings is legitimate),
  // but said: `emt study` and `emt train` rebuild it first, `emt score`, `emt generate` and `emt eval` do not.
  const fs::path recipe = fs::path(b.dir) / "recipe.yaml";
  if (cfg.model.pretrained.empty() && fs::exists(recipe) && read_file(recipe.string()) != pretrain_recipe(cfg))
    log_warn("[finetune] {} was built by another recipe than this config's (a pretrain.*, model, dataset, seed or "
             "dtype setting differs; `emt pretrain CONFIG --print-recipe` prints this config's): using it as it is; "
             "`emt pretrain CONFIG` rebuilds it", b.dir);
  b.device = resolve_device(cfg.run.device);
  b.model = load_llava(b.dir, parse_dtype(cfg.run.dtype), b.device, cfg.model.vision_tower);
  b.tokenizer = cfg.model.tokenizer.empty() ? std::shared_ptr<Tokenizer>(load_hf_tokenizer(b.dir))
                                            : std::shared_ptr<Tokenizer>(load_sentencepiece(cfg.model.tokenizer));
  int64_t image_id = b.tokenizer->special_token_id("<image>");
  if (image_id < 0) image_id = b.tokenizer->add_special_token("<image>");
  if (b.model->image_token_id >= 0 && b.model->image_token_id != image_id)
    throw FormatError("[finetune] " + b.dir + ": config.json image_token_index " +
                      std::to_string(b.model->image_token_id) + " but the tokenizer maps <image> to " +
                      std::to_string(image_id));
  b.model->image_token_id = image_id;
  auto pre = fs::path(b.dir) / "preprocessor_config.json";
  if (!fs::exists(pre) && !cfg.model.vision_tower.empty())  // the original layout: the CLIP folder's preprocessing
    pre = fs::path(cfg.model.vision_tower) / "preprocessor_config.json";
  b.image = fs::exists(pre) ? load_hf_preprocessor_config(pre.string())
                            : image_options_for_size(b.model->options.vision.image_size);
  b.conversation = cfg.model.conversation;
  b.system = cfg.model.system_prompt;
  b.model->eval();
  return b;
}

namespace {
// The user-facing files of a checkpoint: PEFT adapter (LoRA or prompt tuning) and the projector in LLaVA's
// mm_projector naming, so `emt generate --adapter RUN/epoch_K` and Python PEFT can use them directly.
void save_method_artifacts(LlavaModelImpl& model, const TrainableSetup& setup, const FinetuneSection& ft,
                           const std::string& dir, const std::string& base_dir) {
  const auto& p = setup.policy;
  if (p.llm == ComponentMode::Lora || p.vision == ComponentMode::Lora || p.projector == ComponentMode::Lora) {
    LoraSaveOptions so;
    so.base_model_name_or_path = base_dir;
    if (p.projector == ComponentMode::Full) so.modules_to_save = {kProjectorRoot};
    save_lora_adapter(model, lora_for_method(ft.method, ft.lora), dir, so);
  } else if (p.prompt) {
    PromptAdapterMeta meta;
    meta.base_model_name_or_path = base_dir;
    meta.tokenizer_name_or_path = base_dir;
    meta.init = ft.prompt_tuning.init;
    meta.init_text = ft.prompt_tuning.init_text;
    meta.num_attention_heads = model.options.llm.num_heads;
    meta.num_layers = model.options.llm.num_layers;
    save_prompt_adapter(dir, setup.prompt_embeddings, meta);
  }
  if (p.projector == ComponentMode::Full)
    save_projector_file(*model.multi_modal_projector, dir + "/mm_projector.safetensors");
}
}  // namespace

namespace {
// Every token the decoder processes for a batch: the unpadded text, each image token replaced by the image's tokens.
int64_t processed_tokens(const Batch& b, const LlavaOptions& o) {
  return b.attention_mask.sum().item<int64_t>() + (b.images.defined() ? b.size() * (o.num_image_tokens() - 1) : 0);
}
}  // namespace

StepLoss LlavaObjective::loss(const Batch& batch) {
  StepLoss s;
  if (teacher_) {
    const auto images = batch.images.to(device_), ids = batch.input_ids.to(device_),
               mask = batch.attention_mask.to(device_), labels = batch.labels.to(device_);
    LlavaOutput out = model_->forward(images, ids, mask, labels);
    const torch::Tensor base = teacher_->base_logits(images, ids, mask);
    s.loss = out.loss + kd_weight_ * distillation_kl(out.logits, base, out.labels, kd_temperature_).to(out.loss.scalar_type());
  } else {
    // The batch as it comes (on the host from the loader): the model decides positions there and copies to its
    // device itself, so the loss costs no device-to-host sync.
    s.loss = model_->loss(batch.images, batch.input_ids, batch.attention_mask, batch.labels);
  }
  int64_t replayed = 0;
  if (replay_) {
    const Batch r = replay_(batch.epoch * replay_per_epoch_ + batch.number);
    const torch::Tensor lr = model_->loss(r.images, r.input_ids, r.attention_mask, r.labels);
    s.loss = (1.0 - replay_ratio_) * s.loss + replay_ratio_ * lr.to(s.loss.scalar_type());
    replayed = processed_tokens(r, model_->options);
  }
  if (term_) {
    torch::Tensor extra = term_(LossTermInput{batch, s.loss, *model_, trained_});
    if (!extra.defined() || extra.numel() != 1)
      throw Error("[finetune] the method's loss term must return a scalar tensor (one element)");
    s.loss = s.loss + extra.reshape({}).to(s.loss.scalar_type());
  }
  s.samples = batch.size();
  s.tokens = (batch.labels != -100).sum().item<int64_t>();  // labels live on the host: no device sync
  s.processed = processed_tokens(batch, model_->options) + replayed;
  return s;
}

void LlavaObjective::set_distillation(std::shared_ptr<BaseView> base, double weight, double temperature) {
  teacher_ = std::move(base);
  kd_weight_ = weight;
  kd_temperature_ = temperature;
}

void LlavaObjective::set_replay(std::function<Batch(int64_t)> data, double ratio, int64_t batches_per_epoch) {
  replay_ = std::move(data);
  replay_ratio_ = ratio;
  replay_per_epoch_ = std::max<int64_t>(1, batches_per_epoch);
}

void LlavaObjective::set_train(bool on) { model_->train(on); }

void LlavaObjective::set_loss_term(LossTerm term, NamedTensors trained) {
  term_ = std::move(term);
  trained_ = std::move(trained);
}

namespace {
std::mutex g_methods_mutex;
std::map<std::string, MethodSpec>& registered_methods() {
  static std::map<std::string, MethodSpec> m;
  return m;
}
std::optional<MethodSpec> registered_method(const std::string& name) {
  std::lock_guard<std::mutex> l(g_methods_mutex);
  auto it = registered_methods().find(name);
  if (it == registered_methods().end()) return std::nullopt;
  return it->second;
}

// Every trained tensor by name, live (what a loss term differentiates through).
NamedTensors live_trained(LlavaModelImpl& model, const torch::Tensor& prompt) {
  NamedTensors out;
  for (const auto& p : model.named_parameters())
    if (p.value().requires_grad()) out.emplace_back(p.key(), p.value());
  if (prompt.defined()) out.emplace_back("prompt_embeddings", prompt);
  return out;
}
}  // namespace

void register_method(const std::string& name, MethodSpec spec) {
  add_extension_name(ExtensionKind::method, name, spec.base);  // validates the name and the base
  std::lock_guard<std::mutex> l(g_methods_mutex);
  registered_methods()[name] = std::move(spec);
}

LoaderOptions training_loader_options(const RunConfig& cfg, const BaseModel& base, int64_t batch_size, uint64_t seed) {
  LoaderOptions lo;
  lo.batch_size = batch_size;
  lo.shuffle = true;
  lo.with_answer = true;
  lo.seed = seed;
  lo.workers = cfg.data.workers;
  lo.prefetch = cfg.data.prefetch;
  lo.padding_side = "right";
  lo.conversation = base.conversation;
  lo.system = base.system;
  lo.image = base.image;
  return lo;
}

namespace {
// The moving average in the live tensors for one scope (no-op without one), swapped back on any exit.
class AverageSwapped {
 public:
  explicit AverageSwapped(WeightAverage* avg) : avg_(avg) {
    if (avg_) avg_->swap();
  }
  ~AverageSwapped() {
    if (avg_) avg_->swap();
  }
  AverageSwapped(const AverageSwapped&) = delete;
  AverageSwapped& operator=(const AverageSwapped&) = delete;

 private:
  WeightAverage* avg_;
};

// What a mitigation method adds to the objective; returns the moving average for ema (null otherwise).
std::shared_ptr<WeightAverage> add_mitigation(LlavaObjective& objective, BaseModel& base, const RunConfig& cfg,
                                              const TrainableSetup& setup, int64_t batches_per_epoch,
                                              const FinetuneOptions& opts) {
  const auto& ft = cfg.finetune;
  const auto& mc = ft.mitigation;
  const std::string mit = split_method(ft.method).mitigation;
  if (mit.empty() || mit == "wise-ft") {  // wise-ft trains as its base method; the study scores the interpolations
    if (mit == "wise-ft" && (setup.policy.prompt || setup.policy.llm == ComponentMode::Full ||
                             setup.policy.vision == ComponentMode::Full))
      throw ConfigError("[finetune] finetune.method '" + ft.method +
                        "': wise-ft interpolates LoRA and the projector, so its method must train only those");
    return nullptr;
  }
  NamedTensors live = live_trained(*base.model, setup.prompt_embeddings), initial;
  for (const auto& [n, t] : live) initial.emplace_back(n, t.detach().clone());
  const uint64_t seed = static_cast<uint64_t>(cfg.run.seed) + 7919u * static_cast<uint64_t>(opts.comm ? opts.comm->rank() : 0);
  if (mit == "l2sp") {
    const double w = mc.l2sp_weight;
    objective.set_loss_term([w, initial](const LossTermInput& in) { return w * weighted_sq_distance(in.trained, initial); },
                            live);
  } else if (mit == "ewc") {
    ReferenceStream ref(cfg, base, ft.batch_size, seed);
    NamedTensors fisher =
        diagonal_fisher(*base.model, live, [&ref] { return ref.next(); }, mc.ewc_fisher_batches, base.device);
    log_info("[finetune] ewc: diagonal Fisher from {} reference batches of {} ({} source(s))", mc.ewc_fisher_batches,
             ft.batch_size, ref.sources());
    const double w = mc.ewc_weight;
    objective.set_loss_term(
        [w, initial, fisher](const LossTermInput& in) { return w * weighted_sq_distance(in.trained, initial, fisher); },
        live);
  } else if (mit == "lwf") {
    if (setup.policy.llm == ComponentMode::Full || setup.policy.vision == ComponentMode::Full)
      throw ConfigError("[finetune] finetune.method '" + ft.method +
                        "': lwf sees the base inside the tuned model (LoRA scale 0, base projector), so its method "
                        "must not train the LLM or the vision tower in full");
    objective.set_distillation(std::make_shared<BaseView>(*base.model), mc.lwf_weight, mc.lwf_temperature);
  } else if (mit == "replay") {
    const int64_t rb = replay_batch_size(mc.replay_ratio, ft.batch_size);
    auto ref = std::make_shared<ReferenceStream>(cfg, base, rb, seed);
    log_info("[finetune] replay: {} reference samples beside every {} fine-tuning samples ({} source(s))", rb,
             ft.batch_size, ref->sources());
    objective.set_replay([ref](int64_t g) { return ref->at(g); }, mc.replay_ratio, batches_per_epoch);
  } else if (mit == "ema") {
    return std::make_shared<WeightAverage>(live, mc.ema_decay);
  }
  return nullptr;
}
}  // namespace

TrainSummary finetune(BaseModel& base, const RunConfig& cfg, const FinetuneOptions& opts) {
  const auto& ft = cfg.finetune;
  if (ft.dataset.empty()) throw ConfigError("[finetune] finetune.dataset: must name the dataset to fine-tune on");
  auto it = cfg.data.datasets.find(ft.dataset);
  if (it == cfg.data.datasets.end())
    throw ConfigError("[finetune] finetune.dataset: '" + ft.dataset + "' is not in data.datasets");
  const DatasetConfig& dcfg = it->second;
  auto train = open_dataset(ft.dataset, dcfg, cfg.data.root, Split::train, static_cast<uint64_t>(cfg.run.seed));

  PromptSpec prompts;
  prompts.questions = {ft.question};
  prompts.answer_template = dcfg.answer;
  LoaderOptions lo = training_loader_options(cfg, base, ft.batch_size, static_cast<uint64_t>(cfg.run.seed));
  lo.skip_bad = dcfg.skip_bad;
  if (opts.comm) {
    lo.rank = opts.comm->rank();
    lo.world_size = opts.comm->world_size();
    lo.even_shards = true;  // every rank the same number of batches: the ranks step together
  }
  DataLoader loader(train, base.tokenizer, prompts, lo);

  TrainableSetup setup = apply_method(*base.model, ft, base.tokenizer.get());
  base.model->language_model->model->grad_checkpointing = ft.grad_checkpointing;
  log_info("[finetune] {} on {}: {} ({} of {} parameters trainable, {} LoRA modules){}", ft.method, ft.dataset,
           describe_policy(setup.policy), setup.trainable, setup.total, setup.lora_modules.size(),
           opts.comm ? fmt::format("; {} data-parallel ranks of batch {} (combined batch {})", opts.comm->world_size(),
                                   ft.batch_size, ft.batch_size * opts.comm->world_size())
                     : "");

  LlavaObjective objective(base.model, base.device);
  if (auto spec = registered_method(ft.method); spec && spec->make_loss_term) {
    NamedTensors live = live_trained(*base.model, setup.prompt_embeddings), initial;
    for (const auto& [n, t] : live) initial.emplace_back(n, t.detach().clone());
    if (LossTerm term = spec->make_loss_term(initial)) objective.set_loss_term(std::move(term), std::move(live));
  }
  std::shared_ptr<WeightAverage> ema = add_mitigation(objective, base, cfg, setup, loader.num_batches(), opts);
  auto source = loader_source(loader);
  TrainableIO io;
  torch::Tensor prompt = setup.prompt_embeddings;
  io.get = [&base, prompt, ema] {
    NamedTensors t = trainable_tensors(*base.model, prompt);
    if (ema)
      for (auto& e : ema->state()) t.push_back(std::move(e));
    return t;
  };
  io.set = [&base, prompt, ema](const NamedTensors& t) {
    load_trainable_tensors(*base.model, ema ? ema->load_state(t, "checkpoint") : t, prompt, "checkpoint");
  };
  io.save_artifacts = [&base, &cfg, setup, ema](const std::string& dir) {
    AverageSwapped scope(ema.get());  // an ema checkpoint's adapter files hold the average: what the study scores
    save_method_artifacts(*base.model, setup, cfg.finetune, dir, base_model_dir(cfg));
  };
  TrainerOptions to = trainer_options(ft, cfg.run);
  if (ema) to.after_step = [ema] { ema->update(); };
  to.run_dir = opts.run_dir;
  to.config_yaml = config_to_yaml(cfg);
  to.compat = resume_compat(cfg);
  to.resume = opts.resume;
  to.progress = opts.progress;
  to.label = ft.method + "/" + ft.dataset;
  to.comm = opts.comm;
  Trainer trainer(objective, *source, setup.groups, io, to);
  if (opts.on_epoch) {
    auto cb = opts.on_epoch;
    trainer.on_epoch_end([cb, ema](const EpochEnd& e) {
      AverageSwapped scope(ema.get());  // scored: the moving average
      cb(e);
    });
  }
  return trainer.fit();
}

void load_scored_weights(LlavaModelImpl& model, const TrainableSetup& setup, const std::string& method,
                         const std::string& trainable_file) {
  SafetensorsReader r(trainable_file);
  NamedTensors t;
  for (const auto& n : r.names()) t.emplace_back(n, r.load(n));
  if (split_method(method).mitigation == "ema") {
    WeightAverage avg(live_trained(model, setup.prompt_embeddings), 0.5);
    t = avg.load_state(t, trainable_file);  // the trained tensors, with the average kept aside
    load_trainable_tensors(model, t, setup.prompt_embeddings, trainable_file);
    avg.swap();  // the model now holds the average
    return;
  }
  load_trainable_tensors(model, t, setup.prompt_embeddings, trainable_file);
}

}  // namespace emt
