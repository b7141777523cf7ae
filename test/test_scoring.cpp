// Scoring: normalisation, label sets, the strict verdict on a table of realistic answers (the EMT paper's failure
// kinds among them), likelihood ranking, the external judge protocol and `emt eval --rescore`.
#include <emt/core/error.h>
#include <emt/eval/evaluator.h>
#include <emt/eval/metrics.h>
#include <emt/eval/scoring.h>
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "test/helpers.h"

using emt_test::slurp;

namespace {

std::vector<std::string> digit_names() {
  std::vector<std::string> v;
  for (int d = 0; d < 10; ++d) v.push_back(std::to_string(d));
  return v;
}
const std::vector<std::string> kFashion = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                           "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
const std::vector<std::string> kCifar10 = {"airplane", "automobile", "bird", "cat", "deer",
                                           "dog",      "frog",       "horse", "ship", "truck"};
std::vector<std::string> objects60() {
  std::vector<std::string> v;
  for (const char* c : {"red", "orange", "yellow", "green", "blue", "purple"})
    for (const char* s : {"circle", "square", "triangle", "star", "cross", "arrow", "bar", "ring", "crescent",
                          "heart"})
      v.push_back(std::string(c) + " " + s);
  return v;
}

void write_text(const std::string& path, const std::string& s) {
  std::filesystem::create_directories(std::filesystem::path(path).parent_path());
  std::ofstream(path) << s;
}
std::string make_script(const std::string& dir, const std::string& name, const std::string& body) {
  std::string p = dir + "/" + name;
  write_text(p, "#!/bin/sh\n" + body);
  ::chmod(p.c_str(), 0755);
  return p;
}

}  // namespace

TEST_CASE("normalize_text lower-cases, keeps label joiners, drops other punctuation", "[scoring]") {
  CHECK(emt::normalize_text("The object is a T-shirt/top.") == "the object is a t-shirt/top");
  CHECK(emt::normalize_text("  Hello,   World!! ") == "hello world");
  CHECK(emt::normalize_text("a - b / c") == "a b c");
  CHECK(emt::normalize_text("aquarium_fish") == "aquarium fish");
  CHECK(emt::normalize_text("-x-") == "x");
  CHECK(emt::normalize_text("") == "");
  CHECK(emt::match_words("T-shirt/top") == std::vector<std::string>{"t", "shirt", "top"});
  CHECK(emt::match_words("The number is 7.") == std::vector<std::string>{"the", "number", "is", "7"});
}

TEST_CASE("make_label_set validates class names and aliases", "[scoring]") {
  CHECK_THROWS_AS(emt::make_label_set({}), emt::ConfigError);
  CHECK_THROWS_AS(emt::make_label_set({"cat", "Cat"}), emt::ConfigError);       // reads the same
  CHECK_THROWS_AS(emt::make_label_set({"cat", "!!!"}), emt::ConfigError);       // nothing to match
  CHECK_THROWS_AS(emt::make_label_set(kCifar10, {"plane"}), emt::ConfigError);  // no '='
  CHECK_THROWS_AS(emt::make_label_set(kCifar10, {"=airplane"}), emt::ConfigError);
  CHECK_THROWS_AS(emt::make_label_set(kCifar10, {"plane="}), emt::ConfigError);
  CHECK_THROWS_AS(emt::make_label_set(kCifar10, {"plane=rocket"}), emt::ConfigError);  // unknown label
  CHECK_THROWS_AS(emt::make_label_set(kCifar10, {"cat=dog"}), emt::ConfigError);       // names another class
  CHECK_THROWS_AS(emt::make_label_set(kCifar10, {"car=automobile", "car=truck"}), emt::ConfigError);
  CHECK_THROWS_AS(emt::make_label_set(kCifar10, {"?=cat"}), emt::ConfigError);
  CHECK_NOTHROW(emt::make_label_set(kCifar10, {"cat=cat", " kitty = Cat "}));

  auto d = emt::make_label_set(digit_names());
  CHECK(d.digits);
  CHECK_FALSE(emt::make_label_set(kCifar10).digits);
  // Longest phrase first: "ankle boot" (2 words) sorts before "boot".
  auto f = emt::make_label_set(kFashion);
  CHECK(f.phrases.front().words.size() == 3);  // "t shirt top"
  CHECK_THROWS_AS(emt::strict_verdict("x", f, 10), emt::Error);
  CHECK_THROWS_AS(emt::strict_verdict("x", f, -1), emt::Error);
}

