// The evaluator on a tiny random LLaVA and datasets written by the test: predictions files, batch-size invariance,
// determinism, verdict counts, likelihood ranking (KV-cache reuse == full recompute; a biased model picks its
// class), the judge scorer, CLIP zero-shot on constructed aligned / permuted CLIP models, and validation errors.
#include <catch2/catch.hpp>
#include <emt/adapters/peft.h>
#include <emt/core/conversation.h>
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <emt/core/llava.h>
#include <emt/core/runtime.h>
#include <emt/eval/evaluator.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>

#include "test/helpers.h"
#include "test/test_tokenizer_fake.h"
#include "test/test_models_common.h"

using emt_test::slurp;

namespace fs = std::filesystem;

namespace {

// Test-only tokenizer: one id per word; '.', ',', '?', '!', ':' and ';' are words of their own. Ids 0..3 are pad,
// bos, eos, unk; the vocabulary is every word of the corpus given at construction.
class WordTokenizer : public emt_test::FakeTokenizerBase {
 public:
  explicit WordTokenizer(const std::vector<std::string>& corpus) {
    for (const auto& t : corpus)
      for (const auto& w : split(t)) intern(w);
  }
  std::vector<int64_t> encode(const std::string& text, bool add_bos = false, bool add_eos = false) const override {
    std::vector<int64_t> ids;
    if (add_bos) ids.push_back(1);
    std::string cur;
    auto flush = [&] {
      if (cur.empty()) return;
      auto it = ids_.find(cur);
      ids.push_back(it == ids_.end() ? 3 : it->second);
      cur.clear();
    };
    for (size_t i = 0; i < text.size();) {
      bool special = false;
      for (const auto& [tok, id] : special_)
        if (text.compare(i, tok.size(), tok) == 0) {
          flush();
          ids.push_back(id);
          i += tok.size();
          special = true;
          break;
        }
      if (special) continue;
      char c = text[i++];
      if (std::isspace(static_cast<unsigned char>(c))) {
        flush();
      } else if (is_punct(c)) {
        flush();
        cur = std::string(1, c);
        flush();
      } else {
        cur.push_back(c);
      }
    }
    flush();
    if (add_eos) ids.push_back(2);
    return ids;
  }
  std::string decode(const std::vector<int64_t>& ids, bool skip_special) const override {
    std::string s;
    for (auto id : ids) {
      std::string w;
      if (id >= 4 && id < 4 + static_cast<int64_t>(words_.size())) w = words_[static_cast<size_t>(id - 4)];
      else if (!skip_special)
        for (const auto& [tok, sid] : special_)
          if (sid == id) w = tok;
      if (w.empty()) continue;
      s += (s.empty() ? "" : " ") + w;
    }
    return s;
  }
  int64_t id_of(const std::string& w) const { return ids_.at(w); }

  static bool is_punct(char c) { return std::string(".,?!:;").find(c) != std::string::npos; }
  static std::vector<std::string> split(const std::string& text) {
    std::vector<std::string> out;
    std::string cur;
    for (char c : text) {
      if (std::isspace(static_cast<unsigned char>(c)) || is_punct(c)) {
        if (!cur.empty()) out.push_back(cur);
        cur.clear();
        if (is_punct(c)) out.emplace_back(1, c);
      } else {
        cur.push_back(c);
      }
    }
    if (!cur.empty()) out.push_back(cur);
    return out;
  }

 private:
  void intern(const std::string& w) {
    if (ids_.count(w)) return;
    ids_[w] = 4 + static_cast<int64_t>(words_.size());
    words_.push_back(w);
  }
  int64_t base_vocab() const override { return 4 + static_cast<int64_t>(words_.size()); }
  std::vector<std::string> words_;
  std::map<std::string, int64_t> ids_;
};

// IDX test split (and a one-image train split) with `n` images of 28x28; image i shows class labels[i].
// identical_per_class: every image of a class is the same picture (the CLIP tests need that).
void write_idx(const std::string& dir, const std::vector<int64_t>& labels, const std::vector<std::string>& names,
               bool identical_per_class) {
  fs::create_directories(dir);
  const int64_t n = static_cast<int64_t>(labels.size());
  std::vector<uint8_t> px(static_cast<size_t>(n * 28 * 28)), lab;
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t seed = identical_per_class ? static_cast<uint64_t>(labels[i]) : static_cast<uint64_t>(i) + 100;
    auto perm = emt::seeded_permutation(28 * 28, seed);
    for (int64_t p = 0; p < 28 * 28; ++p) px[static_cast<size_t>(i * 784 + p)] = static_cast<uint8_t>(perm[p] % 256);
    lab.push_back(static_cast<uint8_t>(labels[i]));
  }
  emt::write_file_atomic(dir + "/t10k-images-idx3-ubyte", emt::encode_idx({n, 28, 28}, px.data()));
  emt::write_file_atomic(dir + "/t10k-labels-idx1-ubyte", emt::encode_idx({n}, lab.data()));
  emt::write_file_atomic(dir + "/train-images-idx3-ubyte", emt::encode_idx({1, 28, 28}, px.data()));
  emt::write_file_atomic(dir + "/train-labels-idx1-ubyte", emt::encode_idx({1}, lab.data()));
  if (!names.empty()) {
    std::string txt;
    for (const auto& s : names) txt += s + "\n";
    emt::write_file_atomic(dir + "/classes.txt", txt);
  }
}

