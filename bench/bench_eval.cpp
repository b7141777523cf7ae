// Throughput of Evaluator::evaluate() on a tiny random model (shapes of configs/models/tiny.yaml, a SentencePiece
// tokenizer trained on the prompts): images/s at batch 1 vs batch 32 with the strict scorer, and the extra cost
// of the likelihood ranking at batch 32. Medians of 3 runs after a warm-up.
#include <emt/core/config.h>
#include <emt/core/dataset.h>
#include <emt/core/llava.h>
#include <emt/core/runtime.h>
#include <emt/core/tokenizer.h>
#include <emt/eval/evaluator.h>
#include <torch/torch.h>

#include "bench_common.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

namespace {

using emt_bench::median;

}  // namespace

int main(int argc, char** argv) {
  namespace fs = std::filesystem;
  const int threads = argc > 1 ? std::atoi(argv[1]) : 0;
  const int64_t images = argc > 2 ? std::atoll(argv[2]) : 64;
  emt::set_threads(threads);
  const fs::path dir = fs::temp_directory_path() / "emt_bench_eval";
  fs::create_directories(dir);

  emt::RunConfig cfg;
  cfg.data.root = dir.string();
  emt::DatasetConfig shapes;
  shapes.format = "synthetic";
  shapes.path = "shapes10";
  shapes.test_max_samples = images;
  cfg.data.datasets = {{"shapes", shapes}};
  cfg.eval.max_new_tokens = 12;
  cfg.eval.scorers = {"strict"};

  // A tokenizer that knows the prompt's words.
  emt::Evaluator probe(cfg);
  const auto& names = probe.dataset("shapes")->class_names();
  std::string corpus;
  for (int rep = 0; rep < 20; ++rep) {
    corpus += emt::dataset_question("shapes", shapes, names) + "\n";
    for (const auto& n : names) corpus += emt::answer_text(shapes, n) + "\n";
  }
  emt::write_file_atomic((dir / "corpus.txt").string(), corpus);
  emt::SentencePieceTrainOptions so;
  so.vocab_size = 160;
  emt::train_sentencepiece((dir / "corpus.txt").string(), (dir / "tok").string(), so);
  std::shared_ptr<emt::Tokenizer> tok = emt::load_sentencepiece((dir / "tok.model").string());
  const int64_t image_id = tok->add_special_token("<image>");

  emt::ModelSection m;
  m.projector = "mlp2x_gelu";
  m.llm.hidden_size = 192;
  m.llm.num_layers = 4;
  m.llm.intermediate_size = 512;
  m.llm.vocab_size = static_cast<int>(tok->vocab_size());
  torch::manual_seed(0);
  emt::EvalModel em;
  em.model = emt::build_llava(m, image_id);
  em.tokenizer = tok;
  em.image = emt::image_options_for_size(m.vision.image_size);
  em.conversation = "plain";

  auto images_per_s = [&](int batch, const std::vector<std::string>& scorers) {
    auto c = cfg;
    c.eval.batch_size = batch;
    c.eval.scorers = scorers;
    emt::Evaluator ev(c);
    ev.set_progress(false);
    ev.evaluate(em, "");  // warm-up
    std::vector<double> t;
    for (int r = 0; r < 3; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      ev.evaluate(em, "");
      t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return static_cast<double>(images) / median(t);
  };
  const double b1 = images_per_s(1, {"strict"}), b32 = images_per_s(32, {"strict"});
  const double lik = images_per_s(32, {"strict", "likelihood"});
  std::printf("bench_eval: tiny random model, %lld shapes10 images, %lld new tokens max, %d threads, median of 3\n",
              static_cast<long long>(images), static_cast<long long>(cfg.eval.max_new_tokens),
              emt::set_threads(threads));
  std::printf("  batch  1, strict             %8.1f images/s\n", b1);
  std::printf("  batch 32, strict             %8.1f images/s  (%.2fx batch 1)\n", b32, b32 / b1);
  std::printf("  batch 32, strict+likelihood  %8.1f images/s  (likelihood over %zu classes costs %.2fx)\n", lik,
              names.size(), b32 / lik);
  return 0;
}
