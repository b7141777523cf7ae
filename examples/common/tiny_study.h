// Shared by the examples: a tiny study configuration (the tiny model shapes, a base-model recipe of a few steps,
// one thread) written as YAML, so each example reads like a researcher's own config plus the code it adds.
#pragma once
#include <emt/core/config.h>
#include <emt/eval/metrics.h>

#include <cstdio>
#include <filesystem>
#include <string>

namespace example {

// `datasets` and `study` are YAML blocks for data.datasets (indented four spaces) and study (two); `eval` is the
// eval section as a flow map.
inline emt::RunConfig tiny_study(const std::string& dir, const std::string& name, const std::string& datasets,
                                 const std::string& study,
                                 const std::string& eval = "{batch_size: 8, max_new_tokens: 6}") {
  std::filesystem::create_directories(dir);
  const std::string yaml = "run: {out_dir: " + dir + "/runs, name: " + name + ", threads: 1, seed: 0, log_level: warn}\n"
R"(model:
  projector: mlp2x_gelu
  vision: {image_size: 28, patch_size: 7, hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}
  clip_text: {vocab_size: 160, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64,
              max_position_embeddings: 32, projection_dim: 16}
  llm: {vocab_size: 160, hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64,
        max_position_embeddings: 128}
data:
  workers: 1
  datasets:
)" + datasets + "pretrain: {cache_dir: " + dir + R"(/base, clip_steps: 4, align_steps: 2, instruct_steps: 6,
           batch_size: 16, tokenizer_vocab: 160, train_max_samples: 64}
finetune: {batch_size: 8, learning_rate: 1.0e-3, lora: {r: 4, alpha: 8, dropout: 0.0}}
eval: )" + eval + "\nstudy:\n" + study;
  return emt::load_config_string(yaml, {}, name + ".yaml");
}

// Fails the example with a message (examples assert what they show).
inline int fail(const std::string& what) {
  std::fprintf(stderr, "FAILED: %s\n", what.c_str());
  return 1;
}

// The accuracy of one results.jsonl row, or -1 when there is none.
inline double accuracy(const std::vector<emt::ResultRow>& rows, const std::string& method, int64_t epoch,
                       const std::string& dataset, const std::string& scorer) {
  for (const auto& r : rows)
    if (r.kind == "mllm" && r.method == method && r.epoch == epoch && r.eval_dataset == dataset && r.scorer == scorer)
      return r.accuracy;
  return -1;
}

}  // namespace example