std::vector<int64_t> cyclic_labels(int64_t n, int64_t k) {
  std::vector<int64_t> v;
  for (int64_t i = 0; i < n; ++i) v.push_back(i % k);
  return v;
}

// Two datasets: "digits" (IDX, 20 images, the MNIST number prompt) and "shapes" (synthetic shapes10, 12 images).
emt::RunConfig eval_config(const std::string& root) {
  write_idx(root + "/digits", cyclic_labels(20, 10), {}, false);
  emt::RunConfig cfg;
  cfg.data.root = root;
  cfg.data.workers = 1;
  emt::DatasetConfig digits;
  digits.format = "idx";
  digits.path = "digits";
  emt::DatasetConfig shapes;
  shapes.format = "synthetic";
  shapes.path = "shapes10";
  shapes.test_max_samples = 12;
  cfg.data.datasets = {{"digits", digits}, {"shapes", shapes}};
  cfg.eval.batch_size = 4;
  cfg.eval.max_new_tokens = 5;
  cfg.eval.scorers = {"strict", "likelihood"};
  cfg.run.seed = 3;
  return cfg;
}

// Every word the prompts and answers of the evaluator's datasets use, for WordTokenizer.
std::vector<std::string> corpus_of(const emt::Evaluator& ev, const emt::RunConfig& cfg) {
  std::vector<std::string> corpus = {"The object is a(n) ."};
  for (const auto& name : ev.datasets()) {
    const auto& names = ev.dataset(name)->class_names();
    corpus.push_back(emt::dataset_question(name, cfg.data.datasets.at(name), names));
    for (const auto& c : names) corpus.push_back(c);
  }
  return corpus;
}

// The model tests' tiny shapes with room for the longest prompt + answer and `vocab` tokens.
emt::ModelSection eval_model_section(int64_t vocab) {
  auto m = emt_test::tiny_model_section("mlp2x_gelu");
  m.llm.max_position_embeddings = 128;
  m.llm.vocab_size = static_cast<int>(vocab);
  return m;
}

emt::EvalModel tiny_eval_model(std::shared_ptr<WordTokenizer> tok) {
  const int64_t image_id = tok->add_special_token("<image>");
  auto m = eval_model_section(tok->vocab_size());
  torch::manual_seed(7);
  emt::EvalModel em;
  em.model = emt::build_llava(m, image_id);
  em.model->to(torch::kFloat64);  // batch-size invariance must not hinge on float rounding of a random model
  em.tokenizer = tok;
  em.image = emt::image_options_for_size(8);
  em.conversation = "plain";
  return em;
}

using emt_test::read_jsonl;

struct Fixture {
  std::string dir;
  emt::RunConfig cfg;
  std::unique_ptr<emt::Evaluator> ev;
  std::shared_ptr<WordTokenizer> tok;
  emt::EvalModel m;
  explicit Fixture(const std::string& name, const std::function<void(emt::RunConfig&)>& edit = {}) {
    dir = emt_test::scratch_dir(name);
    cfg = eval_config(dir + "/data");
    cfg.run.out_dir = dir + "/runs";  // the judge cache lives in the run directory
    if (edit) edit(cfg);
    ev = std::make_unique<emt::Evaluator>(cfg);
    ev->set_progress(false);
    tok = std::make_shared<WordTokenizer>(corpus_of(*ev, cfg));
    m = tiny_eval_model(tok);
  }
};

}  // namespace

