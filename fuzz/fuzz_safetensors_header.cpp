// libFuzzer target: arbitrary bytes as a safetensors file image (u64 LE header length + JSON + data).
// Only emt::Error may escape the parser; anything else (crash, std::bad_alloc, sanitizer report) is a bug.
#include <emt/core/error.h>
#include <emt/core/safetensors.h>

#include <cstddef>
#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  const uint64_t rest = size - 8;
  // A lying length is clamped exactly as the reader would reject it; the JSON gets what is really there.
  const uint64_t hn = n < rest ? n : rest;
  const std::string header(reinterpret_cast<const char*>(data + 8), hn);
  try {
    auto infos = emt::parse_safetensors_header(header, rest - hn, "fuzz.safetensors");
    for (const auto& t : infos)
      if (t.begin > t.end || t.end > rest - hn) __builtin_trap();  // the validator must have caught this
  } catch (const emt::Error&) {
  }
  return 0;
}
