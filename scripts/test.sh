#!/usr/bin/env bash
# Fresh machine -> installed packages, build, every test (ctest) against Debian's LibTorch 1.13; the pinned
# Python references (.venv, from PyPI) and every test again against the wheel's LibTorch 2.x (build-torch2/);
# the interop checks against transformers / peft / safetensors / tokenizers / the real CLIP tokenizer; then the
# fast tests under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/, Debug) and each libFuzzer target
# for EMT_FUZZ_SECONDS (default 20). After the first suite, sweeps run on a real one-node Slurm cluster
# (scripts/slurm-test.sh); after the 2.x suite, scripts/gpu-check.sh --dry-run builds what a GPU machine without
# Debian packages builds, from gpu-deps/ alone. EMT_TEST_SLURM=0, EMT_TEST_TORCH2=0, EMT_TEST_GPU_CHECK=0,
# EMT_TEST_INTEROP=0, EMT_TEST_SANITIZE=0 and EMT_TEST_FUZZ=0 skip a stage (local iteration); CI runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS; tstage=$SECONDS
stage_done() { echo "[test] $1: $((SECONDS - tstage)) s (total $((SECONDS - t0)) s)"; tstage=$SECONDS; }
bash scripts/setup.sh
stage_done "packages"
# The pinned Python references download while the first build compiles (network-bound; log in .venv-setup.log).
venv_pid=""
if [ "${EMT_TEST_TORCH2:-1}" = "1" ] || [ "${EMT_TEST_INTEROP:-1}" = "1" ]; then
  bash scripts/setup-python.sh > .venv-setup.log 2>&1 &
  venv_pid=$!
fi
wait_venv() {
  if [ -n "$venv_pid" ]; then
    if ! wait "$venv_pid"; then cat .venv-setup.log; echo "[test] scripts/setup-python.sh failed"; exit 1; fi
    cat .venv-setup.log
    venv_pid=""
  fi
}
bash scripts/build.sh
stage_done "build (LibTorch 1.13)"
(cd build && ctest --output-on-failure -j "${EMT_TEST_JOBS:-2}" ${EMT_CTEST_ARGS:-})
stage_done "tests (LibTorch 1.13)"
if [ "${EMT_TEST_SLURM:-1}" = "1" ]; then
  echo "[test] sweeps on a real one-node Slurm cluster (slurm-wlm, munge; as root)"
  bash scripts/slurm-test.sh
  stage_done "Slurm"
else
  echo "[test] Slurm stage skipped (EMT_TEST_SLURM=0)"
fi
if [ "${EMT_TEST_TORCH2:-1}" = "1" ]; then
  echo "[test] the same suite against LibTorch 2.x (the pinned PyTorch wheel's LibTorch, build-torch2/)"
  wait_venv
  bash scripts/build-torch2.sh
  stage_done "build (LibTorch 2.x)"
  (cd build-torch2 && ctest --output-on-failure -j "${EMT_TEST_JOBS:-2}" ${EMT_CTEST_ARGS:-})
  stage_done "tests (LibTorch 2.x)"
else
  echo "[test] LibTorch 2.x stage skipped (EMT_TEST_TORCH2=0)"
fi
if [ "${EMT_TEST_GPU_CHECK:-1}" = "1" ]; then
  echo "[test] scripts/gpu-check.sh --dry-run: the GPU machine's build from gpu-deps/ and the wheel alone, on the CPU"
  wait_venv
  bash scripts/gpu-check.sh --dry-run
  stage_done "GPU check (dry run)"
else
  echo "[test] GPU check dry run skipped (EMT_TEST_GPU_CHECK=0)"
fi
if [ "${EMT_TEST_INTEROP:-1}" = "1" ]; then
  echo "[test] interop checks against the real Python libraries"
  wait_venv
  bash scripts/setup-python.sh
  bash scripts/interop.sh
  stage_done "interop"
else
  echo "[test] interop stage skipped (EMT_TEST_INTEROP=0)"
fi
if [ "${EMT_TEST_SANITIZE:-1}" = "1" ]; then
  echo "[test] fast tests under AddressSanitizer + UndefinedBehaviorSanitizer"
  # The test program and what it runs (the library, the emt program); not the GPU or interop programs.
  EMT_BUILD_DIR=build-asan EMT_BUILD_TYPE=Debug EMT_CMAKE_ARGS="-DEMT_SANITIZE=ON" \
    EMT_TARGETS=emt_tests bash scripts/build.sh
  stage_done "build (sanitizers)"
  # [slow] tests are not registered there; the consumer test is labelled slow, the GPU program gpu.
  (cd build-asan && ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    ctest --output-on-failure -j 2 -LE 'slow|gpu')
  stage_done "tests (sanitizers)"
else
  echo "[test] sanitizer stage skipped (EMT_TEST_SANITIZE=0)"
fi
if [ "${EMT_TEST_FUZZ:-1}" = "1" ]; then
  bash scripts/fuzz.sh "${EMT_FUZZ_SECONDS:-20}"
  stage_done "fuzz"
else
  echo "[test] fuzz stage skipped (EMT_TEST_FUZZ=0)"
fi
echo "[test] all passed"
