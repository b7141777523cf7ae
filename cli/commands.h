// Sub-command registry of the `emt` executable: each cli/cmd_*.cpp registers its sub-commands on the CLI11 app.
// Commands do their work by calling the library and throw emt errors; main() maps them to exit codes.
#pragma once
#include <CLI/CLI.hpp>
#include <emt/core/config.h>
#include <emt/core/distributed.h>

#include <functional>
#include <memory>
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

// Data parallel: the process group the launcher's environment names (emt launch, torchrun, srun), or nullptr for
// one process. Moves run.device "cuda"/"auto" to cuda:<LOCAL_RANK>; ranks other than 0 log warnings only.
std::shared_ptr<Communicator> join_process_group(RunConfig& cfg);

}  // namespace emt::cli
