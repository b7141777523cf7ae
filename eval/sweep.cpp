// Sweep files: parsing and validation, the grid's tasks, finished-task markers, Slurm scripts.
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include <emt/eval/sweep.h>
#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include <cctype>
#include <filesystem>
#include <type_traits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

namespace emt {
namespace fs = std::filesystem;

namespace {

std::string where(const std::string& file, const std::string& key, const YAML::Node& n) {
  return file + ":" + std::to_string(n.Mark().line + 1) + ": " + key;
}

void only_keys(const YAML::Node& node, const std::string& file, const std::string& section,
               const std::set<std::string>& allowed) {
  if (!node.IsMap()) throw ConfigError("[sweep] " + where(file, section, node) + ": expected a mapping");
  for (const auto& kv : node) {
    const auto key = kv.first.as<std::string>();
    if (!allowed.count(key)) {
      std::string list;
      for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
      throw ConfigError("[sweep] " + where(file, section + "." + key, kv.first) + ": unknown key (expected one of " +
                        list + ")");
    }
  }
}

template <class T>
T scalar(const YAML::Node& parent, const char* key, T def, const std::string& file, const std::string& section) {
  const YAML::Node n = parent[key];
  if (!n) return def;
  try {
    if (!n.IsScalar()) throw YAML::Exception(n.Mark(), "not a scalar");
    return n.as<T>();
  } catch (const YAML::Exception&) {
    throw ConfigError("[sweep] " + where(file, section + "." + key, n) + ": expected a " +
                      (std::is_same_v<T, std::string> ? "string" : "number"));
  }
}

std::vector<std::string> strings(const YAML::Node& parent, const char* key, const std::string& file,
                                 const std::string& section) {
  const YAML::Node n = parent[key];
  std::vector<std::string> out;
  if (!n) return out;
  if (!n.IsSequence()) throw ConfigError("[sweep] " + where(file, section + "." + key, n) + ": expected a list");
  for (const auto& v : n) out.push_back(v.as<std::string>());
  return out;
}

// A grid value as an override's right-hand side: scalars as written, lists and maps in YAML flow form.
std::string value_text(const YAML::Node& v) {
  if (v.IsScalar()) return v.Scalar();
  YAML::Emitter e;
  e << YAML::Flow << v;
  return e.c_str();
}

std::string file_safe(const std::string& s) {
  std::string out;
  for (char c : s) out += (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '=' || c == '_') ? c : '-';
  return out;
}

}  // namespace

std::string Sweep::root() const { return (fs::path(out_dir) / name).string(); }

Sweep load_sweep(const std::string& path) {
  Sweep s;
  s.file = fs::absolute(path).lexically_normal().string();
  YAML::Node doc;
  try {
    doc = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    throw IoError("[sweep] cannot read sweep file '" + path + "'");
  } catch (const YAML::Exception& e) {
    throw ConfigError("[sweep] " + path + ": invalid YAML: " + e.what());
  }
  only_keys(doc, path, "(top level)", {"sweep", "slurm"});
  const YAML::Node sw = doc["sweep"];
  if (!sw) throw ConfigError("[sweep] " + path + ": no 'sweep' section");
  only_keys(sw, path, "sweep", {"name", "command", "config", "out_dir", "overrides", "grid", "parallel",
                                "ranks_per_task"});
  s.name = scalar<std::string>(sw, "name", "", path, "sweep");
  if (s.name.empty() || file_safe(s.name) != s.name)
    throw ConfigError("[sweep] " + path + ": sweep.name must be set and file-name safe (letters, digits, . - = _), got '" +
                      s.name + "'");
  s.command = scalar<std::string>(sw, "command", "study", path, "sweep");
  if (s.command != "study" && s.command != "train")
    throw ConfigError("[sweep] " + path + ": sweep.command must be study or train, got '" + s.command + "'");
  const auto base = fs::path(s.file).parent_path();
  const auto config = scalar<std::string>(sw, "config", "", path, "sweep");
  if (config.empty()) throw ConfigError("[sweep] " + path + ": sweep.config (the base config file) is required");
  s.config = (fs::path(config).is_absolute() ? fs::path(config) : base / config).lexically_normal().string();
  s.out_dir = scalar<std::string>(sw, "out_dir", s.out_dir, path, "sweep");
  s.overrides = strings(sw, "overrides", path, "sweep");
  s.parallel = scalar<int64_t>(sw, "parallel", 1, path, "sweep");
  if (s.parallel < 1) throw ConfigError("[sweep] " + path + ": sweep.parallel must be >= 1");
  s.ranks_per_task = scalar<int64_t>(sw, "ranks_per_task", 1, path, "sweep");
  if (s.ranks_per_task < 1) throw ConfigError("[sweep] " + path + ": sweep.ranks_per_task must be >= 1");
  if (const YAML::Node g = sw["grid"]) {
    if (!g.IsMap()) throw ConfigError("[sweep] " + where(path, "sweep.grid", g) + ": expected key: [values]");
    for (const auto& kv : g) {
      const auto key = kv.first.as<std::string>();
      if (!kv.second.IsSequence() || kv.second.size() == 0)
        throw ConfigError("[sweep] " + where(path, "sweep.grid." + key, kv.second) + ": expected a non-empty list");
      std::vector<std::string> values;
      for (const auto& v : kv.second) values.push_back(value_text(v));
      s.grid.emplace_back(key, values);
    }
  }
  if (const YAML::Node sl = doc["slurm"]) {
    only_keys(sl, path, "slurm",
              {"partition", "account", "mem", "time", "gpus", "cpus_per_task", "signal_seconds", "extra"});
    auto& o = s.slurm;
    o.partition = scalar<std::string>(sl, "partition", o.partition, path, "slurm");
    o.account = scalar<std::string>(sl, "account", o.account, path, "slurm");
    o.mem = scalar<std::string>(sl, "mem", o.mem, path, "slurm");
    o.time = scalar<std::string>(sl, "time", o.time, path, "slurm");
    o.gpus = scalar<int64_t>(sl, "gpus", o.gpus, path, "slurm");
    o.cpus_per_task = scalar<int64_t>(sl, "cpus_per_task", o.cpus_per_task, path, "slurm");
    o.signal_seconds = scalar<int64_t>(sl, "signal_seconds", o.signal_seconds, path, "slurm");
    o.extra = strings(sl, "extra", path, "slurm");
    if (o.gpus < 0 || o.cpus_per_task < 1 || o.signal_seconds < 1)
      throw ConfigError("[sweep] " + path + ": slurm.gpus >= 0, slurm.cpus_per_task >= 1 and slurm.signal_seconds >= 1");
  }
  if (s.slurm.gpus > 0 && s.ranks_per_task > s.slurm.gpus)
    throw ConfigError(fmt::format("[sweep] {}: sweep.ranks_per_task is {} but slurm.gpus is {}: each rank needs its "
                                  "own GPU (set slurm.gpus to {}, or 0 for CPU tasks)", path, s.ranks_per_task,
                                  s.slurm.gpus, s.ranks_per_task));
  // The cartesian product, the first grid key varying slowest.
  int64_t n = 1;
  for (const auto& [k, vs] : s.grid) n *= static_cast<int64_t>(vs.size());
  for (int64_t i = 0; i < n; ++i) {
    SweepTask t;
    t.index = i;
    t.overrides = s.overrides;
    std::ostringstream name;
    name << "t" << std::string(i < 10 ? "00" : i < 100 ? "0" : "") << i;
    int64_t rest = i, stride = n;
    for (const auto& [k, vs] : s.grid) {
      stride /= static_cast<int64_t>(vs.size());
      const auto& v = vs[static_cast<size_t>(rest / stride)];
      rest %= stride;
      t.overrides.push_back(k + "=" + v);
      name << "_" << file_safe(k.substr(k.rfind('.') + 1) + "=" + v);
    }
    t.name = name.str();
    t.run_dir = (fs::path(s.root()) / t.name).string();
    t.overrides.push_back("run.out_dir=" + s.root());
    t.overrides.push_back("run.name=" + t.name);
    try {
      load_config(s.config, t.overrides);
    } catch (const ConfigError& e) {
      throw ConfigError("[sweep] " + path + ": task " + t.name + " has an invalid configuration:\n" + e.what());
    }
    s.tasks.push_back(std::move(t));
  }
  return s;
}

bool sweep_task_finished(const SweepTask& t) { return fs::exists(fs::path(t.run_dir) / "sweep_task.json"); }

void mark_sweep_task_finished(const SweepTask& t, double seconds) {
  nlohmann::json j = {{"task", t.name}, {"index", t.index}, {"overrides", t.overrides}, {"exit_code", 0},
                      {"seconds", seconds}};
  fs::create_directories(t.run_dir);
  write_file_atomic((fs::path(t.run_dir) / "sweep_task.json").string(), j.dump(2) + "\n");
}

std::vector<std::string> sweep_task_argv(const Sweep& s, const SweepTask& t, const std::string& emt_exe) {
  std::vector<std::string> argv;
  if (s.ranks_per_task > 1)  // data parallel on the task's node
    argv = {emt_exe, "launch", "--nproc", std::to_string(s.ranks_per_task), "--"};
  argv.insert(argv.end(), {emt_exe, s.command, s.config});
  argv.insert(argv.end(), t.overrides.begin(), t.overrides.end());
  argv.push_back(s.command == "study" ? "--no-report" : "--resume");  // the sweep writes one report for all
  if (s.allow_judge && s.command == "study") argv.push_back("--allow-judge");
  return argv;
}

std::string slurm_array_spec(const std::vector<int64_t>& indices) {
  std::ostringstream out;
  for (size_t i = 0; i < indices.size();) {
    size_t j = i;
    while (j + 1 < indices.size() && indices[j + 1] == indices[j] + 1) ++j;
    out << (i ? "," : "") << indices[i];
    if (j > i) out << "-" << indices[j];
    i = j + 1;
  }
  return out.str();
}

namespace {
std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string sbatch_header(const Sweep& s, const std::string& job, const std::string& output) {
  std::ostringstream h;
  h << "#!/usr/bin/env bash\n"
    << "#SBATCH --job-name=" << job << "\n"
    << "#SBATCH --output=" << output << "\n"
    << "#SBATCH --cpus-per-task=" << s.slurm.cpus_per_task << "\n"
    << "#SBATCH --time=" << s.slurm.time << "\n";
  if (!s.slurm.partition.empty()) h << "#SBATCH --partition=" << s.slurm.partition << "\n";
  if (!s.slurm.account.empty()) h << "#SBATCH --account=" << s.slurm.account << "\n";
  if (!s.slurm.mem.empty()) h << "#SBATCH --mem=" << s.slurm.mem << "\n";
  return h.str();
}
}  // namespace

std::string sweep_array_script(const Sweep& s, const std::vector<int64_t>& indices, const std::string& emt_exe) {
  std::ostringstream o;
  o << sbatch_header(s, s.name, (fs::path(s.root()) / "slurm-%A_%a.out").string());
  o << "#SBATCH --array=" << slurm_array_spec(indices) << "%" << s.parallel << "\n";
  if (s.slurm.gpus > 0) o << "#SBATCH --gres=gpu:" << s.slurm.gpus << "\n";
  o << "#SBATCH --signal=B:USR1@" << s.slurm.signal_seconds << "\n"
    << "#SBATCH --requeue\n"
    << "#SBATCH --open-mode=append\n";  // a requeued task appends to its log
  for (const auto& e : s.slurm.extra) o << "#SBATCH " << e << "\n";
  o << "# Written by emt sweep for " << s.file << ": one array task per unfinished grid point.\n"
    << "# A preemption notice (USR1) reaches emt, which checkpoints and exits 75; the task then requeues itself.\n"
    << "set -uo pipefail\n"
    << shell_quote(emt_exe) << " sweep " << shell_quote(s.file) << " --run-task \"$SLURM_ARRAY_TASK_ID\""
    << (s.allow_judge ? " --allow-judge" : "") << " &\n"
    << "PID=$!\n"
    << "trap 'kill -USR1 $PID' USR1 TERM\n"
    << "wait $PID; RC=$?\n"
    << "while kill -0 $PID 2>/dev/null; do wait $PID; RC=$?; done\n"
    << "if [ \"$RC\" -eq 75 ]; then\n"
    << "  echo \"preempted: requeueing ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}\"\n"
    << "  scontrol requeue \"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}\"; exit 0\n"
    << "fi\n"
    << "exit \"$RC\"\n";
  return o.str();
}

std::string sweep_report_script(const Sweep& s, const std::string& emt_exe) {
  std::ostringstream o;
  o << sbatch_header(s, s.name + "-report", (fs::path(s.root()) / "slurm-report-%j.out").string());
  o << "# Runs after the array (afterany): the report over every finished task of " << s.file << ".\n"
    << "set -euo pipefail\n"
    << "exec " << shell_quote(emt_exe) << " sweep " << shell_quote(s.file) << " --report-only\n";
  return o.str();
}

}  // namespace emt
