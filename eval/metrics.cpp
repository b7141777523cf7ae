// Loading and combining results.jsonl rows and the forgetting metrics computed from them (docs/report.md).
#include <emt/core/error.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <emt/eval/metrics.h>
#include <fmt/format.h>

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace emt {

namespace fs = std::filesystem;
namespace {
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
}

std::string ResultRow::key() const {
  return fmt::format("{}|{}|{}|seed{}|epoch{}|{}|{}", kind, finetune_dataset, method, seed, epoch, eval_dataset, scorer);
}

// ---- results.jsonl I/O ------------------------------------------------------------------------------------------

namespace {

template <class T>
T get_field(const nlohmann::json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) throw FormatError(fmt::format("[results] {}: missing field '{}'", where, key));
  bool ok = true;
  if constexpr (std::is_same_v<T, std::string>) ok = it->is_string();
  else if constexpr (std::is_same_v<T, int64_t>) ok = it->is_number_integer();
  else ok = it->is_number();
  if (!ok) throw FormatError(fmt::format("[results] {}: field '{}' has the wrong type (got {})", where, key, it->dump()));
  return it->get<T>();
}

}  // namespace

ResultRow parse_result_line(const std::string& line, const std::string& where) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(line);
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("[results] {}: invalid JSON: {}", where, e.what()));
  }
  if (!j.is_object()) throw FormatError(fmt::format("[results] {}: expected a JSON object", where));
  ResultRow r;
  r.kind = get_field<std::string>(j, "kind", where);
  if (r.kind != "mllm" && r.kind != "clip_zero_shot")
    throw FormatError(fmt::format("[results] {}: kind must be mllm or clip_zero_shot (got '{}')", where, r.kind));
  r.finetune_dataset = get_field<std::string>(j, "finetune_dataset", where);
  r.method = get_field<std::string>(j, "method", where);
  r.seed = get_field<int64_t>(j, "seed", where);
  r.epoch = get_field<int64_t>(j, "epoch", where);
  r.eval_dataset = get_field<std::string>(j, "eval_dataset", where);
  r.scorer = get_field<std::string>(j, "scorer", where);
  r.accuracy = get_field<double>(j, "accuracy", where);
  r.n = get_field<int64_t>(j, "n", where);
  r.n_correct = get_field<int64_t>(j, "n_correct", where);
  r.n_incorrect = get_field<int64_t>(j, "n_incorrect", where);
  r.n_intrinsic = get_field<int64_t>(j, "n_intrinsic", where);
  r.n_extrinsic = get_field<int64_t>(j, "n_extrinsic", where);
  if (j.contains("run") && j["run"].is_string()) r.run = j["run"].get<std::string>();
  if (auto nm = j.find("n_naming"); nm != j.end()) {
    if (!nm->is_object())
      throw FormatError(fmt::format("[results] {}: n_naming must be an object of dataset -> count", where));
    for (const auto& [ds, v] : nm->items()) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > r.n)
        throw FormatError(fmt::format("[results] {}: n_naming.{} must be a count in [0, n = {}] (got {})", where,
                                      ds, r.n, v.dump()));
      if (ds.empty() || ds == r.eval_dataset)
        throw FormatError(fmt::format("[results] {}: n_naming names '{}', which is not another dataset", where, ds));
      r.n_naming[ds] = v.get<int64_t>();
    }
  }
  if (r.epoch < 0) throw FormatError(fmt::format("[results] {}: epoch must be >= 0 (got {})", where, r.epoch));
  if (r.eval_dataset.empty()) throw FormatError(fmt::format("[results] {}: eval_dataset is empty", where));
  if (!(r.accuracy >= 0.0 && r.accuracy <= 1.0))
    throw FormatError(fmt::format("[results] {}: accuracy must be in [0, 1] (got {})", where, r.accuracy));
  for (auto [name, v] : {std::pair<const char*, int64_t>{"n", r.n}, {"n_correct", r.n_correct},
                         {"n_incorrect", r.n_incorrect}, {"n_intrinsic", r.n_intrinsic}, {"n_extrinsic", r.n_extrinsic}})
    if (v < 0) throw FormatError(fmt::format("[results] {}: {} must be >= 0 (got {})", where, name, v));
  int64_t counted = r.n_correct + r.n_incorrect + r.n_intrinsic + r.n_extrinsic;
  if (counted > r.n)
    throw FormatError(fmt::format("[results] {}: verdict counts sum to {}, more than n = {}", where, counted, r.n));
  if (r.method != "base" && r.kind == "mllm" && r.finetune_dataset.empty())
    throw FormatError(fmt::format("[results] {}: method '{}' needs a finetune_dataset", where, r.method));
  auto lo = j.find("ci_low"), hi = j.find("ci_high");
  if (lo != j.end() && hi != j.end() && lo->is_number() && hi->is_number()) {
    r.ci_low = lo->get<double>();
    r.ci_high = hi->get<double>();
  } else {
    std::tie(r.ci_low, r.ci_high) = wilson_interval(std::min(r.n_correct, r.n), r.n);
  }
  r.source = where;
  return r;
}

