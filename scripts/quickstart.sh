#!/usr/bin/env bash
# The main job on a fresh machine: install, build, then run the quickstart forgetting study.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
if build/emt study --help >/dev/null 2>&1; then
  exec build/emt study configs/quickstart.yaml "$@"
fi
echo "[quickstart] 'emt study' is not available in this build yet; showing the resolved quickstart config instead."
exec build/emt config show configs/quickstart.yaml "$@"
