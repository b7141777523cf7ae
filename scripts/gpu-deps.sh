#!/usr/bin/env bash
# Collects, from this machine's Debian packages (scripts/setup.sh), everything besides PyTorch, nvcc, CMake and
# ninja that emt's GPU build needs, into one folder (default gpu-deps/, git-ignored) to copy to a GPU machine that
# has no Debian packages and no network: scripts/gpu-check.sh builds from it there.
#
# What the GPU build is: the library, the `emt` program and the [gpu] tests, configured with EMT_WITH_OPENCV=OFF
# (stb_image decodes; Debian's OpenCV would bring about 213 MB of libraries through imgcodecs), EMT_WITH_PLOTS=OFF
# and EMT_WITH_CURL=OFF (figures and the HTTP judge belong to the report and scoring machine) and
# EMT_BUILD_SUITE=OFF. It needs headers (nlohmann-json, CLI11, fmt, yaml-cpp, Catch2, stb, Gloo for c10d's
# process group, zlib) and three small shared libraries (libyaml-cpp, libfmt, libz) that need nothing beyond the C
# and C++ runtimes. The folder keeps Debian's layout (usr/include, usr/lib/...), with each package's CMake files, so
# CMAKE_PREFIX_PATH=gpu-deps/usr finds them. Size: about 6 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu-deps}"
PKGS=(libyaml-cpp-dev libyaml-cpp0.7 libfmt-dev libfmt9 nlohmann-json3-dev libcli11-dev catch2 zlib1g-dev zlib1g
      libgloo-dev libstb-dev)
LIMIT_MIB=32  # the folder travels with the source tree, 64 MiB in all
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    { echo "[gpu-deps] the Debian package $p is not installed: run scripts/setup.sh first" >&2; exit 1; }
done
tmp="$(mktemp -d "${OUT%/}.tmp.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
list="$tmp/files"
: > "$list"
for p in "${PKGS[@]}"; do
  # Headers, shared libraries and their links, CMake and pkg-config files; no documentation, and no static
  # archives but Catch2's (its CMake file names it).
  dpkg -L "$p" | while IFS= read -r f; do
    case "$f" in
      */share/doc/*|*/share/man/*|*/lintian/*) continue ;;
      */libCatch2WithMain.a) ;;
      *.a) continue ;;
    esac
    [ -d "$f" ] && continue  # folders, and links to folders (merged /usr's /lib)
    if [ -e "$f" ]; then printf '%s\n' "$f"; fi
  done >> "$list"
done
mkdir -p "$tmp/root"
tar -C / -cf - --files-from=<(sed 's|^/||' "$list") | tar -C "$tmp/root" -xf -
# Merged /usr: zlib1g's /lib/x86_64-linux-gnu/libz.so.1 belongs under usr/lib with the rest.
if [ -d "$tmp/root/lib" ] && [ ! -L "$tmp/root/lib" ]; then
  mkdir -p "$tmp/root/usr/lib"
  cp -a "$tmp/root/lib/." "$tmp/root/usr/lib/"
  rm -rf "$tmp/root/lib"
fi
# Links that point outside the folder (absolute targets) or at nothing are dropped; libz.so -> /lib/... is made
# relative again.
find "$tmp/root" -type l | while IFS= read -r l; do
  t="$(readlink "$l")"
  if [ "${t#/}" != "$t" ]; then
    base="$(basename "$t")"
    if [ -e "$(dirname "$l")/$base" ]; then ln -sfn "$base" "$l"; else rm -f "$l"; fi
  fi
  [ -e "$l" ] || rm -f "$l"
done
{
  echo "emt GPU build dependencies, collected by scripts/gpu-deps.sh on $(date -u +%Y-%m-%d) from:"
  for p in "${PKGS[@]}"; do dpkg-query -W -f='  ${Package} ${Version}\n' "$p"; done
  echo "host: $(. /etc/os-release && echo "$PRETTY_NAME"), $(ldd --version | head -1)"
} > "$tmp/root/MANIFEST.txt"
size_kib=$(du -sk "$tmp/root" | cut -f1)
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "[gpu-deps] $OUT would be $((size_kib / 1024)) MiB, more than $LIMIT_MIB MiB" >&2
  exit 1
fi
rm -rf "$OUT"
mv "$tmp/root" "$OUT"
echo "[gpu-deps] $OUT: $(find "$OUT" -type f | wc -l) files, $((size_kib / 1024)) MiB ($((size_kib)) KiB) from ${#PKGS[@]} packages"