std::string result_to_json_line(const ResultRow& r) {
  nlohmann::ordered_json j;
  j["kind"] = r.kind;
  j["finetune_dataset"] = r.finetune_dataset;
  j["method"] = r.method;
  j["seed"] = r.seed;
  j["epoch"] = r.epoch;
  j["eval_dataset"] = r.eval_dataset;
  j["scorer"] = r.scorer;
  j["accuracy"] = r.accuracy;
  j["n"] = r.n;
  j["n_correct"] = r.n_correct;
  j["n_incorrect"] = r.n_incorrect;
  j["n_intrinsic"] = r.n_intrinsic;
  j["n_extrinsic"] = r.n_extrinsic;
  j["ci_low"] = r.ci_low;
  j["ci_high"] = r.ci_high;
  if (!r.n_naming.empty()) j["n_naming"] = r.n_naming;
  j["run"] = r.run;
  return j.dump();
}

LoadedResults combine_rows(const std::vector<ResultRow>& rows) {
  LoadedResults out;
  std::map<std::string, size_t> at;
  for (const auto& r : rows) {
    std::string key = r.key();
    auto it = at.find(key);
    if (it == at.end()) {
      at[key] = out.rows.size();
      out.rows.push_back(r);
    } else {
      out.rows[it->second] = r;
      ++out.duplicates;
      out.duplicate_keys.push_back(key);
    }
  }
  return out;
}

LoadedResults load_results(const std::vector<std::string>& run_dirs) {
  if (run_dirs.empty()) throw ConfigError("[results] no run directories given");
  std::vector<ResultRow> rows;
  for (const auto& dir : run_dirs) {
    fs::path p = fs::is_directory(dir) ? fs::path(dir) / "results.jsonl" : fs::path(dir);
    if (!fs::is_regular_file(p))
      throw IoError(fmt::format("[results] {}: no results.jsonl (is this a study run directory?)", dir));
    std::istringstream is(read_file(p.string()));
    std::string line;
    for (int64_t ln = 1; std::getline(is, line); ++ln) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      rows.push_back(parse_result_line(line, fmt::format("{}:{}", p.string(), ln)));
    }
  }
  LoadedResults out = combine_rows(rows);
  out.run_dirs = run_dirs;
  if (out.duplicates > 0)
    log_warn("[results] {} row(s) repeat an earlier key and replace it (first: {})", out.duplicates,
             out.duplicate_keys.front());
  return out;
}

std::string cell_name(const std::string& finetune_dataset, const std::string& method, int64_t seed) {
  if (method == "base") return "base";
  return fmt::format("{}__{}__seed{}", finetune_dataset, method, seed);
}

