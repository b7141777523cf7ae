// Data parallelism over PyTorch's own c10d process groups: Gloo (CPU tensors; CUDA tensors staged through host
// memory) and, in builds configured with EMT_WITH_NCCL against a CUDA LibTorch, NCCL for CUDA tensors. Ranks meet
// through a c10d TCP store. The trainer all-reduces gradients through a Communicator, the evaluator shards its
// batches and gathers the answers; rank 0 writes every file. No c10d or Gloo type appears in this header.
#pragma once
#include <torch/types.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace emt {

// Where this process stands in a multi-process job, as its launcher described it.
struct DistEnv {
  int rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source;  // "env" (RANK/WORLD_SIZE, as emt launch and torchrun set them) or "slurm"
};

// RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (emt launch, torchrun); else, inside an srun step (not
// in the batch script itself), SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID with MASTER_ADDR or else
// SLURM_LAUNCH_NODE_IPADDR, and MASTER_PORT or else 20000 + SLURM_JOB_ID % 20000. nullopt when neither names more
// than one process. ConfigError naming the variable when one is malformed or out of range.
std::optional<DistEnv> dist_env_from_environment();

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  bool is_main() const { return rank() == 0; }
  virtual std::string backend() const = 0;  // "gloo" | "nccl"
  // Sum over every rank, in place (float, double, int64 tensors on the CPU or a CUDA device).
  virtual void all_reduce_sum(torch::Tensor& t) = 0;
  // `root`'s values into every rank's tensor of the same shape and dtype, in place.
  virtual void broadcast(torch::Tensor& t, int root = 0) = 0;
  // Every rank's bytes, in rank order (any lengths).
  virtual std::vector<std::string> all_gather_bytes(const std::string& mine) = 0;
  virtual void barrier() = 0;
};

struct ProcessGroupOptions {
  std::string backend = "auto";  // auto (nccl for CUDA devices where built, else gloo) | gloo | nccl
  torch::Device device = torch::kCPU;  // where the trainer's tensors live
  // How long a collective (and the rendezvous) may wait for the slowest rank: rank 0 may be building the tiny
  // base model (minutes) while the others wait for it. EMT_DIST_TIMEOUT_S overrides it.
  std::chrono::seconds timeout{std::chrono::seconds(3600)};
};

// Joins the process group of `env` (rank 0 hosts the TCP store at master_addr:master_port). IoError naming the
// address when the rendezvous fails or times out; ConfigError when the backend is unknown or not built.
std::shared_ptr<Communicator> init_process_group(const DistEnv& env, const ProcessGroupOptions& opts = {});

// The process group a command should use: init_process_group(env) when dist_env_from_environment() names more
// than one process, else nullptr (a single process). Logs the rank, world size and backend.
std::shared_ptr<Communicator> process_group_from_environment(const ProcessGroupOptions& opts = {});

// True when `comm` is null or this is rank 0: the process that writes files and prints.
inline bool is_main_process(const Communicator* comm) { return comm == nullptr || comm->is_main(); }

// A 64-bit FNV-1a fingerprint of the bytes of `tensors` (copied to the host where needed), in order: equal on
// every rank exactly when the tensors are bitwise equal (up to hash collisions).
uint64_t tensor_fingerprint(const std::vector<torch::Tensor>& tensors);

}  // namespace emt
