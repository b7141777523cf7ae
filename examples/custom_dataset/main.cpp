// A dataset defined in code, fine-tuned on and scored next to a built-in one: register a format, name it in the
// config, run the study. Usage: custom_dataset [WORK_DIR]
#include <emt/core/dataset.h>
#include <emt/eval/metrics.h>
#include <emt/eval/study.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

#include "../common/tiny_study.h"

namespace {

// Three classes of 28x28 grey stripes (horizontal, vertical, diagonal) with a random phase and noise.
std::shared_ptr<emt::ImageDataset> stripes(const std::string& name, const emt::DatasetConfig&, emt::Split split) {
  const int64_t n = split == emt::Split::train ? 96 : 24;
  torch::manual_seed(split == emt::Split::train ? 1 : 2);
  auto y = torch::arange(28).view({28, 1}).expand({28, 28}), x = torch::arange(28).view({1, 28}).expand({28, 28});
  std::vector<torch::Tensor> images;
  std::vector<int64_t> labels;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = i % 3, phase = torch::randint(4, {1}).item<int64_t>();
    auto coord = c == 0 ? y : c == 1 ? x : (x + y);
    auto on = torch::div(coord + phase, 2, "floor").remainder(2) == 0;  // stripes two pixels wide
    auto img = on.to(torch::kFloat32) * 200 + torch::rand({28, 28}) * 50;
    images.push_back(img.clamp(0, 255).to(torch::kUInt8).unsqueeze(-1));
    labels.push_back(c);
  }
  return emt::make_memory_dataset(torch::stack(images), labels, {"horizontal stripes", "vertical stripes",
                                                                 "diagonal stripes"}, name);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : (std::filesystem::temp_directory_path() / "emt-custom-dataset").string();
  emt::register_dataset_format("stripes", stripes);  // before the config names it
  auto cfg = example::tiny_study(dir, "custom-dataset",
                                 "    stripes: {format: stripes}\n"
                                 "    shapes10: {format: synthetic, path: shapes10, train_max_samples: 96, "
                                 "test_max_samples: 24}\n",
                                 "  finetune_datasets: [stripes]\n  methods: [lora]\n  epochs: 1\n");
  emt::StudyOptions so;
  so.progress = false;
  const auto summary = emt::run_study(cfg, so);
  std::printf("%s\n", summary.matrix.c_str());

  const auto rows = emt::load_results({summary.run_dir}).rows;
  // The base model and the fine-tuned one, each scored on both datasets (24 test images each).
  for (const auto& [method, epoch] : {std::pair<std::string, int64_t>{"base", 0}, {"lora", 1}})
    for (const char* ds : {"stripes", "shapes10"}) {
      bool found = false;
      for (const auto& r : rows)
        if (r.kind == "mllm" && r.method == method && r.epoch == epoch && r.eval_dataset == ds && r.scorer == "strict")
          found = r.n == 24;
      if (!found) return example::fail(method + " epoch " + std::to_string(epoch) + " has no 24-image row for " + ds);
    }
  // The predictions name this dataset's own classes.
  std::ifstream pred(summary.run_dir + "/predictions/base/stripes.jsonl");
  std::set<std::string> labels;
  for (std::string line; std::getline(pred, line);) {
    const auto at = line.find("\"label_name\":\"");
    if (at != std::string::npos) labels.insert(line.substr(at + 14, line.find('"', at + 14) - at - 14));
  }
  if (labels != std::set<std::string>{"horizontal stripes", "vertical stripes", "diagonal stripes"})
    return example::fail("the stripes predictions do not carry the three class names");
  std::printf("custom_dataset ok: %zu result rows in %s\n", rows.size(), summary.run_dir.c_str());
  return 0;
}
