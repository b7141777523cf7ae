#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, PyTorch 2.x with CUDA in python3, nvcc, CMake and ninja, but no
# network and no Debian packages. It builds emt against the wheel's LibTorch from the source tree and gpu-deps/
# (made beforehand by scripts/gpu-deps.sh on a machine with scripts/setup.sh's packages, about 6 MiB), checks that
# the build took nothing from outside those, runs the [gpu] tests, then benchmarks a llava-1.5-7b-shaped model with
# random weights in bf16: the LoRA training step (ms/step, tokens/s, MFU at 4N FLOPs per token against 989
# TFLOP/s, peak GPU memory; attention through SDPA) and EMT-style generation, batch 1 against batched. Everything
# it prints also goes to one log file. Within 10 minutes on a 16-core H100/H200 machine (the build is most of it).
#
#   scripts/gpu-check.sh [--dry-run] [--log FILE] [--deps DIR] [--build-dir DIR] [--python PY]
#
# --dry-run: the same steps on a machine without a GPU (CI runs it): gpu-deps/ is made if missing, CMake may not
#   look under /usr or /usr/local and pkg-config only into gpu-deps/ (as on a machine without Debian's -dev
#   packages), the [gpu] tests must report themselves skipped (exit 77), and the benchmarks run the tiny model on
#   the CPU. Default python: .venv/bin/python (scripts/setup-python.sh).
# The log: --log, else $EMT_GPU_CHECK_LOG, else $OUT/gpu-check.log when $OUT is a folder, else BUILD/gpu-check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
LOG="${EMT_GPU_CHECK_LOG:-}"
DEPS="gpu-deps"
BUILD="build-gpu"
PY="${EMT_GPU_PYTHON:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --log) LOG="$2"; shift ;;
    --deps) DEPS="$2"; shift ;;
    --build-dir) BUILD="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$PY" ]; then
  if [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -z "$LOG" ]; then
  if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then LOG="$OUT/gpu-check.log"; else LOG="$BUILD/gpu-check.log"; fi
fi
mkdir -p "$(dirname "$LOG")" "$BUILD"
exec > >(tee "$LOG") 2>&1
t0=$SECONDS; tstep=$SECONDS
step() { echo; echo "== [gpu-check] $1 (at $((SECONDS - t0)) s)"; tstep=$SECONDS; }
done_step() { echo "-- $1: $((SECONDS - tstep)) s"; }
fail() { echo "gpu-check: FAILED: $*"; exit 1; }
trap 'echo "gpu-check: stopped by an error at line $LINENO after $((SECONDS - t0)) s (log: $LOG)"' ERR

