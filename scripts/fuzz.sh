#!/usr/bin/env bash
# Builds the libFuzzer targets with clang and runs each for a bounded time: scripts/fuzz.sh [seconds-each].
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-20}"
CC=clang-14 CXX=clang++-14 EMT_BUILD_DIR=build-fuzz EMT_BUILD_TYPE=RelWithDebInfo \
  EMT_CMAKE_ARGS="-DEMT_BUILD_FUZZ=ON -DEMT_BUILD_TESTS=OFF -DEMT_BUILD_BENCH=OFF" bash scripts/build.sh
for f in build-fuzz/fuzz_*; do
  [ -x "$f" ] || continue
  name=$(basename "$f")
  corpus="build-fuzz/corpus/$name"; mkdir -p "$corpus"
  [ -d "fuzz/seeds/$name" ] && cp -n fuzz/seeds/"$name"/* "$corpus"/ 2>/dev/null || true
  echo "[fuzz] $name for ${SECS}s"
  ASAN_OPTIONS=detect_leaks=0 "$f" -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=65536 "$corpus" \
    2>build-fuzz/$name.log || { tail -50 build-fuzz/$name.log; echo "[fuzz] $name FAILED"; exit 1; }
  grep -E "^Done|stat::number_of_executed_units" build-fuzz/$name.log | tail -1 || true
done
