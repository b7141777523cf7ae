#!/usr/bin/env bash
# Builds emt against LibTorch 2.x: the LibTorch bundled in the pinned PyTorch wheel of .venv
# (scripts/setup-python.sh), into ${EMT_BUILD_DIR:-build-torch2}. The wheel is a CUDA build; emt compiles no CUDA
# code, so it links the wheel's libraries directly (EMT_TORCH_IMPORT=libraries) and needs no CUDA toolkit.
# See docs/building.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-python.sh
PY="${EMT_VENV:-.venv}/bin/python"
PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
EMT_BUILD_DIR="${EMT_BUILD_DIR:-build-torch2}" \
EMT_CMAKE_ARGS="-DEMT_TORCH_IMPORT=libraries -DCMAKE_PREFIX_PATH=$PREFIX ${EMT_CMAKE_ARGS:-}" \
  bash scripts/build.sh
