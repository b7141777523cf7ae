// Sweeps (`emt sweep SWEEP.yaml`): a grid over any config keys expanded into tasks, each an `emt study` (or
// `emt train`) run with its own deterministic run directory; run locally K at a time or as a Slurm job array
// with a dependent report job. A task that finished (exit 0) leaves sweep_task.json in its run directory, so
// re-running or re-submitting a sweep skips it. The format is in docs/sweeps.md.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace emt {

struct SweepSlurm {
  std::string partition, account, mem;      // empty = not requested
  std::string time = "24:00:00";
  int64_t gpus = 1;                         // --gres=gpu:N (0 = none)
  int64_t cpus_per_task = 8;
  int64_t signal_seconds = 120;             // --signal=B:USR1@N: the preemption notice's lead time
  std::vector<std::string> extra;           // more #SBATCH lines, e.g. "--qos=long"
};

struct SweepTask {
  int64_t index = 0;
  std::string name;                         // t000_<key>=<value>_... (file-name safe, deterministic)
  std::string run_dir;                      // <out_dir>/<sweep name>/<task name>
  std::vector<std::string> overrides;       // the sweep's fixed overrides, the grid point, run.out_dir/run.name
};

struct Sweep {
  std::string file;                         // the sweep file (absolute)
  std::string name;
  std::string command = "study";            // study | train
  std::string config;                       // the base config (absolute; relative paths resolve against `file`)
  std::string out_dir = "runs/sweeps";
  std::vector<std::string> overrides;       // applied to every task, before the grid point
  std::vector<std::pair<std::string, std::vector<std::string>>> grid;  // key -> values, first key slowest
  int64_t parallel = 1;                     // local: tasks at once; slurm: the array's %K
  int64_t ranks_per_task = 1;               // > 1: each task runs data-parallel (emt launch --nproc N)
  SweepSlurm slurm;
  std::vector<SweepTask> tasks;
  bool allow_judge = false;                 // --allow-judge on the sweep's command line (never from the file):
                                            // passed on to every study task

  std::string root() const;                 // <out_dir>/<name>: task directories, scripts, the report
};

// Reads and validates a sweep file: unknown or mistyped keys are a ConfigError naming the file and the key, and
// every task's configuration is loaded once (a typo in a grid key fails here, before anything runs).
Sweep load_sweep(const std::string& path);
bool sweep_task_finished(const SweepTask& t);
void mark_sweep_task_finished(const SweepTask& t, double seconds);  // atomic write of sweep_task.json
// The command line of a task: {emt, command, config, overrides..., plus --no-report (study) or --resume (train),
// and --allow-judge for a study when the sweep has it},
// behind {emt, launch, --nproc, N, --} when ranks_per_task N > 1.
std::vector<std::string> sweep_task_argv(const Sweep& s, const SweepTask& t, const std::string& emt_exe);
// The job-array script for `indices` (the unfinished tasks) and the dependent report job's script.
std::string sweep_array_script(const Sweep& s, const std::vector<int64_t>& indices, const std::string& emt_exe);
std::string sweep_report_script(const Sweep& s, const std::string& emt_exe);
// "0-3" or "1,4,7" (contiguous runs collapsed: "0-2,5").
std::string slurm_array_spec(const std::vector<int64_t>& indices);

}  // namespace emt
