// Shared training fixtures: one fixed batch served every epoch, and the two-image memorisation batch of the tiny
// multimodal model (same prompt, different answers: only the image tells them apart).
#pragma once
#include <emt/core/config.h>
#include <emt/core/loader.h>
#include <emt/train/trainer.h>
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

namespace emt_test {

class FixedBatchSource : public emt::BatchSource {
 public:
  explicit FixedBatchSource(emt::Batch b) : b_(std::move(b)) {}
  int64_t num_batches() const override { return 1; }
  void start_epoch(int64_t, int64_t skip) override { given_ = skip > 0; }
  bool next(emt::Batch& out) override {
    if (given_) return false;
    out = b_;
    given_ = true;
    return true;
  }

 private:
  emt::Batch b_;
  bool given_ = false;
};

// input_ids [2, 8]: BOS, <image>, three prompt tokens, a two-token answer, EOS; labels on the answer and EOS.
inline emt::Batch memorise_batch(int64_t image_token, uint64_t seed = 21) {
  auto g = torch::make_generator<at::CPUGeneratorImpl>(seed);
  emt::Batch b;
  b.images = torch::randn({2, 3, 8, 8}, g);
  b.input_ids = torch::tensor(std::vector<int64_t>{1, image_token, 5, 6, 7, 20, 21, 2,  //
                                                   1, image_token, 5, 6, 7, 30, 31, 2})
                    .view({2, 8});
  b.attention_mask = torch::ones_like(b.input_ids);
  b.labels = torch::full_like(b.input_ids, -100);
  b.labels.narrow(1, 5, 3).copy_(b.input_ids.narrow(1, 5, 3));
  b.indices = {0, 1};
  return b;
}

// The fine-tuning section of the memorisation tests: rank-4 LoRA (alpha 8) at a high rate.
inline emt::FinetuneSection memorise_section(const std::string& method = "lora", double lora_dropout = 0.0) {
  emt::FinetuneSection ft;
  ft.method = method;
  ft.lora.r = 4;
  ft.lora.alpha = 8;
  ft.lora.dropout = lora_dropout;
  ft.learning_rate = 1e-2;
  return ft;
}

// Trainer options for in-process tests: constant rate, no progress bar, no signal handlers, a metrics line
// every step.
inline emt::TrainerOptions quiet_options(int epochs, const std::string& precision = "f32") {
  emt::TrainerOptions o;
  o.epochs = epochs;
  o.schedule = "constant";
  o.warmup_steps = 0;
  o.precision = precision;
  o.progress = false;
  o.handle_signals = false;
  o.log_every_steps = 1;
  return o;
}

}  // namespace emt_test
