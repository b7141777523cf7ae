// Levelled logging to stderr. One global level, set once by the CLI (or a library user). A library user logs a
// formatted line with log_line; emt's own sources format with fmt through core/logging.h, which is not installed.
#pragma once
#include <string>
#include <string_view>

namespace emt {

enum class LogLevel { debug = 0, info = 1, warn = 2, error = 3, off = 4 };

void set_log_level(LogLevel level);
LogLevel log_level();
LogLevel parse_log_level(const std::string& name);  // throws ConfigError on unknown names
void log_line(LogLevel level, std::string_view msg);

}  // namespace emt
