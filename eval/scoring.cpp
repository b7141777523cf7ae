// EMT scoring: normalisation, label sets, the strict lexical verdict, likelihood ranking and re-scoring a run's
// kept generations (the judge itself is in judge.cpp).
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include <emt/eval/judge.h>
#include <emt/eval/metrics.h>
#include <emt/eval/scoring.h>
#include "core/text.h"
#include <fmt/format.h>

#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <tuple>

namespace emt {

namespace fs = std::filesystem;

const char* verdict_name(VerdictKind k) {
  switch (k) {
    case VerdictKind::correct: return "correct";
    case VerdictKind::incorrect: return "incorrect";
    case VerdictKind::intrinsic: return "intrinsic";
    case VerdictKind::extrinsic: return "extrinsic";
  }
  return "?";
}

VerdictKind parse_verdict(const std::string& s) {
  for (auto k : {VerdictKind::correct, VerdictKind::incorrect, VerdictKind::intrinsic, VerdictKind::extrinsic})
    if (s == verdict_name(k)) return k;
  throw FormatError(fmt::format("[scoring] unknown verdict '{}' (expected correct|incorrect|intrinsic|extrinsic)", s));
}

// ---- normalisation ----------------------------------------------------------------------------------------------

namespace {
// Bytes >= 0x80 (UTF-8 sequences) count as letters so accented words stay whole.
bool is_word_char(unsigned char c) { return std::isalnum(c) || c >= 0x80; }
bool is_joiner(char c) { return c == '-' || c == '/'; }
}  // namespace

std::string normalize_text(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    unsigned char c = static_cast<unsigned char>(text[i]);
    if (is_word_char(c)) {
      out.push_back(static_cast<char>(c < 0x80 ? std::tolower(c) : c));
    } else if (is_joiner(static_cast<char>(c)) && !out.empty() && is_word_char(static_cast<unsigned char>(out.back())) &&
               i + 1 < text.size() && is_word_char(static_cast<unsigned char>(text[i + 1]))) {
      out.push_back(static_cast<char>(c));
    } else if (!out.empty() && out.back() != ' ') {
      out.push_back(' ');
    }
  }
  while (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

std::vector<std::string> match_words(const std::string& text) {
  std::vector<std::string> words;
  std::string cur;
  for (char c : normalize_text(text)) {
    if (c == ' ' || is_joiner(c)) {
      if (!cur.empty()) words.push_back(std::move(cur));
      cur.clear();
    } else {
      cur.push_back(c);
    }
  }
  if (!cur.empty()) words.push_back(std::move(cur));
  return words;
}

// ---- label sets -------------------------------------------------------------------------------------------------

namespace {

std::string join_words(const std::vector<std::string>& w) {
  std::string s;
  for (const auto& x : w) {
    if (!s.empty()) s += ' ';
    s += x;
  }
  return s;
}

const std::vector<std::string>& number_words() {
  static const std::vector<std::string> w = {"zero", "one", "two",   "three", "four",
                                             "five", "six", "seven", "eight", "nine"};
  return w;
}

// Fashion-MNIST spellings, keyed by the joined match words of the official class name.
const std::map<std::string, std::vector<std::string>>& fashion_aliases() {
  static const std::map<std::string, std::vector<std::string>> m = {
      {"t shirt top", {"t-shirt", "tshirt", "top", "tee"}},
      {"trouser", {"trousers", "pants"}},
      {"pullover", {"pullovers", "sweater"}},
      {"dress", {"dresses"}},
      {"coat", {"coats"}},
      {"sandal", {"sandals"}},
      {"shirt", {"shirts"}},
      {"sneaker", {"sneakers"}},
      {"bag", {"bags", "handbag"}},
      {"ankle boot", {"ankle boots", "boot", "boots"}},
  };
  return m;
}


bool all_digits(const std::string& w) {
  return !w.empty() && std::all_of(w.begin(), w.end(), [](char c) { return c >= '0' && c <= '9'; });
}

}  // namespace

LabelSet make_label_set(const std::vector<std::string>& class_names, const std::vector<std::string>& aliases,
                        const std::vector<std::string>& foreign_labels) {
  if (class_names.empty()) throw ConfigError("[scoring] label set: no class names");
  LabelSet ls;
  ls.class_names = class_names;
  std::map<std::string, int64_t> owner;  // joined words -> label (-1 foreign)
  std::map<std::string, int64_t> by_name;
  auto add = [&](const std::vector<std::string>& words, int64_t label) {
    ls.phrases.push_back({words, label});
    owner[join_words(words)] = label;
  };
  for (size_t i = 0; i < class_names.size(); ++i) {
    auto words = match_words(class_names[i]);
    if (words.empty())
      throw ConfigError(fmt::format("[scoring] label set: class {} name '{}' has no letters or digits", i,
                                    class_names[i]));
    std::string key = join_words(words);
    if (by_name.count(key))
      throw ConfigError(fmt::format("[scoring] label set: class {} '{}' reads the same as class {} '{}'", i,
                                    class_names[i], by_name[key], class_names[by_name[key]]));
    by_name[key] = static_cast<int64_t>(i);
    add(words, static_cast<int64_t>(i));
  }
  ls.digits = class_names.size() == 10;
  for (int d = 0; d < 10 && ls.digits; ++d) ls.digits = class_names[d] == std::to_string(d);

  auto add_builtin = [&](const std::string& alias, int64_t label) {
    auto words = match_words(alias);
    if (!owner.count(join_words(words))) add(words, label);  // an own name always wins over a built-in alias
  };
  if (ls.digits)
    for (int d = 0; d < 10; ++d) add_builtin(number_words()[d], d);
  bool fashion = class_names.size() == 10;
  for (const auto& [name, _] : fashion_aliases()) fashion = fashion && by_name.count(name);
  if (fashion)
    for (const auto& [name, list] : fashion_aliases())
      for (const auto& a : list) add_builtin(a, by_name[name]);

  for (const auto& spec : aliases) {
    size_t eq = spec.find('=');
    std::string alias = eq == std::string::npos ? "" : detail::trim(spec.substr(0, eq));
    std::string target = eq == std::string::npos ? "" : detail::trim(spec.substr(eq + 1));
    if (alias.empty() || target.empty())
      throw ConfigError(fmt::format("[scoring] alias '{}': expected 'alias=label' with both sides non-empty", spec));
    auto it = by_name.find(join_words(match_words(target)));
    if (it == by_name.end())
      throw ConfigError(fmt::format("[scoring] alias '{}': '{}' is not one of the {} class names", spec, target,
                                    class_names.size()));
    auto words = match_words(alias);
    if (words.empty()) throw ConfigError(fmt::format("[scoring] alias '{}': alias has no letters or digits", spec));
    auto prev = owner.find(join_words(words));
    if (prev != owner.end()) {
      if (prev->second != it->second)
        throw ConfigError(fmt::format("[scoring] alias '{}': '{}' already names class {} '{}'", spec, alias,
                                      prev->second, class_names[prev->second]));
      continue;
    }
    add(words, it->second);
  }

  if (!ls.digits)
    for (int d = 0; d < 10; ++d)
      if (d != 1) add_builtin(number_words()[d], -1);
  for (const auto& f : foreign_labels) {
    auto words = match_words(f);
    if (!words.empty() && !owner.count(join_words(words))) add(words, -1);
  }

  std::sort(ls.phrases.begin(), ls.phrases.end(), [](const LabelSet::Phrase& a, const LabelSet::Phrase& b) {
    if (a.words.size() != b.words.size()) return a.words.size() > b.words.size();
    std::string ja = join_words(a.words), jb = join_words(b.words);
    if (ja.size() != jb.size()) return ja.size() > jb.size();
    return ja < jb;
  });
  return ls;
}

// ---- the strict verdict -----------------------------------------------------------------------------------------

namespace {

// Every phrase of `labels` found in `words`, longest first, each span consumed once: (position, phrase) in order
// of the phrase list; `used` marks the consumed words.
std::vector<std::pair<size_t, const LabelSet::Phrase*>> match_phrases(const std::vector<std::string>& words,
                                                                      const LabelSet& labels,
                                                                      std::vector<char>& used) {
  used.assign(words.size(), 0);
  std::vector<std::pair<size_t, const LabelSet::Phrase*>> hits;
  for (const auto& p : labels.phrases) {
    const size_t len = p.words.size();
    for (size_t i = 0; i + len <= words.size(); ++i) {
      bool hit = true;
      for (size_t k = 0; k < len && hit; ++k) hit = !used[i + k] && words[i + k] == p.words[k];
      if (!hit) continue;
      std::fill(used.begin() + i, used.begin() + i + len, 1);
      hits.emplace_back(i, &p);
      i += len - 1;
    }
  }
  return hits;
}

}  // namespace

Verdict strict_verdict(const std::string& output, const LabelSet& labels, int64_t true_label) {
  if (true_label < 0 || true_label >= labels.num_classes())
    throw Error(fmt::format("[scoring] strict verdict: true label {} outside [0, {})", true_label,
                            labels.num_classes()));
  const auto words = match_words(output);
  std::vector<char> used;
  std::vector<std::pair<size_t, int64_t>> own;  // (position, label)
  Verdict v;
  for (const auto& [pos, p] : match_phrases(words, labels, used)) {
    if (p->label >= 0) own.emplace_back(pos, p->label);
    else v.contradicting = true;
  }
  for (size_t i = 0; i < words.size(); ++i)
    if (!used[i] && all_digits(words[i])) v.contradicting = true;
  std::sort(own.begin(), own.end());
  for (const auto& [pos, label] : own)
    if (std::find(v.mentioned.begin(), v.mentioned.end(), label) == v.mentioned.end()) v.mentioned.push_back(label);

  if (v.mentioned.empty()) {
    v.kind = VerdictKind::extrinsic;
  } else if (v.mentioned.size() > 1) {
    v.kind = VerdictKind::intrinsic;
  } else {
    v.predicted = v.mentioned[0];
    if (v.contradicting) v.kind = VerdictKind::intrinsic;
    else v.kind = v.predicted == true_label ? VerdictKind::correct : VerdictKind::incorrect;
  }
  return v;
}

int64_t names_class_of(const std::string& output, const LabelSet& other, const LabelSet& own) {
  const auto words = match_words(output);
  std::vector<char> used;
  size_t first = words.size();
  int64_t label = -1;
  for (const auto& [pos, p] : match_phrases(words, other, used)) {
    if (p->label < 0 || pos >= first) continue;
    if (p->words.size() == 1 && p->words[0] == "one") continue;
    const bool shared = std::any_of(own.phrases.begin(), own.phrases.end(), [&](const LabelSet::Phrase& q) {
      return q.label >= 0 && q.words == p->words;
    });
    if (shared) continue;
    first = pos;
    label = p->label;
  }
  return label;
}

// ---- likelihood ranking ----------------------------------------------------------------------------------------

LikelihoodResult likelihood_rank(const torch::Tensor& loglik, const torch::Tensor& labels) {
  // loglik: [B, C], labels: [B] -> predicted [B] int64, correct [B] bool
  TORCH_CHECK(loglik.dim() == 2 && loglik.size(1) > 0, "likelihood_rank: loglik must be [B, C] with C > 0, got ",
              loglik.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == loglik.size(0), "likelihood_rank: labels must be [",
              loglik.size(0), "], got ", labels.sizes());
  TORCH_CHECK(!torch::isnan(loglik).any().item<bool>(), "likelihood_rank: loglik contains NaN");
  auto lab = labels.to(torch::kLong);
  const int64_t C = loglik.size(1);
  if (lab.numel() > 0)
    TORCH_CHECK(lab.min().item<int64_t>() >= 0 && lab.max().item<int64_t>() < C,
                "likelihood_rank: labels outside [0, ", C, ")");
  auto best = std::get<0>(loglik.max(1, /*keepdim=*/true));
  auto idx = torch::arange(C, torch::TensorOptions().dtype(torch::kLong).device(loglik.device())).expand_as(loglik);
  auto pred = std::get<0>(torch::where(loglik == best, idx, torch::full_like(idx, C)).min(1));
  return {pred, pred == lab.to(pred.device())};
}

// ---- re-scoring a run -------------------------------------------------------------------------------------------

namespace {

struct PredFile {
  fs::path path;
  std::string cell_dir;
  int64_t epoch = 0;
  std::string dataset;
};

std::vector<PredFile> list_prediction_files(const std::string& run_dir) {
  fs::path root = fs::path(run_dir) / "predictions";
  if (!fs::is_directory(root)) throw IoError(fmt::format("[rescore] {}: no predictions/ directory", run_dir));
  std::vector<PredFile> files;
  for (const auto& cell : fs::directory_iterator(root)) {
    if (!cell.is_directory()) continue;
    for (const auto& ep : fs::directory_iterator(cell.path())) {
      std::string name = ep.path().filename().string();
      if (!ep.is_directory() || name.rfind("epoch_", 0) != 0) continue;
      std::string num = name.substr(6);
      if (!all_digits(num)) throw FormatError(fmt::format("[rescore] {}: expected epoch_<k>", ep.path().string()));
      for (const auto& f : fs::directory_iterator(ep.path())) {
        if (!f.is_regular_file() || f.path().extension() != ".jsonl") continue;
        files.push_back({f.path(), cell.path().filename().string(), std::stoll(num), f.path().stem().string()});
      }
    }
  }
  std::sort(files.begin(), files.end(), [](const PredFile& a, const PredFile& b) {
    return std::tie(a.cell_dir, a.epoch, a.dataset) < std::tie(b.cell_dir, b.epoch, b.dataset);
  });
  return files;
}

nlohmann::ordered_json parse_json_line(const std::string& line, const std::string& where) {
  try {
    auto j = nlohmann::ordered_json::parse(line);
    if (!j.is_object()) throw FormatError(fmt::format("[rescore] {}: expected a JSON object", where));
    return j;
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("[rescore] {}: invalid JSON: {}", where, e.what()));
  }
}

template <class T>
T field(const nlohmann::ordered_json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) throw FormatError(fmt::format("[rescore] {}: missing field '{}'", where, key));
  try {
    return it->get<T>();
  } catch (const nlohmann::json::exception&) {
    throw FormatError(fmt::format("[rescore] {}: field '{}' has the wrong type ({})", where, key, it->dump()));
  }
}

std::vector<std::string> read_lines(const std::string& path) {
  std::vector<std::string> lines;
  std::istringstream is(read_file(path));
  std::string line;
  while (std::getline(is, line)) lines.push_back(line);
  return lines;
}

}  // namespace

