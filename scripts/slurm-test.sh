#!/usr/bin/env bash
# The real-Slurm stage of scripts/test.sh: installs Debian's slurm-wlm and munge if missing, starts a one-node
# cluster on localhost (scripts/slurm-local.sh, as root), runs the hidden [.slurm] tests of build/ (a 4-task sweep
# as a job array with its dependent report job; a preempted array task that requeues itself and resumes), and
# stops the daemons it started, also on failure. It fails, never skips, when Slurm cannot start.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${EMT_BUILD_DIR:-build}"
missing=()
for p in slurm-wlm munge; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
export EMT_SLURM_DIR="${EMT_SLURM_DIR:-/tmp/emt-slurm-test}"
trap 'bash scripts/slurm-local.sh stop' EXIT
bash scripts/slurm-local.sh start
export SLURM_CONF="$EMT_SLURM_DIR/slurm.conf"
start=$(date +%s)
"$BUILD/test/emt_tests" "[.slurm]"
echo "[slurm-test] passed in $(( $(date +%s) - start )) s"
