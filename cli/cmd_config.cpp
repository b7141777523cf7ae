// `emt config show CONFIG [key=value ...]`: prints the resolved configuration (extends + overrides applied).
#include <emt/core/config.h>

#include <iostream>

#include "commands.h"

namespace {
emt::cli::RegisterCommand register_config([](CLI::App& root) {
  auto* config = root.add_subcommand("config", "Inspect configurations");
  config->require_subcommand(1);
  auto* show = config->add_subcommand("show", "Print the resolved config (extends and key=value overrides applied)");
  auto path = std::make_shared<std::string>();
  auto overrides = std::make_shared<std::vector<std::string>>();
  show->add_option("config", *path, "YAML config file")->required();
  show->add_option("overrides", *overrides, "dotted.key=value overrides");
  show->callback([path, overrides] { std::cout << emt::config_to_yaml(emt::load_config(*path, *overrides)); });
  auto* keys = config->add_subcommand("keys", "List every config key with its meaning");
  keys->callback([] {
    for (const auto& [k, doc] : emt::config_reference()) std::cout << k << "\t" << doc << "\n";
  });
});
}  // namespace
