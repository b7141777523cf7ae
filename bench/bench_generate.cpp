// Batched greedy generation of 16 new tokens on the tiny model: KV cache vs full recomputation every step.
// Prints medians over repeats and the speed-up (target >= 5x).
#include <emt/core/config.h>
#include <emt/core/generate.h>
#include <emt/core/llava.h>
#include <emt/core/runtime.h>
#include <torch/torch.h>

#include "bench_common.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>

namespace {

using emt_bench::median;

}  // namespace

int main(int argc, char** argv) {
  int threads = argc > 1 ? std::atoi(argv[1]) : 0;
  int repeats = argc > 2 ? std::atoi(argv[2]) : 7;
  emt::set_threads(threads);
  torch::manual_seed(0);
  // the shapes of configs/models/tiny.yaml
  emt::ModelSection m;
  m.projector = "mlp2x_gelu";
  m.llm.hidden_size = 192;
  m.llm.num_layers = 4;
  m.llm.intermediate_size = 512;
  auto model = emt::build_llava(m, /*image_token_id=*/511);
  model->eval();
  int64_t batch = 16, prompt = 40;
  auto ids = torch::randint(1, 500, {batch, prompt}, torch::kLong);
  ids.select(1, 1).fill_(511);
  auto mask = torch::ones_like(ids);
  auto images = torch::randn({batch, 3, m.vision.image_size, m.vision.image_size});
  emt::GenerateOptions opt;
  opt.max_new_tokens = 16;

  auto time_it = [&](bool cache) {
    opt.use_cache = cache;
    std::vector<double> t;
    emt::generate(model, images, ids, mask, opt);  // warm-up
    for (int r = 0; r < repeats; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      emt::generate(model, images, ids, mask, opt);
      t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    return median(t);
  };
  double with_cache = time_it(true), recompute = time_it(false);
  int64_t seq = prompt - 1 + model->options.num_image_tokens();
  std::printf("bench_generate: tiny model, batch %lld, prompt %lld tokens (incl. %lld image), 16 new tokens, "
              "%d threads, %d repeats\n",
              (long long)batch, (long long)seq, (long long)model->options.num_image_tokens(), emt::set_threads(threads),
              repeats);
  std::printf("  KV cache      median %9.2f ms  (%7.1f tokens/s)\n", with_cache, batch * 16 / with_cache * 1e3);
  std::printf("  recompute     median %9.2f ms  (%7.1f tokens/s)\n", recompute, batch * 16 / recompute * 1e3);
  std::printf("  speed-up      %.2fx (target >= 5x)\n", recompute / with_cache);
  return 0;
}
