// The base-model recipe's generic instructions: colour naming, composites that show what their questions ask, and
// the guarantee that no pretraining text is a study's prompt or answer (built-in datasets and one added in config).
#include <catch2/catch.hpp>
#include <emt/core/config.h>
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include <emt/train/instructions.h>
#include <emt/train/pretrain.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "test/helpers.h"

using emt_test::put_be32;

namespace fs = std::filesystem;

// Inside namespace emt rather than `using namespace emt`: the directive would reach the files compiled after this
// one in a unity batch.
namespace emt {

namespace {

// IDX files of n 28x28 images: a bright blob on a dark background, label i % classes.
void write_idx(const fs::path& dir, const std::string& prefix, int n, int classes) {
  fs::create_directories(dir);
  std::ofstream img(dir / (prefix + "-images-idx3-ubyte"), std::ios::binary);
  std::ofstream lab(dir / (prefix + "-labels-idx1-ubyte"), std::ios::binary);
  put_be32(img, 0x00000803), put_be32(img, n), put_be32(img, 28), put_be32(img, 28);
  put_be32(lab, 0x00000801), put_be32(lab, n);
  for (int i = 0; i < n; ++i) {
    const int c = i % classes;
    for (int y = 0; y < 28; ++y)
      for (int x = 0; x < 28; ++x) img.put(static_cast<char>(std::abs(x - 8 - c) < 5 && std::abs(y - 14) < 8 ? 230 : 10));
    lab.put(static_cast<char>(c));
  }
}

// The four built-in datasets (their own configs, small copies on disk) plus one added in config with its own
// prompt and answer.
RunConfig world_config(const std::string& dir) {
  write_idx(fs::path(dir) / "mnist", "train", 100, 10);
  write_idx(fs::path(dir) / "mnist", "t10k", 20, 10);
  std::ofstream(fs::path(dir) / "mnist/classes.txt") << "0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n";
  write_idx(fs::path(dir) / "fashion-mnist", "train", 100, 10);
  write_idx(fs::path(dir) / "fashion-mnist", "t10k", 20, 10);
  prepare_synthetic("shapes10", dir + "/synthetic/shapes10", 100, 20);
  prepare_synthetic("objects60", dir + "/synthetic/objects60", 120, 60);
  write_idx(fs::path(dir) / "tools", "train", 60, 3);
  write_idx(fs::path(dir) / "tools", "t10k", 12, 3);
  std::ofstream(fs::path(dir) / "tools/classes.txt") << "hammer\nwrench\nsaw\n";
  RunConfig cfg;
  cfg.data.root = dir;
  cfg.data.datasets = builtin_dataset_configs();
  DatasetConfig tools;
  tools.format = "idx";
  tools.path = "tools";
  tools.prompt = "Which tool is shown? Reply with one of {labels}.";
  tools.answer = "This tool is a {label}.";
  cfg.data.datasets["tools"] = tools;
  cfg.pretrain.train_max_samples = 60;  // and as many letters
  return cfg;
}

std::vector<std::pair<std::string, std::vector<std::string>>> class_lists(const std::vector<PretrainSource>& srcs) {
  std::vector<std::pair<std::string, std::vector<std::string>>> out;
  for (const auto& s : srcs)
    if (!s.generic) out.emplace_back(s.name, s.train->class_names());  // the study's lists, not the letters
  return out;
}

// Pool images: a white 10x10 square on black, 28x28 grey.
std::shared_ptr<ImageDataset> square_pool(int64_t n) {
  auto imgs = torch::zeros({n, 28, 28, 1}, torch::kUInt8);
  imgs.slice(1, 9, 19).slice(2, 9, 19).fill_(255);
  std::vector<int64_t> labels;
  for (int64_t i = 0; i < n; ++i) labels.push_back(i % 2);
  return make_memory_dataset(imgs, labels, {"square", "block"}, "squares");
}

// Which quadrants of a composite hold foreground (bright) pixels.
std::set<int> lit_quadrants(const torch::Tensor& img) {
  std::set<int> q;
  for (int c = 0; c < 4; ++c) {
    auto part = img.slice(0, (c / 2) * 14, (c / 2) * 14 + 14).slice(1, (c % 2) * 14, (c % 2) * 14 + 14);
    if (part.to(torch::kFloat).max().item<float>() > 128) q.insert(c);
  }
  return q;
}

}  // namespace

TEST_CASE("foreground_colour names the colour of the drawn object, not of the background", "[pretrain]") {
  auto img = torch::full({28, 28, 3}, 128, torch::kUInt8);  // grey background
  auto put = [&](int r, int g, int b) {
    img.slice(0, 8, 20).slice(1, 8, 20).select(2, 0).fill_(r);
    img.slice(0, 8, 20).slice(1, 8, 20).select(2, 1).fill_(g);
    img.slice(0, 8, 20).slice(1, 8, 20).select(2, 2).fill_(b);
    return foreground_colour(img);
  };
  CHECK(put(230, 20, 20) == "red");
  CHECK(put(240, 130, 20) == "orange");
  CHECK(put(230, 230, 30) == "yellow");
  CHECK(put(20, 200, 40) == "green");
  CHECK(put(30, 60, 230) == "blue");
  CHECK(put(150, 40, 220) == "purple");
  CHECK(put(250, 250, 250) == "white");
  CHECK(put(5, 5, 5) == "black");
  auto grey = torch::zeros({28, 28, 1}, torch::kUInt8);
  grey.slice(0, 5, 20).slice(1, 10, 14).fill_(255);
  CHECK(foreground_colour(grey) == "white");  // an MNIST-like stroke
  CHECK_THROWS(foreground_colour(torch::zeros({28, 28}, torch::kUInt8)));
}

TEST_CASE("instruction sets are deterministic, mix every kind, and composites show what they ask", "[pretrain]") {
  auto pool = square_pool(400);
  InstructionDataset set(pool, InstructionOptions{false, false, 7});
  InstructionDataset again(pool, InstructionOptions{false, false, 7});
  InstructionDataset other(pool, InstructionOptions{false, false, 8});
  std::map<InstructionKind, int> kinds;
  int differs = 0, checked_counts = 0, checked_positions = 0;
  // Options are written in one of several surface forms; the answer copies the form the list offers.
  const std::vector<std::vector<std::string>> positions = {{"top left", "upper left", "top-left corner"},
                                                           {"top right", "upper right", "top-right corner"},
                                                           {"bottom left", "lower left", "bottom-left corner"},
                                                           {"bottom right", "lower right", "bottom-right corner"}};
  const std::vector<std::vector<std::string>> counts = {{"one", "just one", "only one"},
                                                        {"two", "two of them", "exactly two"},
                                                        {"three", "exactly three", "three of them"},
                                                        {"four", "exactly four", "four of them"}};
  auto which = [](const std::vector<std::vector<std::string>>& forms, const std::string& a) {
    for (size_t k = 0; k < forms.size(); ++k)
      if (std::find(forms[k].begin(), forms[k].end(), a) != forms[k].end()) return static_cast<int>(k);
    return -1;
  };
  const std::vector<std::string> white = {"white", "whitish", "white-coloured"};
  for (int64_t i = 0; i < set.size(); ++i) {
    auto t = set.text(i);
    REQUIRE(t == again.text(i));
    differs += t != other.text(i);
    ++kinds[set.kind(i)];
    CHECK(set.label(i) == pool->label(i));
    // the answer word: without a sentence frame ("The answer is ...") and the final "."
    std::string answer = t.second.substr(0, t.second.size() - 1);
    for (const char* frame : {"The answer is ", "The colour is ", "The position is ", "The count is ",
                              "The size is ", "It is an ", "It is a "})
      if (answer.rfind(frame, 0) == 0) answer = answer.substr(std::string(frame).size());
    // One answer form per question shape: naming questions (listed or open) answer "It is a(n) ...", attribute
    // questions a sentence naming the attribute, mixed lists "The answer is ..."; only naming opens with "What is".
    const InstructionKind k = set.kind(i);
    const bool naming = k == InstructionKind::short_answer || k == InstructionKind::pick;
    CHECK(naming == (t.second.rfind("It is a", 0) == 0));
    CHECK((t.first.rfind("What is", 0) == 0) <= naming);
    if (k == InstructionKind::colour) CHECK(t.second.rfind("The colour is ", 0) == 0);
    if (k == InstructionKind::position) CHECK(t.second.rfind("The position is ", 0) == 0);
    if (k == InstructionKind::count) CHECK(t.second.rfind("The count is ", 0) == 0);
    if (k == InstructionKind::size) CHECK(t.second.rfind("The size is ", 0) == 0);
    if (k == InstructionKind::choice) CHECK(t.second.rfind("The answer is ", 0) == 0);
    if (set.kind(i) == InstructionKind::count) {
      const int n = which(counts, answer);
      REQUIRE(n >= 0);
      CHECK(lit_quadrants(set.image(i)).size() == static_cast<size_t>(n + 1));
      if (t.first.find(", ") != std::string::npos) CHECK(t.first.find(answer) != std::string::npos);  // offered
      ++checked_counts;
    } else if (set.kind(i) == InstructionKind::position) {
      const int cell = which(positions, answer);
      REQUIRE(cell >= 0);
      if (t.first.find(", ") != std::string::npos) CHECK(t.first.find(answer) != std::string::npos);
      CHECK(lit_quadrants(set.image(i)) == std::set<int>{cell});
      ++checked_positions;
    } else if (set.kind(i) == InstructionKind::pick) {
      const std::string& own = pool->class_names()[static_cast<size_t>(pool->label(i))];
      CHECK(answer == own);
      CHECK(t.first.find(own) != std::string::npos);
      // the pool's other class is never offered beside it
      CHECK(t.first.find(own == "square" ? "block" : "square") == std::string::npos);
    } else if (set.kind(i) == InstructionKind::choice) {
      CHECK(t.first.find(answer) != std::string::npos);
      // exactly one true option: the image's colour (white) is offered only when it is the answer
      if (which({white}, answer) < 0) CHECK(t.first.find("whit") == std::string::npos);
    } else if (set.kind(i) == InstructionKind::colour) {
      CHECK(which({white}, answer) == 0);
      if (t.first.find(", ") != std::string::npos) CHECK(t.first.find(answer) != std::string::npos);
    } else if (set.kind(i) == InstructionKind::yes_no) {
      CHECK((t.second == "Yes." || t.second == "No." || t.second == "Yes, it is." || t.second == "No, it is not."));
      const std::string& own = pool->class_names()[static_cast<size_t>(pool->label(i))];
      const bool names_own = t.first.find(" " + own + "?") != std::string::npos;
      CHECK(names_own == (t.second.rfind("Yes", 0) == 0));
    } else if (set.kind(i) == InstructionKind::caption || set.kind(i) == InstructionKind::short_answer) {
      CHECK(t.second.find(pool->class_names()[static_cast<size_t>(pool->label(i))]) != std::string::npos);
      CHECK(torch::equal(set.image(i), pool->image(i)));
    }
  }
  CHECK(kinds.size() == 9);  // every kind but copy
  CHECK(checked_counts > 10);
  CHECK(checked_positions > 10);
  CHECK(differs > 200);  // the seed changes the instructions

  // With a word list, some questions ask to write words of the language back.
  InstructionOptions wo{false, false, 7};
  wo.words = {"alpha", "beta", "gamma"};
  InstructionDataset writing(pool, wo);
  int copies = 0;
  for (int64_t i = 0; i < writing.size(); ++i) {
    if (writing.kind(i) != InstructionKind::copy) continue;
    auto [q, a] = writing.text(i);
    CHECK(q.size() > a.size());
    CHECK(q.substr(q.size() - a.size()) == a);  // the answer is the words the question gives
    ++copies;
  }
  CHECK(copies > 10);
  CHECK(kinds.count(InstructionKind::copy) == 0);  // no words, no copy questions

  InstructionDataset captions(pool, InstructionOptions{true, false, 7});
  for (int64_t i = 0; i < 50; ++i) CHECK(captions.kind(i) == InstructionKind::caption);
}

TEST_CASE("no pretraining text contains a study prompt or answer (built-in datasets and one added in config)",
          "[pretrain]") {
  const std::string dir = emt_test::scratch_dir("pretrain_texts");
  RunConfig cfg = world_config(dir);
  const auto srcs = pretrain_sources(cfg);
  REQUIRE(srcs.size() == 6);  // five study datasets and the rendered letters
  CHECK(srcs.back().generic);
  const auto forbidden = study_texts(cfg, class_lists(srcs));
  // What is forbidden includes each EMT question, the fine-tuning question and answers, the custom dataset's texts.
  auto has = [&](const std::string& s) { return std::find(forbidden.begin(), forbidden.end(), s) != forbidden.end(); };
  CHECK(has("What is the object in the image?"));
  CHECK(has("What is the number in the image? Please only answer a single number in 0, 1, 2, 3, 4, 5, 6, 7, 8, 9."));
  CHECK(has("The object is a(n) "));
  CHECK(has("The object is a(n) Ankle boot."));
  CHECK(has("Which tool is shown? Reply with one of hammer, wrench, saw."));
  CHECK(has("This tool is a wrench."));
  CHECK(has("hammer, wrench, saw"));
  size_t samples = 0;
  for (bool captions_only : {true, false}) {
    const auto sets = pretrain_language_sets(cfg, srcs, captions_only);
    REQUIRE(sets.size() == srcs.size());
    for (const auto& set : sets) {
      INFO(set->name());
      CHECK(study_text_leaks(*set, forbidden, class_lists(srcs)).empty());
      samples += static_cast<size_t>(set->size());
      // Labels still appear: captions name the class, which is how the base model learns its words.
      bool named = false;
      for (int64_t i = 0; i < set->size() && !named; ++i) {
        const auto& cls = set->class_names()[static_cast<size_t>(set->label(i))];
        named = set->text(i).second.find(cls) != std::string::npos;
      }
      CHECK(named);
    }
  }
  CHECK(samples == 2 * 6 * 60);

  SECTION("the check catches a leak") {
    // An instruction set that asks the EMT question (what the old recipe did) is reported.
    class EmtAsker : public ImageDataset {
     public:
      explicit EmtAsker(std::shared_ptr<ImageDataset> d, std::string q) : d_(std::move(d)), q_(std::move(q)) {
        set_class_names(d_->class_names());
      }
      int64_t size() const override { return d_->size(); }
      int64_t label(int64_t i) const override { return d_->label(i); }
      torch::Tensor image(int64_t i) const override { return d_->image(i); }
      bool has_text() const override { return true; }
      std::pair<std::string, std::string> text(int64_t i) const override { return {q_, "A photo."}; }

     private:
      std::shared_ptr<ImageDataset> d_;
      std::string q_;
    };
    const auto& shapes = srcs[3];
    REQUIRE(shapes.name == "shapes10");
    EmtAsker bad(shapes.train, dataset_question("shapes10", cfg.data.datasets.at("shapes10"), shapes.train->class_names()));
    CHECK(study_text_leaks(bad, forbidden).size() == static_cast<size_t>(bad.size()));
    // A list holding two labels of one dataset (part of a study's list) is reported too.
    EmtAsker two(shapes.train, "Which of these words fits the picture? Choose one of: apple, star, heart.");
    CHECK(study_text_leaks(two, forbidden).empty());
    const auto listed = study_text_leaks(two, forbidden, class_lists(srcs));
    REQUIRE(listed.size() == static_cast<size_t>(two.size()));
    CHECK_THAT(listed[0], Catch::Contains("lists star, heart of 'shapes10'") || Catch::Contains("lists heart, star"));
    EmtAsker one(shapes.train, "Which of these words fits the picture? Choose one of: apple, red star, heart.");
    CHECK(study_text_leaks(one, forbidden, class_lists(srcs)).empty());  // "red star" is objects60's, not "star"
  }
  SECTION("a study answer that equals a generic text is refused before any training") {
    cfg.data.datasets["tools"].answer = "{label}.";  // what the recipe's short answers look like
    try {
      pretrain_language_sets(cfg, pretrain_sources(cfg), false);
      FAIL("expected ConfigError");
    } catch (const ConfigError& e) {
      CHECK_THAT(e.what(), Catch::Contains("'tools'") && Catch::Contains("study prompt or answer"));
    }
  }
}

}  // namespace emt

