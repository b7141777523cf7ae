// Runtime basics: device and dtype selection, intra-op threads, seeding every RNG, atomic file writes.
#pragma once
#include <torch/types.h>

#include <cstdint>
#include <string>

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

// Writes bytes to `path` through a temporary file in the same directory + fsync + rename, so readers only ever
// see the old or the new content. Throws IoError naming the path (disk full, permission, ...).
void write_file_atomic(const std::string& path, const std::string& bytes);
std::string read_file(const std::string& path);  // throws IoError naming the path
// Atomically replaces directory `final_dir` by `tmp_dir`: an existing final_dir is swapped in one step
// (renameat2 RENAME_EXCHANGE), so readers see the old or the new copy, never neither; the old one is removed.
void commit_dir_atomic(const std::string& tmp_dir, const std::string& final_dir);

}  // namespace emt