TEST_CASE("strict verdicts on realistic answers", "[scoring]") {
  const auto digits = emt::make_label_set(digit_names());
  const auto digits_x = emt::make_label_set(digit_names(), {}, kCifar10);  // other datasets' labels contradict
  const auto fashion = emt::make_label_set(kFashion);
  const auto cifar = emt::make_label_set(kCifar10, {}, digit_names());
  const auto obj = emt::make_label_set(objects60());
  const auto fish = emt::make_label_set({"aquarium_fish", "fish", "flatfish", "shark"});
  using K = emt::VerdictKind;
  struct Row {
    const emt::LabelSet* set;
    const char* output;
    int64_t label;
    K kind;
    int64_t predicted;
  };
  const Row rows[] = {
      // digit label set (MNIST prompt)
      {&digits, "The number is 7.", 7, K::correct, 7},
      {&digits, "7", 7, K::correct, 7},
      {&digits, "The number in the image is seven.", 7, K::correct, 7},
      {&digits, "Four", 4, K::correct, 4},
      {&digits, "The number is 4. The number is 4.", 4, K::correct, 4},
      {&digits, "The number is 1.", 7, K::incorrect, 1},
      {&digits, "0, 1, 2, 3, 4, 5, 6, 7, 8, 9", 3, K::intrinsic, -1},  // refusing with the list
      {&digits, "It could be a 3 or an 8.", 3, K::intrinsic, -1},
      {&digits, "The number is 38.", 3, K::extrinsic, -1},
      {&digits, "A handwritten digit on a black background.", 4, K::extrinsic, -1},
      {&digits, "The airplane is 8.", 8, K::correct, 8},      // no foreign labels known: nothing contradicts
      {&digits_x, "The airplane is 8.", 8, K::intrinsic, 8},  // the paper's intrinsic example
      {&digits_x, "The object is an airplane.", 8, K::extrinsic, -1},
      {&digits_x, "The number is 8.", 8, K::correct, 8},
      // Fashion-MNIST: "T-shirt/top" and "Shirt" share a word, "Ankle boot" has aliases
      {&fashion, "The object is a T-shirt/top.", 0, K::correct, 0},
      {&fashion, "The object is a t-shirt.", 0, K::correct, 0},
      {&fashion, "A person wearing a tshirt", 0, K::correct, 0},
      {&fashion, "The object is a shirt.", 0, K::incorrect, 6},
      {&fashion, "The object is an ankle boot.", 9, K::correct, 9},
      {&fashion, "The object is a boot.", 9, K::correct, 9},
      {&fashion, "The object is a sneaker.", 9, K::incorrect, 7},
      {&fashion, "Trouser, Pullover, Dress", 1, K::intrinsic, -1},
      {&fashion, "The object is a 9.", 9, K::extrinsic, -1},  // a digit answer after MNIST tuning
      {&fashion, "The object is a bag 5.", 8, K::intrinsic, 8},
      // CIFAR-10-style 10-class set
      {&cifar, "The object is an airplane.", 0, K::correct, 0},
      {&cifar, "AIRPLANE!!!", 0, K::correct, 0},
      {&cifar, "The object is a(n) cat.", 3, K::correct, 3},
      {&cifar, "The object is a 3.", 0, K::extrinsic, -1},  // MNIST-tuned model on a CIFAR-10 airplane
      {&cifar, "airplane, automobile, bird, cat", 0, K::intrinsic, -1},
      {&cifar, "The airplane is 8.", 0, K::intrinsic, 0},
      {&cifar, "The object is an airplane flying over eight houses.", 0, K::intrinsic, 0},
      {&cifar, "The object is one bird.", 2, K::correct, 2},  // "one" is ordinary English, not a number answer
      {&cifar, "The object is a truck.", 0, K::incorrect, 9},
      {&cifar, "The object is a Dog", 3, K::incorrect, 5},
      {&cifar, "a picture of a fish in a tank", 2, K::extrinsic, -1},
      {&cifar, "cats", 3, K::extrinsic, -1},  // whole words only: no plural matching
      {&cifar, "", 3, K::extrinsic, -1},
      // 60-class colour x shape set
      {&obj, "The object is a red circle.", 0, K::correct, 0},
      {&obj, "The object is a blue star.", 43, K::correct, 43},
      {&obj, "The object is a green star.", 43, K::incorrect, 33},
      {&obj, "The object is an orange crescent.", 18, K::correct, 18},
      {&obj, "The object is a circle.", 0, K::extrinsic, -1},
      {&obj, "red circle, red square", 0, K::intrinsic, -1},
      {&obj, "The object is a purple heart 2.", 59, K::intrinsic, 59},
      // a matched span is consumed: "fish" inside "aquarium fish" does not count again
      {&fish, "The object is an aquarium fish.", 0, K::correct, 0},
      {&fish, "The object is an aquarium_fish.", 0, K::correct, 0},
      {&fish, "The object is a fish.", 0, K::incorrect, 1},
      {&fish, "aquarium fish or shark", 0, K::intrinsic, -1},
      {&fish, "The object is a flatfish.", 2, K::correct, 2},
  };
  for (const auto& r : rows) {
    INFO("output: '" << r.output << "' true label " << r.label);
    auto v = emt::strict_verdict(r.output, *r.set, r.label);
    CHECK(emt::verdict_name(v.kind) == std::string(emt::verdict_name(r.kind)));
    CHECK(v.predicted == r.predicted);
  }
  auto v = emt::strict_verdict("airplane, automobile, bird, cat", cifar, 0);
  CHECK(v.mentioned == std::vector<int64_t>{0, 1, 2, 3});
  CHECK_FALSE(v.contradicting);
  CHECK(emt::strict_verdict("The object is a 3.", cifar, 0).contradicting);
}

