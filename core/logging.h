// emt's own formatted logging (fmt), beside the public levels of <emt/core/log.h>. Not installed: fmt stays out
// of the public headers.
#pragma once
#include <emt/core/log.h>
#include <fmt/format.h>

#include <utility>

namespace emt {

template <typename... Args>
void log_debug(fmt::format_string<Args...> f, Args&&... args) {
  if (log_level() <= LogLevel::debug) log_line(LogLevel::debug, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void log_info(fmt::format_string<Args...> f, Args&&... args) {
  if (log_level() <= LogLevel::info) log_line(LogLevel::info, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void log_warn(fmt::format_string<Args...> f, Args&&... args) {
  if (log_level() <= LogLevel::warn) log_line(LogLevel::warn, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void log_error(fmt::format_string<Args...> f, Args&&... args) {
  if (log_level() <= LogLevel::error) log_line(LogLevel::error, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace emt
