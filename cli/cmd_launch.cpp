// `emt launch --nproc N -- emt train|study ...`: N local data-parallel processes (RANK, WORLD_SIZE, LOCAL_RANK,
// MASTER_ADDR, MASTER_PORT set as torchrun sets them), preemption notices forwarded to every one, the first
// failure stopping the rest; and the join step every data-parallel command runs.
#include <emt/core/config.h>
#include <emt/core/distributed.h>
#include <emt/core/error.h>
#include "core/logging.h"
#include <emt/core/runtime.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fmt/ranges.h>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <thread>

#include "commands.h"

namespace emt::cli {

std::shared_ptr<Communicator> join_process_group(RunConfig& cfg) {
  auto env = dist_env_from_environment();
  if (!env) return nullptr;
  // One GPU per local rank: "cuda" / "auto" become cuda:<LOCAL_RANK>; an explicit cuda:N is kept.
  const torch::Device dev = resolve_device(cfg.run.device);
  if (dev.is_cuda() && cfg.run.device.find(':') == std::string::npos) cfg.run.device = "cuda:" + std::to_string(env->local_rank);
  ProcessGroupOptions po;
  po.device = resolve_device(cfg.run.device);
  auto comm = init_process_group(*env, po);
  log_info("[dist] rank {} of {} on {} ({} via {}:{}, from {} variables)", env->rank, env->world_size, cfg.run.device,
           comm->backend(), env->master_addr, env->master_port, env->source == "slurm" ? "Slurm" : "launcher");
  if (!comm->is_main() && log_level() < LogLevel::warn) set_log_level(LogLevel::warn);  // rank 0 speaks for all
  return comm;
}

namespace {

volatile std::sig_atomic_t g_forwarded = 0;
std::vector<pid_t> g_children;  // filled before the handlers are installed, read-only afterwards

void forward_signal(int sig) {
  g_forwarded = sig;
  for (pid_t p : g_children) ::kill(p, sig);
}

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw IoError("[launch] socket(): cannot pick a free port; pass --master-port");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    ::close(fd);
    throw IoError("[launch] cannot bind a port on 127.0.0.1; pass --master-port");
  }
  const int port = ntohs(a.sin_port);
  ::close(fd);
  return port;
}

int exit_code(int status) { return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status); }

int launch(int nproc, int port, int grace_s, std::vector<std::string> command) {
  if (nproc < 1) throw ConfigError("[launch] --nproc must be >= 1");
  if (command.empty()) throw ConfigError("[launch] no command: emt launch --nproc N -- emt train CONFIG ...");
  if (command[0] == "emt") command[0] = std::filesystem::read_symlink("/proc/self/exe").string();
  if (port == 0) port = free_port();
  std::vector<char*> argv;
  for (auto& a : command) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::cout.flush();
  std::cerr.flush();
  // Signals arriving while the children start are held, then forwarded to all of them.
  sigset_t block, old;
  sigemptyset(&block);
  for (int s : {SIGTERM, SIGUSR1, SIGINT, SIGHUP}) sigaddset(&block, s);
  sigprocmask(SIG_BLOCK, &block, &old);
  for (int r = 0; r < nproc; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      for (pid_t p : g_children) ::kill(p, SIGKILL);
      throw IoError("[launch] fork() failed for rank " + std::to_string(r));
    }
    if (pid == 0) {
      sigprocmask(SIG_SETMASK, &old, nullptr);
      ::setenv("RANK", std::to_string(r).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(nproc).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      ::execvp(argv[0], argv.data());
      std::fprintf(stderr, "emt: error: [launch] cannot run '%s': %s\n", argv[0], std::strerror(errno));
      std::_Exit(127);
    }
    g_children.push_back(pid);
  }
  struct sigaction sa {};
  sa.sa_handler = forward_signal;
  sigemptyset(&sa.sa_mask);
  for (int s : {SIGTERM, SIGUSR1, SIGINT, SIGHUP}) sigaction(s, &sa, nullptr);
  sigprocmask(SIG_SETMASK, &old, nullptr);
  log_info("[launch] {} ranks on 127.0.0.1:{}: {}", nproc, port, fmt::join(command, " "));

  // The first rank to fail decides the exit code; the others get SIGTERM, then SIGKILL after the grace period.
  int first_failure = 0, running = nproc;
  std::vector<bool> alive(static_cast<size_t>(nproc), true);
  std::chrono::steady_clock::time_point kill_at{};
  while (running > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, first_failure ? WNOHANG : 0);
    if (pid < 0 && errno == EINTR) continue;
    if (pid < 0) break;
    if (pid == 0) {  // stopping the others: wait, then force
      if (std::chrono::steady_clock::now() >= kill_at)
        for (size_t r = 0; r < g_children.size(); ++r)
          if (alive[r]) ::kill(g_children[r], SIGKILL);
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    for (size_t r = 0; r < g_children.size(); ++r) {
      if (g_children[r] != pid) continue;
      alive[r] = false;
      --running;
      const int code = exit_code(status);
      if (code != 0 && !first_failure) {
        first_failure = code;
        if (running > 0)
          log_warn("[launch] rank {} exited with {}: stopping the other ranks (SIGTERM, SIGKILL after {} s)", r, code,
                   grace_s);
        for (size_t o = 0; o < g_children.size(); ++o)
          if (alive[o]) ::kill(g_children[o], SIGTERM);
        kill_at = std::chrono::steady_clock::now() + std::chrono::seconds(grace_s);
      }
    }
  }
  return first_failure;
}

RegisterCommand register_launch([](CLI::App& root) {
  auto* cmd = root.add_subcommand("launch", "Run N local data-parallel ranks of an emt command (Gloo/NCCL)");
  auto nproc = std::make_shared<int>(2);
  auto port = std::make_shared<int>(0);
  auto grace = std::make_shared<int>(30);
  auto command = std::make_shared<std::vector<std::string>>();
  cmd->add_option("--nproc", *nproc, "number of ranks (processes) on this machine")->default_val(2);
  cmd->add_option("--master-port", *port, "TCP port of rank 0's store (default: a free one)");
  cmd->add_option("--grace", *grace, "seconds the other ranks get to stop after one fails")->default_val(30);
  cmd->add_option("command", *command, "the command after --, e.g. -- emt study CONFIG")->required();
  cmd->callback([=] {
    const int code = launch(*nproc, *port, *grace, *command);
    if (code != 0) std::exit(code);  // the ranks printed their own errors
  });
});

}  // namespace

}  // namespace emt::cli
