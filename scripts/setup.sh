#!/usr/bin/env bash
# Set up qkiln on a fresh Debian 12 machine with Python 3.11, from the locked dependency set.
#   scripts/setup.sh          .venv with qkiln and requirements/run.lock, and the demo model's wheel
#   scripts/setup.sh test     .venv with requirements/test.lock too (torch CPU, transformers, onnxruntime, ...),
#                             llama-cpp-python (built once, the wheel kept in ~/.cache/qkiln/wheels), and the
#                             Arm cross toolchain + qemu from Debian's packages
#   scripts/setup.sh test --fresh   the same into a new .venv (what CI does)
# Every Python package comes from a lock at an exact version with its sha256 (`make lock` refreshes them);
# pip installs them with --no-deps, so nothing outside the lock comes in.
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-run}
PY=${PYTHON:-python3}

if [ "${2:-}" = --fresh ]; then
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip, quiet; this machine image's pip config names local index folders that hold only some packages, and pip
# warns once per package it does not find there: noise, filtered out (anything else pip says is kept).
pip() {
  .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

lock=requirements/run.lock
[ "$want" = test ] && lock=requirements/test.lock
pip install --require-hashes --no-deps -r "$lock"
pip install --require-hashes --no-deps -r requirements/demo-model.txt

if [ "$want" = test ]; then
  need=()
  for pkg in gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  # Debian's arm64 python3.11 + numpy, unpacked into ~/.cache for the qemu tests (they never download).
  scripts/arm/fetch_arm_python.sh >/dev/null
  # llama.cpp's Python binding builds from source (about 10 minutes on 2 cores): build it once, keep the
  # wheel, and install from it afterwards. Portable flags (AVX2, no -march=native) so the cached wheel runs on
  # any x86-64-v3 machine: a wheel for correctness tests, not a speed reference (bench/ builds its own).
  wheels="${XDG_CACHE_HOME:-$HOME/.cache}/qkiln/wheels"
  mkdir -p "$wheels"
  llama_cpp=$(grep -o '^llama-cpp-python==[^ ]*' requirements/llama-cpp.txt)
  if ! ls "$wheels"/llama_cpp_python-"${llama_cpp#*==}"-*.whl >/dev/null 2>&1; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip wheel --no-deps -w "$wheels" "$llama_cpp"
  fi
  pip install --no-deps --no-index --find-links "$wheels" "$llama_cpp"
  # Test inputs that come from a registry (Llama 2's vocabulary in an npm package) are fetched here, never
  # mid-test.
  scripts/fetch_test_data.sh
  # Debian's arm64 python3 + numpy, unpacked once into ~/.cache, for the target-ISA check under qemu
  # (qkiln validate / build on Arm targets, tests marked qemu)
  scripts/arm/fetch_arm_python.sh >/dev/null
fi

# qkiln itself, editable, built by the locked setuptools (no isolated build environment that would float).
pip install --no-deps --no-build-isolation -e .
