#!/usr/bin/env bash
# The interop stage: emt against the real Python libraries it claims to be compatible with (transformers' LLaVA,
# PEFT LoRA, safetensors, transformers' LLaMA tokenizers, open_clip's CLIP tokenizer), with the pinned references
# of scripts/setup-python.sh. Builds emt_interop in ${EMT_BUILD_DIR:-build}, writes everything under
# <build>/interop, prints one PASS/FAIL line per check and exits non-zero on any failure. Downloads nothing.
#   EMT_PYTHON       the Python with the references (default .venv/bin/python)
#   EMT_INTEROP_ONLY space-separated name fragments: run only the checks whose names contain one
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${EMT_PYTHON:-.venv/bin/python}"
BUILD="${EMT_BUILD_DIR:-build}"
VENV_DIR="$(dirname "$(dirname "$PY")")"
if [ ! -x "$PY" ]; then
  echo "[interop] no Python at $PY: run scripts/setup-python.sh (or set EMT_PYTHON)"
  exit 1
fi
if [ ! -f "$BUILD/build.ninja" ] && [ ! -f "$BUILD/Makefile" ]; then
  echo "[interop] $BUILD is not a configured build directory: run scripts/build.sh first"
  exit 1
fi
start=$(date +%s)
cmake --build "$BUILD" --target emt_interop -j "${EMT_BUILD_JOBS:-2}" > "$BUILD/interop-build.log" 2>&1 || {
  cat "$BUILD/interop-build.log"; echo "[interop] building emt_interop failed"; exit 1; }
only=()
[ -n "${EMT_INTEROP_ONLY:-}" ] && only=(--only ${EMT_INTEROP_ONLY})
status=0
"$PY" test/interop/run.py --emt "$BUILD/test/interop/emt_interop" --work "$BUILD/interop" \
  --old-transformers "$VENV_DIR/transformers-4.51" --new-transformers "$VENV_DIR/transformers-5" "${only[@]}" \
  || status=$?
echo "[interop] $(( $(date +%s) - start )) s"
exit $status
