#!/usr/bin/env bash
# Fresh machine -> installed packages, build, every test (ctest). Opt-in stages: EMT_TEST_SANITIZE=1 runs the fast
# tests under ASan+UBSan (build-asan/), EMT_TEST_FUZZ=1 builds the libFuzzer targets with clang and runs each for
# EMT_FUZZ_SECONDS (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
(cd build && ctest --output-on-failure -j "${EMT_TEST_JOBS:-2}" ${EMT_CTEST_ARGS:-})
if [ "${EMT_TEST_SANITIZE:-0}" = "1" ]; then
  echo "[test] fast tests under AddressSanitizer + UndefinedBehaviorSanitizer"
  EMT_BUILD_DIR=build-asan EMT_BUILD_TYPE=Debug EMT_CMAKE_ARGS="-DEMT_SANITIZE=ON -DEMT_BUILD_BENCH=OFF" \
    bash scripts/build.sh
  (cd build-asan && ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    ctest --output-on-failure -j 2 -LE slow -E 'consumer|\[slow\]')
fi
if [ "${EMT_TEST_FUZZ:-0}" = "1" ]; then
  bash scripts/fuzz.sh "${EMT_FUZZ_SECONDS:-20}"
fi
echo "[test] all passed"
