// Typed configuration: unknown keys with suggestions, types, extends, overrides, cross-field rules, round trip.
#include <emt/core/config.h>
#include <emt/core/error.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <set>

#include "helpers.h"

using emt::ConfigError;

namespace {
std::string write(const std::string& dir, const std::string& name, const std::string& text) {
  auto p = std::filesystem::path(dir) / name;
  std::filesystem::create_directories(p.parent_path());
  std::ofstream(p) << text;
  return p.string();
}
std::string config_error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("config: defaults load and validate", "[config]") {
  auto c = emt::load_config_string("");
  CHECK(c.finetune.method == "lora");
  CHECK(c.finetune.lora.r == 64);
  CHECK(c.finetune.lora.alpha == 16.0);
  CHECK(c.study.learning_rate_by_method.at("linear") == 2e-3);
  REQUIRE_NOTHROW(emt::validate_config(c));
}

TEST_CASE("config: typo gets file:line:col, the dotted key and a suggestion", "[config]") {
  auto dir = emt_test::scratch_dir("config_typo");
  auto path = write(dir, "bad.yaml", "finetune:\n  method: lora\n  learnig_rate: 1e-4\n");
  auto msg = config_error_of([&] { emt::load_config(path); });
  CHECK_THAT(msg, Catch::Contains(path + ":3:3: finetune.learnig_rate: unknown key"));
  CHECK_THAT(msg, Catch::Contains("did you mean 'learning_rate'?"));
}

TEST_CASE("config: every problem is reported at once", "[config]") {
  auto msg = config_error_of([] {
    emt::load_config_string("run:\n  threads: many\nfinetune:\n  epocs: 3\n  batch_size: -1\n", {}, "two.yaml");
  });
  CHECK_THAT(msg, Catch::Contains("two.yaml:2:12: run.threads: expected an integer (got many)"));
  CHECK_THAT(msg, Catch::Contains("two.yaml:4:3: finetune.epocs: unknown key (did you mean 'epochs'?)"));
  // batch_size is well-typed, so its range rule waits for the type errors to be fixed; two problems listed
  CHECK_THAT(msg, Catch::Contains("2 problems"));
}

TEST_CASE("config: cross-field rules name the key and where it was set", "[config]") {
  auto msg = config_error_of([] {
    emt::load_config_string(
        "model:\n  llm:\n    hidden_size: 96\n    num_heads: 5\nfinetune:\n  batch_size: 0\n  dataset: nope\n", {},
        "x.yaml");
  });
  CHECK_THAT(msg, Catch::Contains("x.yaml:4:16: model.llm.num_heads: must divide model.llm.hidden_size 96 (got 5)"));
  CHECK_THAT(msg, Catch::Contains("x.yaml:6:15: finetune.batch_size: must be > 0 (got 0)"));
  CHECK_THAT(msg, Catch::Contains("finetune.dataset: unknown dataset 'nope'"));
}

TEST_CASE("config: each validation rule throws", "[config]") {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"run.device=tpu", "run.device"},
      {"run.threads=-1", "run.threads"},
      {"run.dtype=f8", "run.dtype"},
      {"run.name=a/b", "run.name"},
      {"model.projector=mlp3x", "model.projector"},
      {"model.conversation=chatml", "model.conversation"},
      {"model.vision.patch_size=5", "model.vision.patch_size"},
      {"model.vision.select_layer=-9", "model.vision.select_layer"},
      {"model.vision.select_feature=cls", "model.vision.select_feature"},
      {"model.vision.hidden_act=tanh", "model.vision.hidden_act"},
      {"model.llm.num_kv_heads=3", "model.llm.num_kv_heads"},
      {"model.clip_text.num_heads=5", "model.clip_text.num_heads"},
      {"finetune.method=adapter", "finetune.method"},
      {"finetune.schedule=step", "finetune.schedule"},
      {"finetune.warmup_ratio=1.5", "finetune.warmup_ratio"},
      {"finetune.learning_rate=0", "finetune.learning_rate"},
      {"finetune.precision=f16", "finetune.precision"},
      {"finetune.lora.r=0", "finetune.lora.r"},
      {"finetune.lora.dropout=0.99", "finetune.lora.dropout"},
      {"finetune.lora.init=xavier", "finetune.lora.init"},
      {"finetune.lora.target_regex=(", "finetune.lora.target_regex"},
      {"finetune.lora.alpha=0", "finetune.lora.alpha"},
      {"finetune.lora.target_modules=[]", "finetune.lora.target_modules"},
      {"finetune.lora.rank_pattern.q_proj=0", "finetune.lora.rank_pattern.q_proj"},
      {"finetune.lora.alpha_pattern.q_proj=-1", "finetune.lora.alpha_pattern.q_proj"},
      {"finetune.prompt_tuning.init=text", "finetune.prompt_tuning.init_text"},
      {"eval.primary_scorer=gpt", "eval.primary_scorer"},
      {"eval.scorers=[judge]", "eval.judge_command"},
      {"eval.top_p=0", "eval.top_p"},
      {"eval.clip_templates=[a photo]", "eval.clip_templates"},
      {"eval.datasets=[cifar10]", "eval.datasets[0]"},
      {"study.methods=[lora,qlora]", "study.methods[1]"},
      {"study.seeds=[]", "study.seeds"},
      {"study.learning_rate_by_method.lora=-1", "study.learning_rate_by_method.lora"},
      {"pretrain.batch_size=0", "pretrain.batch_size"},
      {"data.datasets.d.format=tfrecord", "data.datasets.d.format"},
      {"data.datasets.d.test_fraction=0", "data.datasets.d.test_fraction"},
      {"data.datasets.d.answer=It is.", "data.datasets.d.answer"},
      {"data.datasets.d.aliases=[seven]", "data.datasets.d.aliases"},
  };
  for (const auto& [ov, key] : cases) {
    INFO(ov);
    std::vector<std::string> ovs = {ov};
    if (ov.rfind("data.datasets.d.", 0) == 0 && ov.find(".path") == std::string::npos)
      ovs.insert(ovs.begin(), "data.datasets.d.path=x");
    auto msg = config_error_of([&] { emt::load_config_string("", ovs); });
    CHECK_THAT(msg, Catch::Contains(key + ":"));
  }
}

