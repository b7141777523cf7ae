// The tiny base-model recipe: tokenizer training, contrastive CLIP, projector alignment on captions, instruction
// tuning on generic visual instructions, all with the one Trainer; writes an HF-layout directory.
#include <emt/adapters/policy.h>
#include <emt/core/conversation.h>
#include <emt/core/hf_checkpoint.h>
#include <emt/core/image.h>
#include <emt/core/llava.h>
#include <emt/core/loader.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <emt/core/tokenizer.h>
#include <emt/train/finetune.h>
#include <emt/train/instructions.h>
#include <emt/train/pretrain.h>
#include <emt/train/trainer.h>
#include <fmt/format.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <set>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

namespace emt {
namespace fs = std::filesystem;
using json = nlohmann::json;

// ---- mixture -------------------------------------------------------------------------------------------------

MixtureDataset::MixtureDataset(std::vector<std::shared_ptr<ImageDataset>> parts) : parts_(std::move(parts)) {
  std::vector<std::string> names;
  for (const auto& p : parts_) {
    starts_.push_back(total_);
    label_offsets_.push_back(static_cast<int64_t>(names.size()));
    total_ += p->size();
    for (const auto& n : p->class_names()) names.push_back(n);
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
  return label_offsets_[k] + parts_[k]->label(j);
}

torch::Tensor MixtureDataset::image(int64_t i) const {
  auto [k, j] = locate(i);
  auto img = parts_[k]->image(j);
  // Grey and colour datasets meet in one batch: always hand out 3 channels.
  if (img.dim() == 3 && img.size(2) == 1) img = img.expand({img.size(0), img.size(1), 3}).contiguous();
  return img;
}

std::string MixtureDataset::source(int64_t i) const {
  auto [k, j] = locate(i);
  return parts_[k]->name() + ": " + parts_[k]->source(j);
}

std::vector<std::vector<bool>> contrasted_datasets(const std::vector<std::vector<std::string>>& class_names) {
  const size_t n = class_names.size();
  std::vector<std::set<std::string>> words(n);
  for (size_t k = 0; k < n; ++k)
    for (const auto& c : class_names[k]) {
      std::string w;
      for (char ch : c + " ") {
        if (std::isalnum(static_cast<unsigned char>(ch))) {
          w += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
        } else if (!w.empty()) {
          words[k].insert(w);
          w.clear();
        }
      }
    }
  std::vector<std::vector<bool>> out(n, std::vector<bool>(n, true));
  for (size_t a = 0; a < n; ++a)
    for (size_t b = 0; b < n; ++b)
      if (a != b)
        for (const auto& w : words[a]) out[a][b] = out[a][b] && words[b].count(w) == 0;
  return out;
}

// ---- objectives ----------------------------------------------------------------------------------------------

namespace {

std::string lowercase(std::string s) {
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

// Contrastive image-text loss: each image must pick its class caption among the captions of its own dataset and
// of every dataset whose labels could not also describe it (contrasted_datasets; CLIP's loss with the batch's
// captions replaced by that label space). A digit competes with "a photo of a Shirt", so the tower tells the
// datasets apart as a web-trained CLIP does; same-class images in a batch are never false negatives, and datasets
// whose label spaces overlap (shapes10 "circle", objects60 "red circle") never compete.
class ClipObjective : public Objective {
 public:
  // caption_dataset: [C] the dataset index of every caption (class) of the mixture; contrasted: [D, D] bool.
  ClipObjective(ClipModel clip, torch::Tensor caption_ids, torch::Tensor caption_mask, torch::Tensor caption_dataset,
                torch::Tensor contrasted, torch::Device dev)
      : clip_(std::move(clip)), ids_(caption_ids.to(dev)), mask_(caption_mask.to(dev)),
        // [C, C]: true where the caption of column j may compete for an image of the class of row i
        competes_(contrasted.index_select(0, caption_dataset).index_select(1, caption_dataset).to(dev)),
        dev_(dev) {}
  StepLoss loss(const Batch& batch) override {
    auto img = torch::nn::functional::normalize(clip_->image_features(batch.images.to(dev_)),
                                                torch::nn::functional::NormalizeFuncOptions().dim(-1));
    auto txt = torch::nn::functional::normalize(clip_->text_features(ids_, mask_),
                                                torch::nn::functional::NormalizeFuncOptions().dim(-1));
    auto logits = clip_->logit_scale.exp().clamp_max(100.0) * img.matmul(txt.t());
    auto target = torch::tensor(batch.class_ids, torch::kLong).to(dev_);
    logits = logits.masked_fill(competes_.index_select(0, target).logical_not(), -1e4);
    return {torch::nn::functional::cross_entropy(logits, target), batch.size(), batch.size()};
  }
  void set_train(bool on) override { clip_->train(on); }

 private:
  ClipModel clip_;
  torch::Tensor ids_, mask_, competes_;
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
  o.handle_signals = true;  // a preemption notice stops pretraining at the next step (it starts over on a rerun)
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
  RunConfig r;
  r.model = cfg.model;
  r.model.pretrained.clear();
  r.data.datasets = cfg.data.datasets;
  // The recipe draws its own subsets (pretrain.train_max_samples): the fine-tuning bounds do not shape it.
  for (auto& [name, d] : r.data.datasets) d.train_max_samples = DatasetConfig{}.train_max_samples;
  r.pretrain = cfg.pretrain;
  r.run.seed = cfg.run.seed;
  r.run.dtype = cfg.run.dtype;
  r.finetune.question = cfg.finetune.question;  // part of the tokenizer's corpus
  // Only the keys that shape the model are written, so a new key elsewhere (a fine-tuning or study setting)
  // leaves every cached base valid.
  const YAML::Node all = YAML::Load(config_to_yaml(r));
  YAML::Node keep(YAML::NodeType::Map);
  keep["recipe_version"] = 6;
  keep["run"]["seed"] = all["run"]["seed"];
  keep["run"]["dtype"] = all["run"]["dtype"];
  keep["model"] = all["model"];
  keep["data"]["datasets"] = all["data"]["datasets"];
  keep["pretrain"] = all["pretrain"];
  keep["pretrain"].remove("cache_dir");
  keep["finetune"]["question"] = all["finetune"]["question"];
  YAML::Emitter out;
  out << keep;
  return "# emt tiny base-model recipe (the cache is reused while this text is unchanged)\n" + std::string(out.c_str()) +
         "\n";
}

std::vector<PretrainSource> pretrain_sources(const RunConfig& cfg) {
  std::vector<std::string> names = cfg.pretrain.datasets;
  if (names.empty())
    for (const auto& [n, _] : cfg.data.datasets) names.push_back(n);
  if (names.empty()) throw ConfigError("[pretrain] data.datasets is empty: nothing to pretrain on");
  const uint64_t seed = static_cast<uint64_t>(cfg.run.seed);
  // What the language stages show the LLM: pretrain.instruct_max_samples of the contrastive pool (0 = all).
  auto set_language = [&](PretrainSource& s) {
    s.language = s.train;
    if (cfg.pretrain.instruct_max_samples > 0 && cfg.pretrain.instruct_max_samples < s.train->size()) {
      s.language = subset(s.train, choose_subset(*s.train, cfg.pretrain.instruct_max_samples, true,
                                                 mix_seed(seed, 0x4C4C4D)));
      s.language->set_name(s.name);
      s.language->set_class_names(s.train->class_names());
    }
  };
  std::vector<PretrainSource> out;
  for (const auto& n : names) {
    auto it = cfg.data.datasets.find(n);
    if (it == cfg.data.datasets.end()) throw ConfigError("[pretrain] pretrain.datasets: '" + n + "' is not in data.datasets");
    PretrainSource s;
    s.name = n;
    // The recipe picks its own subset: data.datasets.*.train_max_samples limits fine-tuning, not pretraining.
    auto full = open_dataset_full(n, it->second, cfg.data.root, Split::train);
    s.train = subset(full, choose_subset(*full, cfg.pretrain.train_max_samples, true, seed));
    s.train->set_name(n);
    s.train->set_class_names(full->class_names());
    set_language(s);
    s.digits = is_digit_dataset(it->second, full->class_names());
    out.push_back(std::move(s));
  }
  if (cfg.pretrain.letters) {
    if (cfg.data.datasets.count(kGenericLetters))
      throw ConfigError(fmt::format("[pretrain] data.datasets.{}: that name belongs to the recipe's rendered letters "
                                    "(pretrain.letters); rename the dataset or set pretrain.letters: false",
                                    kGenericLetters));
    if (!built_with_opencv())
      throw ConfigError("[pretrain] pretrain.letters: the rendered letters are drawn with OpenCV, and this emt was "
                        "built without it (EMT_WITH_OPENCV=OFF); build the tiny base with OpenCV, or set "
                        "pretrain.letters: false (another recipe, without the letters' lists)");
    PretrainSource s;
    s.name = kGenericLetters;
    s.generic = true;
    s.train = open_synthetic_dataset("letters", Split::train, mix_seed(seed, 0x1E77E5),
                                     cfg.pretrain.train_max_samples);
    s.train->set_name(s.name);
    set_language(s);
    out.push_back(std::move(s));
  }
  return out;
}

std::vector<std::shared_ptr<ImageDataset>> pretrain_language_sets(const RunConfig& cfg,
                                                                  const std::vector<PretrainSource>& srcs,
                                                                  bool captions_only) {
  std::vector<std::shared_ptr<ImageDataset>> out;
  std::vector<std::pair<std::string, std::vector<std::string>>> names;
  for (const auto& [n, d] : cfg.data.datasets) {
    bool pooled = false;
    for (const auto& s : srcs) pooled = pooled || s.name == n;
    if (pooled) continue;
    names.emplace_back(n, open_dataset_full(n, d, cfg.data.root, Split::test)->class_names());
  }
  for (const auto& s : srcs)
    if (!s.generic) names.emplace_back(s.name, s.train->class_names());
  const auto forbidden = study_texts(cfg, names);
  // Everyday nouns that no dataset uses as a label (by its normalised words).
  std::vector<std::string> nouns;
  for (const auto& w : everyday_nouns()) {
    bool used = false;
    for (const auto& [_, list] : names)
      for (const auto& c : list) used = used || lowercase(c) == w;
    if (!used) nouns.push_back(w);
  }
  auto options_for = [&](size_t k) {
    InstructionOptions io;
    io.captions_only = captions_only;
    io.digits = srcs[k].digits;
    io.same_kind_lists = srcs[k].generic;
    io.seed = mix_seed(static_cast<uint64_t>(cfg.run.seed), k);
    io.distractors = nouns;
    io.own_labels = cfg.pretrain.pick_own_labels;
    io.unlisted_percent = cfg.pretrain.pick_unlisted;
    for (size_t o = 0; o < srcs.size(); ++o)
      if (o != k && !srcs[o].generic && !srcs[k].generic) io.other_labels.push_back(srcs[o].train->class_names());
    return io;
  };
  // The words of the language (what the tokenizer is trained on): the generic texts, the CLIP captions and the
  // study's texts, split at spaces, without trailing punctuation. Copy questions draw from them.
  std::set<std::string> words;
  auto add_words = [&](const std::string& text) {
    std::istringstream in(text);
    for (std::string w; in >> w;) {
      while (!w.empty() && std::string(".,?:;!").find(w.back()) != std::string::npos) w.pop_back();
      if (!w.empty()) words.insert(w);
    }
  };
  std::vector<InstructionDataset> plain;  // without copy questions
  for (size_t k = 0; k < srcs.size(); ++k) plain.emplace_back(srcs[k].language, options_for(k));
  if (!captions_only) {
    for (const auto& f : forbidden) add_words(f);
    for (size_t k = 0; k < srcs.size(); ++k) {
      for (int64_t i = 0; i < plain[k].size(); ++i) {
        auto [q, a] = plain[k].text(i);
        add_words(q);
        add_words(a);
      }
      for (const auto& c : srcs[k].train->class_names()) add_words("a photo of a " + c + ".");
    }
  }
  for (size_t k = 0; k < srcs.size(); ++k) {
    auto set = std::make_shared<InstructionDataset>(plain[k], std::vector<std::string>(words.begin(), words.end()));
    // The base model must never practise what a study asks or trains: refuse a recipe that would.
    auto leaks = study_text_leaks(*set, forbidden, names, cfg.pretrain.pick_own_labels);
    if (!leaks.empty())
      throw ConfigError(fmt::format("[pretrain] {} generic instruction(s) for '{}' contain a study prompt or answer, "
                                    "e.g. {}; change that dataset's prompt/answer so they differ from the recipe's "
                                    "generic texts (docs/training.md)", leaks.size(), srcs[k].name, leaks[0]));
    out.push_back(set);
  }
  return out;
}

namespace {

// Stage 0: a SentencePiece BPE over the language the model will meet: the generic instructions, CLIP captions, and
// the study's prompts and answers (a tokenizer knows the whole language, as LLaMA's does; the LLM is never trained
// on the study texts before a study).
std::shared_ptr<Tokenizer> train_tokenizer(const RunConfig& cfg, const std::vector<PretrainSource>& srcs,
                                           const std::vector<std::shared_ptr<ImageDataset>>& sets,
                                           const fs::path& staging) {
  std::vector<std::string> lines;
  for (const auto& set : sets)
    for (int64_t i = 0; i < std::min<int64_t>(set->size(), 1500); ++i) {
      auto [q, a] = set->text(i);
      lines.push_back(q);
      lines.push_back(a);
    }
  for (const auto& s : srcs) {
    if (s.generic) {
      for (const auto& c : s.train->class_names()) lines.push_back("a photo of a " + c + ".");
      continue;
    }
    const auto& dc = cfg.data.datasets.at(s.name);
    lines.push_back(render_prompt(cfg.model.conversation, cfg.model.system_prompt,
                                  dataset_question(s.name, dc, s.train->class_names())));
    for (const auto& c : s.train->class_names()) {
      lines.push_back(answer_text(dc, c));
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
  std::error_code ec;
  fs::remove(staging / "corpus.txt", ec);
  return load_sentencepiece((staging / "tokenizer.model").string());
}

struct TinyModels {
  LlavaModel llava{nullptr};
  ClipModel clip{nullptr};
  ModelSection shapes;
  int64_t image_id = -1;
};

// Model shapes follow the tokenizer; one vision tower, shared: what CLIP learns is what the LLM sees.
TinyModels build_models(const RunConfig& cfg, Tokenizer& tok, torch::Device dev) {
  TinyModels m;
  m.image_id = tok.special_token_id("<image>") >= 0 ? tok.special_token_id("<image>") : tok.add_special_token("<image>");
  m.shapes = cfg.model;
  m.shapes.llm.vocab_size = static_cast<int>(tok.vocab_size());
  m.shapes.clip_text.vocab_size = static_cast<int>(tok.vocab_size());
  m.llava = build_llava(m.shapes, m.image_id);
  ClipOptions co = clip_options(m.shapes.vision, m.shapes.clip_text);
  co.text.eos_token_id = tok.eos_id();
  m.clip = ClipModel(co);
  m.clip->vision_model = m.clip->replace_module("vision_model", m.llava->vision_tower->vision_model);
  m.llava->to(dev);
  m.clip->to(dev);
  log_info("[pretrain] tokenizer: {} pieces, <image> = {}", tok.vocab_size(), m.image_id);
  return m;
}

LoaderOptions language_loader_options(const RunConfig& cfg, const ImageProcessorOptions& image) {
  LoaderOptions lo;
  lo.batch_size = cfg.pretrain.batch_size;
  lo.seed = static_cast<uint64_t>(cfg.run.seed);
  lo.workers = cfg.data.workers;
  lo.prefetch = cfg.data.prefetch;
  lo.conversation = cfg.model.conversation;
  lo.system = cfg.model.system_prompt;
  lo.image = image;
  lo.drop_last = true;
  return lo;
}

// Stage (a): contrastive CLIP, each image against the captions of its own dataset's classes.
void stage_clip(const RunConfig& cfg, TinyModels& m, const std::vector<PretrainSource>& srcs,
                const std::shared_ptr<Tokenizer>& tok, const ImageProcessorOptions& image, torch::Device dev) {
  std::vector<std::shared_ptr<ImageDataset>> parts;
  std::vector<std::vector<std::string>> names;
  for (const auto& s : srcs) {
    parts.push_back(s.train);
    names.push_back(s.train->class_names());
  }
  std::vector<int64_t> dataset_of;
  for (size_t k = 0; k < srcs.size(); ++k) dataset_of.insert(dataset_of.end(), names[k].size(), static_cast<int64_t>(k));
  auto contrasted = contrasted_datasets(names);
  if (cfg.pretrain.contrast == "own_dataset")
    for (size_t a = 0; a < names.size(); ++a)
      for (size_t b = 0; b < names.size(); ++b) contrasted[a][b] = a == b;
  auto pairs = torch::zeros({static_cast<int64_t>(names.size()), static_cast<int64_t>(names.size())}, torch::kBool);
  for (size_t a = 0; a < names.size(); ++a)
    for (size_t b = 0; b < names.size(); ++b) pairs[a][b] = static_cast<bool>(contrasted[a][b]);
  auto mixture = std::make_shared<MixtureDataset>(parts);
  auto [ids, mask] = caption_tensors(*tok, mixture->class_names(), m.shapes.clip_text.max_position_embeddings);
  ClipObjective obj(m.clip, ids, mask, torch::tensor(dataset_of, torch::kLong), pairs, dev);
  for (auto& p : m.clip->parameters()) p.set_requires_grad(true);
  LoaderOptions lo = language_loader_options(cfg, image);
  lo.batch_size = cfg.pretrain.clip_batch_size;
  PromptSpec ps{{"a photo"}, "{label}"};  // prompts are not used by the contrastive objective
  DataLoader loader(mixture, tok, ps, lo);
  auto src = loader_source(loader);
  TrainableIO io{[] { return NamedTensors{}; }, [](const NamedTensors&) {}, {}};
  Trainer t(obj, *src, all_params_groups(*m.clip, cfg.pretrain.learning_rate), io,
            stage_options(cfg, "pretrain/clip", cfg.pretrain.clip_steps, dev));
  t.fit();
  for (auto& p : m.clip->parameters()) p.set_requires_grad(false);
}

// Stages (b) and (c): the causal-LM objective on generic instructions, one dataset per batch (short prompts are
// never padded to longer ones), with the training policy `method`.
void stage_language(const RunConfig& cfg, TinyModels& m, const std::vector<std::shared_ptr<ImageDataset>>& sets,
                    const std::shared_ptr<Tokenizer>& tok, const ImageProcessorOptions& image, const char* label,
                    const char* method, int64_t steps, torch::Device dev) {
  LlavaObjective lm(m.llava, dev);
  FinetuneSection ft = cfg.finetune;
  ft.learning_rate = cfg.pretrain.learning_rate;
  ft.projector_lr = 0.0;
  auto setup = apply_training_policy(*m.llava, policy_for_method(method), ft);
  std::vector<std::unique_ptr<DataLoader>> loaders;
  PromptSpec ps;  // questions come from the instruction sets themselves
  for (const auto& set : sets) loaders.push_back(std::make_unique<DataLoader>(set, tok, ps, language_loader_options(cfg, image)));
  GroupedSource src(std::move(loaders), static_cast<uint64_t>(cfg.run.seed));
  TrainableIO io{[] { return NamedTensors{}; }, [](const NamedTensors&) {}, {}};
  Trainer t(lm, src, setup.groups, io, stage_options(cfg, label, steps, dev));
  t.fit();
}

void write_model_dir(TinyModels& m, const Tokenizer& tok, const ImageProcessorOptions& image_opts,
                     const fs::path& staging) {
  save_llava(m.llava, staging.string());
  save_clip(m.clip, (staging / "clip").string());
  fs::copy_file(staging / "tokenizer.model", staging / "clip" / "tokenizer.model", fs::copy_options::overwrite_existing);
  json added = {{"<image>", m.image_id}};
  write_file_atomic((staging / "added_tokens.json").string(), added.dump(2) + "\n");
  json pre = {{"crop_size", {{"height", image_opts.crop_size}, {"width", image_opts.crop_size}}},
              {"do_center_crop", true}, {"do_normalize", true}, {"do_rescale", true}, {"do_resize", true},
              {"do_convert_rgb", true}, {"image_mean", image_opts.mean}, {"image_std", image_opts.std},
              {"image_processor_type", "CLIPImageProcessor"}, {"resample", 3}, {"rescale_factor", image_opts.rescale},
              {"size", {{"shortest_edge", image_opts.resize_shortest}}}};
  write_file_atomic((staging / "preprocessor_config.json").string(), pre.dump(2) + "\n");
  fs::copy_file(staging / "preprocessor_config.json", staging / "clip" / "preprocessor_config.json",
                fs::copy_options::overwrite_existing);
}

}  // namespace

PretrainReport pretrain_tiny(const RunConfig& cfg, const PretrainOptions& opts) {
  PretrainReport rep;
  rep.dir = cfg.pretrain.cache_dir;
  const std::string recipe = pretrain_recipe(cfg);
  const fs::path dir(rep.dir);
  if (!opts.force && fs::exists(dir / "recipe.yaml") && fs::exists(dir / "config.json") &&
      read_file((dir / "recipe.yaml").string()) == recipe) {
    rep.reused = true;
    log_info("[pretrain] reusing the tiny base model in {} (recipe unchanged)", rep.dir);
    return rep;
  }
  auto t0 = std::chrono::steady_clock::now();
  const auto dev = resolve_device(cfg.run.device);
  apply_run_section(cfg.run);
  // The recipe's result depends on floating-point rounding, hence on the BLAS kernels (docs/training.md).
  log_info("[pretrain] BLAS kernels: {}", blas_kernels());

  const auto srcs = pretrain_sources(cfg);
  const auto captions = pretrain_language_sets(cfg, srcs, /*captions_only=*/true);
  const auto instructions = pretrain_language_sets(cfg, srcs, /*captions_only=*/false);
  const fs::path staging = fs::path(rep.dir + ".tmp." + std::to_string(::getpid()));
  std::error_code ec;
  fs::remove_all(staging, ec);
  fs::create_directories(staging / "clip");

  std::shared_ptr<Tokenizer> tok = train_tokenizer(cfg, srcs, instructions, staging);
  TinyModels m = build_models(cfg, *tok, dev);
  const auto image = image_options_for_size(m.shapes.vision.image_size);
  try {
    if (cfg.pretrain.clip_steps > 0) stage_clip(cfg, m, srcs, tok, image, dev);
    if (cfg.pretrain.align_steps > 0)
      stage_language(cfg, m, captions, tok, image, "pretrain/align", "linear", cfg.pretrain.align_steps, dev);
    if (cfg.pretrain.instruct_steps > 0)
      stage_language(cfg, m, instructions, tok, image, "pretrain/instruct", "vision=frozen,projector=full,llm=full",
                     cfg.pretrain.instruct_steps, dev);
  } catch (const Preempted& e) {
    fs::remove_all(staging, ec);  // the stages are not resumable: the cache stays as it was
    throw Preempted(std::string(e.what()) + "; the base model was not written and is rebuilt on the rerun");
  }
  for (auto& p : m.llava->parameters()) p.set_requires_grad(false);
  m.llava->eval();
  m.clip->eval();

  write_model_dir(m, *tok, image, staging);
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  rep.blas = blas_kernels();
  write_file_atomic((staging / "recipe.yaml").string(), recipe);
  if (dir.has_parent_path()) fs::create_directories(dir.parent_path());
  commit_dir_atomic(staging.string(), rep.dir);
  log_info("[pretrain] tiny base model written to {} in {:.0f}s", rep.dir, rep.seconds);
  return rep;
}

}  // namespace emt
