// Levelled stderr logging; one process-wide level.
#include <emt/core/error.h>
#include <emt/core/log.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

namespace emt {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::info)};
std::mutex g_mu;
}  // namespace

void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load()); }

LogLevel parse_log_level(const std::string& name) {
  if (name == "debug") return LogLevel::debug;
  if (name == "info") return LogLevel::info;
  if (name == "warn" || name == "warning") return LogLevel::warn;
  if (name == "error") return LogLevel::error;
  if (name == "off") return LogLevel::off;
  throw ConfigError("[log] unknown log level '" + name + "' (expected debug, info, warn, error, off)");
}

void log_line(LogLevel level, std::string_view msg) {
  static const char* tags[] = {"debug", "info", "warn", "error"};
  auto now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  localtime_r(&now, &tm);
  char ts[16];
  std::strftime(ts, sizeof ts, "%H:%M:%S", &tm);
  std::lock_guard<std::mutex> lock(g_mu);
  std::fprintf(stderr, "[%s %s] %.*s\n", ts, tags[static_cast<int>(level)], static_cast<int>(msg.size()), msg.data());
}

}  // namespace emt
