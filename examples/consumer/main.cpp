// Minimal library user: loads a config from a string, writes and reads back a safetensors file.
#include <emt/core/config.h>
#include <emt/core/safetensors.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>

int main() {
  emt::RunConfig cfg = emt::load_config_string("finetune:\n  method: linear\n  epochs: 2\n");
  auto path = (std::filesystem::temp_directory_path() / "emt_consumer.safetensors").string();
  emt::save_safetensors(path, {{"w", torch::arange(6, torch::kFloat32).reshape({2, 3})}});
  emt::SafetensorsReader r(path);
  auto w = r.load("w");
  bool ok = cfg.finetune.epochs == 2 && cfg.finetune.method == "linear" && w.sum().item<float>() == 15.0f;
  std::printf(ok ? "consumer ok\n" : "consumer FAILED\n");
  return ok ? 0 : 1;
}
