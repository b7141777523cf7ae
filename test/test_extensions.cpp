// Library users' registries: dataset formats, scorers and methods registered by name are accepted by config
// validation and used by the dataset opener, the Evaluator and the training policy like built-in ones.
#include <emt/adapters/policy.h>
#include <emt/core/config.h>
#include <emt/core/dataset.h>
#include <emt/core/error.h>
#include <emt/eval/evaluator.h>
#include <emt/train/finetune.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include <catch2/catch.hpp>

#include "expect_error.h"

namespace {

int g_opened = 0;

std::shared_ptr<emt::ImageDataset> checker(const std::string& name, const emt::DatasetConfig& cfg, emt::Split split) {
  ++g_opened;
  const int64_t n = split == emt::Split::train ? 12 : 6;
  std::vector<int64_t> labels;
  for (int64_t i = 0; i < n; ++i) labels.push_back(i % 2);
  auto images = torch::randint(0, 255, {n, 8, 8, 1}, torch::kUInt8);
  return emt::make_memory_dataset(images, labels, {"dark", "light"}, name + "@" + cfg.path);
}

const char* kConfig = R"(
data:
  root: /data
  datasets:
    board: {format: checker, path: boards, class_names: [black square, white square]}
    board2: {format: checker}
eval: {scorers: [strict, ext-echo]}
)";

}  // namespace

TEST_CASE("extensions: a registered dataset format is validated, opened and post-processed like a built-in one",
          "[extensions]") {
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] {
               emt::load_config_string("data: {datasets: {x: {format: checkr, path: p}}}\n");
             }),
             Catch::Contains("data.datasets.x.format"));
  emt::register_dataset_format("checker", checker);
  emt::register_scorer("ext-echo", [](const emt::ScorerInput& in) {
    return emt::ScorerResult{in.output == in.class_names[static_cast<size_t>(in.label)] ? emt::VerdictKind::correct
                                                                                         : emt::VerdictKind::incorrect,
                             -1};
  }, {"board"});
  auto cfg = emt::load_config_string(kConfig);
  g_opened = 0;
  auto test = emt::open_dataset("board", cfg.data.datasets.at("board"), cfg.data.root, emt::Split::test, 0);
  CHECK(g_opened == 1);
  CHECK(test->size() == 6);
  CHECK(test->name() == "board");
  // the config's class names replace the format's; the path arrives resolved against data.root
  CHECK(test->class_names() == std::vector<std::string>{"black square", "white square"});
  auto capped = cfg.data.datasets.at("board2");
  capped.train_max_samples = 4;
  CHECK(emt::open_dataset("board2", capped, cfg.data.root, emt::Split::train, 0)->size() == 4);
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] { emt::register_dataset_format("idx", checker); }),
             Catch::Contains("'idx' is a built-in dataset format"));
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] { emt::register_dataset_format("empty", {}); }),
             Catch::Contains("the factory is empty"));

  SECTION("a registered scorer applies to the datasets it names") {
    emt::Evaluator ev(cfg);
    CHECK(ev.scorers() == std::vector<std::string>{"strict", "ext-echo"});
    CHECK(ev.scorers_for("board") == std::vector<std::string>{"strict", "ext-echo"});
    CHECK(ev.scorers_for("board2") == std::vector<std::string>{"strict"});
    CHECK_THROWS_AS(ev.scorers_for("nope"), emt::ConfigError);
    CHECK_THAT(emt_test::error_of<emt::ConfigError>([] {
                 emt::load_config_string("eval: {scorers: [strict, ext-eco]}\n");
               }),
               Catch::Contains("did you mean 'ext-echo'"));
    CHECK_THAT(emt_test::error_of<emt::ConfigError>([] {
                 emt::register_scorer("strict", [](const emt::ScorerInput&) { return emt::ScorerResult{}; });
               }),
               Catch::Contains("built-in scorer"));
  }
}

TEST_CASE("extensions: a registered method trains its base method's components under its own name",
          "[extensions]") {
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([] {
               emt::load_config_string("study: {methods: [lora, lora-pull]}\n");
             }),
             Catch::Contains("study.methods[1]"));
  emt::MethodSpec spec;
  spec.base = "lora";
  emt::register_method("lora-pull", spec);
  auto cfg = emt::load_config_string("study: {methods: [lora, lora-pull]}\nfinetune: {method: lora-pull}\n");
  CHECK(cfg.study.methods.back() == "lora-pull");
  const auto p = emt::policy_for_method("lora-pull"), lora = emt::policy_for_method("lora");
  CHECK(p.name == "lora-pull");
  CHECK(p.llm == lora.llm);
  CHECK(p.projector == lora.projector);
  CHECK(p.vision == lora.vision);
  CHECK(p.prompt == lora.prompt);
  CHECK(emt::registered_method_base("lora-pull") == "lora");
  CHECK(emt::registered_method_base("lora").empty());
  spec.base = "lorax";
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] { emt::register_method("bad-base", spec); }),
             Catch::Contains("its base must be a built-in method"));
  spec.base = "linear";
  CHECK_THAT(emt_test::error_of<emt::ConfigError>([&] { emt::register_method("full", spec); }),
             Catch::Contains("'full' is a built-in method"));
}

// The installed headers are what a library user compiles: every #include <...> in include/emt/ must name the
// standard library, LibTorch (torch/, ATen/, c10/) or emt itself, never OpenCV, yaml-cpp, nlohmann, fmt, ...
TEST_CASE("extensions: public headers include nothing third-party but LibTorch's") {
  namespace fs = std::filesystem;
  const fs::path root = fs::path(EMT_SOURCE_DIR) / "include" / "emt";
  int headers = 0;
  std::vector<std::string> offending;
  for (const auto& entry : fs::recursive_directory_iterator(root)) {
    if (entry.path().extension() != ".h") continue;
    ++headers;
    std::ifstream in(entry.path());
    std::string line;
    while (std::getline(in, line)) {
      if (line.rfind("#include", 0) != 0) continue;
      const auto open = line.find_first_of("<\"");
      const auto close = line.find_first_of(">\"", open + 1);
      REQUIRE(close != std::string::npos);
      const std::string name = line.substr(open + 1, close - open - 1);
      const auto under = [&](const char* prefix) { return name.rfind(prefix, 0) == 0; };
      const bool standard = name.find('/') == std::string::npos && name.find('.') == std::string::npos;
      if (!standard && !under("emt/") && !under("torch/") && !under("ATen/") && !under("c10/")) offending.push_back(entry.path().filename().string() + ": " + name);
    }
  }
  CHECK(headers > 20);
  INFO("offending includes: " << offending.size());
  for (const auto& o : offending) UNSCOPED_INFO(o);
  CHECK(offending.empty());
}
