// The `emt` executable: parses argv with git-style sub-commands, calls the library, maps errors to exit codes.
#include <emt/core/error.h>
#include "core/logging.h"
#include <emt/train/trainer.h>
#include <c10/util/Exception.h>
#include <emt/core/runtime.h>
#include <fmt/format.h>
#include <torch/version.h>

#include <cstdio>
#include <exception>

#include "commands.h"

#ifndef EMT_VERSION
#define EMT_VERSION "dev"
#endif

namespace emt::cli {
std::vector<CommandSetup>& command_registry() {
  static std::vector<CommandSetup> r;
  return r;
}
}  // namespace emt::cli

int main(int argc, char** argv) {
  using namespace emt::cli;
  CLI::App app{"emt: catastrophic forgetting in multimodal LLMs (EMT protocol)", "emt"};
  app.set_version_flag("--version", fmt::format("emt {} (LibTorch {}.{}.{}; {})", EMT_VERSION, TORCH_VERSION_MAJOR,
                                                TORCH_VERSION_MINOR, TORCH_VERSION_PATCH, emt::build_features()));
  app.require_subcommand(1);
  for (auto& setup : command_registry()) setup(app);
  try {
    app.parse(argc, argv);
    return kExitOk;  // work happened inside the sub-command callbacks
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "emt: %s\n", e.what());
    std::fprintf(stderr, "Run 'emt --help' for usage.\n");
    return kExitUsage;
  } catch (const emt::ConfigError& e) {
    std::fprintf(stderr, "emt: config error:\n%s\n", e.what());
    return kExitUsage;
  } catch (const emt::Preempted& e) {
    std::fprintf(stderr, "emt: preempted: %s\n", e.what());
    return kExitPreempted;
  } catch (const emt::Error& e) {
    std::fprintf(stderr, "emt: error: %s\n", e.what());
    return kExitRuntime;
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "emt: error: %s\n", e.what_without_backtrace());
    return kExitRuntime;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emt: error: %s\n", e.what());
    return kExitRuntime;
  }
}
