// JSON-lines writer and the progress display.
#include <emt/core/error.h>
#include <emt/core/metrics.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include <fmt/format.h>

namespace emt {

std::string to_json_line(const JsonFields& fields) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const auto& [k, v] : fields) {
    std::visit(
        [&](const auto& x) {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, double>) {
            if (std::isfinite(x)) j[k] = x; else j[k] = nullptr;  // JSON has no NaN/Inf
          } else {
            j[k] = x;
          }
        },
        v);
  }
  return j.dump();
}

JsonlWriter::JsonlWriter(std::string path) : path_(std::move(path)) {
  std::filesystem::path p(path_);
  std::error_code ec;
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path(), ec);
  f_ = std::fopen(path_.c_str(), "a+");
  if (!f_) throw IoError("[metrics] cannot open '" + path_ + "' for appending: " + std::strerror(errno));
  // A process killed mid-line leaves a torn last line: terminate it so the next record starts on its own line.
  if (std::fseek(f_, 0, SEEK_END) == 0 && std::ftell(f_) > 0 && std::fseek(f_, -1, SEEK_END) == 0) {
    int last = std::fgetc(f_);
    std::fseek(f_, 0, SEEK_END);
    if (last != '\n') std::fputc('\n', f_);
  }
}

JsonlWriter::~JsonlWriter() {
  if (f_) std::fclose(f_);
}

void JsonlWriter::write(const JsonFields& fields) { write_raw(to_json_line(fields)); }

void JsonlWriter::write_raw(const std::string& json_object) {
  std::string line = json_object + "\n";
  if (std::fwrite(line.data(), 1, line.size(), f_) != line.size() || std::fflush(f_) != 0)
    throw IoError("[metrics] write failed for '" + path_ + "': " + std::strerror(errno));
}

Progress::Progress(std::string label, int64_t total, double plain_every_s)
    : label_(std::move(label)), total_(total), plain_every_s_(plain_every_s), tty_(::isatty(2) != 0) {
  start_ = last_ = std::chrono::steady_clock::now();
}

void Progress::update(int64_t done, const std::string& extra) {
  auto now = std::chrono::steady_clock::now();
  double since_last = std::chrono::duration<double>(now - last_).count();
  if (tty_ ? since_last < 0.2 : since_last < plain_every_s_) return;
  last_ = now;
  double el = std::chrono::duration<double>(now - start_).count();
  double rate = el > 0 ? done / el : 0.0;
  double eta = rate > 0 && total_ > done ? (total_ - done) / rate : 0.0;
  if (tty_) {
    int width = 24;
    int fill = total_ > 0 ? static_cast<int>(width * std::min<double>(1.0, double(done) / total_)) : 0;
    std::string bar(fill, '#');
    bar.resize(width, '.');
    std::fprintf(stderr, "\r%s [%s] %lld/%lld %.1f/s eta %.0fs %s\033[K", label_.c_str(), bar.c_str(),
                 (long long)done, (long long)total_, rate, eta, extra.c_str());
  } else {
    std::fprintf(stderr, "%s %lld/%lld %.1f/s eta %.0fs %s\n", label_.c_str(), (long long)done, (long long)total_,
                 rate, eta, extra.c_str());
  }
}

void Progress::finish(const std::string& extra) {
  double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  std::fprintf(stderr, "%s%s done %lld in %.1fs %s\n", tty_ ? "\r" : "", label_.c_str(), (long long)total_, el,
               extra.c_str());
  if (tty_) std::fprintf(stderr, "\033[K");
}

}  // namespace emt