TEST_CASE("config: extends is relative to the file and later layers win", "[config]") {
  auto dir = emt_test::scratch_dir("config_extends");
  write(dir, "models/base.yaml", "model:\n  llm:\n    hidden_size: 64\n    num_layers: 2\nrun:\n  seed: 7\n");
  auto child = write(dir, "exp/child.yaml", "extends: ../models/base.yaml\nmodel:\n  llm:\n    num_layers: 3\n");
  auto c = emt::load_config(child, {"run.seed=9", "eval.scorers=[strict, clip]"});
  CHECK(c.model.llm.hidden_size == 64);  // from the base
  CHECK(c.model.llm.num_layers == 3);    // child wins
  CHECK(c.run.seed == 9);                // override wins
  CHECK(c.eval.scorers == std::vector<std::string>{"strict", "clip"});
}

TEST_CASE("config: extends cycles and missing bases are errors", "[config]") {
  auto dir = emt_test::scratch_dir("config_cycle");
  write(dir, "a.yaml", "extends: b.yaml\n");
  auto b = write(dir, "b.yaml", "extends: a.yaml\n");
  CHECK_THAT(config_error_of([&] { emt::load_config(b); }), Catch::Contains("cycle"));
  auto m = write(dir, "m.yaml", "extends: nothere.yaml\n");
  CHECK_THAT(config_error_of([&] { emt::load_config(m); }), Catch::Contains("file not found"));
  CHECK_THAT(config_error_of([&] { emt::load_config(dir + "/absent.yaml"); }), Catch::Contains("not found"));
  auto syn = write(dir, "syntax.yaml", "run: [\n");
  CHECK_THAT(config_error_of([&] { emt::load_config(syn); }), Catch::Contains("YAML syntax error"));
}

