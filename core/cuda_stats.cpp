// Peak GPU memory from LibTorch's CUDA caching allocator. Compiled with EMT_WITH_CUDA_STATS only when the
// LibTorch build has CUDA libraries and the CUDA runtime headers are at hand (cmake/emtTorch.cmake); otherwise
// the figure is reported as unavailable.
#include <emt/core/runtime.h>

#ifdef EMT_WITH_CUDA_STATS
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace emt {

bool built_with_cuda_stats() {
#ifdef EMT_WITH_CUDA_STATS
  return true;
#else
  return false;
#endif
}

double device_peak_allocated_mb(const torch::Device& dev) {
  if (!dev.is_cuda()) return -1.0;
#ifdef EMT_WITH_CUDA_STATS
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(dev.has_index() ? dev.index() : 0);
  // Index 0 of every statistic array is the aggregate over small and large pools (StatType::AGGREGATE).
  return static_cast<double>(stats.allocated_bytes[0].peak) / (1024.0 * 1024.0);
#else
  return -1.0;
#endif
}

}  // namespace emt