CellId parse_cell_name(const std::string& name) {
  if (name == "base") return {"", "base", 0};
  size_t a = name.find("__");
  size_t b = a == std::string::npos ? a : name.find("__", a + 2);
  auto bad = [&] {
    return FormatError(fmt::format("[results] cell directory '{}': expected 'base' or '<finetune>__<method>__seed<N>'",
                                   name));
  };
  if (b == std::string::npos || a == 0 || b == a + 2) throw bad();
  std::string seed = name.substr(b + 2);
  if (seed.rfind("seed", 0) != 0 || seed.size() == 4 || seed.size() > 22) throw bad();
  for (size_t i = 4; i < seed.size(); ++i)
    if (!(std::isdigit(static_cast<unsigned char>(seed[i])) || (i == 4 && seed[i] == '-' && seed.size() > 5)))
      throw bad();
  return {name.substr(0, a), name.substr(a + 2, b - a - 2), std::stoll(seed.substr(4))};
}

// ---- statistics -------------------------------------------------------------------------------------------------

std::pair<double, double> wilson_interval(int64_t k, int64_t n) {
  if (n < 0 || k < 0 || k > n) throw Error(fmt::format("[metrics] wilson_interval: need 0 <= k <= n (got k={}, n={})", k, n));
  if (n == 0) return {0.0, 1.0};
  const double z = 1.959963984540054, z2 = z * z, nn = static_cast<double>(n);
  const double p = static_cast<double>(k) / nn;
  const double denom = 1.0 + z2 / nn;
  const double center = (p + z2 / (2.0 * nn)) / denom;
  const double half = z * std::sqrt(p * (1.0 - p) / nn + z2 / (4.0 * nn * nn)) / denom;
  return {std::max(0.0, center - half), std::min(1.0, center + half)};
}

// ---- the accuracy tensor ----------------------------------------------------------------------------------------

namespace {
int64_t index_of(const std::vector<std::string>& v, const std::string& s) {
  auto it = std::find(v.begin(), v.end(), s);
  return it == v.end() ? -1 : static_cast<int64_t>(it - v.begin());
}
void add_unique(std::vector<std::string>& v, const std::string& s) {
  if (index_of(v, s) < 0) v.push_back(s);
}
}  // namespace

int64_t AccuracyTensor::method_index(const std::string& m) const { return index_of(methods, m); }
int64_t AccuracyTensor::finetune_index(const std::string& f) const { return index_of(finetune_datasets, f); }
int64_t AccuracyTensor::eval_index(const std::string& d) const { return index_of(eval_datasets, d); }

double AccuracyTensor::at(int64_t m, int64_t f, int64_t e, int64_t d) const {
  if (!mean.defined() || m < 0 || f < 0 || e < 0 || d < 0 || m >= mean.size(0) || f >= mean.size(1) ||
      e >= mean.size(2) || d >= mean.size(3))
    return kNaN;
  return mean.accessor<double, 4>()[m][f][e][d];
}

int64_t AccuracyTensor::last_epoch(int64_t m, int64_t f) const {
  for (int64_t e = epochs; e >= 0; --e)
    for (int64_t d = 0; d < static_cast<int64_t>(eval_datasets.size()); ++d)
      if (!std::isnan(at(m, f, e, d))) return e;
  return -1;
}

