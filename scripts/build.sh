#!/usr/bin/env bash
# Configures and builds emt into ${EMT_BUILD_DIR:-build} (Release, Ninja, all cores by default). EMT_TARGETS
# names the targets to build (default: all, tests included; the quickstart builds emt_cli only).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${EMT_BUILD_DIR:-build}"
JOBS="${EMT_JOBS:-$(nproc)}"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE="${EMT_BUILD_TYPE:-Release}" ${EMT_CMAKE_ARGS:-} >/dev/null
# shellcheck disable=SC2086
cmake --build "$BUILD" -j "$JOBS" ${EMT_TARGETS:+--target $EMT_TARGETS}
