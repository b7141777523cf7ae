// `emt sweep SWEEP.yaml [--backend local|slurm|print]`: a grid of studies (or training runs), run here K at a
// time, submitted as a Slurm job array with a dependent report job, or printed. Finished tasks are skipped.
#include <emt/core/error.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <emt/eval/metrics.h>
#include <emt/eval/report.h>
#include <emt/eval/sweep.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <thread>

#include "commands.h"

namespace {
namespace fs = std::filesystem;

struct SweepArgs {
  std::string file, backend = "local";
  int64_t jobs = 0, run_task = -1;
  bool report_only = false, allow_judge = false;
};

std::string self_exe() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  if (ec) throw emt::IoError("[sweep] cannot find this program's path (/proc/self/exe): " + ec.message());
  return p.string();
}

// Starts one task as a child process, its output appended to <run_dir>/sweep.log.
pid_t start_task(const emt::Sweep& s, const emt::SweepTask& t, const std::string& exe) {
  fs::create_directories(t.run_dir);
  const auto log = (fs::path(t.run_dir) / "sweep.log").string();
  auto argv = emt::sweep_task_argv(s, t, exe);
  pid_t pid = ::fork();
  if (pid < 0) throw emt::Error("[sweep] fork failed for task " + t.name);
  if (pid == 0) {
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::close(fd);
    }
    std::vector<char*> cargv;
    for (auto& a : argv) cargv.push_back(a.data());
    cargv.push_back(nullptr);
    ::execv(exe.c_str(), cargv.data());
    std::perror("emt sweep: execv");
    ::_exit(127);
  }
  return pid;
}

int exit_code_of(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

struct Outcome {
  std::vector<std::string> finished, failed, preempted;
};

// Runs `todo` K at a time. A preemption notice to the sweep is passed on to every running task (each checkpoints
// and exits 75); no new task starts after it.
Outcome run_tasks(const emt::Sweep& s, const std::vector<const emt::SweepTask*>& todo, int64_t k, const std::string& exe) {
  Outcome out;
  emt::PreemptionScope preemption(true);
  std::map<pid_t, std::pair<const emt::SweepTask*, std::chrono::steady_clock::time_point>> running;
  size_t next = 0;
  bool forwarded = false;
  while (next < todo.size() || !running.empty()) {
    const bool stop = emt::pending_preemption() != 0;
    if (stop && !forwarded) {
      for (const auto& [pid, info] : running) ::kill(pid, SIGUSR1);
      forwarded = true;
    }
    while (!stop && next < todo.size() && static_cast<int64_t>(running.size()) < k) {
      const auto* t = todo[next++];
      emt::log_info("[sweep] start {} ({})", t->name, t->run_dir);
      running[start_task(s, *t, exe)] = {t, std::chrono::steady_clock::now()};
    }
    if (stop && running.empty()) break;
    int status = 0;
    pid_t pid = ::waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;
    }
    auto it = running.find(pid);
    if (it == running.end()) continue;
    const auto* t = it->second.first;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - it->second.second).count();
    running.erase(it);
    const int code = exit_code_of(status);
    if (code == 0) {
      emt::mark_sweep_task_finished(*t, secs);
      out.finished.push_back(t->name);
      emt::log_info("[sweep] {} finished in {:.0f}s", t->name, secs);
    } else if (code == emt::cli::kExitPreempted) {
      out.preempted.push_back(t->name);
      emt::log_warn("[sweep] {} preempted (checkpointed; rerun the sweep to continue)", t->name);
    } else {
      out.failed.push_back(t->name);
      emt::log_warn("[sweep] {} failed with exit code {}: see {}/sweep.log", t->name, code, t->run_dir);
    }
  }
  return out;
}

// The report over every finished task (study sweeps), in <root>/report.
void write_sweep_report(const emt::Sweep& s) {
  if (s.command != "study") return;
  std::vector<std::string> dirs;
  for (const auto& t : s.tasks)
    if (emt::sweep_task_finished(t)) dirs.push_back(t.run_dir);
  if (dirs.empty()) {
    std::cout << "no finished task yet: no report\n";
    return;
  }
  emt::ReportOptions ro;
  ro.out_dir = (fs::path(s.root()) / "report").string();
  ro.title = "emt sweep " + s.name;
  auto files = emt::write_report(emt::load_results(dirs), ro);
  std::cout << files.matrix << "report (" << dirs.size() << " of " << s.tasks.size() << " tasks): " << files.html
            << "\n";
}