AccuracyTensor accuracy_tensor(const std::vector<ResultRow>& rows, const std::string& scorer) {
  AccuracyTensor R;
  R.scorer = scorer;
  std::set<int64_t> seeds;
  std::set<std::string> scorers;
  bool any = false;
  for (const auto& r : rows) {
    if (r.kind != "mllm") continue;
    scorers.insert(r.scorer);
    if (r.scorer != scorer) continue;
    any = true;
    add_unique(R.eval_datasets, r.eval_dataset);
    R.epochs = std::max(R.epochs, r.epoch);
    if (r.is_base()) continue;
    add_unique(R.methods, r.method);
    add_unique(R.finetune_datasets, r.finetune_dataset);
    seeds.insert(r.seed);
  }
  if (!any) {
    std::string have;
    for (const auto& s : scorers) have += (have.empty() ? "" : ", ") + s;
    throw Error(fmt::format("[metrics] no results for scorer '{}' (scorers present: {})", scorer,
                            have.empty() ? "none" : have));
  }
  R.seeds.assign(seeds.begin(), seeds.end());
  const int64_t M = R.methods.size(), F = R.finetune_datasets.size(), E = R.epochs + 1, D = R.eval_datasets.size(),
                S = R.seeds.size();
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  R.per_seed = torch::full({M, F, E, D, S}, kNaN, f64);
  R.counts = torch::zeros({M, F, E, D, 5}, torch::TensorOptions().dtype(torch::kLong));
  R.naming = torch::zeros({M, F, E, D, 2}, torch::TensorOptions().dtype(torch::kLong));
  auto ps = R.per_seed.accessor<double, 5>();
  auto cnt = R.counts.accessor<int64_t, 5>();
  auto nam = R.naming.accessor<int64_t, 5>();
  std::vector<std::array<int64_t, 2>> base_nam(static_cast<size_t>(D * F), {0, 0});  // [d * F + f]

  std::vector<double> base_sum(D, 0.0), clip_sum(D, 0.0);
  std::vector<int64_t> base_k(D, 0), clip_k(D, 0);
  std::vector<std::array<int64_t, 5>> base_cnt(D, {0, 0, 0, 0, 0});
  std::set<std::tuple<int64_t, int64_t, int64_t>> cells;  // (m, f, s) that have rows
  std::set<std::tuple<int64_t, int64_t, int64_t>> own_epoch0;  // (m, f, d) with their own epoch-0 rows
  for (const auto& r : rows) {
    if (r.kind == "clip_zero_shot") {
      int64_t d = R.eval_index(r.eval_dataset);
      if (d >= 0) clip_sum[d] += r.accuracy, ++clip_k[d];
      continue;
    }
    if (r.scorer != scorer) continue;
    const int64_t d = R.eval_index(r.eval_dataset);
    const std::array<int64_t, 5> c = {r.n, r.n_correct, r.n_incorrect, r.n_intrinsic, r.n_extrinsic};
    if (r.is_base()) {
      if (r.epoch != 0) continue;
      base_sum[d] += r.accuracy;
      ++base_k[d];
      for (int i = 0; i < 5; ++i) base_cnt[d][i] += c[i];
      for (int64_t f = 0; f < F; ++f)
        if (auto it = r.n_naming.find(R.finetune_datasets[f]); it != r.n_naming.end())
          base_nam[d * F + f][0] += r.n, base_nam[d * F + f][1] += it->second;
      continue;
    }
    const int64_t m = R.method_index(r.method), f = R.finetune_index(r.finetune_dataset);
    const int64_t s = std::lower_bound(R.seeds.begin(), R.seeds.end(), r.seed) - R.seeds.begin();
    cells.insert({m, f, s});
    if (r.epoch == 0) own_epoch0.insert({m, f, d});
    ps[m][f][r.epoch][d][s] = r.accuracy;
    for (int i = 0; i < 5; ++i) cnt[m][f][r.epoch][d][i] += c[i];
    if (auto it = r.n_naming.find(r.finetune_dataset); it != r.n_naming.end())
      nam[m][f][r.epoch][d][0] += r.n, nam[m][f][r.epoch][d][1] += it->second;
  }
  R.base.assign(D, kNaN);
  R.clip.assign(D, kNaN);
  for (int64_t d = 0; d < D; ++d) {
    if (base_k[d]) R.base[d] = base_sum[d] / base_k[d];
    if (clip_k[d]) R.clip[d] = clip_sum[d] / clip_k[d];
  }
  // The base model is epoch 0 of every cell (the same model before any fine-tuning).
  for (const auto& [m, f, s] : cells)
    for (int64_t d = 0; d < D; ++d)
      if (!own_epoch0.count({m, f, d}) && base_k[d]) ps[m][f][0][d][s] = R.base[d];
  std::set<std::pair<int64_t, int64_t>> mf;
  for (const auto& [m, f, s] : cells) mf.insert({m, f});
  for (const auto& [m, f] : mf)
    for (int64_t d = 0; d < D; ++d)
      if (!own_epoch0.count({m, f, d})) {
        for (int i = 0; i < 5; ++i) cnt[m][f][0][d][i] = base_cnt[d][i];
        for (int i = 0; i < 2; ++i) nam[m][f][0][d][i] = base_nam[d * F + f][i];
      }

  auto present = ~torch::isnan(R.per_seed);
  auto sum = torch::where(present, R.per_seed, torch::zeros_like(R.per_seed)).sum(-1);
  R.mean = sum / present.sum(-1).to(torch::kFloat64);  // 0/0 = NaN where no seed has a value
  return R;
}

