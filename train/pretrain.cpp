// The tiny base-model recipe: tokenizer training, contrastive CLIP, projector alignment, instruction tuning, all
// with the one Trainer; writes an HF-layout directory that load_llava/load_hf_tokenizer read back.
#include <emt/adapters/policy.h>
#include <emt/core/conversation.h>
#include <emt/core/generate.h>
#include <emt/core/hf_checkpoint.h>
#include <emt/core/image.h>
#include <emt/core/llava.h>
#include <emt/core/loader.h>
#include <emt/core/log.h>
#include <emt/core/runtime.h>
#include <emt/core/tokenizer.h>
#include <emt/train/finetune.h>
#include <emt/train/pretrain.h>
#include <emt/train/trainer.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

namespace emt {
namespace fs = std::filesystem;
using json = nlohmann::json;

// ---- mixture -------------------------------------------------------------------------------------------------

MixtureDataset::MixtureDataset(std::vector<Part> parts, bool text_mode)
    : parts_(std::move(parts)), text_mode_(text_mode) {
  std::vector<std::string> names;
  for (const auto& p : parts_) {
    starts_.push_back(total_);
    label_offsets_.push_back(static_cast<int64_t>(names.size()));
    total_ += p.dataset->size();
    for (const auto& n : p.dataset->class_names()) names.push_back(n);
    if (text_mode_ && p.questions.empty())
      throw ConfigError("[pretrain] mixture part '" + p.dataset->name() + "' has no question");
  }
  set_class_names(std::move(names));
  set_name("mixture");
}

std::pair<size_t, int64_t> MixtureDataset::locate(int64_t i) const {
  TORCH_CHECK(i >= 0 && i < total_, "mixture index ", i, " out of range ", total_);
  size_t k = static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), i) - starts_.begin()) - 1;
  return {k, i - starts_[k]};
}

int64_t MixtureDataset::label(int64_t i) const {
  auto [k, j] = locate(i);
  return label_offsets_[k] + parts_[k].dataset->label(j);
}

torch::Tensor MixtureDataset::image(int64_t i) const {
  auto [k, j] = locate(i);
  auto img = parts_[k].dataset->image(j);
  // Grey and colour datasets meet in one batch: always hand out 3 channels.
  if (img.dim() == 3 && img.size(2) == 1) img = img.expand({img.size(0), img.size(1), 3}).contiguous();
  return img;
}

std::string MixtureDataset::source(int64_t i) const {
  auto [k, j] = locate(i);
  return parts_[k].dataset->name() + ": " + parts_[k].dataset->source(j);
}

std::pair<std::string, std::string> MixtureDataset::text(int64_t i) const {
  auto [k, j] = locate(i);
  const auto& p = parts_[k];
  // A fixed multiplicative hash spreads the paraphrases evenly over the samples.
  uint64_t h = static_cast<uint64_t>(j) * 0x9E3779B97F4A7C15ull;
  const auto& q = p.questions[(h >> 33) % p.questions.size()];
  const auto& names = p.dataset->class_names();
  return {q, fill_label(p.answer_template, names.at(static_cast<size_t>(p.dataset->label(j))))};
}

std::vector<std::string> question_paraphrases(const std::string& emt_question, bool digits) {
  // Other lead questions, the same instruction (and so the same label list): every prompt names the label space,
  // so datasets whose labels overlap (shapes10 "circle", objects60 "red circle") never get contradicting targets.
  const auto q = emt_question.find("? ");
  if (q == std::string::npos) return {emt_question};  // a custom prompt: no safe way to paraphrase it
  const std::string rest = emt_question.substr(q + 1);
  const std::vector<std::string> leads =
      digits ? std::vector<std::string>{"Which digit is shown?", "What number is in the picture?",
                                        "Read the digit in the image."}
             : std::vector<std::string>{"What is shown in the image?", "Which object does the picture show?",
                                        "Name the object in the image."};
  std::vector<std::string> out;
  for (const auto& l : leads) out.push_back(l + rest);
  return out;
}

// ---- objectives ----------------------------------------------------------------------------------------------