step "machine"
echo "mode: $([ "$DRY" = 1 ] && echo "dry run (no GPU needed)" || echo "GPU"); log: $LOG; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "host: $(uname -srm), $(nproc) cores; $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")"
command -v "$PY" >/dev/null 2>&1 || [ -x "$PY" ] || fail "no Python interpreter '$PY' (--python)"
"$PY" - <<'EOF' || fail "$PY cannot import torch"
import torch
print(f"PyTorch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"{torch.cuda.device_count()} CUDA device(s) visible")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
EOF
if [ "$DRY" = 0 ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    fail "PyTorch sees no CUDA device (use --dry-run on a machine without one)"
fi
for tool in cmake ninja c++; do command -v "$tool" >/dev/null 2>&1 || fail "'$tool' is not on PATH"; done
echo "$(cmake --version | head -1); ninja $(ninja --version); $(c++ --version | head -1)"
if command -v nvcc >/dev/null 2>&1; then echo "nvcc: $(nvcc --version | tail -1)"; else echo "nvcc: not on PATH"; fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv,noheader || true

step "dependencies ($DEPS)"
if [ ! -d "$DEPS" ]; then
  [ "$DRY" = 1 ] || fail "no $DEPS/: make it with scripts/gpu-deps.sh on a machine with scripts/setup.sh's packages and copy it here"
  bash scripts/gpu-deps.sh "$DEPS"
fi
DEPS="$(cd "$DEPS" && pwd)"
[ -f "$DEPS/MANIFEST.txt" ] || fail "$DEPS has no MANIFEST.txt: not a folder made by scripts/gpu-deps.sh"
cat "$DEPS/MANIFEST.txt"
echo "size: $(du -sh "$DEPS" | cut -f1)"
done_step "dependencies"

step "configure ($BUILD)"
TORCH_PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
TORCH_ROOT="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
SITE="$(dirname "$TORCH_ROOT")"
ARCHDIR="$DEPS/usr/lib/x86_64-linux-gnu"
nsrc=$(ls core/*.cpp adapters/*.cpp train/*.cpp eval/*.cpp | wc -l)
batch=$(( (nsrc + $(nproc) - 1) / $(nproc) ))
[ "$batch" -lt 4 ] && batch=4
[ "$batch" -gt 16 ] && batch=16
cmake_args=(-S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEMT_TORCH_IMPORT=libraries
  "-DCMAKE_PREFIX_PATH=$TORCH_PREFIX;$DEPS/usr" -DEMT_WITH_OPENCV=OFF -DEMT_WITH_PLOTS=OFF -DEMT_WITH_CURL=OFF
  -DEMT_BUILD_SUITE=OFF -DEMT_UNITY_BATCH="$batch"
  "-Dyaml-cpp_DIR=$ARCHDIR/cmake/yaml-cpp" "-Dfmt_DIR=$ARCHDIR/cmake/fmt"
  "-Dnlohmann_json_DIR=$DEPS/usr/share/cmake/nlohmann_json" "-DCatch2_DIR=$DEPS/usr/lib/cmake/Catch2"
  "-DZLIB_ROOT=$DEPS/usr" "-DEMT_STB_INCLUDE=$DEPS/usr/include/stb" "-DEMT_GLOO_INCLUDE=$DEPS/usr/include")
# pkg-config sees the folder only (sentencepiece, an optional plug-in, is then left out, as on the GPU machine).
export PKG_CONFIG_LIBDIR="$ARCHDIR/pkgconfig:$DEPS/usr/share/pkgconfig"
[ "$DRY" = 1 ] && cmake_args+=("-DCMAKE_IGNORE_PREFIX_PATH=/usr;/usr/local")
cmake "${cmake_args[@]}" | grep -E "^-- emt|Error|error" || true
[ -f "$BUILD/build.ninja" ] || fail "CMake did not configure $BUILD (its output is above)"
done_step "configure (unity batches of $batch of $nsrc library sources)"

step "build (emt, libemt, the [gpu] tests; $(nproc) jobs)"
cmake --build "$BUILD" -j "$(nproc)" --target emt_cli emt_gpu_tests
done_step "build"

step "nothing outside the source tree, $DEPS and the PyTorch wheel"
features="$("$BUILD/emt" --version)"
echo "$features"
case "$features" in *"no OpenCV"*"no PLplot"*"no libcurl"*) ;; *) fail "emt --version does not list the GPU build's parts" ;; esac
leaks=0
BUILD_ABS="$(cd "$BUILD" && pwd)"
for f in "$BUILD/emt" "$BUILD"/libemt.so.0 "$BUILD/test/emt_gpu_tests"; do
  while read -r lib path; do
    case "$path" in
      "not found") echo "  $f: $lib NOT FOUND"; leaks=1 ;;
      "$DEPS"/*|"$SITE"/*|"$BUILD_ABS"/*) ;;
      *) case "$lib" in
           libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|ld-linux*|libstdc++.so*|libgcc_s.so*|libgomp.so*|libutil.so*|libcuda.so*) ;;
           *) echo "  $f: $lib from $path (neither $DEPS, the wheel, nor the C/C++ runtime)"; leaks=1 ;;
         esac ;;
    esac
  done < <(ldd "$f" | awk '/=>/ { print $1, ($3 == "not" ? "not found" : $3) }')
done
# Headers: every one the compiler read, by ninja's dependency log; system headers are allowed from the C and C++
# runtimes and the kernel (and a CUDA toolkit) only.
ninja -C "$BUILD" -t deps | awk '/^    / { print $1 }' | sort -u > "$BUILD/gpu-check-headers.txt"
src="$(pwd)"
grep -v -e "^$src/" -e "^$DEPS/" -e "^$SITE/" -e "^$BUILD_ABS/" -e "^[^/]" "$BUILD/gpu-check-headers.txt" \
  > "$BUILD/gpu-check-system-headers.txt" || true
echo "headers read: $(wc -l < "$BUILD/gpu-check-headers.txt"), of them outside the tree, $DEPS and the wheel: $(wc -l < "$BUILD/gpu-check-system-headers.txt")"
if command -v dpkg >/dev/null 2>&1 && [ -s "$BUILD/gpu-check-system-headers.txt" ]; then
  # One dpkg -S over all of them: "package[, package]: path" per owned path.
  (xargs -a "$BUILD/gpu-check-system-headers.txt" dpkg -S 2>/dev/null || true) |
    awk -F': ' '{ print $1 }' | tr ',' '\n' | sed 's/^ *//; s/:amd64$//' | sort -u > "$BUILD/gpu-check-owners.txt"
  echo "their packages: $(tr '\n' ' ' < "$BUILD/gpu-check-owners.txt")"
  while read -r pkg; do
    case "$pkg" in
      libc6-dev|linux-libc-dev|libstdc++-*-dev|libgcc-*-dev|gcc-*|libgomp*|cuda-*|libcu*|libnccl*|libnv*|libcudnn*) ;;
      *) echo "  headers from the package $pkg (not in $DEPS)"; leaks=1 ;;
    esac
  done < "$BUILD/gpu-check-owners.txt"
elif [ -s "$BUILD/gpu-check-system-headers.txt" ]; then
  echo "(no dpkg here: the owners of those headers are not checked)"
fi
if [ "$leaks" = 1 ]; then
  [ "$DRY" = 1 ] && fail "the build used something outside the source tree, $DEPS and the wheel (above)"
  echo "warning: the build used something that a machine without it would lack (above); the check goes on"
fi
done_step "isolation"

step "[gpu] tests"
rc=0
"$BUILD/test/emt_gpu_tests" || rc=$?
if [ "$DRY" = 1 ]; then
  [ "$rc" = 77 ] || fail "the [gpu] tests exited $rc on a machine without CUDA (77, skipped, expected)"
  echo "(dry run: skipped as they should be, exit 77)"
else
  [ "$rc" = 0 ] || fail "the [gpu] tests exited $rc"
fi
done_step "[gpu] tests"

step "the build's own parts: images through stb_image against PIL; what it leaves out"
# PNG decode + CLIP preprocessing against PIL + numpy (which the wheel's Python has): the same tensor, bit for bit.
"$BUILD/emt" bench data --python "$PY" --images 2 --rounds 1 --sizes 224,336 | tee "$BUILD/gpu-check-data.txt"
pil_rows=$(grep -c "+ numpy" "$BUILD/gpu-check-data.txt" || true)
[ "$pil_rows" -ge 4 ] || fail "emt bench data printed $pil_rows PIL + numpy rows (4 expected: does $PY have Pillow?)"
grep "+ numpy" "$BUILD/gpu-check-data.txt" | grep -qv "0\.0e+00 *$" &&
  fail "stb_image + emt's preprocessing differ from PIL + numpy (above)"
echo "stb_image + emt's CLIP preprocessing equal PIL + numpy's on every row"
scratch="$(mktemp -d)"
if "$BUILD/emt" data prepare synthetic --out "$scratch" --train-size 2 --test-size 2 > "$scratch/log" 2>&1; then
  fail "emt data prepare synthetic succeeded in a build without OpenCV"
fi
grep -q "EMT_WITH_OPENCV=OFF" "$scratch/log" || { cat "$scratch/log"; fail "the synthetic sets' error does not name EMT_WITH_OPENCV"; }
echo "synthetic sets: refused, naming the option: $(grep -o 'this emt was built without it[^:]*' "$scratch/log" | head -1)"
rm -rf "$scratch"
done_step "parts"

if [ "$DRY" = 1 ]; then
  MODEL=configs/models/tiny.yaml DEVICE=cpu PEAK=()
  TRAIN=(--batch 4 --text-tokens 16 --warmup 1 --rounds 2 --steps 2)
  EVAL=(--batch 4 --prompt 8 --new-tokens 4 --repeats 2)
else
  MODEL=configs/models/llava-1.5-7b.yaml DEVICE=cuda PEAK=(--peak-tflops 989)
  TRAIN=(--batch 8 --text-tokens 48 --warmup 2 --rounds 3 --steps 3)
  EVAL=(--batch 16 --prompt 48 --new-tokens 16 --repeats 3)
fi
THREADS="$(nproc)"
step "LoRA training step: $MODEL, random weights, bf16 frozen weights and autocast, $DEVICE"
"$BUILD/emt" bench train --model "$MODEL" --methods lora --device "$DEVICE" --no-reference --threads "$THREADS" \
  "${TRAIN[@]}" "${PEAK[@]}" run.dtype=bf16 finetune.precision=bf16
done_step "training step"

step "EMT-style generation: $MODEL, random weights, bf16, $DEVICE; batch 1 vs batched, KV cache vs recompute"
"$BUILD/emt" bench eval --model "$MODEL" --device "$DEVICE" --no-evaluator --no-reference --threads "$THREADS" \
  "${EVAL[@]}" \
  run.dtype=bf16
done_step "generation"

echo
echo "gpu-check: passed in $((SECONDS - t0)) s ($([ "$DRY" = 1 ] && echo "dry run" || echo "GPU")); log: $LOG"