std::map<std::string, std::vector<std::string>> class_names_from_predictions(const std::string& run_dir) {
  std::map<std::string, std::map<int64_t, std::string>> seen;
  for (const auto& f : list_prediction_files(run_dir)) {
    auto lines = read_lines(f.path.string());
    for (size_t i = 0; i < lines.size(); ++i) {
      if (detail::trim(lines[i]).empty()) continue;
      std::string where = fmt::format("{}:{}", f.path.string(), i + 1);
      auto j = parse_json_line(lines[i], where);
      int64_t label = field<int64_t>(j, "label", where);
      std::string name = field<std::string>(j, "label_name", where);
      std::string ds = j.contains("dataset") ? field<std::string>(j, "dataset", where) : f.dataset;
      auto [it, fresh] = seen[ds].emplace(label, name);
      if (!fresh && it->second != name)
        throw FormatError(fmt::format("[rescore] {}: label {} is named '{}' here and '{}' elsewhere", where, label,
                                      name, it->second));
    }
  }
  std::map<std::string, std::vector<std::string>> out;
  for (const auto& [ds, m] : seen) {
    std::vector<std::string> names;
    for (const auto& [label, name] : m) {
      if (label != static_cast<int64_t>(names.size()))
        throw FormatError(fmt::format("[rescore] {}: dataset '{}' never shows label {} (saw up to {}); pass the "
                                      "run's config so class names come from it",
                                      run_dir, ds, names.size(), m.rbegin()->first));
      names.push_back(name);
    }
    out[ds] = names;
  }
  return out;
}