TEST_CASE("config: overrides use dotted keys, lists and maps, with the same checks", "[config]") {
  auto c = emt::load_config_string("data:\n  datasets:\n    mnist: {format: idx, path: mnist}\n",
                                   {"data.datasets.mnist.test_fraction=0.2", "eval.datasets=[mnist]",
                                    "finetune.lora.target_modules=q_proj", "study.seeds=[1,2]"});
  CHECK(c.data.datasets.at("mnist").test_fraction == 0.2);
  CHECK(c.data.datasets.at("mnist").path == "mnist");  // map entries are refined, not replaced
  CHECK(c.eval.datasets == std::vector<std::string>{"mnist"});
  CHECK(c.finetune.lora.target_modules == std::vector<std::string>{"q_proj"});
  CHECK(c.study.seeds == std::vector<int64_t>{1, 2});
  auto msg = config_error_of([] { emt::load_config_string("", {"finetune.lernin_rate=1"}); });
  CHECK_THAT(msg, Catch::Contains("command line 'finetune.lernin_rate=1': finetune.lernin_rate: unknown key"));
  CHECK_THAT(config_error_of([] { emt::load_config_string("", {"novalue"}); }), Catch::Contains("expected dotted.key=value"));
  CHECK_THAT(config_error_of([] { emt::load_config_string("", {"finetune.epochs=three"}); }),
             Catch::Contains("expected an integer (got three)"));
}

TEST_CASE("config: the resolved YAML loads back to the same config", "[config]") {
  auto c = emt::load_config_string(
      "data:\n  datasets:\n    a: {format: cifar10, path: c10, class_names: [x, y]}\nfinetune:\n  learning_rate: 3e-5\n");
  auto yaml = emt::config_to_yaml(c);
  auto c2 = emt::load_config_string(yaml);
  CHECK(emt::config_to_yaml(c2) == yaml);
  CHECK(c2.finetune.learning_rate == 3e-5);
  CHECK(c2.data.datasets.at("a").class_names == std::vector<std::string>{"x", "y"});
}

TEST_CASE("config: docs/config.md documents every key", "[config]") {
  std::ifstream in(std::string(EMT_SOURCE_DIR) + "/docs/config.md");
  REQUIRE(in.good());
  std::string doc((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  for (const auto& [key, _] : emt::config_reference()) {
    INFO(key);
    CHECK(doc.find("`" + key + "`") != std::string::npos);
  }
}

TEST_CASE("config: did_you_mean", "[config]") {
  CHECK(emt::did_you_mean("learnig_rate", {"learning_rate", "lora"}) == "learning_rate");
  CHECK(emt::did_you_mean("zzzzzz", {"learning_rate", "lora"}).empty());
}

TEST_CASE("cli: config show prints YAML, exits 2 on config errors", "[config][cli]") {
  auto dir = emt_test::scratch_dir("config_cli");
  auto good = write(dir, "good.yaml", "finetune:\n  epochs: 5\n");
  auto r = emt_test::run_cli("config show " + good + " finetune.batch_size=4");
  CHECK(r.code == 0);
  CHECK_THAT(r.output, Catch::Contains("epochs: 5"));
  CHECK_THAT(r.output, Catch::Contains("batch_size: 4"));
  auto bad = write(dir, "bad.yaml", "finetune:\n  learnig_rate: 1e-4\n");
  auto b = emt_test::run_cli("config show " + bad);
  CHECK(b.code == 2);
  CHECK_THAT(b.output, Catch::Contains(bad + ":2:3: finetune.learnig_rate"));
  CHECK(emt_test::run_cli("--version").code == 0);
  CHECK(emt_test::run_cli("nosuchcommand").code == 2);
}