TEST_CASE("evaluator: predictions files, counts, determinism, batch-size invariance", "[evaluator]") {
  Fixture fx("evaluator_main");
  REQUIRE(fx.ev->datasets() == std::vector<std::string>{"digits", "shapes"});
  REQUIRE(fx.ev->scorers() == std::vector<std::string>{"strict", "likelihood"});
  fx.ev->set_prediction_fields({{"method", std::string("lora")}, {"epoch", int64_t{2}}});
  fx.m.model->train();
  auto scores = fx.ev->evaluate(fx.m, fx.dir + "/pred_a");
  CHECK(fx.m.model->is_training());  // the training flag is restored
  REQUIRE(scores.size() == 2);
  const std::map<std::string, int64_t> sizes = {{"digits", 20}, {"shapes", 12}};
  for (const auto& s : scores) {
    INFO(s.dataset);
    REQUIRE(s.by_scorer.size() == 2);
    for (const auto& [scorer, c] : s.by_scorer) {
      INFO(scorer);
      CHECK(c.n == sizes.at(s.dataset));
      CHECK(c.correct + c.incorrect + c.intrinsic + c.extrinsic == c.n);
      CHECK(c.accuracy == Approx(static_cast<double>(c.correct) / c.n));
      CHECK(c.ci_low <= c.accuracy + 1e-12);  // Wilson bounds bracket the estimate (up to rounding at 0 and 1)
      CHECK(c.ci_high >= c.accuracy - 1e-12);
    }
    CHECK(s.by_scorer.at("likelihood").intrinsic == 0);
    CHECK(s.by_scorer.at("likelihood").extrinsic == 0);

    auto lines = read_jsonl(fx.dir + "/pred_a/" + s.dataset + ".jsonl");
    REQUIRE(static_cast<int64_t>(lines.size()) == sizes.at(s.dataset));
    std::map<std::string, int64_t> strict_counts;
    for (size_t i = 0; i < lines.size(); ++i) {
      const auto& j = lines[i];
      for (const char* k : {"dataset", "index", "source", "label", "label_name", "prompt", "output", "verdict_strict",
                            "pred_strict", "verdict_likelihood", "pred_likelihood", "method", "epoch"})
        CHECK(j.contains(k));
      CHECK(j["method"] == "lora");
      CHECK(j["epoch"] == 2);
      CHECK(j["dataset"] == s.dataset);
      CHECK(j["index"] == static_cast<int64_t>(i));
      const auto& names = fx.ev->dataset(s.dataset)->class_names();
      CHECK(j["label_name"] == names.at(j["label"].get<size_t>()));
      CHECK(j["prompt"].get<std::string>().find("<image>") != std::string::npos);
      // The verdict written is the strict verdict of the output written.
      auto v = emt::strict_verdict(j["output"], fx.ev->label_set(s.dataset), j["label"]);
      CHECK(j["verdict_strict"] == emt::verdict_name(v.kind));
      CHECK(j["pred_strict"] == v.predicted);
      ++strict_counts[j["verdict_strict"]];
      // The answer drift written is the one of the output written.
      const std::string other = s.dataset == "digits" ? "shapes" : "digits";
      const int64_t k = emt::names_class_of(j["output"], fx.ev->label_set(other), fx.ev->label_set(s.dataset));
      if (k >= 0) {
        CHECK(j["names_class_of"] == other + "=" + fx.ev->dataset(other)->class_names()[k]);
        ++strict_counts["drift"];
      } else {
        CHECK_FALSE(j.contains("names_class_of"));
      }
    }
    for (const auto& [scorer, c] : s.by_scorer) {
      INFO(scorer);
      REQUIRE(c.naming.size() == 1);  // the other dataset, counted even when 0
      CHECK(c.naming.begin()->second == strict_counts["drift"]);
    }
    const auto& c = s.by_scorer.at("strict");
    CHECK(strict_counts["correct"] == c.correct);
    CHECK(strict_counts["incorrect"] == c.incorrect);
    CHECK(strict_counts["intrinsic"] == c.intrinsic);
    CHECK(strict_counts["extrinsic"] == c.extrinsic);
  }
  // The study's fields come first on every line.
  CHECK(slurp(fx.dir + "/pred_a/digits.jsonl").rfind("{\"method\":\"lora\",\"epoch\":2,\"dataset\":\"digits\"", 0) == 0);
  CHECK(read_jsonl(fx.dir + "/pred_a/digits.jsonl")[0]["prompt"].get<std::string>().find(
            "Please only answer a single number in 0, 1, 2") != std::string::npos);

  // Same images, same answers, same bytes on a second call.
  fx.ev->evaluate(fx.m, fx.dir + "/pred_b");
  for (const char* d : {"digits", "shapes"})
    CHECK(slurp(fx.dir + "/pred_a/" + d + ".jsonl") == slurp(fx.dir + "/pred_b/" + d + ".jsonl"));

  // A fresh evaluator with batch size 1 (and 3 loader workers) produces the same lines.
  auto cfg1 = fx.cfg;
  cfg1.eval.batch_size = 1;
  cfg1.data.workers = 3;
  emt::Evaluator ev1(cfg1);
  ev1.set_progress(false);
  ev1.set_prediction_fields({{"method", std::string("lora")}, {"epoch", int64_t{2}}});
  auto scores1 = ev1.evaluate(fx.m, fx.dir + "/pred_c");
  for (const char* d : {"digits", "shapes"}) {
    INFO(d);
    auto a = read_jsonl(fx.dir + "/pred_a/" + d + ".jsonl"), c = read_jsonl(fx.dir + "/pred_c/" + d + ".jsonl");
    REQUIRE(a.size() == c.size());
    for (size_t i = 0; i < a.size(); ++i) {
      CHECK(a[i]["source"] == c[i]["source"]);
      CHECK(a[i]["output"] == c[i]["output"]);
      CHECK(a[i]["pred_likelihood"] == c[i]["pred_likelihood"]);
    }
  }
  for (size_t i = 0; i < scores.size(); ++i)
    for (const auto& [scorer, c] : scores[i].by_scorer) CHECK(scores1[i].by_scorer.at(scorer).correct == c.correct);

  // No predictions directory: nothing written, same scores.
  auto again = fx.ev->evaluate(fx.m, "");
  CHECK(again[0].by_scorer.at("strict").correct == scores[0].by_scorer.at("strict").correct);
}

