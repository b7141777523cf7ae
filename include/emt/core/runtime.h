// Runtime basics: device and dtype selection, intra-op threads, seeding every RNG, atomic file writes.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace emt {

// "auto" -> cuda:0 when CUDA is available else cpu; "cpu"; "cuda"; "cuda:N". Throws ConfigError otherwise.
torch::Device resolve_device(const std::string& spec);
// "f32"|"float32", "bf16"|"bfloat16", "f16"|"float16" -> scalar type. Throws ConfigError otherwise.
torch::ScalarType parse_dtype(const std::string& name);
std::string dtype_name(torch::ScalarType t);  // canonical short name: f32, bf16, f16, f64, i64 ...
// 0 = all hardware cores. LibTorch may start with one thread, so callers always set this explicitly.
int set_threads(int n);
// Seeds torch (CPU + CUDA) and the C++ std RNG used by emt (data order uses its own explicit generators).
void seed_everything(uint64_t seed);
// run.deterministic: deterministic algorithms where LibTorch has them (others warn), cuDNN deterministic and
// without autotuning.
void set_deterministic(bool on);
struct RunSection;
// The process-wide part of a run section, applied once by each entry point: run.threads, run.seed and
// run.deterministic. Returns the intra-op thread count in effect.
int apply_run_section(const RunSection& run);

// Autocast of one device type (CPU or CUDA): on/off and the dtype it casts to. The state is thread-local.
struct AutocastState {
  bool enabled = false;
  torch::ScalarType dtype = torch::kBFloat16;
};
AutocastState autocast_state(torch::DeviceType type);
void set_autocast_state(torch::DeviceType type, const AutocastState& s);  // leaving autocast clears its cache
// Sets an autocast state for a scope and restores the previous one on exit, also when the scope throws.
class AutocastScope {
 public:
  AutocastScope(torch::DeviceType type, const AutocastState& s);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  torch::DeviceType type_;
  AutocastState prev_;
};

// Peak memory: the process's peak resident set (host RSS), and the caching allocator's peak of allocated bytes
// on a CUDA device (negative when this build has no CUDA allocator statistics or the device is not CUDA).
double host_peak_rss_mb();
// The BLAS kernels this process computes with, e.g. "OpenBLAS SkylakeX (OPENBLAS_CORETYPE unset)": OpenBLAS's
// core name when OpenBLAS is loaded, else "not OpenBLAS". Training numerics (and the tiny base model) depend on it.
std::string blas_kernels();
double device_peak_allocated_mb(const torch::Device& dev);
// While on, every synchronisation with a CUDA device (a device-to-host copy, .item(), a blocking stream wait) is an
// error (c10's sync debug mode); false when this build cannot ask for it (no CUDA runtime headers at build time).
bool cuda_sync_errors(bool on);
// Starts the peak that device_peak_allocated_mb reports again from what is allocated now (no-op off CUDA).
void reset_device_peak(const torch::Device& dev);
bool built_with_cuda_stats();
// The optional parts this build has (CMake's EMT_WITH_OPENCV, EMT_WITH_PLOTS, EMT_WITH_CURL): OpenCV (image codecs,
// the synthetic sets, contact sheets; without it stb_image decodes), PLplot (the report's figures), libcurl (the
// HTTP judge). build_features() lists them, e.g. "OpenCV 4.6.0, PLplot, libcurl, CUDA allocator statistics".
bool built_with_opencv();
bool built_with_plots();
bool built_with_curl();
std::string build_features();

// States of the default generators, for checkpoints: "cpu" and "cuda:<i>" for every visible CUDA device.
std::vector<std::pair<std::string, torch::Tensor>> generator_states();
// Restores what generator_states() saved. CUDA states for devices this process does not see are reported in
// the returned list (the caller warns: dropout on those devices will not continue exactly).
std::vector<std::string> set_generator_states(const std::vector<std::pair<std::string, torch::Tensor>>& states);

// Preemption notices (SIGTERM, SIGUSR1: Slurm's --signal, a scheduler's kill). While a PreemptionScope is alive
// they set a flag instead of ending the process; long work checks it at safe points (after an optimizer step and
// its checkpoint, after a phase's results are written) and throws Preempted (emt exits 75). Scopes nest: the
// outermost installs the handlers and restores the previous ones; a notice stays pending until taken.
class PreemptionScope {
 public:
  explicit PreemptionScope(bool on = true);
  ~PreemptionScope();
  PreemptionScope(const PreemptionScope&) = delete;
  PreemptionScope& operator=(const PreemptionScope&) = delete;

 private:
  bool on_;
};
int pending_preemption();  // the signal number of a pending notice, or 0
int take_preemption();     // the same, and clears it
// Throws Preempted naming `where` (what is safely on disk, how to continue) when a notice is pending.
void throw_if_preempted(const std::string& where);
// Test hook: EMT_FAULT_SIGNAL_AT=<phase> makes fault_point(phase) send this process SIGUSR1.
void fault_point(const char* phase);

// Writes bytes to `path` through a temporary file in the same directory + fsync + rename, so readers only ever
// see the old or the new content. Throws IoError naming the path (disk full, permission, ...).
void write_file_atomic(const std::string& path, const std::string& bytes);
std::string read_file(const std::string& path);  // throws IoError naming the path
// Atomically replaces directory `final_dir` by `tmp_dir`: an existing final_dir is swapped in one step
// (renameat2 RENAME_EXCHANGE), so readers see the old or the new copy, never neither; the old one is removed.
void commit_dir_atomic(const std::string& tmp_dir, const std::string& final_dir);

}  // namespace emt