TEST_CASE("user aliases are matched like class names", "[scoring]") {
  auto s = emt::make_label_set(kCifar10, {"plane=airplane", "car=Automobile"});
  CHECK(emt::strict_verdict("The object is a plane.", s, 0).kind == emt::VerdictKind::correct);
  CHECK(emt::strict_verdict("a car", s, 0).predicted == 1);
  CHECK(emt::strict_verdict("a plane or a car", s, 0).kind == emt::VerdictKind::intrinsic);
  // "airplane" and "plane" are one class: both together still name one label.
  CHECK(emt::strict_verdict("an airplane, a plane", s, 0).kind == emt::VerdictKind::correct);
}

TEST_CASE("answer drift: an answer naming another dataset's class", "[scoring]") {
  const std::vector<std::string> digits = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
  const std::vector<std::string> shapes = {"circle", "square", "star", "bird"};
  auto pair_sets = [&](const std::vector<std::string>& own, const std::vector<std::string>& other) {
    return std::make_pair(emt::make_label_set(own, {}, other), emt::make_label_set(other, {}, own));
  };
  {
    // shapes asked, digits fine-tuned
    auto [own, other] = pair_sets(shapes, digits);
    CHECK(emt::names_class_of("3", other, own) == 3);
    CHECK(emt::names_class_of("It is a 7.", other, own) == 7);
    CHECK(emt::names_class_of("a star", other, own) == -1);
    CHECK(emt::names_class_of("seven", other, own) == 7);  // the digit set's number-word aliases count
    CHECK(emt::names_class_of("one star", other, own) == -1);  // "one" is ordinary English
    CHECK(emt::names_class_of("8 or 2", other, own) == 8);     // the first one named
    CHECK(emt::names_class_of("", other, own) == -1);
    CHECK(emt::names_class_of("37", other, own) == -1);  // whole words only
  }
  {
    // shapes asked, CIFAR-10 fine-tuned: "bird" is a class of both
    auto own = emt::make_label_set(shapes, {}, kCifar10);
    auto other = emt::make_label_set(kCifar10, {}, shapes);
    CHECK(emt::names_class_of("a bird", other, own) == -1);  // shared with the asked dataset: not drift
    CHECK(emt::names_class_of("a red truck", other, own) == 9);
    CHECK(emt::names_class_of("The object is a deer.", other, own) == 4);
    CHECK(emt::names_class_of("a bird or a cat", other, own) == 3);
  }
  {
    // the fashion aliases of the other set count
    auto own = emt::make_label_set(digits, {}, kFashion);
    auto other = emt::make_label_set(kFashion, {}, digits);
    CHECK(emt::names_class_of("boot", other, own) == 9);
    CHECK(emt::names_class_of("T-shirt", other, own) == 0);
    CHECK(emt::names_class_of("4", other, own) == -1);
  }
}