TEST_CASE("evaluator: candidate log-likelihoods from the shared prompt cache equal full recomputation",
          "[evaluator]") {
  auto tok = std::make_shared<WordTokenizer>(
      std::vector<std::string>{"what is in the image ? The object is a(n) cat dog big red ship ."});
  auto m = tiny_eval_model(tok);
  m.model->eval();
  const int64_t img = m.model->image_token_id;
  std::vector<std::vector<int64_t>> prompts = {tok->encode("<image> what is in the image ?", true),
                                               tok->encode("what is <image> ?", true)};
  std::vector<std::vector<int64_t>> cands = {tok->encode("The object is a(n) cat .", false, true),
                                             tok->encode("The object is a(n) big red ship .", false, true),
                                             tok->encode("dog", false, true)};
  torch::manual_seed(1);
  auto images = torch::randn({2, 3, 8, 8}, torch::kFloat64);
  // Left-padded batch (the second prompt is 3 tokens shorter).
  const int64_t T = static_cast<int64_t>(std::max(prompts[0].size(), prompts[1].size()));
  REQUIRE(T == static_cast<int64_t>(prompts[1].size()) + 3);
  auto ids = torch::zeros({2, T}, torch::kLong), mask = torch::zeros({2, T}, torch::kLong);
  for (int64_t b = 0; b < 2; ++b) {
    const auto& p = prompts[static_cast<size_t>(b)];
    const int64_t off = T - static_cast<int64_t>(p.size());
    for (size_t j = 0; j < p.size(); ++j) {
      ids[b][off + static_cast<int64_t>(j)] = p[j];
      mask[b][off + static_cast<int64_t>(j)] = 1;
    }
  }
  REQUIRE(ids.eq(img).sum().item<int64_t>() == 2);
  for (int64_t rows : {1, 3, 100}) {
    INFO("rows_per_pass " << rows);
    auto ll = emt::candidate_logliks(m.model, images, ids, mask, cands, rows);
    REQUIRE(ll.sizes() == torch::IntArrayRef({2, 3}));
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t c = 0; c < 3; ++c) {
        // Reference: the unpadded prompt + candidate through one full forward, scored by answer_logprobs.
        auto seq = prompts[static_cast<size_t>(b)];
        std::vector<int64_t> lab(seq.size(), -100);
        seq.insert(seq.end(), cands[static_cast<size_t>(c)].begin(), cands[static_cast<size_t>(c)].end());
        lab.insert(lab.end(), cands[static_cast<size_t>(c)].begin(), cands[static_cast<size_t>(c)].end());
        auto sid = torch::tensor(seq, torch::kLong).unsqueeze(0), slab = torch::tensor(lab, torch::kLong).unsqueeze(0);
        torch::NoGradGuard ng;
        auto out = m.model->forward(images.narrow(0, b, 1), sid, torch::ones_like(sid), slab);
        double ref = emt::answer_logprobs(out.logits, out.labels)[0].item<double>();
        CHECK(ll[b][c].item<double>() == Approx(ref).epsilon(1e-5));
        CHECK(ll[b][c].item<double>() < 0.0);
      }
  }
  CHECK_THROWS(emt::candidate_logliks(m.model, images, ids, mask, {}, 4));
  CHECK_THROWS(emt::candidate_logliks(m.model, images, ids, mask, {{}}, 4));
}

TEST_CASE("evaluator: likelihood ranking picks the class the model is biased toward", "[evaluator]") {
  Fixture fx("evaluator_likelihood", [](emt::RunConfig& c) {
    c.eval.datasets = {"digits"};
    c.eval.max_new_tokens = 1;
  });
  // Every hidden state gets a large positive first coordinate (embeddings and image features shifted), and the
  // only non-zero lm_head entry maps it to the token "7": the sentence naming 7 becomes the most likely.
  {
    torch::NoGradGuard ng;
    auto& lm = fx.m.model->language_model;
    lm->model->embed_tokens->weight.select(1, 0).fill_(100.0);
    fx.m.model->multi_modal_projector->linear_2->bias.select(0, 0).fill_(100.0);
    lm->lm_head->weight.zero_();
    lm->lm_head->weight[fx.tok->id_of("7")][0] = 1.0;
  }
  auto scores = fx.ev->evaluate(fx.m, fx.dir + "/pred");
  const auto& c = scores.at(0).by_scorer.at("likelihood");
  CHECK(c.n == 20);
  CHECK(c.correct == 2);  // labels cycle 0..9 over 20 images: two sevens
  CHECK(c.incorrect == 18);
  for (const auto& j : read_jsonl(fx.dir + "/pred/digits.jsonl")) CHECK(j["pred_likelihood"] == 7);
}

