// EMT scoring: text normalisation, label sets with aliases, the strict lexical verdict (correct / incorrect /
// intrinsic / extrinsic hallucination), likelihood ranking and re-scoring a run (the judge: judge.h).
// The exact rules are written down in docs/scoring.md.
#pragma once
#include <emt/eval/judge.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace emt {

enum class VerdictKind { correct, incorrect, intrinsic, extrinsic };
const char* verdict_name(VerdictKind k);          // "correct" | "incorrect" | "intrinsic" | "extrinsic"
VerdictKind parse_verdict(const std::string& s);  // inverse of verdict_name; FormatError otherwise

struct Verdict {
  VerdictKind kind = VerdictKind::extrinsic;
  int64_t predicted = -1;              // the one own label named; -1 when none or several different ones
  std::vector<int64_t> mentioned;      // distinct own labels, in order of first appearance in the output
  bool contradicting = false;          // a number or a foreign label outside every own-label span
};

// Lower-case; every character other than a letter or digit becomes a space, except '-' and '/' between two
// letters/digits (so "T-shirt/top." reads "t-shirt/top"); runs of spaces collapse; no leading/trailing space.
std::string normalize_text(const std::string& text);
// The words matching works on: normalize_text() split at spaces, '-' and '/' ("t-shirt/top" -> t, shirt, top).
std::vector<std::string> match_words(const std::string& text);

// The phrases that name each class of one dataset, plus the phrases that contradict an answer (numbers and
// other datasets' labels). Build with make_label_set(); matching is whole-word, longest phrase first.
struct LabelSet {
  struct Phrase {
    std::vector<std::string> words;  // match_words() of the phrase
    int64_t label = -1;              // own class index, or -1 for a contradicting (foreign) phrase
  };
  std::vector<std::string> class_names;
  bool digits = false;          // class names are exactly "0".."9"
  std::vector<Phrase> phrases;  // sorted: more words first, then more characters, then text

  int64_t num_classes() const { return static_cast<int64_t>(class_names.size()); }
};

// Class names + built-in aliases (number words "zero".."nine" for digit sets; Fashion-MNIST spellings such as
// "t-shirt", "tshirt", "top", "boot", "trousers"; underscores in names read as spaces) + user aliases given as
// "alias=label" (label = a class name, compared after normalisation). Throws ConfigError on an empty or
// duplicate class name, a malformed alias, an unknown label, or an alias that names two different classes.
// Number words and bare numbers always count as contradicting content in non-digit sets ("one" excepted: it is
// ordinary English); `foreign_labels` (e.g. other datasets' class names) are added as contradicting phrases
// unless they name one of this set's own classes.
LabelSet make_label_set(const std::vector<std::string>& class_names, const std::vector<std::string>& aliases = {},
                        const std::vector<std::string>& foreign_labels = {});

// The strict lexical verdict of one generated answer (docs/scoring.md, in this order):
//   1. own labels found (longest first, each matched span consumed) -> the set of distinct classes named;
//   2. none -> extrinsic;  3. two or more different ones -> intrinsic;
//   4. one, plus contradicting content outside it (a number, a number word, a foreign label) -> intrinsic;
//   5. one -> correct when it is true_label, else incorrect.
// Throws emt::Error when true_label is outside [0, num_classes).
Verdict strict_verdict(const std::string& output, const LabelSet& labels, int64_t true_label);

// Whether an answer to `own`'s question names a class of another dataset `other` (the answer drift of
// docs/report.md): a whole-word match of one of `other`'s class names or aliases, matched as strict_verdict
// matches (longest phrase first, each span consumed once), that is not also a phrase of one of `own`'s classes.
// The number word "one" is ordinary English and never counts. Returns the first such class of `other`, or -1.
int64_t names_class_of(const std::string& output, const LabelSet& other, const LabelSet& own);

// Likelihood ranking: per-class answer log-likelihoods [B, C] and true labels [B] -> predicted class [B] (int64,
// ties go to the lowest index) and correct [B] (bool). Every wrong answer is an "incorrect" verdict: this scorer
// cannot hallucinate. TORCH_CHECKs shapes, label range and NaNs.
struct LikelihoodResult {
  torch::Tensor predicted;
  torch::Tensor correct;
};
LikelihoodResult likelihood_rank(const torch::Tensor& loglik, const torch::Tensor& labels);

// ---- scorers of your own (registered with register_scorer, emt/eval/evaluator.h) -------------------------------
// What a scorer sees for one answer.
struct ScorerInput {
  const std::string& dataset;                   // the eval dataset's name
  const std::vector<std::string>& class_names;  // its class names
  int64_t label;                                // the image's class index into class_names
  const std::string& output;                    // the model's answer (cut at stop strings, trimmed)
  const LabelSet& labels;                       // the strict scorer's label set of this dataset (above)
};
struct ScorerResult {
  VerdictKind kind = VerdictKind::incorrect;
  int64_t predicted = -1;  // the class it reads in the answer, -1 for none
};
using ScorerFn = std::function<ScorerResult(const ScorerInput&)>;

// ---- re-scoring a run directory from its kept generations ------------------------------------------------------

struct RescoreOptions {
  std::map<std::string, LabelSet> label_sets;  // eval dataset name -> its label set
  std::shared_ptr<Judge> judge;                // null: no judge rows
  // Scorers of your own to run again over the kept answers (registered_scorer() in evaluator.h gives a registered
  // one): each rewrites verdict_<name> and pred_<name> and gets rows of scorer <name>, on `datasets` (empty = all).
  struct Scorer {
    std::string name;
    ScorerFn fn;
    std::vector<std::string> datasets;
  };
  std::vector<Scorer> scorers;
};
struct RescoreSummary {
  int64_t files = 0;        // predictions/*/epoch_*/*.jsonl read
  int64_t predictions = 0;  // lines re-scored
  int64_t changed = 0;      // lines whose strict verdict changed
  int64_t rows_written = 0; // results.jsonl rows replaced or added
};
// Class names per eval dataset recovered from predictions/ (label -> label_name of every line); FormatError when
// one index has two names or an index below the largest one never occurs.
std::map<std::string, std::vector<std::string>> class_names_from_predictions(const std::string& run_dir);
// Re-reads RUN_DIR/predictions/<cell>/epoch_<k>/<eval>.jsonl, recomputes verdict_strict (and verdict_judge with
// a judge, verdict_<name> for each of opts.scorers), rewrites each predictions file and results.jsonl (rows of
// scorer strict, judge and each of opts.scorers) atomically. ConfigError for a scorer without a function or with
// a built-in or repeated name.
// The cell of a file comes from the line's finetune_dataset/method/seed fields when present, else from the
// directory name (parse_cell_name in metrics.h). Throws FormatError/IoError naming the file and line.
RescoreSummary rescore_run(const std::string& run_dir, const RescoreOptions& opts);

}  // namespace emt
