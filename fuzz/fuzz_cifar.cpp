// libFuzzer target: the CIFAR record parser (1 or 2 label bytes, chosen by the first input byte) must either split
// the buffer into whole records or throw emt::FormatError.
#include <emt/core/dataset.h>
#include <emt/core/error.h>

#include <cstdint>
#include <cstdlib>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const int label_bytes = 1 + (data[0] & 1);
  try {
    emt::CifarRecords r = emt::parse_cifar(data + 1, size - 1, label_bytes, "fuzz.bin");
    if (r.labels.size() != static_cast<size_t>(r.count) * label_bytes ||
        r.pixels.size() != static_cast<size_t>(r.count) * 3072)
      std::abort();
  } catch (const emt::FormatError&) {
  }
  return 0;
}