TEST_CASE("evaluator: a config's judge command runs only when the process allows it", "[evaluator]") {
  const std::string dir = emt_test::scratch_dir("evaluator_judge_refused");
  const std::string marker = dir + "/judge-ran";
  auto judged = [&](emt::RunConfig& c) {
    c.eval.datasets = {"digits"};
    c.eval.max_samples = 2;
    c.eval.scorers = {"strict", "judge"};
    c.eval.judge_command = "touch '" + marker + "'; echo yes";
  };
  emt::allow_config_judge(false);
  try {
    Fixture fx("evaluator_judge_refused_fx", judged);
    FAIL("a configured judge was accepted without --allow-judge");
  } catch (const emt::ConfigError& e) {
    const std::string what = e.what();
    CHECK(what.find("eval.judge_command") != std::string::npos);
    CHECK(what.find("--allow-judge") != std::string::npos);
    CHECK(what.find(marker) != std::string::npos);  // names the command it refused
  }
  CHECK_FALSE(std::filesystem::exists(marker));
  emt::allow_config_judge(true);
  Fixture fx("evaluator_judge_allowed_fx", judged);
  fx.ev->evaluate(fx.m, fx.dir + "/pred");
  emt::allow_config_judge(false);
  CHECK(std::filesystem::exists(marker));
}

TEST_CASE("evaluator: external judge scorer", "[evaluator]") {
  emt::allow_config_judge(true);
  Fixture fx("evaluator_judge", [](emt::RunConfig& c) {
    c.eval.datasets = {"digits"};
    c.eval.max_samples = 10;
    c.data.datasets["digits"].balanced = true;  // one image per digit
    c.eval.scorers = {"strict", "judge"};
    // Says yes exactly for the images labelled 3.
    c.eval.judge_command = "grep -q '\"label\": *\"3\"' && echo yes || echo no";
  });
  REQUIRE(fx.ev->scorers() == std::vector<std::string>{"strict", "judge"});
  REQUIRE(fx.ev->dataset("digits")->size() == 10);
  auto scores = fx.ev->evaluate(fx.m, fx.dir + "/pred");
  const auto& c = scores.at(0).by_scorer.at("judge");
  int64_t threes = 0;
  for (const auto& j : read_jsonl(fx.dir + "/pred/digits.jsonl")) {
    const bool three = j["label"] == 3;
    threes += three;
    CHECK(j["verdict_judge"] == (three ? "correct" : (j["verdict_strict"] == "correct" ? "incorrect"
                                                                                          : j["verdict_strict"])));
    CHECK(j["pred_judge"] == (three ? 3 : -1));
  }
  CHECK(threes == 1);
  CHECK(c.n == 10);
  CHECK(c.correct == threes);
  emt::allow_config_judge(false);
}

namespace {

// A one-layer CLIP for 8x8 images over `vocab` text tokens (texts up to 16 tokens, `projection_dim` wide).
emt::ClipOptions tiny_clip_options(int64_t vocab, int projection_dim) {
  emt::VisionConfig v;
  v.image_size = 8;
  v.patch_size = 4;
  v.hidden_size = 16;
  v.num_layers = 1;
  v.num_heads = 2;
  v.intermediate_size = 24;
  emt::ClipTextConfig t;
  t.vocab_size = static_cast<int>(vocab);
  t.hidden_size = 16;
  t.num_layers = 1;
  t.num_heads = 2;
  t.intermediate_size = 24;
  t.max_position_embeddings = 16;
  t.projection_dim = projection_dim;
  return emt::clip_options(v, t);
}

// A tiny CLIP whose projections are solved so that every image of class k and the text of class k both map to
// the unit vector e_k (e_perm[k] for the text when `perm` is given): cosine 1 on the match, 0 elsewhere.
emt::ClipModel aligned_clip(emt::Evaluator& ev, const std::string& dataset, const WordTokenizer& tok,
                            const emt::ImageProcessorOptions& image, const std::vector<std::string>& templates,
                            const std::vector<int64_t>& perm) {
  auto o = tiny_clip_options(tok.vocab_size(), 8);
  o.text.eos_token_id = tok.eos_id();
  torch::manual_seed(11);
  emt::ClipModel clip(o);
  clip->eval();
  torch::NoGradGuard ng;
  auto ds = ev.dataset(dataset);
  const int64_t K = static_cast<int64_t>(ds->class_names().size());
  // One image per class (all images of a class are identical) and the class text (one template).
  std::vector<torch::Tensor> pix(static_cast<size_t>(K));
  for (int64_t i = 0; i < ds->size(); ++i) pix[static_cast<size_t>(ds->label(i))] = emt::preprocess_image(ds->image(i), image);
  auto pooled_img = clip->vision_model->forward(torch::stack(pix)).pooled;  // [K, D]
  std::vector<std::string> texts;
  for (const auto& c : ds->class_names())
    for (const auto& tp : templates) texts.push_back(emt::fill_label(tp, c));
  auto [ids, mask] = emt::clip_tokenize(tok, texts, 16);
  auto pooled_txt = clip->text_model->forward(ids, mask).pooled;  // [K, D]
  auto E = torch::eye(8).narrow(1, 0, K);  // [P, K]: column k = e_k
  std::vector<int64_t> target;             // text k * NT + t -> e_perm[k]
  for (int64_t k = 0; k < K; ++k)
    for (size_t tp = 0; tp < templates.size(); ++tp) target.push_back(perm.empty() ? k : perm[static_cast<size_t>(k)]);
  auto Et = E.index_select(1, torch::tensor(target, torch::kLong));  // [P, K * NT]
  clip->visual_projection->weight.copy_(E.matmul(torch::pinverse(pooled_img.t())));
  clip->text_projection->weight.copy_(Et.matmul(torch::pinverse(pooled_txt.t())));
  return clip;
}

}  // namespace

