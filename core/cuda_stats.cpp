// What this build has: peak GPU memory from LibTorch's CUDA caching allocator (compiled with EMT_WITH_CUDA_STATS only
// when the LibTorch build has CUDA libraries and the CUDA runtime headers are at hand, cmake/emtTorch.cmake;
// otherwise the figure is reported as unavailable) and the optional parts CMake was configured with.
#include <emt/core/runtime.h>

#ifdef EMT_WITH_CUDA_STATS
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif
#ifdef EMT_WITH_OPENCV
#include <opencv2/core/version.hpp>
#endif

namespace emt {

bool built_with_cuda_stats() {
#ifdef EMT_WITH_CUDA_STATS
  return true;
#else
  return false;
#endif
}

bool built_with_opencv() {
#ifdef EMT_WITH_OPENCV
  return true;
#else
  return false;
#endif
}

bool built_with_plots() {
#ifdef EMT_WITH_PLOTS
  return true;
#else
  return false;
#endif
}

bool built_with_curl() {
#ifdef EMT_WITH_CURL
  return true;
#else
  return false;
#endif
}

std::string build_features() {
  std::string s;
#ifdef EMT_WITH_OPENCV
  s += "OpenCV " CV_VERSION;
#else
  s += "stb_image (no OpenCV)";
#endif
  s += built_with_plots() ? ", PLplot" : ", no PLplot";
  s += built_with_curl() ? ", libcurl" : ", no libcurl";
  s += built_with_cuda_stats() ? ", CUDA allocator statistics" : "";
  return s;
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

bool cuda_sync_errors(bool on) {
#ifdef EMT_WITH_CUDA_STATS
  c10::cuda::warning_state().set_sync_debug_mode(on ? c10::cuda::SyncDebugMode::L_ERROR
                                                    : c10::cuda::SyncDebugMode::L_DISABLED);
  return true;
#else
  return false;
#endif
}

void reset_device_peak(const torch::Device& dev) {
  if (!dev.is_cuda()) return;
#ifdef EMT_WITH_CUDA_STATS
  c10::cuda::CUDACachingAllocator::resetPeakStats(dev.has_index() ? dev.index() : 0);
#endif
}

}  // namespace emt