namespace {

// Contrastive image-text loss against the caption of every class of the image's own dataset: each image must pick
// its class caption among its dataset's captions (CLIP's loss with the batch's captions replaced by that label
// space, as zero-shot classification asks it). Same-class images in a batch are never false negatives, and
// datasets whose label spaces overlap (shapes10 "circle", objects60 "red circle") never compete.
class ClipObjective : public Objective {
 public:
  // caption_group: [C] the dataset index of every caption (class) of the mixture.
  ClipObjective(ClipModel clip, torch::Tensor caption_ids, torch::Tensor caption_mask, torch::Tensor caption_group,
                torch::Device dev)
      : clip_(std::move(clip)), ids_(caption_ids.to(dev)), mask_(caption_mask.to(dev)), group_(caption_group.to(dev)),
        dev_(dev) {}
  StepLoss loss(const Batch& batch) override {
    auto img = torch::nn::functional::normalize(clip_->image_features(batch.images.to(dev_)),
                                                torch::nn::functional::NormalizeFuncOptions().dim(-1));
    auto txt = torch::nn::functional::normalize(clip_->text_features(ids_, mask_),
                                                torch::nn::functional::NormalizeFuncOptions().dim(-1));
    auto logits = clip_->logit_scale.exp().clamp_max(100.0) * img.matmul(txt.t());
    auto target = torch::tensor(batch.class_ids, torch::kLong).to(dev_);
    auto other = group_.unsqueeze(0).ne(group_.index_select(0, target).unsqueeze(1));
    logits = logits.masked_fill(other, -1e4);
    return {torch::nn::functional::cross_entropy(logits, target), batch.size(), batch.size()};
  }
  void set_train(bool on) override { clip_->train(on); }

 private:
  ClipModel clip_;
  torch::Tensor ids_, mask_, group_;
  torch::Device dev_;
};

std::vector<ParamGroup> all_params_groups(torch::nn::Module& m, double lr) {
  ParamGroup decay{"default", {}, lr, true}, nodecay{"no_decay", {}, lr, false};
  for (auto& p : m.parameters()) {
    if (!p.requires_grad()) continue;
    (p.dim() >= 2 ? decay : nodecay).params.push_back(p);
  }
  std::vector<ParamGroup> out;
  if (!decay.params.empty()) out.push_back(decay);
  if (!nodecay.params.empty()) out.push_back(nodecay);
  return out;
}

// Captions "a photo of a {label}." for every class, tokenised with bos/eos and right-padded.
std::pair<torch::Tensor, torch::Tensor> caption_tensors(const Tokenizer& tok, const std::vector<std::string>& names,
                                                        int64_t max_len) {
  std::vector<std::vector<int64_t>> seqs;
  int64_t longest = 0;
  for (const auto& n : names) {
    auto ids = tok.encode("a photo of a " + n + ".", true, true);
    if (static_cast<int64_t>(ids.size()) > max_len)
      throw ConfigError("[pretrain] caption for class '" + n + "' has " + std::to_string(ids.size()) +
                        " tokens, more than model.clip_text.max_position_embeddings " + std::to_string(max_len));
    longest = std::max<int64_t>(longest, static_cast<int64_t>(ids.size()));
    seqs.push_back(std::move(ids));
  }
  auto ids = torch::full({static_cast<int64_t>(names.size()), longest}, tok.pad_id(), torch::kLong);
  auto mask = torch::zeros_like(ids);
  for (size_t i = 0; i < seqs.size(); ++i)
    for (size_t j = 0; j < seqs[i].size(); ++j) ids[i][j] = seqs[i][j], mask[i][j] = 1;
  return {ids, mask};
}

// Batches drawn from several loaders, one loader per batch, in a seeded order per epoch: prompts of one kind
// (a dataset's paraphrases, or its long EMT prompt listing every label) share a batch, so short prompts are
// never padded to the longest one.
class GroupedSource : public BatchSource {
 public:
  GroupedSource(std::vector<std::unique_ptr<DataLoader>> loaders, uint64_t seed)
      : loaders_(std::move(loaders)), seed_(seed) {}
  int64_t num_batches() const override {
    int64_t n = 0;
    for (const auto& l : loaders_) n += l->num_batches();
    return n;
  }
  void start_epoch(int64_t epoch, int64_t skip) override {
    order_.clear();
    for (size_t k = 0; k < loaders_.size(); ++k) {
      loaders_[k]->start_epoch(epoch, 0);
      for (int64_t b = 0; b < loaders_[k]->num_batches(); ++b) order_.push_back(k);
    }
    std::mt19937_64 rng(seed_ * 1000003ull + static_cast<uint64_t>(epoch));
    std::shuffle(order_.begin(), order_.end(), rng);
    pos_ = 0;
    Batch dummy;
    for (int64_t i = 0; i < skip && next(dummy); ++i) {
    }
  }
  bool next(Batch& out) override {
    while (pos_ < order_.size()) {
      if (loaders_[order_[pos_++]]->next(out)) return true;
    }
    return false;
  }

