#!/usr/bin/env bash
# Unpack an aarch64 Python 3.11 + NumPy from Debian's arm64 packages into a folder, for running qkiln's kernels
# from Python under qemu-aarch64. Uses apt's own downloader with a private state/lists/cache dir and
# APT::Architecture=arm64, so the host's dpkg is untouched (never `dpkg --add-architecture`).
#   scripts/arm/fetch_arm_python.sh [DEST]     (default ~/.cache/qkiln/arm64-python)
set -euo pipefail
dest=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/qkiln/arm64-python}
if [ -x "$dest/root/usr/bin/python3.11" ] && [ -d "$dest/root/usr/lib/python3/dist-packages/numpy" ]; then
  echo "$dest"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
opts=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Dir::State::status=/dev/null
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root -qq)
apt-get "${opts[@]}" update >/dev/null
(cd "$work/debs" && apt-get "${opts[@]}" download \
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3-numpy libblas3 liblapack3 libgfortran5 \
  libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 \
  libuuid1 libtirpc3 libnsl2 libcrypt1 libdb5.3 libgcc-s1 libstdc++6 libgssapi-krb5-2 libkrb5-3 \
  libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 media-types >/dev/null 2>&1)
for f in "$work"/debs/*.deb; do dpkg-deb -x "$f" "$work/root"; done
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.tmp" && mkdir -p "$dest.tmp" && mv "$work/root" "$dest.tmp/root" && rm -rf "$dest" && mv "$dest.tmp" "$dest"
echo "$dest"