namespace {

bool applies(const RescoreOptions::Scorer& sc, const std::string& dataset) {
  return sc.datasets.empty() || std::find(sc.datasets.begin(), sc.datasets.end(), dataset) != sc.datasets.end();
}

// One prediction file re-scored in place (rewritten only when a verdict changed) -> its strict (judge, own
// scorers') result rows, empty when the file holds no prediction.
std::vector<ResultRow> rescore_file(const PredFile& f, const RescoreOptions& opts, const std::string& run_name,
                                    RescoreSummary& sum) {
  auto lines = read_lines(f.path.string());
  CellId cell;
  bool cell_known = false;
  ResultRow strict, judge;
  std::vector<ResultRow> own(opts.scorers.size());  // one per scorer of opts.scorers
  bool file_changed = false;
  std::string rewritten;
  for (size_t i = 0; i < lines.size(); ++i) {
    if (detail::trim(lines[i]).empty()) continue;
    std::string where = fmt::format("{}:{}", f.path.string(), i + 1);
    auto j = parse_json_line(lines[i], where);
    if (!cell_known) {
      if (j.contains("method") && j.contains("finetune_dataset")) {
        cell.method = field<std::string>(j, "method", where);
        cell.finetune_dataset = field<std::string>(j, "finetune_dataset", where);
        cell.seed = j.contains("seed") ? field<int64_t>(j, "seed", where) : 0;
      } else {
        cell = parse_cell_name(f.cell_dir);
      }
      cell_known = true;
    }
    std::string ds = j.contains("dataset") ? field<std::string>(j, "dataset", where) : f.dataset;
    auto ls = opts.label_sets.find(ds);
    if (ls == opts.label_sets.end()) {
      std::string known;
      for (const auto& [k, _] : opts.label_sets) known += (known.empty() ? "" : ", ") + k;
      throw ConfigError(fmt::format("[rescore] {}: no label set for eval dataset '{}' (known: {})", where, ds, known));
    }
    int64_t label = field<int64_t>(j, "label", where);
    std::string output = field<std::string>(j, "output", where);
    if (label < 0 || label >= ls->second.num_classes())
      throw FormatError(fmt::format("[rescore] {}: label {} outside [0, {}) of dataset '{}'", where, label,
                                    ls->second.num_classes(), ds));
    Verdict v = strict_verdict(output, ls->second, label);
    std::string vname = verdict_name(v.kind);
    if (!j.contains("verdict_strict") || j["verdict_strict"] != vname) {
      ++sum.changed;
      file_changed = true;
    }
    j["verdict_strict"] = vname;
    auto bump = [](ResultRow& r, VerdictKind k) {
      ++r.n;
      switch (k) {
        case VerdictKind::correct: ++r.n_correct; break;
        case VerdictKind::incorrect: ++r.n_incorrect; break;
        case VerdictKind::intrinsic: ++r.n_intrinsic; break;
        case VerdictKind::extrinsic: ++r.n_extrinsic; break;
      }
    };
    bump(strict, v.kind);
    std::string named;  // the answer drift, as the Evaluator counts it
    for (const auto& [other, other_ls] : opts.label_sets) {
      if (other == ds) continue;
      const int64_t k = names_class_of(output, other_ls, ls->second);
      strict.n_naming[other] += k >= 0;
      if (opts.judge) judge.n_naming[other] += k >= 0;
      for (size_t si = 0; si < own.size(); ++si)
        if (applies(opts.scorers[si], ds)) own[si].n_naming[other] += k >= 0;
      if (k >= 0) named += (named.empty() ? "" : ",") + other + "=" + other_ls.class_names[k];
    }
    const bool had = j.contains("names_class_of");
    if (had != !named.empty() || (had && j["names_class_of"] != named)) file_changed = true;
    if (named.empty()) j.erase("names_class_of");
    else j["names_class_of"] = named;
    if (opts.judge) {
      std::string label_name = j.contains("label_name") ? field<std::string>(j, "label_name", where)
                                                        : ls->second.class_names[label];
      bool yes = opts.judge->says_yes(label_name, output);
      // A "no" keeps the strict failure kind when strict agrees it failed, so the taxonomy survives.
      VerdictKind jk = yes ? VerdictKind::correct
                           : (v.kind == VerdictKind::correct ? VerdictKind::incorrect : v.kind);
      if (!j.contains("verdict_judge") || j["verdict_judge"] != verdict_name(jk)) file_changed = true;
      j["verdict_judge"] = verdict_name(jk);
      bump(judge, jk);
    }
    for (size_t si = 0; si < own.size(); ++si) {
      const auto& sc = opts.scorers[si];
      if (!applies(sc, ds)) continue;
      const auto& names = ls->second.class_names;
      const ScorerResult r = sc.fn(ScorerInput{ds, names, label, output, ls->second});
      if (r.predicted < -1 || r.predicted >= static_cast<int64_t>(names.size()))
        throw Error(fmt::format("[rescore] {}: scorer '{}' predicted class {}, outside [-1, {})", where, sc.name,
                                r.predicted, names.size()));
      const std::string vk = "verdict_" + sc.name, pk = "pred_" + sc.name;
      if (!j.contains(vk) || j[vk] != verdict_name(r.kind) || !j.contains(pk) || j[pk] != r.predicted)
        file_changed = true;
      j[vk] = verdict_name(r.kind);
      j[pk] = r.predicted;
      bump(own[si], r.kind);
    }
    ++sum.predictions;
    rewritten += j.dump() + "\n";
  }
  if (file_changed) write_file_atomic(f.path.string(), rewritten);
  std::vector<ResultRow> rows;
  if (strict.n == 0) return rows;
  std::vector<std::pair<ResultRow*, std::string>> all = {{&strict, "strict"}, {&judge, "judge"}};
  for (size_t si = 0; si < own.size(); ++si) all.emplace_back(&own[si], opts.scorers[si].name);
  for (auto& [r, scorer] : all) {
    if (r->n == 0) continue;
    r->kind = "mllm";
    r->finetune_dataset = cell.finetune_dataset;
    r->method = cell.method;
    r->seed = cell.seed;
    r->epoch = f.epoch;
    r->eval_dataset = f.dataset;
    r->scorer = scorer;
    r->accuracy = static_cast<double>(r->n_correct) / static_cast<double>(r->n);
    std::tie(r->ci_low, r->ci_high) = wilson_interval(r->n_correct, r->n);
    r->run = run_name;
    rows.push_back(*r);
  }
  return rows;
}

// results.jsonl rewritten: rows whose key was recomputed get the new numbers (other fields kept), the rest stay,
// new keys are appended in the order they were met.
void rewrite_results(const std::string& run_dir, std::map<std::string, ResultRow>& fresh,
                     const std::vector<std::string>& order, RescoreSummary& sum) {
  // Rewrite results.jsonl: rows with a recomputed key get the new numbers (other fields kept), the rest stay.
  std::string results_path = (fs::path(run_dir) / "results.jsonl").string();
  std::string out;
  std::set<std::string> done;
  if (fs::exists(results_path)) {
    auto lines = read_lines(results_path);
    for (size_t i = 0; i < lines.size(); ++i) {
      if (detail::trim(lines[i]).empty()) continue;
      std::string where = fmt::format("{}:{}", results_path, i + 1);
      ResultRow row = parse_result_line(lines[i], where);
      auto it = fresh.find(row.key());
      if (it == fresh.end()) {
        out += lines[i] + "\n";
        continue;
      }
      auto j = parse_json_line(lines[i], where);
      // New numbers over the old row; "run" and fields this code does not know stay as they were.
      auto fresh_json = nlohmann::ordered_json::parse(result_to_json_line(it->second));
      fresh_json.erase("run");
      for (auto kv = fresh_json.begin(); kv != fresh_json.end(); ++kv) j[kv.key()] = kv.value();
      out += j.dump() + "\n";
      done.insert(it->first);
      ++sum.rows_written;
    }
  }
  for (const auto& key : order) {
    if (done.count(key)) continue;
    out += result_to_json_line(fresh[key]) + "\n";
    ++sum.rows_written;
  }
  write_file_atomic(results_path, out);
}

}  // namespace

RescoreSummary rescore_run(const std::string& run_dir, const RescoreOptions& opts) {
  std::set<std::string> taken = {"strict", "judge", "likelihood", "clip"};
  for (const auto& sc : opts.scorers) {
    if (!sc.fn) throw ConfigError("[rescore] scorer '" + sc.name + "': no scorer function");
    if (sc.name.empty() || !taken.insert(sc.name).second)
      throw ConfigError("[rescore] scorer '" + sc.name + "': the name is empty, built in or given twice");
  }
  RescoreSummary sum;
  std::map<std::string, ResultRow> fresh;  // key -> recomputed row
  std::vector<std::string> order;
  const std::string run_name = fs::path(run_dir).lexically_normal().filename().string().empty()
                                   ? fs::path(run_dir).lexically_normal().parent_path().filename().string()
                                   : fs::path(run_dir).lexically_normal().filename().string();
  for (const auto& f : list_prediction_files(run_dir)) {
    ++sum.files;
    for (auto& r : rescore_file(f, opts, run_name, sum)) {
      const std::string key = r.key();
      if (!fresh.count(key)) order.push_back(key);
      fresh[key] = std::move(r);
    }
  }
  rewrite_results(run_dir, fresh, order, sum);
  return sum;
}

}  // namespace emt
