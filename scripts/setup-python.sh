#!/usr/bin/env bash
# Creates ${EMT_VENV:-.venv} with the pinned Python references of scripts/requirements-python.txt: the PyTorch
# 2.x wheel (whose bundled LibTorch build-torch2/ compiles against) and transformers / peft / safetensors /
# tokenizers / open_clip's CLIP tokenizer for the interop checks. Idempotent: a venv whose stamp matches the
# requirements file is kept. Needs PyPI at install time only; no test downloads anything.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EMT_VENV:-.venv}"
REQ=scripts/requirements-python.txt
OPEN_CLIP=open_clip_torch==3.3.0
# Two more transformers for the interop checks, each with its pinned dependencies in its own site dir beside the
# venv, which scripts/interop.sh puts on PYTHONPATH for those checks only: 4.51 (before 4.52's LLaVA refactor: the
# legacy module tree, legacy-named PEFT adapters) and 5.x (the current major version).
OLD_REQ=scripts/requirements-transformers-4.51.txt
NEW_REQ=scripts/requirements-transformers-5.txt
STAMP="$VENV/.emt-requirements"
PY="${EMT_PYTHON_BASE:-python3}"
if [ -f "$STAMP" ] && cmp -s "$STAMP" <(cat "$REQ" "$OLD_REQ" "$NEW_REQ"; echo "$OPEN_CLIP"); then
  echo "[setup-python] $VENV is up to date"
  exit 0
fi
if ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then  # Debian splits these into python3-venv
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
fi
start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "$OPEN_CLIP"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --target "$VENV/transformers-4.51" -r "$OLD_REQ"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --target "$VENV/transformers-5" -r "$NEW_REQ"
{ cat "$REQ" "$OLD_REQ" "$NEW_REQ"; echo "$OPEN_CLIP"; } > "$STAMP"
echo "[setup-python] $VENV ready in $(( $(date +%s) - start )) s: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
