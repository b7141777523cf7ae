// Device/dtype resolution, threads, seeding, atomic file and directory commits.
#include <emt/core/config.h>
#include <emt/core/error.h>
#include <emt/core/runtime.h>
#include <dlfcn.h>
#include <cstdlib>
#include <fcntl.h>
#include <stdio.h>  // renameat2, RENAME_EXCHANGE (glibc >= 2.28)
#include <ATen/autocast_mode.h>
#include <sys/resource.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

namespace emt {
namespace fs = std::filesystem;

torch::Device resolve_device(const std::string& spec) {
  if (spec == "auto") return torch::cuda::is_available() ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  if (spec == "cpu") return torch::Device(torch::kCPU);
  if (spec == "cuda" || spec.rfind("cuda:", 0) == 0) {
    int index = 0;
    if (spec.size() > 5) {
      const std::string num = spec.substr(5);
      if (num.empty() || num.find_first_not_of("0123456789") != std::string::npos)
        throw ConfigError("[runtime] run.device: bad CUDA index in '" + spec + "' (expected cuda:N)");
      index = std::stoi(num);
    }
    if (!torch::cuda::is_available())
      throw ConfigError("[runtime] run.device: '" + spec + "' requested but this LibTorch build sees no CUDA device");
    if (index >= static_cast<int>(torch::cuda::device_count()))
      throw ConfigError("[runtime] run.device: '" + spec + "' but only " +
                        std::to_string(torch::cuda::device_count()) + " CUDA device(s) exist");
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  throw ConfigError("[runtime] run.device: unknown device '" + spec + "' (expected auto, cpu, cuda or cuda:N)");
}

torch::ScalarType parse_dtype(const std::string& name) {
  if (name == "f32" || name == "float32" || name == "fp32") return torch::kFloat32;
  if (name == "bf16" || name == "bfloat16") return torch::kBFloat16;
  if (name == "f16" || name == "float16" || name == "fp16") return torch::kFloat16;
  throw ConfigError("[runtime] unknown dtype '" + name + "' (expected f32, bf16 or f16)");
}

std::string dtype_name(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return "f32";
    case torch::kBFloat16: return "bf16";
    case torch::kFloat16: return "f16";
    case torch::kFloat64: return "f64";
    case torch::kInt64: return "i64";
    case torch::kInt32: return "i32";
    case torch::kInt16: return "i16";
    case torch::kInt8: return "i8";
    case torch::kUInt8: return "u8";
    case torch::kBool: return "bool";
    default: return c10::toString(t);
  }
}

int set_threads(int n) {
  if (n < 0) throw ConfigError("[runtime] run.threads must be >= 0 (0 = all cores), got " + std::to_string(n));
  int want = n == 0 ? static_cast<int>(std::max(1u, std::thread::hardware_concurrency())) : n;
  torch::set_num_threads(want);
  return torch::get_num_threads();
}

void set_deterministic(bool on) {
  // warn_only: an op without a deterministic kernel warns instead of failing the run ("where available").
  at::globalContext().setDeterministicAlgorithms(on, /*warn_only=*/true);
  at::globalContext().setDeterministicCuDNN(on);
  at::globalContext().setBenchmarkCuDNN(!on);
}

int apply_run_section(const RunSection& run) {
  int threads = set_threads(run.threads);
  seed_everything(static_cast<uint64_t>(run.seed));
  set_deterministic(run.deterministic);
  return threads;
}

void seed_everything(uint64_t seed) {
  torch::manual_seed(seed);
  if (torch::cuda::is_available()) torch::cuda::manual_seed_all(seed);
  std::srand(static_cast<unsigned>(seed));
}

namespace {
[[noreturn]] void io_fail(const std::string& what, const std::string& path, int err) {
  throw IoError("[io] " + what + " '" + path + "': " + std::strerror(err));
}
void fsync_dir(const fs::path& dir) {
  int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}
}  // namespace

void write_file_atomic(const std::string& path, const std::string& bytes) {
  fs::path p(path);
  std::error_code ec;
  if (p.has_parent_path()) fs::create_directories(p.parent_path(), ec);
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) io_fail("cannot create", tmp, errno);
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t w = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (w < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      io_fail("write failed for", path, e);
    }
    off += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0) {
    int e = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    io_fail("fsync failed for", path, e);
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    ::unlink(tmp.c_str());
    io_fail("rename failed for", path, e);
  }
  fsync_dir(p.parent_path());
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw IoError("[io] cannot open '" + path + "': " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw IoError("[io] read failed for '" + path + "'");
  return ss.str();
}

void commit_dir_atomic(const std::string& tmp_dir, const std::string& final_dir) {
  std::error_code ec;
  fs::path fin(final_dir);
  if (!fs::exists(tmp_dir)) throw IoError("[io] cannot commit '" + final_dir + "': staging dir '" + tmp_dir + "' is missing");
  if (fs::exists(fin)) {
    // Swap the two directories in one step, so that a reader always finds either the old or the new copy at
    // final_dir (never none); the old copy then lies at tmp_dir and is removed.
    if (::renameat2(AT_FDCWD, tmp_dir.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
      fsync_dir(fin.parent_path());
      fs::remove_all(tmp_dir, ec);
      return;
    }
    if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP)
      io_fail("cannot exchange '" + tmp_dir + "' with", final_dir, errno);
    // A file system without RENAME_EXCHANGE: move the old copy aside first. Readers skip '.old.' names, so for
    // the moment between the two renames final_dir is absent; the old copy is put back if the second fails.
    fs::path old = fin;
    old += ".old." + std::to_string(::getpid());
    fs::remove_all(old, ec);
    fs::rename(fin, old, ec);
    if (ec) throw IoError("[io] cannot move old '" + final_dir + "' aside: " + ec.message());
    fs::rename(tmp_dir, fin, ec);
    if (ec) {
      fs::rename(old, fin);
      throw IoError("[io] cannot rename '" + tmp_dir + "' to '" + final_dir + "': " + ec.message());
    }
    fsync_dir(fin.parent_path());
    fs::remove_all(old, ec);
    return;
  }
  fs::rename(tmp_dir, fin, ec);
  if (ec) throw IoError("[io] cannot rename '" + tmp_dir + "' to '" + final_dir + "': " + ec.message());
  fsync_dir(fin.parent_path());
}

