// A scorer of your own for one dataset: "lenient" counts an answer correct when it names the true class anywhere,
// whatever else it says (the strict scorer also requires that it names no other class and no foreign label). Usage: custom_scorer [WORK_DIR]
#include <emt/eval/evaluator.h>
#include <emt/eval/metrics.h>
#include <emt/eval/scoring.h>
#include <emt/eval/study.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "../common/tiny_study.h"

namespace {

// True when `phrase` occurs in `words` as consecutive whole words.
bool contains(const std::vector<std::string>& words, const std::vector<std::string>& phrase) {
  if (phrase.empty() || phrase.size() > words.size()) return false;
  for (size_t i = 0; i + phrase.size() <= words.size(); ++i)
    if (std::equal(phrase.begin(), phrase.end(), words.begin() + static_cast<std::ptrdiff_t>(i))) return true;
  return false;
}

// Correct when a phrase of the true class (its name or an alias, as the strict scorer reads them) occurs anywhere.
emt::ScorerResult lenient(const emt::ScorerInput& in) {
  const auto words = emt::match_words(in.output);
  emt::ScorerResult r;
  r.kind = emt::VerdictKind::extrinsic;
  for (const auto& ph : in.labels.phrases) {
    if (ph.label < 0 || !contains(words, ph.words)) continue;
    if (ph.label == in.label) return {emt::VerdictKind::correct, in.label};
    if (r.predicted < 0) r = {emt::VerdictKind::incorrect, ph.label};
  }
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : (std::filesystem::temp_directory_path() / "emt-custom-scorer").string();
  emt::register_scorer("lenient", lenient, {"shapes10"});  // shapes10 only
  auto cfg = example::tiny_study(dir, "custom-scorer",
                                 "    shapes10: {format: synthetic, path: shapes10, train_max_samples: 96, "
                                 "test_max_samples: 24}\n"
                                 "    objects60: {format: synthetic, path: objects60, train_max_samples: 96, "
                                 "test_max_samples: 24}\n",
                                 "  finetune_datasets: [shapes10]\n  methods: [linear]\n  epochs: 1\n",
                                 "{batch_size: 8, max_new_tokens: 6, scorers: [strict, lenient]}");
  emt::StudyOptions so;
  so.progress = false;
  const auto summary = emt::run_study(cfg, so);
  const auto rows = emt::load_results({summary.run_dir}).rows;
  int lenient_rows = 0;
  for (const auto& r : rows)
    if (r.scorer == "lenient") {
      ++lenient_rows;
      if (r.eval_dataset != "shapes10") return example::fail("a lenient row for " + r.eval_dataset);
    }
  if (lenient_rows != 2) return example::fail("expected lenient rows for the base and epoch 1, got " +
                                              std::to_string(lenient_rows));
  for (int64_t epoch : {0, 1}) {
    const std::string method = epoch == 0 ? "base" : "linear";
    const double strict = example::accuracy(rows, method, epoch, "shapes10", "strict");
    const double len = example::accuracy(rows, method, epoch, "shapes10", "lenient");
    std::printf("shapes10 %s: strict %.1f%%, lenient %.1f%%\n", method.c_str(), 100 * strict, 100 * len);
    if (len < strict) return example::fail("lenient scored below strict, which it relaxes");
  }
  std::ifstream pred(summary.run_dir + "/predictions/base/shapes10.jsonl");
  std::string first;
  std::getline(pred, first);
  if (first.find("\"verdict_lenient\"") == std::string::npos) return example::fail("no verdict_lenient in predictions");
  std::printf("custom_scorer ok\n");
  return 0;
}