// ---- forgetting -------------------------------------------------------------------------------------------------

std::vector<std::string> forgetting_definitions() { return {"base_minus_last", "max_minus_last", "first_minus_last"}; }

Forgetting forgetting(const AccuracyTensor& R) {
  const int64_t M = R.methods.size(), F = R.finetune_datasets.size(), E = R.epochs + 1, D = R.eval_datasets.size();
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  Forgetting out;
  out.base_minus_epoch = R.mean.narrow(2, 0, 1) - R.mean;
  out.base_minus_last = torch::full({M, F, D}, kNaN, f64);
  out.max_minus_last = torch::full({M, F, D}, kNaN, f64);
  out.first_minus_last = torch::full({M, F, D}, kNaN, f64);
  out.plasticity = torch::full({M, F}, kNaN, f64);
  out.last_epoch = torch::full({M, F}, -1, torch::TensorOptions().dtype(torch::kLong));
  auto bl = out.base_minus_last.accessor<double, 3>();
  auto ml = out.max_minus_last.accessor<double, 3>();
  auto fl = out.first_minus_last.accessor<double, 3>();
  auto pl = out.plasticity.accessor<double, 2>();
  auto le = out.last_epoch.accessor<int64_t, 2>();
  std::map<std::string, torch::Tensor> avg;
  for (const auto& name : forgetting_definitions()) avg[name] = torch::full({M, F}, kNaN, f64);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t f = 0; f < F; ++f) {
      const int64_t L = R.last_epoch(m, f);
      le[m][f] = L;
      if (L < 0) continue;
      for (int64_t d = 0; d < D; ++d) {
        const double last = R.at(m, f, L, d);
        bl[m][f][d] = R.at(m, f, 0, d) - last;
        double mx = kNaN;
        for (int64_t e = 0; e <= L && e < E; ++e) {
          double v = R.at(m, f, e, d);
          if (!std::isnan(v) && (std::isnan(mx) || v > mx)) mx = v;
        }
        ml[m][f][d] = mx - last;
        fl[m][f][d] = L >= 1 ? R.at(m, f, 1, d) - last : kNaN;
      }
      const int64_t own = R.eval_index(R.finetune_datasets[f]);
      if (own >= 0) pl[m][f] = R.at(m, f, L, own) - R.at(m, f, 0, own);
      for (auto [name, t] : {std::pair<std::string, const torch::Tensor*>{"base_minus_last", &out.base_minus_last},
                             {"max_minus_last", &out.max_minus_last},
                             {"first_minus_last", &out.first_minus_last}}) {
        auto a = t->accessor<double, 3>();
        double s = 0.0;
        int64_t k = 0;
        for (int64_t d = 0; d < D; ++d)
          if (d != own && !std::isnan(a[m][f][d])) s += a[m][f][d], ++k;
        if (k) avg[name].accessor<double, 2>()[m][f] = s / k;
      }
    }
  }
  out.average = avg;
  return out;
}

EncoderGap encoder_gap(const AccuracyTensor& R) {
  EncoderGap g;
  g.datasets = R.eval_datasets;
  g.clip = R.clip;
  g.mllm = R.base;
  for (size_t d = 0; d < g.datasets.size(); ++d) {
    double v = g.clip[d] - g.mllm[d];
    g.gap.push_back(v);
    if (!std::isnan(v)) g.total += v, ++g.summed;
  }
  return g;
}

torch::Tensor verdict_rates(const AccuracyTensor& R) {
  auto c = R.counts.to(torch::kFloat64);
  return c.narrow(-1, 1, 4) / c.narrow(-1, 0, 1);  // 0/0 = NaN where nothing was scored
}

}  // namespace emt

