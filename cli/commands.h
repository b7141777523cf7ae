// Sub-command registry of the `emt` executable: each cli/cmd_*.cpp registers its sub-commands on the CLI11 app.
// Commands do their work by calling the library and throw emt errors; main() maps them to exit codes.
#pragma once
#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace emt::cli {

using CommandSetup = std::function<void(CLI::App& root)>;
std::vector<CommandSetup>& command_registry();

struct RegisterCommand {
  explicit RegisterCommand(CommandSetup setup) { command_registry().push_back(std::move(setup)); }
};

// Exit codes, documented in docs/cli.md.
constexpr int kExitOk = 0;
constexpr int kExitRuntime = 1;
constexpr int kExitUsage = 2;
constexpr int kExitPreempted = 75;  // checkpoint written after SIGTERM/SIGUSR1: requeue and --resume

}  // namespace emt::cli