std::string run_capture(const std::string& cmd) {
  std::string out;
  std::unique_ptr<FILE, int (*)(FILE*)> p(::popen(cmd.c_str(), "r"), ::pclose);
  if (!p) throw emt::Error("[sweep] cannot run: " + cmd);
  char buf[512];
  while (std::fgets(buf, sizeof buf, p.get())) out += buf;
  int rc = ::pclose(p.release());
  if (rc != 0) throw emt::Error("[sweep] '" + cmd + "' failed (status " + std::to_string(rc) + "): " + out);
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

int sweep_main(const SweepArgs& a) {
  auto s = emt::load_sweep(a.file);
  s.allow_judge = a.allow_judge;
  const auto exe = self_exe();
  std::vector<const emt::SweepTask*> todo;
  std::vector<int64_t> todo_idx;
  for (const auto& t : s.tasks)
    if (!emt::sweep_task_finished(t)) todo.push_back(&t), todo_idx.push_back(t.index);

  if (a.report_only) {
    write_sweep_report(s);
    return 0;
  }
  if (a.run_task >= 0) {  // one array task (Slurm): run it, mark it finished, pass its exit code on
    if (a.run_task >= static_cast<int64_t>(s.tasks.size()))
      throw emt::ConfigError("[sweep] --run-task " + std::to_string(a.run_task) + ": the sweep has " +
                             std::to_string(s.tasks.size()) + " tasks");
    const auto& t = s.tasks[static_cast<size_t>(a.run_task)];
    if (emt::sweep_task_finished(t)) {
      std::cout << "task " << t.name << " already finished\n";
      return 0;
    }
    auto o = run_tasks(s, {&t}, 1, exe);
    if (!o.failed.empty()) return emt::cli::kExitRuntime;
    return o.preempted.empty() ? 0 : emt::cli::kExitPreempted;
  }
  std::cout << "sweep " << s.name << ": " << s.tasks.size() << " tasks, " << s.tasks.size() - todo.size()
            << " already finished, in " << s.root() << "\n";
  fs::create_directories(s.root());
  if (a.backend == "print") {
    for (const auto& t : s.tasks) {
      std::cout << (emt::sweep_task_finished(t) ? "  done " : "  todo ") << t.name << ":";
      for (const auto& arg : emt::sweep_task_argv(s, t, "emt")) std::cout << " " << arg;
      std::cout << "\n";
    }
    if (!todo_idx.empty()) std::cout << "\n" << emt::sweep_array_script(s, todo_idx, exe);
    std::cout << "\n" << emt::sweep_report_script(s, exe);
    return 0;
  }
  if (a.backend == "slurm") {
    if (todo.empty()) {
      write_sweep_report(s);
      return 0;
    }
    const auto array = (fs::path(s.root()) / "sweep_array.sbatch").string();
    const auto report = (fs::path(s.root()) / "sweep_report.sbatch").string();
    emt::write_file_atomic(array, emt::sweep_array_script(s, todo_idx, exe));
    emt::write_file_atomic(report, emt::sweep_report_script(s, exe));
    if (run_capture("command -v sbatch >/dev/null 2>&1 && echo yes || echo no") != "yes")
      throw emt::Error("[sweep] --backend slurm: sbatch is not on PATH (scripts written to " + s.root() +
                       "; submit them on a Slurm login node, or use --backend local)");
    const auto job = run_capture("sbatch --parsable '" + array + "'");
    const auto rep = run_capture("sbatch --parsable --dependency=afterany:" + job.substr(0, job.find(';')) + " '" +
                                 report + "'");
    std::cout << "submitted array job " << job << " (" << todo.size() << " tasks, --array="
              << emt::slurm_array_spec(todo_idx) << "%" << s.parallel << ") and report job " << rep << "\n";
    return 0;
  }
  if (a.backend != "local")
    throw emt::ConfigError("[sweep] --backend must be local, slurm or print (got '" + a.backend + "')");
  const int64_t k = a.jobs > 0 ? a.jobs : s.parallel;
  auto o = run_tasks(s, todo, k, exe);
  std::cout << o.finished.size() << " tasks finished, " << o.failed.size() << " failed, " << o.preempted.size()
            << " preempted\n";
  for (const auto& f : o.failed) std::cout << "  failed: " << f << "\n";
  write_sweep_report(s);
  if (!o.failed.empty()) return emt::cli::kExitRuntime;
  return o.preempted.empty() ? 0 : emt::cli::kExitPreempted;
}

emt::cli::RegisterCommand register_sweep([](CLI::App& root) {
  auto a = std::make_shared<SweepArgs>();
  auto* cmd = root.add_subcommand("sweep", "Run a grid of studies locally, as a Slurm job array, or print it");
  cmd->add_option("sweep", a->file, "sweep file (docs/sweeps.md)")->required();
  cmd->add_option("--backend", a->backend, "local | slurm | print")->capture_default_str();
  cmd->add_option("-j,--jobs", a->jobs, "local: tasks at once (default: sweep.parallel)");
  cmd->add_option("--run-task", a->run_task, "run one task by index (what each Slurm array task does)");
  cmd->add_flag("--report-only", a->report_only, "write the report over the finished tasks and exit");
  cmd->add_flag("--allow-judge", a->allow_judge, "let every study task run the judge command or contact the judge endpoint its config names");
  cmd->callback([a] {
    int rc = sweep_main(*a);
    if (rc == emt::cli::kExitPreempted) throw emt::Preempted("[sweep] tasks were preempted; rerun to continue");
    if (rc != 0) throw emt::Error("[sweep] some tasks failed");
  });
});
}  // namespace