TEST_CASE("verdict names round-trip", "[scoring]") {
  for (auto k : {emt::VerdictKind::correct, emt::VerdictKind::incorrect, emt::VerdictKind::intrinsic,
                 emt::VerdictKind::extrinsic})
    CHECK(emt::parse_verdict(emt::verdict_name(k)) == k);
  CHECK_THROWS_AS(emt::parse_verdict("wrong"), emt::FormatError);
}

TEST_CASE("likelihood ranking picks the most likely answer, ties to the lowest class", "[scoring]") {
  auto ll = torch::tensor({-1.0, -2.0, -3.0, -5.0, -1.0, -1.0, 0.0, 0.0, -1.0}).view({3, 3});
  auto r = emt::likelihood_rank(ll, torch::tensor({0, 2, 1}));
  CHECK(r.predicted.equal(torch::tensor({0, 1, 0}, torch::kLong)));
  CHECK(r.correct.equal(torch::tensor({true, false, false})));
  CHECK_THROWS(emt::likelihood_rank(ll.view({9}), torch::tensor({0})));
  CHECK_THROWS(emt::likelihood_rank(ll, torch::tensor({0, 1})));
  CHECK_THROWS(emt::likelihood_rank(ll, torch::tensor({0, 1, 3})));
  CHECK_THROWS(emt::likelihood_rank(ll, torch::tensor({0, -1, 2})));
  auto nan = ll.clone();
  nan[1][1] = std::nan("");
  CHECK_THROWS(emt::likelihood_rank(nan, torch::tensor({0, 1, 2})));
  auto empty = emt::likelihood_rank(torch::zeros({0, 4}), torch::zeros({0}, torch::kLong));
  CHECK(empty.predicted.numel() == 0);
}