TEST_CASE("evaluator: CLIP zero-shot is 100% on an aligned CLIP and 0% on a permuted one", "[evaluator]") {
  auto dir = emt_test::scratch_dir("evaluator_clip");
  const std::vector<std::string> names = {"cat", "dog", "ship", "frog"};
  write_idx(dir + "/pets", cyclic_labels(12, 4), names, true);
  emt::RunConfig cfg;
  cfg.data.root = dir;
  emt::DatasetConfig pets;
  pets.format = "idx";
  pets.path = "pets";
  cfg.data.datasets = {{"pets", pets}};
  cfg.eval.batch_size = 5;
  cfg.eval.clip_templates = {"a photo of a {label}."};
  emt::Evaluator ev(cfg);
  ev.set_progress(false);
  WordTokenizer tok({"a photo of a cat dog ship frog ."});
  auto image = emt::image_options_for_size(8);

  auto clip = aligned_clip(ev, "pets", tok, image, cfg.eval.clip_templates, {});
  auto s = ev.clip_zero_shot(clip, tok, image, torch::kCPU);
  REQUIRE(s.size() == 1);
  const auto& c = s[0].by_scorer.at("clip_zero_shot");
  CHECK(c.n == 12);
  CHECK(c.correct == 12);
  CHECK(c.accuracy == 1.0);

  auto permuted = aligned_clip(ev, "pets", tok, image, cfg.eval.clip_templates, {1, 2, 3, 0});
  auto p = ev.clip_zero_shot(permuted, tok, image, torch::kCPU);
  CHECK(p[0].by_scorer.at("clip_zero_shot").n == 12);
  CHECK(p[0].by_scorer.at("clip_zero_shot").correct == 0);
  CHECK(p[0].by_scorer.at("clip_zero_shot").incorrect == 12);

  // A two-template ensemble, both aligned: still every image right.
  auto cfg2 = cfg;
  cfg2.eval.clip_templates = {"a photo of a {label}.", "a {label}"};
  emt::Evaluator ev2(cfg2);
  ev2.set_progress(false);
  auto clip2 = aligned_clip(ev2, "pets", tok, image, cfg2.eval.clip_templates, {});
  CHECK(ev2.clip_zero_shot(clip2, tok, image, torch::kCPU)[0].by_scorer.at("clip_zero_shot").correct == 12);

  // Text embeddings are unit vectors; the aligned classes are orthogonal.
  auto emb = emt::clip_text_embeddings(clip, tok, {"a photo of a cat.", "a photo of a dog."}, torch::kCPU);
  CHECK(emb.norm(2, 1).sub(1.0).abs().max().item<double>() < 1e-5);
  CHECK(emb[0].dot(emb[1]).item<double>() == Approx(0.0).margin(1e-4));
}

TEST_CASE("evaluator: clip scorer on generated text", "[evaluator]") {
  Fixture fx("evaluator_clip_scorer", [](emt::RunConfig& c) {
    c.eval.datasets = {"shapes"};
    c.eval.scorers = {"strict", "clip"};
  });
  CHECK(fx.ev->scorers() == std::vector<std::string>{"strict"});  // no CLIP model yet
  auto o = tiny_clip_options(fx.tok->vocab_size(), 4);
  o.text.eos_token_id = 2;
  fx.ev->set_clip(emt::ClipModel(o), fx.tok);
  REQUIRE(fx.ev->scorers() == std::vector<std::string>{"strict", "clip"});
  auto s = fx.ev->evaluate(fx.m, fx.dir + "/pred");
  const auto& c = s.at(0).by_scorer.at("clip");
  CHECK(c.n == 12);
  CHECK(c.correct + c.incorrect + c.extrinsic == 12);
  CHECK(c.intrinsic == 0);
  for (const auto& j : read_jsonl(fx.dir + "/pred/shapes.jsonl")) {
    CHECK(j.contains("verdict_clip"));
    if (j["output"] == "") CHECK(j["pred_clip"] == -1);
    else CHECK(j["pred_clip"].get<int64_t>() >= 0);
  }
}

TEST_CASE("evaluator: the same subset every time, eval.max_samples on top of the dataset subsets", "[evaluator]") {
  auto dir = emt_test::scratch_dir("evaluator_subsets");
  auto cfg = eval_config(dir + "/data");
  cfg.data.datasets["digits"].test_max_samples = 15;
  cfg.eval.max_samples = 6;
  emt::Evaluator a(cfg), b(cfg);
  for (const char* d : {"digits", "shapes"}) {
    INFO(d);
    auto da = a.dataset(d), db = b.dataset(d);
    REQUIRE(da->size() == 6);
    REQUIRE(db->size() == 6);
    for (int64_t i = 0; i < 6; ++i) CHECK(da->source(i) == db->source(i));
  }
  cfg.run.seed = 4;
  emt::Evaluator c(cfg);
  std::string sa, sc;
  for (int64_t i = 0; i < 6; ++i) {
    sa += a.dataset("shapes")->source(i);
    sc += c.dataset("shapes")->source(i);
  }
  CHECK(sa != sc);  // the choice follows run.seed
}

