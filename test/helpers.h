// Shared test helpers: scratch directories and running the emt CLI.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <sys/wait.h>
#include <filesystem>
#include <string>

namespace emt_test {

// A fresh directory under the build tree, removed and recreated on each call with the same name.
inline std::string scratch_dir(const std::string& name) {
  namespace fs = std::filesystem;
  fs::path p = fs::path(EMT_BINARY_DIR) / "test-scratch" / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

struct CmdResult {
  int code;
  std::string output;  // stdout + stderr
};

// Runs `emt ARGS` (shell-quoted by the caller) and captures output and exit code.
inline CmdResult run_cli_env(const std::string& env, const std::string& args) {
  std::string cmd = (env.empty() ? std::string() : "env " + env + " ") + std::string(EMT_CLI) + " " + args + " 2>&1";
  CmdResult r{-1, {}};
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

inline CmdResult run_cli(const std::string& args) { return run_cli_env("", args); }

}  // namespace emt_test