TEST_CASE("external judge: JSON question on stdin, yes/no on stdout", "[scoring]") {
  std::string dir = emt_test::scratch_dir("judge");
  std::string judge = make_script(dir, "judge.sh",
                                  "in=$(cat)\nprintf '%s' \"$in\" > " + dir + "/last.json\n"
                                  "case \"$in\" in *'\"prediction\":\"The object is a cat.\"'*) echo 'Yes.';;\n"
                                  "*) echo '  NO, it is not';; esac\n");
  CHECK(emt::judge_says_yes(judge, "cat", "The object is a cat."));
  auto j = nlohmann::json::parse(slurp(dir + "/last.json"));
  CHECK(j["question"] == "Is the \"Prediction\" correctly predicting the right \"Label\"? Label: cat; Prediction: "
                         "The object is a cat..");
  CHECK(j["label"] == "cat");
  CHECK(j["prediction"] == "The object is a cat.");
  CHECK_FALSE(emt::judge_says_yes(judge, "cat", "The object is a dog."));
  CHECK(emt::judge_question("7", "The number is 7") ==
        "Is the \"Prediction\" correctly predicting the right \"Label\"? Label: 7; Prediction: The number is 7.");

  // A judge that never reads stdin, with a prompt bigger than a pipe buffer.
  CHECK(emt::judge_says_yes("echo YES", "cat", std::string(300000, 'x')));

  std::string maybe = make_script(dir, "maybe.sh", "cat >/dev/null\necho maybe\n");
  try {
    emt::judge_says_yes(maybe, "cat", "a cat");
    FAIL("no throw");
  } catch (const emt::Error& e) {
    CHECK_THAT(e.what(), Catch::Contains(maybe) && Catch::Contains("maybe"));
  }
  std::string fails = make_script(dir, "fails.sh", "cat >/dev/null\necho 'quota exceeded' >&2\nexit 3\n");
  try {
    emt::judge_says_yes(fails, "cat", "a cat");
    FAIL("no throw");
  } catch (const emt::Error& e) {
    CHECK_THAT(e.what(), Catch::Contains("status 3") && Catch::Contains("quota exceeded") && Catch::Contains(fails));
  }
  CHECK_THROWS_AS(emt::judge_says_yes("true", "cat", "a cat"), emt::Error);  // empty answer
  CHECK_THROWS_AS(emt::judge_says_yes(dir + "/missing.sh", "cat", "a cat"), emt::Error);
  CHECK_THROWS_AS(emt::judge_says_yes("  ", "cat", "a cat"), emt::ConfigError);
}

namespace {
// A run directory with kept generations for a 3-class dataset, stale verdicts and stale results rows.
std::string make_rescore_run(const std::string& name) {
  std::string dir = emt_test::scratch_dir(name);
  auto line = [](int64_t idx, int64_t label, const char* label_name, const char* out, const char* verdict) {
    nlohmann::ordered_json j;
    j["dataset"] = "toy3";
    j["index"] = idx;
    j["label"] = label;
    j["label_name"] = label_name;
    j["prompt"] = "What is the object in the image? Please only answer a single object in cat, dog, bird.";
    j["output"] = out;
    j["verdict_strict"] = verdict;
    return j.dump() + "\n";
  };
  write_text(dir + "/predictions/base/epoch_0/toy3.jsonl",
             line(0, 0, "cat", "The object is a cat.", "incorrect") + line(1, 1, "dog", "The object is a dog.", "correct") +
                 line(2, 2, "bird", "The object is a cat.", "incorrect") +
                 line(3, 2, "bird", "cat, dog, bird", "incorrect"));
  write_text(dir + "/predictions/toy3__lora__seed0/epoch_1/toy3.jsonl",
             line(0, 0, "cat", "The object is a 3.", "correct") + line(1, 1, "dog", "a dog", "correct") +
                 line(2, 2, "bird", "The object is a bird.", "correct"));
  std::string results =
      R"({"kind":"mllm","finetune_dataset":"","method":"base","seed":0,"epoch":0,"eval_dataset":"toy3","scorer":"strict","accuracy":0.0,"n":4,"n_correct":0,"n_incorrect":4,"n_intrinsic":0,"n_extrinsic":0,"ci_low":0.0,"ci_high":0.5,"run":"r1","extra":"kept"})"
      "\n"
      R"({"kind":"mllm","finetune_dataset":"","method":"base","seed":0,"epoch":0,"eval_dataset":"toy3","scorer":"likelihood","accuracy":0.75,"n":4,"n_correct":3,"n_incorrect":1,"n_intrinsic":0,"n_extrinsic":0,"ci_low":0.3,"ci_high":0.95,"run":"r1"})"
      "\n";
  write_text(dir + "/results.jsonl", results);
  return dir;
}
}  // namespace

