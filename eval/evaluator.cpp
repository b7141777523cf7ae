// The evaluator: every eval dataset's fixed test subset, batched KV-cache generation with the EMT prompts, the
// scorers (strict, likelihood ranking over a shared prompt cache, CLIP nearest label, external judge), predictions
// files, and the CLIP zero-shot baseline.
#include <emt/core/conversation.h>
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <emt/core/generate.h>
#include <emt/core/hf_checkpoint.h>
#include <emt/core/loader.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <emt/eval/evaluator.h>
#include <emt/eval/metrics.h>
#include <emt/train/finetune.h>  // BaseModel (fields only)
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>

namespace emt {

namespace fs = std::filesystem;

// ---- counts -----------------------------------------------------------------------------------------------------

void ScoreCounts::add(VerdictKind k) {
  ++n;
  switch (k) {
    case VerdictKind::correct: ++correct; break;
    case VerdictKind::incorrect: ++incorrect; break;
    case VerdictKind::intrinsic: ++intrinsic; break;
    case VerdictKind::extrinsic: ++extrinsic; break;
  }
}

void ScoreCounts::finish() {
  accuracy = n > 0 ? static_cast<double>(correct) / static_cast<double>(n) : 0.0;
  std::tie(ci_low, ci_high) = wilson_interval(correct, n);
}

void set_counts(ResultRow& row, const ScoreCounts& c) {
  row.accuracy = c.accuracy;
  row.n = c.n;
  row.n_correct = c.correct;
  row.n_incorrect = c.incorrect;
  row.n_intrinsic = c.intrinsic;
  row.n_extrinsic = c.extrinsic;
  row.ci_low = c.ci_low;
  row.ci_high = c.ci_high;
  row.n_naming = c.naming;
}

ResultRow make_result_row(const std::string& kind, const std::string& finetune_dataset, const std::string& method,
                          int64_t seed, int64_t epoch, const std::string& eval_dataset, const std::string& scorer,
                          const ScoreCounts& c, const std::string& run) {
  ResultRow r;
  r.kind = kind;
  r.finetune_dataset = finetune_dataset;
  r.method = method;
  r.seed = seed;
  r.epoch = epoch;
  r.eval_dataset = eval_dataset;
  r.scorer = scorer;
  set_counts(r, c);
  r.run = run;
  return r;
}

EvalModel eval_model(const BaseModel& base) {
  EvalModel m;
  m.model = base.model;
  m.tokenizer = base.tokenizer;
  m.image = base.image;
  m.conversation = base.conversation.empty() ? base.model->options.conversation : base.conversation;
  m.system = base.system;
  m.device = base.device;
  return m;
}

std::string valid_utf8(const std::string& s) {
  std::string out;
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = p[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    bool ok = len > 0 && i + len <= n;
    for (size_t k = 1; ok && k < len; ++k) ok = (p[i + k] & 0xC0) == 0x80;
    if (ok && len == 2) ok = c >= 0xC2;                                      // overlong
    if (ok && len == 3) ok = !(c == 0xE0 && p[i + 1] < 0xA0) && !(c == 0xED && p[i + 1] >= 0xA0);  // overlong, surrogates
    if (ok && len == 4) ok = !(c == 0xF0 && p[i + 1] < 0x90) && !(c == 0xF4 && p[i + 1] >= 0x90) && c <= 0xF4;
    if (ok) {
      out.append(s, i, len);
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
  return out;
}

// ---- free helpers -----------------------------------------------------------------------------------------------

namespace {

std::string trim_space(const std::string& s) {
  const char* ws = " \t\r\n\f\v";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// Decoded answer cut at the first stop string and trimmed.
std::string clean_answer(std::string text, const std::vector<std::string>& stops) {
  size_t cut = std::string::npos;
  for (const auto& s : stops)
    if (!s.empty()) cut = std::min(cut, text.find(s));
  if (cut != std::string::npos) text.resize(cut);
  return trim_space(valid_utf8(text));
}

torch::ScalarType param_dtype(torch::nn::Module& m) {
  for (const auto& p : m.parameters()) return p.scalar_type();
  return torch::kFloat32;
}

// Restores a module's training flag on scope exit (also when scoring throws).
struct TrainFlagGuard {
  torch::nn::Module& m;
  bool was;
  explicit TrainFlagGuard(torch::nn::Module& mod) : m(mod), was(mod.is_training()) { m.eval(); }
  ~TrainFlagGuard() { m.train(was); }
};

std::string readable_label(std::string name) {
  std::replace(name.begin(), name.end(), '_', ' ');
  return name;
}

}  // namespace

std::map<std::string, LabelSet> eval_label_sets(const std::map<std::string, std::vector<std::string>>& class_names,
                                                const RunConfig& cfg) {
  std::map<std::string, LabelSet> out;
  for (const auto& [name, names] : class_names) {
    std::vector<std::string> foreign;
    for (const auto& [other, other_names] : class_names)
      if (other != name) foreign.insert(foreign.end(), other_names.begin(), other_names.end());
    auto it = cfg.data.datasets.find(name);
    std::vector<std::string> aliases = it == cfg.data.datasets.end() ? std::vector<std::string>{} : it->second.aliases;
    try {
      out.emplace(name, make_label_set(names, aliases, foreign));
    } catch (const ConfigError& e) {
      throw ConfigError(fmt::format("[eval] dataset '{}': {}", name, e.what()));
    }
  }
  return out;
}

torch::Tensor candidate_logliks(LlavaModel& model, const torch::Tensor& images, const torch::Tensor& input_ids,
                                const torch::Tensor& attention_mask,
                                const std::vector<std::vector<int64_t>>& candidates, int64_t rows_per_pass) {
  // images: [B, 3, S, S] or undefined, input_ids: [B, T] (left-padded) -> [B, C]
  TORCH_CHECK(input_ids.dim() == 2, "candidate_logliks: input_ids must be [B, T], got ", input_ids.sizes());
  TORCH_CHECK(!candidates.empty(), "candidate_logliks: no candidates");
  int64_t L = 0;
  for (size_t c = 0; c < candidates.size(); ++c) {
    TORCH_CHECK(!candidates[c].empty(), "candidate_logliks: candidate ", c, " is empty");
    L = std::max<int64_t>(L, static_cast<int64_t>(candidates[c].size()));
  }
  torch::NoGradGuard ng;
  auto& lm = model->language_model;
  auto feats = images.defined() ? model->encode_images(images) : torch::Tensor();
  auto in = model->splice(feats, input_ids, attention_mask);
  const int64_t B = input_ids.size(0), Tp = in.embeds.size(1), C = static_cast<int64_t>(candidates.size());
  auto dev = in.embeds.device();
  auto lopts = torch::TensorOptions().dtype(torch::kLong);

  // The prompt is run once; every candidate continues from a copy of its cache (capacity Tp + L).
  KVCache cache = make_kv_cache(lm->options, B, Tp + L, in.embeds.scalar_type(), dev);
  auto hidden = lm->model->forward(in.embeds, in.attention_mask, {}, &cache);
  auto last = lm->logits(hidden.select(1, Tp - 1));  // [B, V]: scores each candidate's first token

  auto ids = torch::zeros({C, L}, lopts), labels = torch::full({C, L}, -100, lopts), mask = torch::zeros({C, L}, lopts);
  for (int64_t c = 0; c < C; ++c) {
    const auto& v = candidates[static_cast<size_t>(c)];
    auto t = torch::tensor(v, lopts);
    const int64_t n = t.size(0);
    ids[c].narrow(0, 0, n).copy_(t);
    labels[c].narrow(0, 0, n).copy_(t);
    mask[c].narrow(0, 0, n).fill_(1);
  }
  ids = ids.to(dev);
  labels = labels.to(dev);
  mask = mask.to(dev);

  auto out = torch::empty({B, C}, torch::TensorOptions().dtype(torch::kFloat32).device(dev));
  const int64_t per = std::max<int64_t>(1, rows_per_pass / std::max<int64_t>(B, 1));
  for (int64_t c0 = 0; c0 < C; c0 += per) {
    const int64_t cc = std::min(per, C - c0), rows = B * cc;  // row r = b * cc + j (class c0 + j)
    KVCache ec;
    for (size_t l = 0; l < cache.k.size(); ++l) {
      ec.k.push_back(cache.k[l].repeat_interleave(cc, 0));
      ec.v.push_back(cache.v[l].repeat_interleave(cc, 0));
    }
    ec.length = Tp;
    auto cids = ids.narrow(0, c0, cc).repeat({B, 1});
    auto cmask = torch::cat({in.attention_mask.repeat_interleave(cc, 0), mask.narrow(0, c0, cc).repeat({B, 1})}, 1);
    auto h = lm->model->forward(lm->embed(cids), cmask, {}, &ec);  // [rows, L, D]
    auto lg = torch::cat({last.repeat_interleave(cc, 0).unsqueeze(1), lm->logits(h)}, 1);  // [rows, L + 1, V]
    auto lab = torch::cat({torch::full({rows, 1}, -100, lopts.device(dev)), labels.narrow(0, c0, cc).repeat({B, 1})}, 1);
    out.narrow(1, c0, cc).copy_(answer_logprobs(lg, lab).view({B, cc}));
  }
  return out;
}

std::pair<torch::Tensor, torch::Tensor> clip_tokenize(const Tokenizer& tok, const std::vector<std::string>& texts,
                                                      int64_t max_len) {
  TORCH_CHECK(max_len >= 2, "clip_tokenize: max_len must be >= 2, got ", max_len);
  std::vector<std::vector<int64_t>> seqs;
  int64_t T = 1;
  for (const auto& t : texts) {
    auto ids = tok.encode(t, /*add_bos=*/true, /*add_eos=*/true);
    if (static_cast<int64_t>(ids.size()) > max_len) {
      ids.resize(static_cast<size_t>(max_len));
      ids.back() = tok.eos_id();
    }
    T = std::max<int64_t>(T, static_cast<int64_t>(ids.size()));
    seqs.push_back(std::move(ids));
  }
  const int64_t N = static_cast<int64_t>(seqs.size());
  const int64_t pad = tok.pad_id() >= 0 ? tok.pad_id() : tok.eos_id();
  auto ids = torch::full({N, T}, pad, torch::kLong), mask = torch::zeros({N, T}, torch::kLong);
  auto ia = ids.accessor<int64_t, 2>();
  auto ma = mask.accessor<int64_t, 2>();
  for (int64_t i = 0; i < N; ++i)
    for (size_t j = 0; j < seqs[i].size(); ++j) {
      ia[i][static_cast<int64_t>(j)] = seqs[i][j];
      ma[i][static_cast<int64_t>(j)] = 1;
    }
  return {ids, mask};
}

torch::Tensor clip_text_embeddings(ClipModel& clip, const Tokenizer& tok, const std::vector<std::string>& texts,
                                   torch::Device device) {
  torch::NoGradGuard ng;
  constexpr int64_t kChunk = 256;
  std::vector<torch::Tensor> parts;
  for (size_t i = 0; i < texts.size(); i += kChunk) {
    std::vector<std::string> chunk(texts.begin() + static_cast<std::ptrdiff_t>(i),
                                   texts.begin() + static_cast<std::ptrdiff_t>(std::min(texts.size(), i + kChunk)));
    auto [ids, mask] = clip_tokenize(tok, chunk, clip->options.text.max_position_embeddings);
    auto f = clip->text_features(ids.to(device), mask.to(device)).to(torch::kFloat32);
    parts.push_back(torch::nn::functional::normalize(f, torch::nn::functional::NormalizeFuncOptions().dim(-1)));
  }
  if (parts.empty()) return torch::empty({0, clip->options.projection_dim});
  return torch::cat(parts, 0);
}

std::pair<ClipModel, std::shared_ptr<Tokenizer>> load_clip_dir(const std::string& dir, torch::Device device) {
  const fs::path d(dir);
  std::shared_ptr<Tokenizer> tok;
  if (fs::exists(d / "vocab.json") && fs::exists(d / "merges.txt"))
    tok = load_clip_bpe((d / "vocab.json").string(), (d / "merges.txt").string());
  else if (fs::exists(d / "tokenizer.model"))
    tok = load_sentencepiece((d / "tokenizer.model").string());
  else
    throw IoError("[eval] CLIP directory " + dir + ": no tokenizer (expected vocab.json + merges.txt, or "
                  "tokenizer.model)");
  auto clip = load_clip(dir, torch::kFloat32, device);
  clip->eval();
  return {clip, tok};
}

ImageProcessorOptions clip_image_options(const std::string& dir, const ClipModel& clip) {
  const fs::path pre = fs::path(dir) / "preprocessor_config.json";
  return fs::exists(pre) ? load_hf_preprocessor_config(pre.string())
                         : image_options_for_size(clip->options.vision.image_size);
}

// ---- the evaluator ----------------------------------------------------------------------------------------------

namespace {
struct RegisteredScorer {
  ScorerFn fn;
  std::vector<std::string> datasets;  // empty = all
};
std::mutex g_scorers_mutex;
std::map<std::string, RegisteredScorer>& registered_scorers() {
  static std::map<std::string, RegisteredScorer> m;
  return m;
}
}  // namespace

struct Evaluator::Impl {
  struct Entry {
    std::shared_ptr<ImageDataset> ds;
    DatasetConfig dcfg;
    std::string question;
  };
  RunConfig cfg;
  std::vector<std::string> names;
  std::map<std::string, Entry> entries;
  std::map<std::string, LabelSet> label_sets;
  ClipModel clip{nullptr};
  std::shared_ptr<Tokenizer> clip_tok;
  JsonFields extra;
  bool progress = true;
  std::shared_ptr<Communicator> comm;  // data parallel: batches dealt out over the ranks, answers gathered
  std::map<std::string, RegisteredScorer> custom;  // registered scorers (configured or not)
  std::unique_ptr<Judge> judge;                    // the judge scorer's, when configured

  // The configured registered scorers that apply to `dataset`, in name order.
  std::vector<std::string> custom_for(const std::string& dataset) const {
    std::vector<std::string> out;
    for (const auto& [name, r] : custom)
      if (configured(name) &&
          (r.datasets.empty() || std::find(r.datasets.begin(), r.datasets.end(), dataset) != r.datasets.end()))
        out.push_back(name);
    return out;
  }

  bool main() const { return is_main_process(comm.get()); }
  // Data parallel: every rank's counts summed into `scores` (each rank scored its own batches).
  void gather_counts(DatasetScores& scores) const;

  bool configured(const std::string& scorer) const {
    const auto& s = cfg.eval.scorers;
    return cfg.eval.primary_scorer == scorer || std::find(s.begin(), s.end(), scorer) != s.end();
  }
  const Entry& entry(const std::string& name) const {
    auto it = entries.find(name);
    if (it == entries.end()) {
      std::string known;
      for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
      throw ConfigError(fmt::format("[eval] dataset '{}' is not evaluated (evaluated: {})", name, known));
    }
    return it->second;
  }
  struct DatasetScorers;
  std::unique_ptr<DataLoader> prompt_loader(EvalModel& m, const std::string& name) const;
  DatasetScorers prepare_scorers(EvalModel& m, const Entry& e);
  void score_answer(const DatasetScorers& sc, const LabelSet& ls, const std::string& label_name, int64_t label,
                    const std::string& output, int64_t lik_pred, int64_t clip_pred, DatasetScores& scores,
                    JsonFields& f) const;
  DatasetScores evaluate_one(EvalModel& m, size_t di, const std::string& pred_dir);
  void count_naming(const std::string& name, const std::string& output, DatasetScores& scores, JsonFields& f) const;
};

void register_scorer(const std::string& name, ScorerFn fn, std::vector<std::string> datasets) {
  if (!fn) throw ConfigError("[eval] register_scorer('" + name + "'): the scorer function is empty");
  add_extension_name(ExtensionKind::scorer, name);  // validates the name
  std::lock_guard<std::mutex> l(g_scorers_mutex);
  registered_scorers()[name] = {std::move(fn), std::move(datasets)};
}

RescoreOptions::Scorer registered_scorer(const std::string& name) {
  std::lock_guard<std::mutex> l(g_scorers_mutex);
  const auto& m = registered_scorers();
  auto it = m.find(name);
  if (it == m.end()) {
    std::string known;
    for (const auto& [n, _] : m) known += (known.empty() ? "" : ", ") + n;
    throw ConfigError(fmt::format("[eval] scorer '{}' is not registered (registered: {})", name,
                                  known.empty() ? "none" : known));
  }
  return {name, it->second.fn, it->second.datasets};
}

void check_config_judge(const RunConfig& cfg) {
  const auto& s = cfg.eval.scorers;
  const bool judged = cfg.eval.primary_scorer == "judge" || std::find(s.begin(), s.end(), "judge") != s.end();
  if (!judged || config_judge_allowed()) return;
  if (!cfg.eval.judge_url.empty())
    throw ConfigError(fmt::format(
        "[eval] eval.judge_url: the config asks to send every answer to {} (model '{}') as the judge, and a config "
        "never contacts a host by itself; add --allow-judge to the command line to allow it (library code: "
        "emt::allow_config_judge(true))",
        cfg.eval.judge_url, cfg.eval.judge_model));
  throw ConfigError(fmt::format(
      "[eval] eval.judge_command: the config asks to run '{}' as the judge, and a config never runs a program by "
      "itself; add --allow-judge to the command line to run it (library code: emt::allow_config_judge(true))",
      cfg.eval.judge_command));
}

Evaluator::Evaluator(const RunConfig& cfg) : impl_(std::make_unique<Impl>()) {
  Impl& d = *impl_;
  d.cfg = cfg;
  std::vector<std::string> known = {"strict", "likelihood", "clip", "judge"};
  {
    std::lock_guard<std::mutex> l(g_scorers_mutex);
    d.custom = registered_scorers();  // as registered when the evaluator is made
  }
  for (const auto& [name, _] : d.custom) known.push_back(name);
  std::vector<std::string> listed = cfg.eval.scorers;
  listed.push_back(cfg.eval.primary_scorer);
  for (const auto& s : listed)
    if (std::find(known.begin(), known.end(), s) == known.end())
      throw ConfigError(fmt::format("[eval] eval.scorers: unknown scorer '{}' (known: {})", s, fmt::join(known, ", ")));
  if (d.configured("judge") && cfg.eval.judge_command.empty() && cfg.eval.judge_url.empty())
    throw ConfigError("[eval] eval.judge_command: the judge scorer is configured but neither a command nor "
                      "eval.judge_url is set");
  check_config_judge(cfg);
  if (d.configured("judge")) d.judge = std::make_unique<Judge>(judge_options(cfg));
  if (cfg.eval.batch_size <= 0)
    throw ConfigError(fmt::format("[eval] eval.batch_size must be > 0 (got {})", cfg.eval.batch_size));

  const bool explicit_list = !cfg.eval.datasets.empty();
  std::vector<std::string> wanted = cfg.eval.datasets;
  if (!explicit_list)
    for (const auto& [name, _] : cfg.data.datasets) wanted.push_back(name);
  const auto seed = static_cast<uint64_t>(cfg.run.seed);
  std::map<std::string, std::vector<std::string>> class_names;
  for (const auto& name : wanted) {
    auto it = cfg.data.datasets.find(name);
    if (it == cfg.data.datasets.end())
      throw ConfigError(fmt::format("[eval] eval.datasets: '{}' is not in data.datasets", name));
    if (d.entries.count(name)) continue;
    const DatasetConfig& dc = it->second;
    if (dc.format == "llava_json") {
      if (explicit_list)
        throw ConfigError(fmt::format("[eval] eval.datasets: '{}' is instruction data (llava_json) without class "
                                      "labels and cannot be scored", name));
      log_debug("[eval] skipping instruction dataset '{}'", name);
      continue;
    }
    auto ds = open_dataset(name, dc, cfg.data.root, Split::test, seed);
    if (ds->class_names().empty())
      throw ConfigError(fmt::format("[eval] dataset '{}': no class names, so answers cannot be scored", name));
    if (cfg.eval.max_samples > 0 && cfg.eval.max_samples < ds->size()) {
      // A stream of its own, so eval.max_samples never reuses the choice made by test_max_samples.
      ds = subset(ds, choose_subset(*ds, cfg.eval.max_samples, dc.balanced, mix_seed(seed, 0x65766131ull)));
      ds->set_name(name);
    }
    if (ds->size() == 0) throw ConfigError(fmt::format("[eval] dataset '{}': the test split is empty", name));
    d.names.push_back(name);
    class_names[name] = ds->class_names();
    d.entries[name] = Impl::Entry{ds, dc, dataset_question(name, dc, ds->class_names())};
  }
  if (d.names.empty()) throw ConfigError("[eval] no dataset to evaluate (eval.datasets and data.datasets are empty)");
  d.label_sets = eval_label_sets(class_names, cfg);
}

Evaluator::~Evaluator() = default;

const std::vector<std::string>& Evaluator::datasets() const { return impl_->names; }
std::shared_ptr<ImageDataset> Evaluator::dataset(const std::string& name) const { return impl_->entry(name).ds; }
const LabelSet& Evaluator::label_set(const std::string& name) const {
  impl_->entry(name);
  return impl_->label_sets.at(name);
}
const std::map<std::string, LabelSet>& Evaluator::label_sets() const { return impl_->label_sets; }

std::vector<std::string> Evaluator::scorers() const {
  std::vector<std::string> s = {"strict"};
  if (impl_->configured("likelihood")) s.push_back("likelihood");
  if (impl_->configured("clip") && impl_->clip) s.push_back("clip");
  if (impl_->configured("judge")) s.push_back("judge");
  for (const auto& [name, _] : impl_->custom)
    if (impl_->configured(name)) s.push_back(name);
  return s;
}

std::vector<std::string> Evaluator::scorers_for(const std::string& dataset) const {
  impl_->entry(dataset);  // ConfigError naming the evaluated datasets otherwise
  std::vector<std::string> s;
  for (const auto& name : scorers())
    if (!impl_->custom.count(name)) s.push_back(name);
  for (const auto& name : impl_->custom_for(dataset)) s.push_back(name);
  return s;
}

void Evaluator::set_clip(ClipModel clip, std::shared_ptr<Tokenizer> text_tokenizer) {
  if (!clip || !text_tokenizer) throw ConfigError("[eval] set_clip: CLIP model and tokenizer must both be given");
  clip->eval();
  impl_->clip = std::move(clip);
  impl_->clip_tok = std::move(text_tokenizer);
}
bool Evaluator::has_clip() const { return static_cast<bool>(impl_->clip); }
void Evaluator::set_prediction_fields(JsonFields fields) { impl_->extra = std::move(fields); }
void Evaluator::set_progress(bool on) { impl_->progress = on; }
void Evaluator::set_communicator(std::shared_ptr<Communicator> comm) {
  impl_->comm = comm && comm->world_size() > 1 ? std::move(comm) : nullptr;
}

void Evaluator::Impl::gather_counts(DatasetScores& scores) const {
  nlohmann::json mine = nlohmann::json::object();
  for (const auto& [name, c] : scores.by_scorer)
    mine[name] = {c.n, c.correct, c.incorrect, c.intrinsic, c.extrinsic, c.naming};
  std::map<std::string, ScoreCounts> sum;
  for (const auto& bytes : comm->all_gather_bytes(mine.dump())) {
    const auto theirs = nlohmann::json::parse(bytes);  // items() must not outlive it
    for (const auto& [name, v] : theirs.items()) {
      ScoreCounts& c = sum[name];
      c.n += v[0].get<int64_t>();
      c.correct += v[1].get<int64_t>();
      c.incorrect += v[2].get<int64_t>();
      c.intrinsic += v[3].get<int64_t>();
      c.extrinsic += v[4].get<int64_t>();
      for (const auto& [ds, k] : v[5].items()) c.naming[ds] += k.get<int64_t>();
    }
  }
  scores.by_scorer = std::move(sum);
}

std::vector<DatasetScores> Evaluator::evaluate(EvalModel& m, const std::string& pred_dir) {
  Impl& d = *impl_;
  if (!m.model || !m.tokenizer) throw ConfigError("[eval] evaluate: the model and its tokenizer must be set");
  if (d.configured("clip") && !d.clip) {
    if (d.cfg.eval.primary_scorer == "clip")
      throw ConfigError("[eval] eval.primary_scorer is clip but no CLIP model was given (eval.clip_model)");
    log_warn("[eval] the clip scorer is configured but no CLIP model was given: its rows are skipped");
  }
  if (!pred_dir.empty() && d.main()) fs::create_directories(pred_dir);
  TrainFlagGuard train_flag(*m.model);
  torch::NoGradGuard ng;
  std::vector<DatasetScores> out;
  for (size_t i = 0; i < d.names.size(); ++i) out.push_back(d.evaluate_one(m, i, pred_dir));
  return out;
}

// The prompt-only, unshuffled, left-padded loader of one dataset's test images with its EMT question.
std::unique_ptr<DataLoader> Evaluator::Impl::prompt_loader(EvalModel& m, const std::string& name) const {
  const Entry& e = entries.at(name);
  PromptSpec ps;
  ps.questions = {e.question};
  ps.answer_template = e.dcfg.answer;
  LoaderOptions lo;
  lo.batch_size = cfg.eval.batch_size;
  lo.shuffle = false;
  lo.with_answer = false;
  lo.padding_side = "left";
  lo.seed = static_cast<uint64_t>(cfg.run.seed);
  lo.workers = cfg.data.workers;
  lo.prefetch = cfg.data.prefetch;
  lo.conversation = m.conversation;
  lo.system = m.system;
  lo.image = m.image;
  lo.skip_bad = e.dcfg.skip_bad;
  if (comm) {
    lo.rank = comm->rank();
    lo.world_size = comm->world_size();
    lo.shard_batches = true;
  }
  auto loader = std::make_unique<DataLoader>(e.ds, m.tokenizer, ps, lo);
  if (loader->image_token_id() != m.model->image_token_id)
    throw ConfigError(fmt::format("[eval] {}: the tokenizer's <image> id {} differs from the model's image token "
                                  "id {}", name, loader->image_token_id(), m.model->image_token_id));
  return loader;
}

// What the configured scorers need for one dataset, prepared once: likelihood candidates, CLIP class embeddings.
struct Evaluator::Impl::DatasetScorers {
  bool lik = false, clip = false, judge = false;
  std::vector<std::vector<int64_t>> candidates;  // likelihood: every class's answer ids
  torch::Tensor class_emb;                       // clip: [K, P]
  std::vector<std::string> order;                // scorers in report order, strict first
  std::vector<std::pair<std::string, ScorerFn>> custom;  // registered scorers that apply to this dataset
  std::string dataset;
  const std::vector<std::string>* class_names = nullptr;
};

Evaluator::Impl::DatasetScorers Evaluator::Impl::prepare_scorers(EvalModel& m, const Entry& e) {
  DatasetScorers sc;
  sc.lik = configured("likelihood");
  sc.clip = configured("clip") && clip;
  sc.judge = configured("judge");
  const auto& classes = e.ds->class_names();
  if (sc.lik)
    for (const auto& c : classes)
      sc.candidates.push_back(encode_answer(*m.tokenizer, m.conversation, answer_text(e.dcfg, c)));
  if (sc.clip) {
    std::vector<std::string> texts;
    for (const auto& c : classes) texts.push_back(readable_label(c));
    sc.class_emb = clip_text_embeddings(clip, *clip_tok, texts, m.device);
  }
  sc.order = {"strict"};
  if (sc.lik) sc.order.push_back("likelihood");
  if (sc.clip) sc.order.push_back("clip");
  if (sc.judge) sc.order.push_back("judge");
  sc.dataset = e.ds->name();
  sc.class_names = &e.ds->class_names();
  for (const auto& name : custom_for(e.ds->name())) {
    sc.custom.emplace_back(name, custom.at(name).fn);
    sc.order.push_back(name);
  }
  return sc;
}

// One answer's verdicts under every configured scorer, counted into `scores` and written into its JSON fields.
// lik_pred / clip_pred: that row's prediction (-1 = none) when the scorer runs.
void Evaluator::Impl::score_answer(const DatasetScorers& sc, const LabelSet& ls, const std::string& label_name,
                                   int64_t label, const std::string& output, int64_t lik_pred, int64_t clip_pred,
                                   DatasetScores& scores, JsonFields& f) const {
  Verdict v = strict_verdict(output, ls, label);
  scores.by_scorer["strict"].add(v.kind);
  f.emplace_back("verdict_strict", std::string(verdict_name(v.kind)));
  f.emplace_back("pred_strict", v.predicted);
  if (sc.lik) {
    const VerdictKind kind = lik_pred == label ? VerdictKind::correct : VerdictKind::incorrect;
    scores.by_scorer["likelihood"].add(kind);
    f.emplace_back("verdict_likelihood", std::string(verdict_name(kind)));
    f.emplace_back("pred_likelihood", lik_pred);
  }
  if (sc.clip) {
    // Nothing said is nothing to match: an empty answer is extrinsic, not the nearest label.
    const int64_t p = output.empty() ? -1 : clip_pred;
    const VerdictKind kind =
        p < 0 ? VerdictKind::extrinsic : (p == label ? VerdictKind::correct : VerdictKind::incorrect);
    scores.by_scorer["clip"].add(kind);
    f.emplace_back("verdict_clip", std::string(verdict_name(kind)));
    f.emplace_back("pred_clip", p);
  }
  if (sc.judge) {
    const bool yes = judge->says_yes(label_name, output);
    // A "no" keeps the strict failure kind when strict agrees it failed (as re-scoring does).
    const VerdictKind kind =
        yes ? VerdictKind::correct : (v.kind == VerdictKind::correct ? VerdictKind::incorrect : v.kind);
    scores.by_scorer["judge"].add(kind);
    f.emplace_back("verdict_judge", std::string(verdict_name(kind)));
    f.emplace_back("pred_judge", yes ? label : int64_t{-1});
  }
  for (const auto& [name, fn] : sc.custom) {
    ScorerResult r = fn(ScorerInput{sc.dataset, *sc.class_names, label, output, ls});
    if (r.predicted < -1 || r.predicted >= static_cast<int64_t>(sc.class_names->size()))
      throw Error(fmt::format("[eval] scorer '{}' on {}: predicted class {} is outside [-1, {})", name, sc.dataset,
                              r.predicted, sc.class_names->size()));
    scores.by_scorer[name].add(r.kind);
    f.emplace_back("verdict_" + name, std::string(verdict_name(r.kind)));
    f.emplace_back("pred_" + name, r.predicted);
  }
}

// The answer drift of one answer to `name`'s question: which other eval datasets it names a class of, counted
// into every scorer's map and listed in the predictions line ("names_class_of": "dataset=class,...") when there
// is one.
void Evaluator::Impl::count_naming(const std::string& name, const std::string& output, DatasetScores& scores,
                                   JsonFields& f) const {
  const LabelSet& own = label_sets.at(name);
  std::string named;  // "mnist=3,shapes10=star"
  for (const auto& other : names) {
    if (other == name) continue;
    const int64_t k = names_class_of(output, label_sets.at(other), own);
    if (k < 0) continue;
    named += (named.empty() ? "" : ",") + other + "=" + label_sets.at(other).class_names[k];
    for (auto& [_, c] : scores.by_scorer) ++c.naming[other];
  }
  if (!named.empty()) f.emplace_back("names_class_of", named);
}

DatasetScores Evaluator::Impl::evaluate_one(EvalModel& m, size_t di, const std::string& pred_dir) {
  const std::string& name = names[di];
  const Entry& e = entries.at(name);
  const LabelSet& ls = label_sets.at(name);
  const auto& classes = e.ds->class_names();
  const auto t0 = std::chrono::steady_clock::now();
  auto loader = prompt_loader(m, name);
  const std::string prompt_text = render_prompt(m.conversation, m.system, e.question);
  GenerateOptions g;
  g.max_new_tokens = cfg.eval.max_new_tokens;
  g.temperature = cfg.eval.temperature;
  g.top_p = cfg.eval.top_p;
  g.eos_id = m.tokenizer->eos_id();
  g.stop_strings = stop_strings(m.conversation);
  g.tokenizer = m.tokenizer.get();
  const DatasetScorers sc = prepare_scorers(m, e);
  const auto img_dtype = param_dtype(*m.model->vision_tower);
  DatasetScores scores;
  scores.dataset = name;
  for (const auto& s : sc.order)
    for (const auto& other : names)
      if (other != name) scores.by_scorer[s].naming[other] = 0;
  std::vector<std::pair<int64_t, std::string>> chunks;  // (batch number, its predictions lines)
  std::unique_ptr<Progress> prog;
  if (progress && main()) prog = std::make_unique<Progress>("eval " + name, loader->num_samples());

  Batch batch;
  int64_t done = 0;
  while (loader->next(batch)) {
    for (int64_t i = 0; i < batch.size(); ++i)
      if (batch.class_ids[i] < 0 || batch.class_ids[i] >= ls.num_classes())
        throw FormatError(fmt::format("[eval] {}: {} has label {} outside the {} class names", name,
                                      e.ds->source(batch.indices[i]), batch.class_ids[i], ls.num_classes()));
    auto images = batch.images.to(m.device, img_dtype);
    auto ids = batch.input_ids.to(m.device), mask = batch.attention_mask.to(m.device);
    g.seed = mix_seed(mix_seed(static_cast<uint64_t>(cfg.run.seed), di), static_cast<uint64_t>(batch.number));
    auto gen = generate(m.model, images, ids, mask, g);
    const int64_t B = batch.size();
    std::vector<std::string> outputs;
    for (int64_t i = 0; i < B; ++i) outputs.push_back(clean_answer(m.tokenizer->decode(gen[i], true), g.stop_strings));
    torch::Tensor lik_pred, clip_pred;
    if (sc.lik) {
      auto ll = candidate_logliks(m.model, images, ids, mask, sc.candidates, cfg.eval.batch_size).cpu();
      lik_pred = likelihood_rank(ll, torch::tensor(batch.class_ids, torch::kLong)).predicted;
    }
    if (sc.clip) {
      auto emb = clip_text_embeddings(clip, *clip_tok, outputs, m.device);
      clip_pred = emb.matmul(sc.class_emb.t()).argmax(1).cpu();
    }
    std::string lines;
    for (int64_t i = 0; i < B; ++i) {
      const int64_t label = batch.class_ids[i];
      JsonFields f = extra;
      f.emplace_back("dataset", name);
      f.emplace_back("index", batch.indices[i]);
      f.emplace_back("source", e.ds->source(batch.indices[i]));
      f.emplace_back("label", label);
      f.emplace_back("label_name", classes[label]);
      f.emplace_back("prompt", prompt_text);
      f.emplace_back("output", outputs[i]);
      score_answer(sc, ls, classes[label], label, outputs[i], sc.lik ? lik_pred[i].item<int64_t>() : -1,
                   sc.clip ? clip_pred[i].item<int64_t>() : -1, scores, f);
      count_naming(name, outputs[i], scores, f);
      lines += to_json_line(f) + "\n";
    }
    chunks.emplace_back(batch.number, std::move(lines));
    done += B;
    if (prog) {
      const auto& s = scores.by_scorer["strict"];
      prog->update(done, fmt::format("strict {:.1f}%", 100.0 * s.correct / std::max<int64_t>(1, s.n)));
    }
  }
  if (comm) {
    // Every rank's answers, back in the one-process order of batches.
    nlohmann::json mine = nlohmann::json::array();
    for (auto& [number, lines] : chunks) mine.push_back({number, std::move(lines)});
    chunks.clear();
    for (const auto& bytes : comm->all_gather_bytes(mine.dump()))
      for (const auto& c : nlohmann::json::parse(bytes)) chunks.emplace_back(c[0].get<int64_t>(), c[1].get<std::string>());
    std::sort(chunks.begin(), chunks.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    gather_counts(scores);
  }
  for (auto& [_, c] : scores.by_scorer) c.finish();
  scores.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (prog) {
    std::string summary;
    for (const auto& s : sc.order)
      summary += fmt::format("{}{} {:.1f}%", summary.empty() ? "" : ", ", s, 100.0 * scores.by_scorer[s].accuracy);
    prog->finish(summary);
  }
  if (!pred_dir.empty() && main()) {
    std::string lines;
    for (const auto& c : chunks) lines += c.second;
    write_file_atomic((fs::path(pred_dir) / (name + ".jsonl")).string(), lines);
  }
  return scores;
}

std::vector<DatasetScores> Evaluator::clip_zero_shot(ClipModelImpl& clip, const Tokenizer& text_tokenizer,
                                                     const ImageProcessorOptions& image, torch::Device device) {
  ClipModel holder(std::dynamic_pointer_cast<ClipModelImpl>(clip.shared_from_this()));
  return clip_zero_shot(holder, text_tokenizer, image, device);
}

std::vector<DatasetScores> Evaluator::clip_zero_shot(ClipModel& clip, const Tokenizer& text_tokenizer,
                                                     const ImageProcessorOptions& image, torch::Device device) {
  Impl& d = *impl_;
  if (!clip) throw ConfigError("[eval] clip_zero_shot: no CLIP model");
  if (d.cfg.eval.clip_templates.empty()) throw ConfigError("[eval] eval.clip_templates: needs at least one template");
  TrainFlagGuard train_flag(*clip);
  torch::NoGradGuard ng;
  const auto img_dtype = param_dtype(*clip->vision_model);
  std::vector<DatasetScores> out;
  for (const auto& name : d.names) {
    const auto t0 = std::chrono::steady_clock::now();
    const Impl::Entry& e = d.entries.at(name);
    const auto& classes = e.ds->class_names();
    const int64_t K = static_cast<int64_t>(classes.size()), NT = static_cast<int64_t>(d.cfg.eval.clip_templates.size());
    std::vector<std::string> texts;  // class-major: class k, template t at k * NT + t
    for (const auto& c : classes)
      for (const auto& t : d.cfg.eval.clip_templates) texts.push_back(fill_label(t, readable_label(c)));
    auto emb = clip_text_embeddings(clip, text_tokenizer, texts, device).view({K, NT, -1}).mean(1);
    auto class_emb = torch::nn::functional::normalize(emb, torch::nn::functional::NormalizeFuncOptions().dim(-1));

    DatasetScores scores;
    scores.dataset = name;
    ScoreCounts& counts = scores.by_scorer["clip_zero_shot"];
    const int64_t n = e.ds->size(), bs = d.cfg.eval.batch_size;
    std::unique_ptr<Progress> prog;
    if (d.progress && d.main()) prog = std::make_unique<Progress>("clip zero-shot " + name, n);
    for (int64_t b0 = 0; b0 < n; b0 += bs) {
      if (d.comm && (b0 / bs) % d.comm->world_size() != d.comm->rank()) continue;  // another rank's batch
      const int64_t b1 = std::min(n, b0 + bs);
      std::vector<torch::Tensor> pix(static_cast<size_t>(b1 - b0));
      std::vector<std::string> bad(pix.size());
      at::parallel_for(b0, b1, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) {
          try {
            pix[static_cast<size_t>(i - b0)] = preprocess_image(e.ds->image(i), image);
          } catch (const Error& err) {
            bad[static_cast<size_t>(i - b0)] = err.what();
          }
        }
      });
      std::vector<torch::Tensor> ok;
      std::vector<int64_t> labels;
      for (int64_t i = b0; i < b1; ++i) {
        const auto& msg = bad[static_cast<size_t>(i - b0)];
        if (!msg.empty()) {
          if (!e.dcfg.skip_bad) throw IoError(msg);
          log_warn("[eval] {}: skipping bad image {}: {}", name, e.ds->source(i), msg);
          continue;
        }
        ok.push_back(pix[static_cast<size_t>(i - b0)]);
        labels.push_back(e.ds->label(i));
      }
      if (ok.empty()) continue;
      auto f = clip->image_features(torch::stack(ok).to(device, img_dtype)).to(torch::kFloat32);
      f = torch::nn::functional::normalize(f, torch::nn::functional::NormalizeFuncOptions().dim(-1));
      auto pred = f.matmul(class_emb.t()).argmax(1).cpu();
      for (size_t i = 0; i < labels.size(); ++i)
        counts.add(pred[static_cast<int64_t>(i)].item<int64_t>() == labels[i] ? VerdictKind::correct
                                                                                : VerdictKind::incorrect);
      if (prog) prog->update(b1, fmt::format("{:.1f}%", 100.0 * counts.correct / std::max<int64_t>(1, counts.n)));
    }
    if (d.comm) d.gather_counts(scores);  // replaces the map: `counts` is not used past here
    ScoreCounts& total = scores.by_scorer["clip_zero_shot"];
    total.finish();
    scores.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (prog) prog->finish(fmt::format("clip_zero_shot {:.1f}%", 100.0 * total.accuracy));
    out.push_back(std::move(scores));
  }
  return out;
}

}  // namespace emt
