#!/usr/bin/env bash
# Runs the libFuzzer targets for a bounded time each: scripts/fuzz.sh [seconds-each] (default 20).
# Needs the main build (scripts/build.sh): it is installed into build-fuzz/prefix, and only the fuzz targets and
# the parser sources they exercise are compiled with clang (fuzz/CMakeLists.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-20}"
BUILD="${EMT_BUILD_DIR:-build}"
[ -f "$BUILD/build.ninja" ] || { echo "[fuzz] no main build in $BUILD: run scripts/build.sh first" >&2; exit 2; }
cmake --install "$BUILD" --prefix build-fuzz/prefix >/dev/null
cmake -S fuzz -B build-fuzz/targets -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++-14 \
  -DCMAKE_PREFIX_PATH="$PWD/build-fuzz/prefix" >/dev/null
cmake --build build-fuzz/targets -j "${EMT_JOBS:-2}"
for name in fuzz_idx fuzz_cifar fuzz_safetensors_header; do
  f="build-fuzz/targets/$name"
  corpus="build-fuzz/corpus/$name"; mkdir -p "$corpus"
  [ -d "fuzz/seeds/$name" ] && cp -n fuzz/seeds/"$name"/* "$corpus"/ 2>/dev/null || true
  echo "[fuzz] $name for ${SECS}s"
  LD_LIBRARY_PATH="$PWD/build-fuzz/prefix/lib:${LD_LIBRARY_PATH:-}" ASAN_OPTIONS=detect_leaks=0 \
    "$f" -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=65536 "$corpus" \
    >"build-fuzz/$name.log" 2>&1 || { tail -50 "build-fuzz/$name.log"; echo "[fuzz] $name FAILED (crash input above)"; exit 1; }
  grep -E "^Done [0-9]+ runs" "build-fuzz/$name.log" | tail -1 || true
done