// LibTorch 2.4 replaced the per-device autocast accessors by ones taking a device type; both spellings do the
// same thing.
AutocastState autocast_state(torch::DeviceType type) {
  AutocastState s;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  s.enabled = at::autocast::is_autocast_enabled(type);
  s.dtype = at::autocast::get_autocast_dtype(type);
#else
  if (type == torch::kCUDA) {
    s.enabled = at::autocast::is_enabled();
    s.dtype = at::autocast::get_autocast_gpu_dtype();
  } else {
    s.enabled = at::autocast::is_cpu_enabled();
    s.dtype = at::autocast::get_autocast_cpu_dtype();
  }
#endif
  return s;
}

void set_autocast_state(torch::DeviceType type, const AutocastState& s) {
  const bool was = autocast_state(type).enabled;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 4)
  at::autocast::set_autocast_dtype(type, s.dtype);
  at::autocast::set_autocast_enabled(type, s.enabled);
#else
  if (type == torch::kCUDA) {
    at::autocast::set_autocast_gpu_dtype(s.dtype);
    at::autocast::set_enabled(s.enabled);
  } else {
    at::autocast::set_autocast_cpu_dtype(s.dtype);
    at::autocast::set_cpu_enabled(s.enabled);
  }
#endif
  if (was && !s.enabled) at::autocast::clear_cache();  // casts of weights are cached while autocast is on
}

AutocastScope::AutocastScope(torch::DeviceType type, const AutocastState& s)
    : type_(type), prev_(autocast_state(type)) {
  set_autocast_state(type_, s);
}

AutocastScope::~AutocastScope() { set_autocast_state(type_, prev_); }

std::string blas_kernels() {
  const char* env = std::getenv("OPENBLAS_CORETYPE");
  const std::string forced = env ? std::string("OPENBLAS_CORETYPE=") + env : "OPENBLAS_CORETYPE unset";
  using CoreName = char* (*)();
  auto core = reinterpret_cast<CoreName>(dlsym(RTLD_DEFAULT, "openblas_get_corename"));
  if (!core) return "not OpenBLAS (" + forced + ")";
  const char* name = core();
  return std::string("OpenBLAS ") + (name ? name : "?") + " (" + forced + ")";
}

double host_peak_rss_mb() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / 1024.0;  // Linux reports KiB
}

std::vector<std::pair<std::string, torch::Tensor>> generator_states() {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  auto state_of = [](const torch::Device& d) {
    at::Generator gen = torch::globalContext().defaultGenerator(d);  // a handle to the global one
    std::lock_guard<std::mutex> lock(gen.mutex());
    return gen.get_state();
  };
  out.emplace_back("cpu", state_of(torch::Device(torch::kCPU)));
  const auto n = torch::cuda::device_count();
  for (size_t i = 0; i < n; ++i)
    out.emplace_back("cuda:" + std::to_string(i),
                     state_of(torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(i))));
  return out;
}

std::vector<std::string> set_generator_states(const std::vector<std::pair<std::string, torch::Tensor>>& states) {
  std::vector<std::string> unmatched;
  const auto n = torch::cuda::device_count();
  for (const auto& [name, state] : states) {
    torch::Device dev(torch::kCPU);
    if (name != "cpu") {
      if (name.rfind("cuda:", 0) != 0)
        throw FormatError("[runtime] generator state '" + name + "': expected cpu or cuda:<index>");
      const size_t i = std::stoul(name.substr(5));
      if (i >= n) {
        unmatched.push_back(name);
        continue;
      }
      dev = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(i));
    }
    at::Generator gen = torch::globalContext().defaultGenerator(dev);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(state);
  }
  return unmatched;
}

namespace {
std::atomic<int> g_preempt{0};
std::atomic<int> g_scopes{0};
struct sigaction g_old_term {}, g_old_usr1 {};
extern "C" void on_preempt_signal(int sig) { g_preempt = sig; }
}  // namespace

PreemptionScope::PreemptionScope(bool on) : on_(on) {
  if (!on_ || g_scopes++ > 0) return;
  struct sigaction sa {};
  sa.sa_handler = on_preempt_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, &g_old_term);
  sigaction(SIGUSR1, &sa, &g_old_usr1);
}

PreemptionScope::~PreemptionScope() {
  if (!on_ || --g_scopes > 0) return;
  sigaction(SIGTERM, &g_old_term, nullptr);
  sigaction(SIGUSR1, &g_old_usr1, nullptr);
}

int pending_preemption() { return g_preempt.load(); }
int take_preemption() { return g_preempt.exchange(0); }

void throw_if_preempted(const std::string& where) {
  if (int sig = take_preemption())
    throw Preempted("received signal " + std::to_string(sig) + ": " + where);
}

void fault_point(const char* phase) {
  static const char* spec = std::getenv("EMT_FAULT_SIGNAL_AT");
  if (spec && std::strcmp(spec, phase) == 0) ::kill(::getpid(), SIGUSR1);
}

}  // namespace emt