namespace emt {

std::array<double, 3> difference_interval(int64_t k1, int64_t n1, int64_t k2, int64_t n2) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (n1 <= 0 || n2 <= 0) return {nan, nan, nan};
  const double p1 = static_cast<double>(k1) / n1, p2 = static_cast<double>(k2) / n2;
  const auto [l1, u1] = wilson_interval(k1, n1);
  const auto [l2, u2] = wilson_interval(k2, n2);
  const double d = p1 - p2;
  return {d, d - std::sqrt((p1 - l1) * (p1 - l1) + (u2 - p2) * (u2 - p2)),
          d + std::sqrt((u1 - p1) * (u1 - p1) + (p2 - l2) * (p2 - l2))};
}

std::vector<TradeoffPoint> learning_vs_forgetting(const AccuracyTensor& R) {
  std::vector<TradeoffPoint> out;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto cnt = R.counts.accessor<int64_t, 5>();
  const int64_t D = static_cast<int64_t>(R.eval_datasets.size());
  for (int64_t m = 0; m < static_cast<int64_t>(R.methods.size()); ++m)
    for (int64_t f = 0; f < static_cast<int64_t>(R.finetune_datasets.size()); ++f) {
      const int64_t own = R.eval_index(R.finetune_datasets[f]);
      for (int64_t e = 1; e <= R.last_epoch(m, f); ++e) {
        TradeoffPoint p;
        p.method = R.methods[m];
        p.finetune = R.finetune_datasets[f];
        p.epoch = e;
        p.gain = p.gain_low = p.gain_high = nan;
        if (own >= 0) {
          const auto g = difference_interval(cnt[m][f][e][own][1], cnt[m][f][e][own][0], cnt[m][f][0][own][1],
                                             cnt[m][f][0][own][0]);
          p.gain = g[0], p.gain_low = g[1], p.gain_high = g[2];
        }
        double sum = 0, lo2 = 0, hi2 = 0;
        for (int64_t d = 0; d < D; ++d) {
          if (d == own) continue;
          const auto c = difference_interval(cnt[m][f][e][d][1], cnt[m][f][e][d][0], cnt[m][f][0][d][1], cnt[m][f][0][d][0]);
          if (!std::isfinite(c[0])) continue;
          sum += c[0];
          lo2 += (c[0] - c[1]) * (c[0] - c[1]);
          hi2 += (c[2] - c[0]) * (c[2] - c[0]);
          ++p.others;
        }
        if (p.others > 0) {
          const double k = static_cast<double>(p.others);
          p.change = sum / k;
          p.change_low = p.change - std::sqrt(lo2) / k;
          p.change_high = p.change + std::sqrt(hi2) / k;
        } else {
          p.change = p.change_low = p.change_high = nan;
        }
        if (std::isfinite(p.gain) || p.others > 0) out.push_back(p);
      }
    }
  return out;
}

std::vector<DriftPoint> answer_drift(const AccuracyTensor& R) {
  std::vector<DriftPoint> out;
  auto nam = R.naming.accessor<int64_t, 5>();
  for (int64_t m = 0; m < static_cast<int64_t>(R.methods.size()); ++m)
    for (int64_t f = 0; f < static_cast<int64_t>(R.finetune_datasets.size()); ++f) {
      const int64_t own = R.eval_index(R.finetune_datasets[f]);
      for (int64_t e = 0; e <= R.last_epoch(m, f); ++e)
        for (int64_t d = 0; d < static_cast<int64_t>(R.eval_datasets.size()); ++d) {
          if (d == own || nam[m][f][e][d][0] == 0) continue;
          DriftPoint p;
          p.method = R.methods[m];
          p.finetune = R.finetune_datasets[f];
          p.eval = R.eval_datasets[d];
          p.epoch = e;
          p.n = nam[m][f][e][d][0];
          p.naming = nam[m][f][e][d][1];
          p.rate = static_cast<double>(p.naming) / static_cast<double>(p.n);
          std::tie(p.ci_low, p.ci_high) = wilson_interval(p.naming, p.n);
          out.push_back(p);
        }
    }
  return out;
}

}  // namespace emt