TEST_CASE("rescore_run counts the answer drift toward every other dataset", "[scoring]") {
  std::string dir = emt_test::scratch_dir("rescore-drift");
  auto line = [](const char* ds, int64_t label, const char* label_name, const char* out) {
    nlohmann::ordered_json j;
    j["finetune_dataset"] = "digits";
    j["method"] = "lora";
    j["seed"] = 0;
    j["epoch"] = 1;
    j["dataset"] = ds;
    j["label"] = label;
    j["label_name"] = label_name;
    j["output"] = out;
    j["verdict_strict"] = "correct";
    return j.dump() + "\n";
  };
  write_text(dir + "/predictions/digits__lora__seed0/epoch_1/toy3.jsonl",
             line("toy3", 0, "cat", "3") + line("toy3", 1, "dog", "a dog") + line("toy3", 2, "bird", "It is a 7.") +
                 line("toy3", 0, "cat", "one cat"));
  write_text(dir + "/predictions/digits__lora__seed0/epoch_1/digits.jsonl",
             line("digits", 3, "3", "3") + line("digits", 2, "2", "a bird"));
  emt::RescoreOptions opts;
  opts.label_sets["toy3"] = emt::make_label_set({"cat", "dog", "bird"}, {}, digit_names());
  opts.label_sets["digits"] = emt::make_label_set(digit_names(), {}, {"cat", "dog", "bird"});
  emt::rescore_run(dir, opts);
  auto loaded = emt::load_results({dir});
  REQUIRE(loaded.rows.size() == 2);
  for (const auto& r : loaded.rows) {
    INFO(r.eval_dataset);
    if (r.eval_dataset == "toy3") CHECK(r.n_naming == std::map<std::string, int64_t>{{"digits", 2}});
    else CHECK(r.n_naming == std::map<std::string, int64_t>{{"toy3", 1}});
  }
  auto toy = emt_test::read_jsonl(dir + "/predictions/digits__lora__seed0/epoch_1/toy3.jsonl");
  CHECK(toy[0]["names_class_of"] == "digits=3");
  CHECK_FALSE(toy[1].contains("names_class_of"));
  CHECK(toy[2]["names_class_of"] == "digits=7");
  CHECK_FALSE(toy[3].contains("names_class_of"));
  // The counts round-trip through results.jsonl and are validated there.
  auto row = loaded.rows[0];
  CHECK(emt::parse_result_line(emt::result_to_json_line(row), "x").n_naming == row.n_naming);
  auto j = nlohmann::json::parse(emt::result_to_json_line(row));
  j["n_naming"][row.n_naming.begin()->first] = row.n + 1;
  CHECK_THROWS_AS(emt::parse_result_line(j.dump(), "x:1"), emt::FormatError);
  j["n_naming"] = nlohmann::json::object({{row.eval_dataset, 1}});
  CHECK_THROWS_AS(emt::parse_result_line(j.dump(), "x:1"), emt::FormatError);
  j["n_naming"] = 3;
  CHECK_THROWS_AS(emt::parse_result_line(j.dump(), "x:1"), emt::FormatError);
}