 private:
  std::vector<std::unique_ptr<DataLoader>> loaders_;
  uint64_t seed_;
  std::vector<size_t> order_;
  size_t pos_ = 0;
};

struct Stage {
  std::string name;
  int64_t steps;
};

TrainerOptions stage_options(const RunConfig& cfg, const std::string& label, int64_t steps, torch::Device dev) {
  TrainerOptions o;
  o.epochs = 0;  // steps decide
  o.max_steps = steps;
  o.schedule = "cosine";
  o.warmup_ratio = 0.05;
  o.weight_decay = 0.01;
  o.max_grad_norm = 1.0;
  o.device = dev;
  o.label = label;
  o.handle_signals = false;
  o.log_every_steps = 50;
  return o;
}

std::string write_corpus(const std::string& path, const std::vector<std::string>& lines) {
  std::string text;
  for (int rep = 0; rep < 4; ++rep)
    for (const auto& l : lines) text += l + "\n";
  write_file_atomic(path, text);
  return path;
}

}  // namespace

// ---- the recipe ----------------------------------------------------------------------------------------------

std::string pretrain_recipe(const RunConfig& cfg) {
  RunConfig r;  // only what shapes the result
  r.model = cfg.model;
  r.model.pretrained.clear();
  r.data.datasets = cfg.data.datasets;
  // The recipe draws its own subsets (pretrain.train_max_samples): the fine-tuning bounds do not shape it.
  for (auto& [name, d] : r.data.datasets) d.train_max_samples = DatasetConfig{}.train_max_samples;
  r.pretrain = cfg.pretrain;
  r.pretrain.cache_dir.clear();
  r.run.seed = cfg.run.seed;
  r.run.dtype = cfg.run.dtype;
  return "# emt tiny base-model recipe (the cache is reused while this text is unchanged)\nrecipe_version: 2\n" +
         config_to_yaml(r);
}

