// Shared test helpers: scratch directories and running the emt CLI.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <sys/wait.h>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

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

// The bytes of a file ("" when it cannot be read) and a file with exactly `bytes`.
inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
// Every non-empty line of a JSON-lines file, parsed; throws when the file cannot be opened.
inline std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::vector<nlohmann::json> v;
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) v.push_back(nlohmann::json::parse(line));
  return v;
}

inline void spit(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A big-endian 32-bit integer (IDX headers).
inline void put_be32(std::ofstream& f, uint32_t v) {
  for (int s = 24; s >= 0; s -= 8) f.put(static_cast<char>((v >> s) & 0xff));
}

}  // namespace emt_test