TEST_CASE("rescore_run runs scorers of one's own again: verdicts, predictions and rows", "[scoring]") {
  std::string dir = make_rescore_run("rescore-own");
  emt::RescoreOptions opts;
  opts.label_sets["toy3"] = emt::make_label_set({"cat", "dog", "bird"});
  // "mentions": correct when the true class's name occurs anywhere in the answer; predicts the first name found.
  auto mentions = [](const emt::ScorerInput& in) {
    emt::ScorerResult r;
    for (size_t k = 0; k < in.class_names.size() && r.predicted < 0; ++k)
      if (in.output.find(in.class_names[k]) != std::string::npos) r.predicted = static_cast<int64_t>(k);
    r.kind = in.output.find(in.class_names[static_cast<size_t>(in.label)]) != std::string::npos
                 ? emt::VerdictKind::correct
                 : emt::VerdictKind::incorrect;
    return r;
  };
  opts.scorers.push_back({"mentions", mentions, {}});
  opts.scorers.push_back({"elsewhere", mentions, {"other"}});  // applies to no dataset of this run
  emt::rescore_run(dir, opts);
  auto loaded = emt::load_results({dir});
  std::map<std::string, emt::ResultRow> by;
  for (const auto& r : loaded.rows) by[r.method + "/" + r.scorer] = r;
  CHECK_FALSE(by.count("base/elsewhere"));
  REQUIRE(by.count("base/mentions"));
  // base answers: cat (label cat), dog (dog), cat (bird), "cat, dog, bird" (bird) -> 3 of 4 mention the truth
  CHECK(by["base/mentions"].n == 4);
  CHECK(by["base/mentions"].n_correct == 3);
  CHECK(by["base/strict"].n_correct == 2);
  REQUIRE(by.count("lora/mentions"));
  CHECK(by["lora/mentions"].n_correct == 2);  // "a 3" names nothing
  auto base = emt_test::read_jsonl(dir + "/predictions/base/epoch_0/toy3.jsonl");
  CHECK(base[2]["verdict_mentions"] == "incorrect");
  CHECK(base[2]["pred_mentions"] == 0);
  CHECK(base[3]["verdict_mentions"] == "correct");
  CHECK_FALSE(base[0].contains("verdict_elsewhere"));
  // a scorer that reads a class outside the label set is an error naming the file, line and scorer
  emt::RescoreOptions bad = opts;
  bad.scorers = {{"wild", [](const emt::ScorerInput&) { return emt::ScorerResult{emt::VerdictKind::correct, 9}; }, {}}};
  CHECK_THAT(emt_test::error_of<emt::Error>([&] { emt::rescore_run(dir, bad); }),
             Catch::Contains("toy3.jsonl:1") && Catch::Contains("scorer 'wild'"));
  bad.scorers = {{"strict", mentions, {}}};
  CHECK_THROWS_AS(emt::rescore_run(dir, bad), emt::ConfigError);
  bad.scorers = {{"empty", {}, {}}};
  CHECK_THROWS_AS(emt::rescore_run(dir, bad), emt::ConfigError);
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] { emt::registered_scorer("never-registered"); }),
             Catch::Contains("'never-registered' is not registered"));
}

TEST_CASE("rescore_run recomputes verdicts and rewrites strict rows", "[scoring]") {
  std::string dir = make_rescore_run("rescore-lib");
  auto names = emt::class_names_from_predictions(dir);
  REQUIRE(names.at("toy3") == std::vector<std::string>{"cat", "dog", "bird"});
  emt::RescoreOptions opts;
  opts.label_sets["toy3"] = emt::make_label_set(names["toy3"]);
  auto s = emt::rescore_run(dir, opts);
  CHECK(s.files == 2);
  CHECK(s.predictions == 7);
  CHECK(s.changed == 3);
  CHECK(s.rows_written == 2);  // base row replaced, lora epoch-1 row added

  auto loaded = emt::load_results({dir});
  REQUIRE(loaded.rows.size() == 3);
  const auto& base = loaded.rows[0];
  CHECK(base.scorer == "strict");
  CHECK(base.n == 4);
  CHECK(base.n_correct == 2);
  CHECK(base.n_incorrect == 1);
  CHECK(base.n_intrinsic == 1);
  CHECK(base.accuracy == Approx(0.5));
  auto [lo, hi] = emt::wilson_interval(2, 4);
  CHECK(base.ci_low == Approx(lo));
  CHECK(base.ci_high == Approx(hi));
  CHECK(base.run == "r1");
  CHECK(loaded.rows[1].scorer == "likelihood");
  CHECK(loaded.rows[1].accuracy == Approx(0.75));  // untouched
  const auto& lora = loaded.rows[2];
  CHECK(lora.method == "lora");
  CHECK(lora.finetune_dataset == "toy3");
  CHECK(lora.epoch == 1);
  CHECK(lora.n_correct == 2);
  CHECK(lora.n_extrinsic == 1);
  CHECK(slurp(dir + "/results.jsonl").find("\"extra\":\"kept\"") != std::string::npos);
  auto pred = slurp(dir + "/predictions/toy3__lora__seed0/epoch_1/toy3.jsonl");
  CHECK(pred.find("\"verdict_strict\":\"extrinsic\"") != std::string::npos);
  CHECK(pred.find("\"prompt\"") < pred.find("\"output\""));  // field order kept

  // Rescoring again changes nothing.
  auto again = emt::rescore_run(dir, opts);
  CHECK(again.changed == 0);

  // Errors: unknown dataset, bad cell directory, bad label.
  emt::RescoreOptions none;
  CHECK_THROWS_AS(emt::rescore_run(dir, none), emt::ConfigError);
  write_text(dir + "/predictions/not-a-cell/epoch_1/toy3.jsonl",
             R"({"dataset":"toy3","index":0,"label":0,"label_name":"cat","output":"cat"})" "\n");
  CHECK_THROWS_AS(emt::rescore_run(dir, opts), emt::FormatError);
  std::filesystem::remove_all(dir + "/predictions/not-a-cell");
  write_text(dir + "/predictions/base/epoch_0/toy3.jsonl",
             R"({"dataset":"toy3","index":0,"label":7,"label_name":"cat","output":"cat"})" "\n");
  CHECK_THROWS_AS(emt::rescore_run(dir, opts), emt::FormatError);
  CHECK_THROWS_AS(emt::rescore_run(dir + "/nope", opts), emt::IoError);
}