PretrainReport pretrain_tiny(const RunConfig& cfg, const PretrainOptions& opts) {
  PretrainReport rep;
  rep.dir = cfg.pretrain.cache_dir;
  const std::string recipe = pretrain_recipe(cfg);
  const fs::path dir(rep.dir);
  if (!opts.force && fs::exists(dir / "recipe.yaml") && fs::exists(dir / "config.json") &&
      read_file((dir / "recipe.yaml").string()) == recipe) {
    rep.reused = true;
    if (fs::exists(dir / "pretrain_report.json")) {
      auto j = json::parse(read_file((dir / "pretrain_report.json").string()));
      rep.exact_match = j.value("exact_match", std::map<std::string, double>{});
      rep.clip_zero_shot = j.value("clip_zero_shot", std::map<std::string, double>{});
      rep.seconds = j.value("seconds", 0.0);
    }
    log_info("[pretrain] reusing the tiny base model in {} (recipe unchanged)", rep.dir);
    return rep;
  }
  auto t0 = std::chrono::steady_clock::now();
  const auto dev = resolve_device(cfg.run.device);
  set_threads(cfg.run.threads);
  seed_everything(static_cast<uint64_t>(cfg.run.seed));
  const uint64_t seed = static_cast<uint64_t>(cfg.run.seed);

  std::vector<std::string> names = cfg.pretrain.datasets;
  if (names.empty())
    for (const auto& [n, _] : cfg.data.datasets) names.push_back(n);
  if (names.empty()) throw ConfigError("[pretrain] data.datasets is empty: nothing to pretrain on");

  // Datasets (train subsets) and their questions.
  struct Src {
    std::string name;
    DatasetConfig cfg;
    std::shared_ptr<ImageDataset> train;
    std::string emt_question;
    bool digits;
  };
  std::vector<Src> srcs;
  for (const auto& n : names) {
    Src s;
    s.name = n;
    s.cfg = cfg.data.datasets.at(n);
    // The recipe picks its own subset: data.datasets.*.train_max_samples limits fine-tuning, not pretraining.
    auto full = open_dataset_full(n, s.cfg, cfg.data.root, Split::train);
    auto idx = choose_subset(*full, cfg.pretrain.train_max_samples, true, seed);
    s.train = subset(full, idx);
    s.train->set_name(n);
    s.train->set_class_names(full->class_names());
    s.emt_question = dataset_question(n, s.cfg, full->class_names());
    s.digits = is_digit_dataset(s.cfg, full->class_names());
    srcs.push_back(std::move(s));
  }

  // Tokenizer trained on every text the model will see.
  const fs::path staging = fs::path(rep.dir + ".tmp." + std::to_string(::getpid()));
  std::error_code ec;
  fs::remove_all(staging, ec);
  fs::create_directories(staging / "clip");
  std::vector<std::string> lines;
  for (const auto& s : srcs) {
    lines.push_back(render_prompt(cfg.model.conversation, cfg.model.system_prompt, s.emt_question));
    for (const auto& q : question_paraphrases(s.emt_question, s.digits)) lines.push_back(q);
    for (const auto& c : s.train->class_names()) {
      lines.push_back(answer_text(s.cfg, c));
      lines.push_back("a photo of a " + c + ".");
    }
  }
  lines.push_back(cfg.finetune.question);
  write_corpus((staging / "corpus.txt").string(), lines);
  SentencePieceTrainOptions so;
  so.vocab_size = cfg.pretrain.tokenizer_vocab;
  so.user_defined_symbols = {"<image>"};
  so.split_by_unicode_script = false;  // "circle," one piece: the EMT label lists need ~30% fewer tokens
  so.pad_id = 2;  // a real padding piece, and eos off id 2 (HF CLIP pools at argmax when eos_token_id == 2)
  so.eos_id = 3;
  try {
    train_sentencepiece((staging / "corpus.txt").string(), (staging / "tokenizer").string(), so);
  } catch (const Error& e) {
    // A small label space cannot fill a large vocabulary: SentencePiece names the largest size it can reach.
    std::string msg = e.what();
    auto at = msg.find("value <= ");
    if (at == std::string::npos) throw;
    so.vocab_size = std::stoll(msg.substr(at + 9));
    log_warn("[pretrain] pretrain.tokenizer_vocab {} is more than this corpus supports; using {}",
             cfg.pretrain.tokenizer_vocab, so.vocab_size);
    train_sentencepiece((staging / "corpus.txt").string(), (staging / "tokenizer").string(), so);
  }
  std::shared_ptr<Tokenizer> tok = load_sentencepiece((staging / "tokenizer.model").string());
  const int64_t image_id = tok->special_token_id("<image>") >= 0 ? tok->special_token_id("<image>")
                                                                  : tok->add_special_token("<image>");
  const int64_t vocab = tok->vocab_size();
  log_info("[pretrain] tokenizer: {} pieces, <image> = {}", vocab, image_id);

  // Model shapes follow the tokenizer.
  ModelSection ms = cfg.model;
  ms.llm.vocab_size = static_cast<int>(vocab);
  ms.clip_text.vocab_size = static_cast<int>(vocab);
  LlavaModel llava = build_llava(ms, image_id);
  ClipOptions co = clip_options(ms.vision, ms.clip_text);
  co.text.eos_token_id = tok->eos_id();
  ClipModel clip(co);
  // One vision tower, shared: what CLIP learns is what the LLM sees.
  clip->vision_model = clip->replace_module("vision_model", llava->vision_tower->vision_model);
  llava->to(dev);
  clip->to(dev);
  const auto image_opts = image_options_for_size(ms.vision.image_size);

  std::vector<MixtureDataset::Part> parts;
  for (const auto& s : srcs) {
    std::vector<std::string> qs = question_paraphrases(s.emt_question, s.digits);
    // The EMT prompt is what the study asks: give it half of the samples.
    for (size_t i = 0, n = qs.size(); i < n; ++i) qs.push_back(s.emt_question);
    parts.push_back({s.train, qs, s.cfg.answer});
  }
  auto mixture = std::make_shared<MixtureDataset>(parts, /*text_mode=*/true);
  LoaderOptions lo;
  lo.batch_size = cfg.pretrain.batch_size;
  lo.seed = seed;
  lo.workers = cfg.data.workers;
  lo.prefetch = cfg.data.prefetch;
  lo.conversation = cfg.model.conversation;
  lo.system = cfg.model.system_prompt;
  lo.image = image_opts;
  lo.drop_last = true;
  PromptSpec ps;  // questions come from the mixture itself
  // Language stages: per dataset, a quarter of the images with the EMT prompt and the rest with paraphrases,
  // each kind in batches of its own.
  auto grouped_loaders = [&] {
    std::vector<std::unique_ptr<DataLoader>> out;
    for (const auto& src : srcs) {
      const int64_t n = src.train->size(), cut = n / 4;
      std::vector<int64_t> emt_idx, para_idx;
      for (int64_t i = 0; i < n; ++i) (i % 4 == 0 && static_cast<int64_t>(emt_idx.size()) < cut ? emt_idx : para_idx).push_back(i);
      auto emt_part = subset(src.train, emt_idx);
      auto para_part = subset(src.train, para_idx);
      for (auto* part : {&emt_part, &para_part}) {
        (*part)->set_name(src.name);
        (*part)->set_class_names(src.train->class_names());
      }
      std::vector<std::string> para_q = question_paraphrases(src.emt_question, src.digits);
      for (auto& [part, qs] : {std::pair{emt_part, std::vector<std::string>{src.emt_question}},
                               std::pair{para_part, para_q}}) {
        auto mix = std::make_shared<MixtureDataset>(std::vector<MixtureDataset::Part>{{part, qs, src.cfg.answer}}, true);
        out.push_back(std::make_unique<DataLoader>(mix, tok, ps, lo));
      }
    }
    return out;
  };

  // (a) contrastive CLIP
  if (cfg.pretrain.clip_steps > 0) {
    auto [ids, mask] = caption_tensors(*tok, mixture->class_names(), ms.clip_text.max_position_embeddings);
    std::vector<int64_t> group;
    for (size_t k = 0; k < srcs.size(); ++k)
      group.insert(group.end(), srcs[k].train->class_names().size(), static_cast<int64_t>(k));
    ClipObjective obj(clip, ids, mask, torch::tensor(group, torch::kLong), dev);
    for (auto& p : clip->parameters()) p.set_requires_grad(true);
    LoaderOptions clo = lo;
    clo.batch_size = cfg.pretrain.clip_batch_size;
    DataLoader loader(mixture, tok, ps, clo);
    auto src = loader_source(loader);
    TrainableIO io{[] { return NamedTensors{}; }, [](const NamedTensors&) {}, {}};
    Trainer t(obj, *src, all_params_groups(*clip, cfg.pretrain.learning_rate), io,
              stage_options(cfg, "pretrain/clip", cfg.pretrain.clip_steps, dev));
    t.fit();
  }
  for (auto& p : clip->parameters()) p.set_requires_grad(false);

  // (b) projector alignment, (c) instruction tuning: the causal-LM objective with two policies.
  LlavaObjective lm(llava, dev);
  for (const auto& [stage, method, steps] :
       {std::tuple<const char*, const char*, int64_t>{"pretrain/align", "linear", cfg.pretrain.align_steps},
        {"pretrain/instruct", "vision=frozen,projector=full,llm=full", cfg.pretrain.instruct_steps}}) {
    if (steps <= 0) continue;
    FinetuneSection ft = cfg.finetune;
    ft.learning_rate = cfg.pretrain.learning_rate;
    ft.projector_lr = 0.0;
    auto setup = apply_training_policy(*llava, policy_for_method(method), ft);
    GroupedSource src(grouped_loaders(), seed);
    TrainableIO io{[] { return NamedTensors{}; }, [](const NamedTensors&) {}, {}};
    Trainer t(lm, src, setup.groups, io, stage_options(cfg, stage, steps, dev));
    t.fit();
  }
  for (auto& p : llava->parameters()) p.set_requires_grad(false);
  llava->eval();
  clip->eval();

  // Closing check: greedy exact match of the answer sentence on test images, with the EMT prompt.
  if (opts.check_samples > 0) {
    torch::NoGradGuard ng;
    for (const auto& s : srcs) {
      auto test = open_dataset(s.name, s.cfg, cfg.data.root, Split::test, seed);
      auto idx = choose_subset(*test, opts.check_samples, true, seed);
      auto sub = subset(test, idx);
      sub->set_class_names(test->class_names());
      PromptSpec q{{s.emt_question}, s.cfg.answer};
      LoaderOptions elo = lo;
      elo.shuffle = false;
      elo.with_answer = false;
      elo.padding_side = "left";
      elo.drop_last = false;
      elo.batch_size = 64;
      DataLoader loader(sub, tok, q, elo);
      loader.start_epoch(0);
      auto [cap_ids, cap_mask] = caption_tensors(*tok, sub->class_names(), ms.clip_text.max_position_embeddings);
      auto txt = torch::nn::functional::normalize(clip->text_features(cap_ids.to(dev), cap_mask.to(dev)),
                                                  torch::nn::functional::NormalizeFuncOptions().dim(-1));
      Batch b;
      int64_t right = 0, n = 0, clip_right = 0;
      GenerateOptions go;
      go.max_new_tokens = 16;
      go.eos_id = tok->eos_id();
      while (loader.next(b)) {
        auto zs = clip->image_features(b.images.to(dev)).matmul(txt.t()).argmax(-1).cpu();
        for (size_t i = 0; i < b.class_ids.size(); ++i) clip_right += zs[static_cast<int64_t>(i)].item<int64_t>() == b.class_ids[i];
        auto outs = generate(llava, b.images.to(dev), b.input_ids.to(dev), b.attention_mask.to(dev), go);
        for (size_t i = 0; i < outs.size(); ++i) {
          std::string text = tok->decode(outs[i], true);
          while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) text.pop_back();
          while (!text.empty() && std::isspace(static_cast<unsigned char>(text.front()))) text.erase(0, 1);
          std::string want = answer_text(s.cfg, sub->class_names().at(static_cast<size_t>(b.class_ids[i])));
          right += text == want;
          ++n;
        }
      }
      rep.exact_match[s.name] = n ? static_cast<double>(right) / n : 0.0;
      rep.clip_zero_shot[s.name] = n ? static_cast<double>(clip_right) / n : 0.0;
      log_info("[pretrain] {}: greedy exact match {:.1f}%, CLIP zero-shot {:.1f}% on {} test images", s.name,
               100.0 * rep.exact_match[s.name], 100.0 * rep.clip_zero_shot[s.name], n);
    }
  }

  // Write the HF-layout directory, then swap it in atomically.
  save_llava(llava, staging.string());
  save_clip(clip, (staging / "clip").string());
  fs::copy_file(staging / "tokenizer.model", staging / "clip" / "tokenizer.model", fs::copy_options::overwrite_existing);
  json added = {{"<image>", image_id}};
  write_file_atomic((staging / "added_tokens.json").string(), added.dump(2) + "\n");
  json pre = {{"crop_size", {{"height", image_opts.crop_size}, {"width", image_opts.crop_size}}},
              {"do_center_crop", true}, {"do_normalize", true}, {"do_rescale", true}, {"do_resize", true},
              {"do_convert_rgb", true}, {"image_mean", image_opts.mean}, {"image_std", image_opts.std},
              {"image_processor_type", "CLIPImageProcessor"}, {"resample", 3}, {"rescale_factor", image_opts.rescale},
              {"size", {{"shortest_edge", image_opts.resize_shortest}}}};
  write_file_atomic((staging / "preprocessor_config.json").string(), pre.dump(2) + "\n");
  fs::copy_file(staging / "preprocessor_config.json", staging / "clip" / "preprocessor_config.json",
                fs::copy_options::overwrite_existing);
  fs::remove(staging / "corpus.txt", ec);
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  json report = {{"seconds", rep.seconds}, {"exact_match", rep.exact_match}, {"clip_zero_shot", rep.clip_zero_shot},
                 {"threads", torch::get_num_threads()}};
  write_file_atomic((staging / "pretrain_report.json").string(), report.dump(2) + "\n");
  write_file_atomic((staging / "recipe.yaml").string(), recipe);
  if (dir.has_parent_path()) fs::create_directories(dir.parent_path());
  commit_dir_atomic(staging.string(), rep.dir);
  log_info("[pretrain] tiny base model written to {} in {:.0f}s", rep.dir, rep.seconds);
  return rep;
}

}  // namespace emt
