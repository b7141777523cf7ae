// A regularizer added to the fine-tuning loss: "lora-l2" trains what lora trains, plus an L2 pull of every trained
// tensor toward its initial value (L2-SP), compared with plain lora in one study. Usage: custom_objective [WORK_DIR]
#include <emt/core/safetensors.h>
#include <emt/eval/metrics.h>
#include <emt/eval/study.h>
#include <emt/train/finetune.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>

#include "../common/tiny_study.h"

namespace {

// lambda * sum ||theta - theta_0||^2 over the trained tensors.
emt::LossTerm l2_pull(const emt::NamedTensors& initial, double lambda) {
  return [initial, lambda](const emt::LossTermInput& in) {
    torch::Tensor sum = torch::zeros({}, in.loss.options().dtype(torch::kFloat32));
    for (size_t i = 0; i < in.trained.size(); ++i)
      sum = sum + (in.trained[i].second - initial[i].second.to(in.trained[i].second.device())).pow(2).sum();
    return sum * lambda;
  };
}

// Squared norm of the LoRA B matrices of a checkpoint: how far LoRA moved from its start (B starts at zero).
double lora_b_norm2(const std::string& checkpoint) {
  emt::SafetensorsReader r(checkpoint + "/trainable.safetensors");
  double s = 0;
  for (const auto& n : r.names())
    if (n.find("lora_B") != std::string::npos) s += r.load(n).pow(2).sum().item<double>();
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : (std::filesystem::temp_directory_path() / "emt-custom-objective").string();
  emt::MethodSpec spec;
  spec.base = "lora";
  spec.make_loss_term = [](const emt::NamedTensors& initial) { return l2_pull(initial, 50.0); };
  emt::register_method("lora-l2", spec);

  auto cfg = example::tiny_study(dir, "custom-objective",
                                 "    shapes10: {format: synthetic, path: shapes10, train_max_samples: 96, "
                                 "test_max_samples: 24}\n"
                                 "    objects60: {format: synthetic, path: objects60, train_max_samples: 96, "
                                 "test_max_samples: 24}\n",
                                 "  finetune_datasets: [shapes10]\n  methods: [lora, lora-l2]\n  epochs: 1\n");
  emt::StudyOptions so;
  so.progress = false;
  const auto summary = emt::run_study(cfg, so);
  std::printf("%s\n", summary.matrix.c_str());

  const auto rows = emt::load_results({summary.run_dir}).rows;
  for (const char* m : {"lora", "lora-l2"})
    if (example::accuracy(rows, m, 1, "shapes10", "strict") < 0)
      return example::fail(std::string("no epoch-1 row for ") + m);
  const std::string cells = summary.run_dir + "/cells/";
  const double plain = lora_b_norm2(cells + "shapes10__lora__seed0/epoch_1");
  const double pulled = lora_b_norm2(cells + "shapes10__lora-l2__seed0/epoch_1");
  std::printf("||B||^2 after one epoch: lora %.3g, lora-l2 %.3g\n", plain, pulled);
  if (!(plain > 0) || !(pulled < plain)) return example::fail("the L2 pull did not keep LoRA closer to its start");
  std::printf("custom_objective ok\n");
  return 0;
}
