// Metrics as one JSON object per line (metrics.jsonl, results.jsonl) and a progress display for long work.
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace emt {

using JsonScalar = std::variant<std::nullptr_t, bool, int64_t, double, std::string>;
using JsonFields = std::vector<std::pair<std::string, JsonScalar>>;

std::string to_json_line(const JsonFields& fields);  // one compact JSON object, no newline

// Appends JSON lines to a file; each line is written and flushed whole so a killed process leaves whole lines.
class JsonlWriter {
 public:
  explicit JsonlWriter(std::string path);  // creates parent directories; throws IoError
  ~JsonlWriter();
  JsonlWriter(const JsonlWriter&) = delete;
  JsonlWriter& operator=(const JsonlWriter&) = delete;
  void write(const JsonFields& fields);
  void write_raw(const std::string& json_object);  // one already-serialised object (no newline)
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

// Progress of a counted loop: a redrawn bar on a TTY, a plain line every `plain_every` seconds otherwise.
class Progress {
 public:
  Progress(std::string label, int64_t total, double plain_every_s = 10.0);
  // done: items finished so far; extra: short free text (loss=..., acc=...).
  void update(int64_t done, const std::string& extra = "");
  void finish(const std::string& extra = "");

 private:
  std::string label_;
  int64_t total_;
  double plain_every_s_;
  bool tty_;
  std::chrono::steady_clock::time_point start_, last_;
};

}  // namespace emt
