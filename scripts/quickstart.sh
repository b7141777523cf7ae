#!/usr/bin/env bash
# The main job on a fresh machine: install, build, prepare the real and synthetic data, then run the quickstart
# forgetting study (builds or reuses the tiny base model, fine-tunes, re-scores every dataset, writes the report).
# Extra arguments are config overrides, e.g. scripts/quickstart.sh study.epochs=1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
EMT_TARGETS=emt_cli bash scripts/build.sh  # the emt program and its library only: no tests, no benchmarks
start=$(date +%s)
for d in mnist fashion-mnist synthetic; do
  case $d in
    mnist) ready=data/mnist/t10k-labels-idx1-ubyte ;;
    fashion-mnist) ready=data/fashion-mnist ;;
    synthetic) ready=data/synthetic/objects60/SOURCE.txt
      # sets drawn by an older generator are redrawn (SOURCE.txt records the version)
      grep -qs "version 2," "$ready" || rm -rf data/synthetic ;;
  esac
  [ -e "$ready" ] || build/emt data prepare "$d" --out data
done
build/emt study configs/quickstart.yaml "$@"
echo "[quickstart] finished in $(( $(date +%s) - start ))s after the build"
