#!/usr/bin/env bash
# Fresh machine -> installed packages, build, every test (ctest), then the fast tests again under
# AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/, Debug) and each libFuzzer target for
# EMT_FUZZ_SECONDS (default 20). EMT_TEST_SANITIZE=0 / EMT_TEST_FUZZ=0 skip those two stages (local iteration).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
(cd build && ctest --output-on-failure -j "${EMT_TEST_JOBS:-2}" ${EMT_CTEST_ARGS:-})
if [ "${EMT_TEST_SANITIZE:-1}" = "1" ]; then
  echo "[test] fast tests under AddressSanitizer + UndefinedBehaviorSanitizer"
  EMT_BUILD_DIR=build-asan EMT_BUILD_TYPE=Debug EMT_CMAKE_ARGS="-DEMT_SANITIZE=ON -DEMT_BUILD_BENCH=OFF" \
    bash scripts/build.sh
  (cd build-asan && ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    ctest --output-on-failure -j 2 -LE slow -E 'consumer|\[slow\]')
else
  echo "[test] sanitizer stage skipped (EMT_TEST_SANITIZE=0)"
fi
if [ "${EMT_TEST_FUZZ:-1}" = "1" ]; then
  bash scripts/fuzz.sh "${EMT_FUZZ_SECONDS:-20}"
else
  echo "[test] fuzz stage skipped (EMT_TEST_FUZZ=0)"
fi
echo "[test] all passed"
