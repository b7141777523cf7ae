// Process groups over c10d: the environment a launcher sets, the TCP-store rendezvous, and the few collectives the
// trainer and the evaluator use, on Gloo (and NCCL where built).
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1  // the Gloo process group is part of every LibTorch emt builds against
#endif
#include <emt/core/distributed.h>
#include <emt/core/error.h>
#include "core/logging.h"
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef EMT_WITH_NCCL
#define USE_C10D_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/torch.h>

#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <limits>

namespace emt {

namespace {

const char* env_or_null(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

int env_int(const char* name, long lo, long hi) {
  const char* v = std::getenv(name);
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v, &end, 10);
  if (errno != 0 || end == v || *end != '\0' || x < lo || x > hi)
    throw ConfigError(fmt::format("[dist] environment variable {}='{}': expected an integer in [{}, {}]", name, v, lo,
                                  hi));
  return static_cast<int>(x);
}

bool is_loopback(const std::string& addr) {
  return addr == "localhost" || addr.rfind("127.", 0) == 0 || addr == "::1";
}

class C10dCommunicator : public Communicator {
 public:
  C10dCommunicator(const DistEnv& env, const ProcessGroupOptions& opts) : rank_(env.rank), world_(env.world_size) {
    const auto timeout = std::chrono::duration_cast<std::chrono::milliseconds>(opts.timeout);
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(env.master_port);
    so.isServer = env.rank == 0;
    so.numWorkers = static_cast<size_t>(env.world_size);
    so.waitWorkers = true;
    so.timeout = timeout;
    try {
      store_ = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    } catch (const std::exception& e) {
      throw IoError(fmt::format("[dist] rank {} of {}: the rendezvous at {}:{} failed (is rank 0 running, is the "
                                "port free and reachable?): {}", env.rank, env.world_size, env.master_addr,
                                env.master_port, first_line(e.what())));
    }
    auto go = c10d::ProcessGroupGloo::Options::create(timeout);
    if (const char* ifname = env_or_null("GLOO_SOCKET_IFNAME"))
      go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    else if (is_loopback(env.master_addr))
      go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    else
      go->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    try {
      gloo_ = c10::make_intrusive<c10d::ProcessGroupGloo>(c10::make_intrusive<c10d::PrefixStore>("gloo", store_),
                                                          env.rank, env.world_size, go);
    } catch (const std::exception& e) {
      throw IoError(fmt::format("[dist] rank {} of {}: the Gloo process group did not form: {}", env.rank,
                                env.world_size, first_line(e.what())));
    }
    std::string want = opts.backend;
    if (want == "auto") want = opts.device.is_cuda() && nccl_built() ? "nccl" : "gloo";
    if (want == "nccl") {
      if (!nccl_built())
        throw ConfigError("[dist] backend nccl: this build has no NCCL (configure with -DEMT_WITH_NCCL=ON against a "
                          "CUDA LibTorch); use gloo");
#ifdef EMT_WITH_NCCL
      auto no = c10d::ProcessGroupNCCL::Options::create();
      no->timeout = timeout;
      nccl_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(c10::make_intrusive<c10d::PrefixStore>("nccl", store_),
                                                          env.rank, env.world_size, no);
#endif
    } else if (want != "gloo") {
      throw ConfigError("[dist] backend '" + opts.backend + "': expected auto, gloo or nccl");
    }
    backend_ = want;
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  std::string backend() const override { return backend_; }

  void all_reduce_sum(torch::Tensor& t) override {
    run("all-reduce", t, [](auto& pg, std::vector<at::Tensor>& v) { return pg.allreduce(v); });  // SUM
  }

  void broadcast(torch::Tensor& t, int root) override {
    c10d::BroadcastOptions o;
    o.rootRank = root;
    run("broadcast", t, [&o](auto& pg, std::vector<at::Tensor>& v) { return pg.broadcast(v, o); });
  }

  std::vector<std::string> all_gather_bytes(const std::string& mine) override {
    auto sizes = torch::zeros({world_}, torch::kInt64);
    sizes[rank_] = static_cast<int64_t>(mine.size());
    all_reduce_sum(sizes);
    const int64_t longest = std::max<int64_t>(1, sizes.max().item<int64_t>());
    auto in = torch::zeros({longest}, torch::kUInt8);
    std::memcpy(in.data_ptr<uint8_t>(), mine.data(), mine.size());
    std::vector<std::vector<at::Tensor>> outs(1);
    for (int r = 0; r < world_; ++r) outs[0].push_back(torch::empty({longest}, torch::kUInt8));
    std::vector<at::Tensor> ins{in};
    wait("all-gather", [&] { return gloo_->allgather(outs, ins); });
    std::vector<std::string> got;
    for (int r = 0; r < world_; ++r)
      got.emplace_back(reinterpret_cast<const char*>(outs[0][static_cast<size_t>(r)].data_ptr<uint8_t>()),
                       static_cast<size_t>(sizes[r].item<int64_t>()));
    return got;
  }

  void barrier() override {
    wait("barrier", [&] { return gloo_->barrier(c10d::BarrierOptions()); });
  }

 private:
  static bool nccl_built() {
#ifdef EMT_WITH_NCCL
    return true;
#else
    return false;
#endif
  }
  static std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

  template <typename F>
  void wait(const char* what, F&& start) {
    try {
      start()->wait();
    } catch (const std::exception& e) {
      throw Error(fmt::format("[dist] rank {} of {}: {} failed (a rank died, or waited past the timeout): {}", rank_,
                              world_, what, first_line(e.what())));
    }
  }

  // A collective on `t`: on NCCL for a CUDA tensor where NCCL is up, else on Gloo (a CUDA tensor through a host
  // copy).
  template <typename F>
  void run(const char* what, torch::Tensor& t, F&& op) {
#ifdef EMT_WITH_NCCL
    if (t.is_cuda() && nccl_) {
      std::vector<at::Tensor> v{t.contiguous()};
      wait(what, [&] { return op(*nccl_, v); });
      if (!v[0].is_same(t)) t.copy_(v[0]);
      return;
    }
#endif
    std::vector<at::Tensor> v{t.is_cuda() ? t.cpu() : t.contiguous()};
    wait(what, [&] { return op(*gloo_, v); });
    if (!v[0].is_same(t)) t.copy_(v[0]);
  }

#ifdef EMT_WITH_NCCL
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl_;
#endif
  int rank_, world_;
  std::string backend_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo_;
};

}  // namespace

std::optional<DistEnv> dist_env_from_environment() {
  DistEnv e;
  if (env_or_null("WORLD_SIZE")) {
    e.world_size = env_int("WORLD_SIZE", 1, 1 << 20);
    if (e.world_size <= 1) return std::nullopt;
    if (!env_or_null("RANK")) throw ConfigError("[dist] WORLD_SIZE is set but RANK is not");
    e.rank = env_int("RANK", 0, e.world_size - 1);
    e.local_rank = env_or_null("LOCAL_RANK") ? env_int("LOCAL_RANK", 0, e.world_size - 1) : 0;
    if (const char* a = env_or_null("MASTER_ADDR")) e.master_addr = a;
    if (env_or_null("MASTER_PORT")) e.master_port = env_int("MASTER_PORT", 1, 65535);
    e.source = "env";
    return e;
  }
  // Only inside an srun step: the batch script itself (step "batch", 4294967294) is one process even with
  // --ntasks=N, and its emt would otherwise wait for ranks that never start.
  const char* step = env_or_null("SLURM_STEP_ID");
  const bool srun_step = step && std::string(step) != "4294967294" && std::string(step) != "4294967293";
  if (env_or_null("SLURM_NTASKS") && env_or_null("SLURM_PROCID") && srun_step) {
    e.world_size = env_int("SLURM_NTASKS", 1, 1 << 20);
    if (e.world_size <= 1) return std::nullopt;
    e.rank = env_int("SLURM_PROCID", 0, e.world_size - 1);
    e.local_rank = env_or_null("SLURM_LOCALID") ? env_int("SLURM_LOCALID", 0, e.world_size - 1) : 0;
    if (const char* a = env_or_null("MASTER_ADDR"))
      e.master_addr = a;
    else if (const char* b = env_or_null("SLURM_LAUNCH_NODE_IPADDR"))
      e.master_addr = b;
    if (env_or_null("MASTER_PORT"))
      e.master_port = env_int("MASTER_PORT", 1, 65535);
    else if (env_or_null("SLURM_JOB_ID"))
      e.master_port = 20000 + env_int("SLURM_JOB_ID", 0, std::numeric_limits<int>::max()) % 20000;
    e.source = "slurm";
    return e;
  }
  return std::nullopt;
}

std::shared_ptr<Communicator> init_process_group(const DistEnv& env, const ProcessGroupOptions& opts) {
  if (env.world_size < 2) throw ConfigError("[dist] init_process_group: world_size must be >= 2");
  if (env.rank < 0 || env.rank >= env.world_size)
    throw ConfigError(fmt::format("[dist] rank {} is not in [0, {})", env.rank, env.world_size));
  ProcessGroupOptions o = opts;
  if (env_or_null("EMT_DIST_TIMEOUT_S"))
    o.timeout = std::chrono::seconds(env_int("EMT_DIST_TIMEOUT_S", 1, 7 * 24 * 3600));
  return std::make_shared<C10dCommunicator>(env, o);
}

std::shared_ptr<Communicator> process_group_from_environment(const ProcessGroupOptions& opts) {
  auto env = dist_env_from_environment();
  if (!env) return nullptr;
  auto comm = init_process_group(*env, opts);
  log_info("[dist] rank {} of {} ({} via {}:{}, from {} variables)", env->rank, env->world_size, comm->backend(),
           env->master_addr, env->master_port, env->source == "slurm" ? "Slurm" : "launcher");
  return comm;
}

uint64_t tensor_fingerprint(const std::vector<torch::Tensor>& tensors) {
  uint64_t h = 1469598103934665603ull;
  for (const auto& t : tensors) {
    auto c = t.detach().to(torch::kCPU).contiguous();
    const auto* p = static_cast<const unsigned char*>(c.data_ptr());
    const size_t n = static_cast<size_t>(c.numel()) * c.element_size();
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ull;
  }
  return h;
}

}  // namespace emt
