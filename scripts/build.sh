#!/usr/bin/env bash
# Configures and builds emt into ${EMT_BUILD_DIR:-build} (Release with debug info, Ninja, 2 jobs by default).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${EMT_BUILD_DIR:-build}"
JOBS="${EMT_JOBS:-$(nproc)}"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE="${EMT_BUILD_TYPE:-Release}" ${EMT_CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD" -j "$JOBS"