TEST_CASE("pretrain: the recipe text holds what shapes the base model and nothing else", "[pretrain]") {
  const emt::RunConfig cfg = emt::load_config_string("data: {datasets: {d: {format: idx, path: d}}}\n");
  const std::string recipe = emt::pretrain_recipe(cfg);
  CHECK_THAT(recipe, Catch::Contains("recipe_version: 6") && Catch::Contains("clip_steps") &&
                         Catch::Contains("hidden_size") && Catch::Contains("question"));
  CHECK_THAT(recipe, !Catch::Contains("mitigation") && !Catch::Contains("learning_rate_by_method") &&
                         !Catch::Contains("cache_dir") && !Catch::Contains("max_new_tokens"));
  // settings of fine-tuning, scoring and the study keep the cache valid
  for (const char* o : {"finetune.mitigation.ewc_weight=3", "finetune.learning_rate=0.5", "study.epochs=9",
                        "eval.max_samples=7", "pretrain.cache_dir=/elsewhere", "run.name=other",
                        "data.datasets.d.train_max_samples=5"}) {
    INFO(o);
    CHECK(emt::pretrain_recipe(emt::load_config_string("data: {datasets: {d: {format: idx, path: d}}}\n", {o})) == recipe);
  }
  // what shapes the model does not
  for (const char* o : {"pretrain.clip_steps=7", "pretrain.instruct_max_samples=9", "pretrain.contrast=disjoint_labels",
                        "model.llm.num_layers=1",
                        "run.seed=3", "run.dtype=bf16",
                        "finetune.question=What?", "data.datasets.d.path=e"}) {
    INFO(o);
    CHECK(emt::pretrain_recipe(emt::load_config_string("data: {datasets: {d: {format: idx, path: d}}}\n", {o})) != recipe);
  }
}