TEST_CASE("class names from predictions must be complete and consistent", "[scoring]") {
  std::string dir = emt_test::scratch_dir("rescore-names");
  write_text(dir + "/predictions/base/epoch_0/a.jsonl",
             R"({"label":0,"label_name":"cat","output":"x"})" "\n" R"({"label":2,"label_name":"bird","output":"x"})" "\n");
  CHECK_THROWS_AS(emt::class_names_from_predictions(dir), emt::FormatError);  // label 1 never seen
  write_text(dir + "/predictions/base/epoch_0/a.jsonl",
             R"({"label":0,"label_name":"cat","output":"x"})" "\n" R"({"label":0,"label_name":"dog","output":"x"})" "\n");
  CHECK_THROWS_AS(emt::class_names_from_predictions(dir), emt::FormatError);  // two names for one label
}

TEST_CASE("emt eval --rescore rewrites results and prints the matrix; --judge adds judge rows", "[scoring]") {
  std::string dir = make_rescore_run("rescore-cli");
  auto r = emt_test::run_cli("eval --rescore " + dir);
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("toy3") != std::string::npos);
  CHECK(r.output.find("50.0") != std::string::npos);  // base strict accuracy 2/4
  CHECK(r.output.find("rescored 7 answers in 2 files") != std::string::npos);

  std::string judge = make_script(dir, "judge.sh",
                                  "in=$(cat)\ncase \"$in\" in *'Label: cat; Prediction: The object is a cat'*|"
                                  "*'Label: dog; Prediction: The object is a dog'*|*'Label: dog; Prediction: a dog'*) "
                                  "echo yes;; *) echo no;; esac\n");
  auto rj = emt_test::run_cli("eval --rescore " + dir + " --judge " + judge);
  INFO(rj.output);
  REQUIRE(rj.code == 0);
  auto loaded = emt::load_results({dir});
  int judge_rows = 0;
  for (const auto& row : loaded.rows)
    if (row.scorer == "judge") {
      ++judge_rows;
      if (row.method == "base") CHECK(row.n_correct == 2);
      if (row.method == "lora") CHECK(row.n_correct == 1);
    }
  CHECK(judge_rows == 2);
  CHECK(emt_test::run_cli("eval").code == 2);
  CHECK(emt_test::run_cli("eval --rescore " + dir + "/missing").code == 1);
  CHECK(emt_test::run_cli("eval --rescore " + dir + " --alias nope").code == 2);
}