TEST_CASE("evaluator: validation errors", "[evaluator]") {
  auto dir = emt_test::scratch_dir("evaluator_errors");
  auto base = eval_config(dir + "/data");
  auto with = [&](const std::function<void(emt::RunConfig&)>& edit) {
    auto c = base;
    edit(c);
    return c;
  };
  CHECK_THROWS_AS(emt::Evaluator(with([](emt::RunConfig& c) { c.eval.datasets = {"nope"}; })), emt::ConfigError);
  CHECK_THROWS_AS(emt::Evaluator(with([](emt::RunConfig& c) { c.eval.scorers = {"strict", "bleu"}; })),
                  emt::ConfigError);
  CHECK_THROWS_AS(emt::Evaluator(with([](emt::RunConfig& c) { c.eval.scorers = {"judge"}; })), emt::ConfigError);
  CHECK_THROWS_AS(emt::Evaluator(with([](emt::RunConfig& c) { c.eval.batch_size = 0; })), emt::ConfigError);
  CHECK_THROWS_AS(emt::Evaluator(with([](emt::RunConfig& c) { c.data.datasets.clear(); })), emt::ConfigError);
  CHECK_THROWS_AS(emt::Evaluator(with([](emt::RunConfig& c) {
                    emt::DatasetConfig j;
                    j.format = "llava_json";
                    j.path = "x.json";
                    c.data.datasets["instr"] = j;
                    c.eval.datasets = {"instr"};
                  })),
                  emt::ConfigError);
  // An implicit list skips instruction data instead.
  {
    auto c = base;
    emt::DatasetConfig j;
    j.format = "llava_json";
    j.path = "x.json";
    c.data.datasets["instr"] = j;
    emt::Evaluator ev(c);
    const std::vector<std::string> expected = {"digits", "shapes"};
    CHECK(ev.datasets() == expected);
    CHECK_THROWS_AS(ev.dataset("instr"), emt::ConfigError);
  }
  CHECK_THROWS_AS(emt::Evaluator(with([](emt::RunConfig& c) { c.data.datasets["digits"].aliases = {"seven=77"}; })),
                  emt::ConfigError);

  // Primary scorer clip without a CLIP model fails at evaluate().
  Fixture fx("evaluator_errors_clip", [](emt::RunConfig& c) {
    c.eval.datasets = {"shapes"};
    c.eval.primary_scorer = "clip";
    c.eval.scorers = {"strict"};
  });
  CHECK_THROWS_AS(fx.ev->evaluate(fx.m, ""), emt::ConfigError);
  CHECK_THROWS_AS(fx.ev->set_clip(emt::ClipModel(nullptr), fx.tok), emt::ConfigError);
  // A model whose image token is not the tokenizer's.
  fx.ev = std::make_unique<emt::Evaluator>(with([](emt::RunConfig& c) { c.eval.datasets = {"shapes"}; }));
  fx.ev->set_progress(false);
  fx.m.model->image_token_id = 3;
  CHECK_THROWS_AS(fx.ev->evaluate(fx.m, ""), emt::ConfigError);

  auto empty = emt_test::scratch_dir("evaluator_errors_noclip");
  CHECK_THROWS_AS(emt::load_clip_dir(empty, torch::kCPU), emt::IoError);
}

