// What every benchmark shares: the median of repeated timings (these machines are noisy; medians, not means).
#pragma once
#include <algorithm>
#include <vector>

namespace emt_bench {

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace emt_bench
