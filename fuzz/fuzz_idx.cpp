// libFuzzer target: the IDX parser must either return a consistent array or throw emt::FormatError.
#include <emt/core/dataset.h>
#include <emt/core/error.h>

#include <cstdint>
#include <cstdlib>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    emt::IdxArray a = emt::parse_idx(data, size, "fuzz.idx");
    size_t total = 1;
    for (int64_t d : a.dims) total *= static_cast<size_t>(d);
    if (total != a.data.size()) std::abort();  // the parser promised dims match the data
  } catch (const emt::FormatError&) {
  }
  return 0;
}