TEST_CASE("evaluator: answers become valid UTF-8", "[evaluator]") {
  CHECK(emt::valid_utf8("The object is a caf\xC3\xA9.") == "The object is a caf\xC3\xA9.");
  CHECK(emt::valid_utf8("cut \xE2\x82") == "cut \xEF\xBF\xBD\xEF\xBF\xBD");  // a 3-byte character cut after 2
  CHECK(emt::valid_utf8("\xFF" "a") == "\xEF\xBF\xBD" "a");
  CHECK(emt::valid_utf8("\xC0\xAF") == "\xEF\xBF\xBD\xEF\xBF\xBD");              // overlong '/'
  CHECK(emt::valid_utf8("\xED\xA0\x80") == "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // a UTF-16 surrogate
  CHECK(emt::valid_utf8("\xF0\x9F\x90\x88") == "\xF0\x9F\x90\x88");                // 4-byte character kept
  CHECK(nlohmann::json(emt::valid_utf8("x\x80y")).dump() == "\"x\xEF\xBF\xBDy\"");
}

TEST_CASE("emt score: a saved model directory scored end to end", "[evaluator][slow]") {
  auto dir = emt_test::scratch_dir("evaluator_cli");
  write_idx(dir + "/data/digits", cyclic_labels(20, 10), {}, false);
  // Tokenizer: SentencePiece trained on the prompt, "<image>" added after its vocabulary (added_tokens.json).
  emt::DatasetConfig digits;
  digits.format = "idx";
  std::vector<std::string> names;
  for (int d = 0; d < 10; ++d) names.push_back(std::to_string(d));
  std::string corpus;
  for (int rep = 0; rep < 20; ++rep) {
    corpus += emt::dataset_question("digits", digits, names) + "\n";
    for (const auto& n : names) corpus += emt::answer_text(digits, n) + "\n";
  }
  fs::create_directories(dir + "/model");
  emt::write_file_atomic(dir + "/corpus.txt", corpus);
  emt::SentencePieceTrainOptions so;
  so.vocab_size = 60;
  emt::train_sentencepiece(dir + "/corpus.txt", dir + "/model/tokenizer", so);
  auto tok = emt::load_sentencepiece(dir + "/model/tokenizer.model");
  const int64_t image_id = tok->add_special_token("<image>");
  emt::write_file_atomic(dir + "/model/added_tokens.json", "{\"<image>\": " + std::to_string(image_id) + "}");
  auto m = eval_model_section(image_id + 1);
  torch::manual_seed(5);
  auto model = emt::build_llava(m, image_id);
  emt::save_llava(model, dir + "/model");

  std::ofstream(dir + "/cfg.yaml") << "run: {out_dir: " << dir << "/runs, name: s}\n"
                                   << "model: {pretrained: " << dir << "/model}\n"
                                   << "data:\n  root: " << dir << "/data\n  workers: 1\n"
                                   << "  datasets:\n    digits: {format: idx, path: digits}\n"
                                   << "eval: {batch_size: 8, max_new_tokens: 4, scorers: [strict, likelihood], "
                                      "clip_baseline: false}\n";
  auto r = emt_test::run_cli("score " + dir + "/cfg.yaml --out " + dir + "/out");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("digits") != std::string::npos);
  auto rows = read_jsonl(dir + "/out/results.jsonl");
  REQUIRE(rows.size() == 2);
  for (const auto& row : rows) {
    CHECK(row["eval_dataset"] == "digits");
    CHECK(row["method"] == "base");
    CHECK(row["n"] == 20);
  }
  CHECK(read_jsonl(dir + "/out/predictions/digits.jsonl").size() == 20);
  // Overrides use the config's dotted keys; a checkpoint directory without adapter files is a usage error.
  auto r2 = emt_test::run_cli("score " + dir + "/cfg.yaml eval.max_samples=5 --out " + dir + "/out2");
  INFO(r2.output);
  CHECK(r2.code == 0);
  CHECK(read_jsonl(dir + "/out2/predictions/digits.jsonl").size() == 5);
  fs::create_directories(dir + "/empty_ckpt");
  CHECK(emt_test::run_cli("score " + dir + "/cfg.yaml --adapter " + dir + "/empty_ckpt --out " + dir + "/o3").code ==
        2);

  // A checkpoint emt wrote names its cell (the config saved beside it and its epoch_K name); any other adapter
  // directory becomes method "adapter". Either way `emt report` reads the rows, together with the base's.
  const std::string ck = dir + "/runs/s/cells/digits__linear__seed3/epoch_2";
  fs::create_directories(ck);
  emt::save_projector_file(*model->multi_modal_projector, ck + "/mm_projector.safetensors");
  std::ofstream(ck + "/config.yaml") << emt::read_file(dir + "/cfg.yaml")
                                     << "finetune: {dataset: digits, method: linear}\n";
  {
    std::string y = emt::read_file(ck + "/config.yaml");
    y.replace(y.find("name: s}"), 8, "name: s, seed: 3}");
    emt::write_file_atomic(ck + "/config.yaml", y);
  }
  auto r4 = emt_test::run_cli("score " + dir + "/cfg.yaml --adapter " + ck + " --out " + dir + "/o4");
  INFO(r4.output);
  REQUIRE(r4.code == 0);
  for (const auto& row : read_jsonl(dir + "/o4/results.jsonl")) {
    CHECK(row["method"] == "linear");
    CHECK(row["finetune_dataset"] == "digits");
    CHECK(row["seed"] == 3);
    CHECK(row["epoch"] == 2);
  }
  fs::create_directories(dir + "/their_adapter");
  fs::copy_file(ck + "/mm_projector.safetensors", dir + "/their_adapter/mm_projector.safetensors");
  auto r5 = emt_test::run_cli("score " + dir + "/cfg.yaml --adapter " + dir + "/their_adapter --out " + dir + "/o5");
  INFO(r5.output);
  REQUIRE(r5.code == 0);
  for (const auto& row : read_jsonl(dir + "/o5/results.jsonl")) {
    CHECK(row["method"] == "adapter");
    CHECK(row["finetune_dataset"] == "their_adapter");
  }
  auto rep = emt_test::run_cli("report " + dir + "/out " + dir + "/o4 " + dir + "/o5 --out " + dir + "/rep");
  INFO(rep.output);
  CHECK(rep.code == 0);
  CHECK(fs::exists(dir + "/rep/report.html"));
}