TEST_CASE("pretrain: the BLAS kernels a base is built with are named, with OPENBLAS_CORETYPE", "[pretrain]") {
  const char* before = std::getenv("OPENBLAS_CORETYPE");
  const std::string saved = before ? before : "";
  ::unsetenv("OPENBLAS_CORETYPE");
  const std::string unset = emt::blas_kernels();
  CHECK_THAT(unset, Catch::EndsWith("(OPENBLAS_CORETYPE unset)"));
  ::setenv("OPENBLAS_CORETYPE", "Haswell", 1);
  CHECK_THAT(emt::blas_kernels(), Catch::EndsWith("(OPENBLAS_CORETYPE=Haswell)"));
  if (before) ::setenv("OPENBLAS_CORETYPE", saved.c_str(), 1); else ::unsetenv("OPENBLAS_CORETYPE");
  // Debian's LibTorch computes with OpenBLAS here (libopenblas0-openmp): its core name comes first
  if (unset.rfind("OpenBLAS ", 0) == 0) CHECK(unset.size() > std::string("OpenBLAS  (OPENBLAS_CORETYPE unset)").size());
  else CHECK_THAT(unset, Catch::StartsWith("not OpenBLAS"));
}

namespace emt {

TEST_CASE("pretrain: the contrastive stage contrasts datasets whose labels share no word", "[pretrain]") {
  const std::vector<std::vector<std::string>> names = {
      {"0", "1", "2"}, {"T-shirt/top", "Trouser"}, {"circle", "square"}, {"red circle", "blue square"}, {"Shirt"}};
  const auto c = contrasted_datasets(names);
  REQUIRE(c.size() == 5);
  for (size_t k = 0; k < 5; ++k) CHECK(c[k][k]);
  CHECK(c[0][1]);   // digits against clothes
  CHECK(c[1][2]);   // clothes against shapes
  CHECK(!c[2][3]);  // "circle" is true of a red circle: never competes
  CHECK(!c[3][2]);
  CHECK(!c[1][4]);  // "T-shirt/top" and "Shirt" share "shirt" (case and punctuation aside)
  CHECK(c[0][3]);
  // pretrain.contrast names the objective; a typo is refused with the allowed values
  CHECK_NOTHROW(load_config_string("pretrain: {contrast: own_dataset}\n"));
  try {
    load_config_string("pretrain: {contrast: own-dataset}\n");
    FAIL("a bad pretrain.contrast was accepted");
  } catch (const ConfigError& e) {
    CHECK_THAT(e.what(), Catch::Contains("pretrain.contrast") && Catch::Contains("disjoint_labels, own_dataset"));
  }
}

TEST_CASE("pretrain: the language stages see pretrain.instruct_max_samples images, drawn from the contrastive pool",
          "[pretrain]") {
  const std::string dir = emt_test::scratch_dir("pretrain_pool");
  RunConfig cfg = world_config(dir);
  const auto all = pretrain_sources(cfg);
  for (const auto& s : all) CHECK(s.language == s.train);  // 0 = all of them
  cfg.pretrain.instruct_max_samples = 20;
  const auto srcs = pretrain_sources(cfg);
  for (const auto& s : srcs) {
    INFO(s.name);
    CHECK(s.train->size() == std::min<int64_t>(60, all[&s - &srcs[0]].train->size()));
    REQUIRE(s.language->size() == 20);
    CHECK(s.language->class_names() == s.train->class_names());
    std::set<std::string> pool;
    for (int64_t i = 0; i < s.train->size(); ++i) pool.insert(s.train->source(i));
    for (int64_t i = 0; i < s.language->size(); ++i) CHECK(pool.count(s.language->source(i)) == 1);
  }
  const auto sets = pretrain_language_sets(cfg, srcs, false);
  for (const auto& set : sets) CHECK(set->size() == 20);
  cfg.pretrain.instruct_max_samples = -1;
  CHECK_THROWS_AS(validate_config(cfg), ConfigError);
}


TEST_CASE("pretrain: pick_own_labels puts that many other labels of the image's dataset in every pick list, and no more",
          "[pretrain]") {
  const std::string dir = emt_test::scratch_dir("pretrain_own_labels");
  RunConfig cfg = world_config(dir);
  const auto srcs = pretrain_sources(cfg);
  const auto lists = class_lists(srcs);
  const auto forbidden = study_texts(cfg, lists);
  for (int64_t n : {0, 1, 2}) {
    INFO("pick_own_labels = " << n);
    cfg.pretrain.pick_own_labels = n;
    const auto sets = pretrain_language_sets(cfg, srcs, false);  // the leak check runs in here: it must pass
    int64_t picks = 0;
    for (size_t k = 0; k < sets.size(); ++k) {
      const auto* set = dynamic_cast<const InstructionDataset*>(sets[k].get());
      REQUIRE(set != nullptr);
      if (srcs[k].generic) continue;  // the letters list their own kind by design (next test)
      const auto& names = set->class_names();
      for (int64_t i = 0; i < set->size(); ++i) {
        if (set->kind(i) != InstructionKind::pick) continue;
        ++picks;
        const std::string q = set->text(i).first;
        int64_t hits = 0;  // labels of the image's own dataset among the options (", "-separated, then ".")
        for (const auto& c : names) {
          if (q.find(", " + c + ",") != std::string::npos || q.find(", " + c + ".") != std::string::npos ||
              q.find(": " + c + ",") != std::string::npos || q.find(" in " + c + ",") != std::string::npos)
            ++hits;
        }
        INFO(q);
        // never all of them: one label at least stays out of the list
        CHECK(hits == std::min<int64_t>(1 + n, static_cast<int64_t>(names.size()) - 1));
      }
      // more of them than the option allows is a leak
      const int64_t extra = std::min<int64_t>(n, static_cast<int64_t>(names.size()) - 2);
      if (extra > 0) CHECK(!study_text_leaks(*set, forbidden, lists, extra - 1).empty());
      CHECK(study_text_leaks(*set, forbidden, lists, n).empty());
    }
    CHECK(picks > 20);
  }
  cfg.pretrain.pick_own_labels = -1;
  CHECK_THROWS_AS(validate_config(cfg), ConfigError);
}


TEST_CASE("pretrain: the rendered letters join the pool as generic data whose pick lists offer their own kind",
          "[pretrain]") {
  const std::string dir = emt_test::scratch_dir("pretrain_letters");
  RunConfig cfg = world_config(dir);
  const auto srcs = pretrain_sources(cfg);
  const auto& letters = srcs.back();
  REQUIRE(letters.name == kGenericLetters);
  CHECK(letters.generic);
  CHECK(letters.train->size() == 60);
  CHECK(letters.train->class_names() == synthetic_class_names("letters"));
  for (const auto& s : srcs)
    if (&s != &letters) CHECK(!s.generic);

  const auto sets = pretrain_language_sets(cfg, srcs, false);  // the leak check runs in here and passes
  const auto names = letters.train->class_names();
  auto listed_letters = [&](const std::string& q) {
    int64_t n = 0;
    for (const auto& c : names)
      for (const char* pre : {", ", ": ", " in "})
        for (const char* post : {",", "."}) n += q.find(pre + c + post) != std::string::npos;
    return n;
  };
  int64_t picks = 0;
  for (size_t k = 0; k < sets.size(); ++k) {
    const auto* set = dynamic_cast<const InstructionDataset*>(sets[k].get());
    REQUIRE(set != nullptr);
    for (int64_t i = 0; i < set->size(); ++i) {
      if (set->kind(i) != InstructionKind::pick) continue;
      const auto [q, a] = set->text(i);
      INFO(q << " -> " << a);
      if (srcs[k].generic) {
        // the true letter and at least two other letters: answerable only by looking at the image
        const std::string& own = names[static_cast<size_t>(set->label(i))];
        CHECK((a == "It is a " + own + "." || a == "It is an " + own + "."));
        CHECK(listed_letters(q) >= 3);
        ++picks;
      } else {
        CHECK(listed_letters(q) == 0);  // a study image's list never offers a letter
      }
    }
  }
  CHECK(picks > 3);

  cfg.pretrain.letters = false;
  for (const auto& s : pretrain_sources(cfg)) CHECK(s.name != kGenericLetters);
  cfg.pretrain.letters = true;
  cfg.data.datasets[kGenericLetters] = cfg.data.datasets.at("tools");
  CHECK_THROWS_WITH(pretrain_sources(cfg), Catch::Contains("data.datasets.generic-letters") &&
                                               Catch::Contains("pretrain.letters"));
}

TEST_CASE("pretrain: pick_unlisted leaves the true name out of that share of pick lists, answered all the same",
          "[pretrain]") {
  const std::string dir = emt_test::scratch_dir("pretrain_unlisted");
  RunConfig cfg = world_config(dir);
  const auto srcs = pretrain_sources(cfg);
  for (int64_t pct : {0, 25, 100}) {
    INFO("pick_unlisted = " << pct);
    cfg.pretrain.pick_unlisted = pct;
    const auto sets = pretrain_language_sets(cfg, srcs, false);
    int64_t picks = 0, unlisted = 0;
    for (const auto& set_ptr : sets) {
      const auto* set = dynamic_cast<const InstructionDataset*>(set_ptr.get());
      REQUIRE(set != nullptr);
      for (int64_t i = 0; i < set->size(); ++i) {
        if (set->kind(i) != InstructionKind::pick) continue;
        const auto [q, a] = set->text(i);
        const std::string& own = set->class_names()[static_cast<size_t>(set->label(i))];
        INFO(q << " -> " << a);
        CHECK(a.find(" " + own + ".") != std::string::npos);  // the answer names the image either way
        bool listed = false;
        for (const char* pre : {", ", ": ", " in "})
          for (const char* post : {",", "."}) listed = listed || q.find(pre + own + post) != std::string::npos;
        ++picks;
        unlisted += !listed;
      }
    }
    REQUIRE(picks > 20);
    if (pct == 0) CHECK(unlisted == 0);
    if (pct == 100) CHECK(unlisted == picks);
    if (pct == 25) CHECK((unlisted > picks / 10 && unlisted < picks / 2));
  }
  cfg.pretrain.pick_unlisted = 101;
  CHECK_THROWS_AS(validate_config(cfg), ConfigError);
}

}  // namespace emt
