// Base-model loading, the causal-LM objective, and fine-tuning with the one Trainer.
#include <emt/adapters/peft.h>
#include <emt/core/dataset.h>
#include <emt/core/hf_checkpoint.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <emt/train/finetune.h>
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
    save_lora_adapter(model, ft.lora, dir, so);
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

StepLoss LlavaObjective::loss(const Batch& batch) {
  StepLoss s;
  s.loss = model_->loss(batch.images.to(device_), batch.input_ids.to(device_), batch.attention_mask.to(device_),
                        batch.labels.to(device_));
  if (term_) {
    torch::Tensor extra = term_(LossTermInput{batch, s.loss, *model_, trained_});
    if (!extra.defined() || extra.numel() != 1)
      throw Error("[finetune] the method's loss term must return a scalar tensor (one element)");
    s.loss = s.loss + extra.reshape({}).to(s.loss.scalar_type());
  }
  s.samples = batch.size();
  s.tokens = (batch.labels != -100).sum().item<int64_t>();  // labels live on the host: no device sync
  // the decoder's sequence: the unpadded text, each image token replaced by the image's tokens
  s.processed = batch.attention_mask.sum().item<int64_t>() +
                (batch.images.defined() ? batch.size() * (model_->options.num_image_tokens() - 1) : 0);
  return s;
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
  LoaderOptions lo;
  lo.batch_size = ft.batch_size;
  lo.shuffle = true;
  lo.with_answer = true;
  lo.seed = static_cast<uint64_t>(cfg.run.seed);
  lo.workers = cfg.data.workers;
  lo.prefetch = cfg.data.prefetch;
  lo.padding_side = "right";
  lo.conversation = base.conversation;
  lo.system = base.system;
  lo.image = base.image;
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
  auto source = loader_source(loader);
  TrainableIO io;
  torch::Tensor prompt = setup.prompt_embeddings;
  io.get = [&base, prompt] { return trainable_tensors(*base.model, prompt); };
  io.set = [&base, prompt](const NamedTensors& t) { load_trainable_tensors(*base.model, t, prompt, "checkpoint"); };
  io.save_artifacts = [&base, &cfg, setup](const std::string& dir) {
    save_method_artifacts(*base.model, setup, cfg.finetune, dir, base_model_dir(cfg));
  };
  TrainerOptions to = trainer_options(ft, cfg.run);
  to.run_dir = opts.run_dir;
  to.config_yaml = config_to_yaml(cfg);
  to.compat = resume_compat(cfg);
  to.resume = opts.resume;
  to.progress = opts.progress;
  to.label = ft.method + "/" + ft.dataset;
  to.comm = opts.comm;
  Trainer trainer(objective, *source, setup.groups, io, to);
  if (opts.on_epoch) trainer.on_epoch_end(opts.on_epoch);
  return trainer.fit();
}

}  // namespace emt
