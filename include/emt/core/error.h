// The emt exception family. Library code throws these; only cli/ catches them and maps them to exit codes.
#pragma once
#include <stdexcept>
#include <string>

namespace emt {

// Base of every error emt raises on purpose. Messages name the component, file, key/tensor, expected and actual.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// Invalid configuration or command-line usage (exit code 2).
class ConfigError : public Error {
 public:
  using Error::Error;
};

// A file or directory could not be read or written.
class IoError : public Error {
 public:
  using Error::Error;
};

// A file was read but its content is malformed (bad header, wrong size, lying offsets ...).
class FormatError : public Error {
 public:
  using Error::Error;
};

// Thrown at a safe point after a SIGTERM/SIGUSR1 (a preemption notice) once everything done so far is on disk
// (a checkpoint, finished result rows); `emt` exits 75 and a rerun continues from there.
class Preempted : public Error {
 public:
  using Error::Error;
};

}  // namespace emt
