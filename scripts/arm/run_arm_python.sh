#!/usr/bin/env bash
# Run the Python-level kernel check (tests/kernels/arm_python_check.py) with an aarch64 Python + NumPy under
# qemu-aarch64, against a cross-compiled libqkiln_kernels.so.
#   scripts/arm/run_arm_python.sh CPU [CPU ...]        e.g. cortex-a72 neoverse-n1 max
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
root=$(scripts/arm/fetch_arm_python.sh)/root
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m qkiln.kernels.build --arch aarch64 --cc aarch64-linux-gnu-gcc --shared-out "$work/libqkiln_kernels.so" >/dev/null
# qkiln's import layout (package-dir mapping) rebuilt with symlinks: qkiln/ (with qkiln/kernels/), quantize/
# (the GPTQ loops' NumPy definitions) and model/ (what quantize/ imports of it) are needed
mkdir -p "$work/pkg/qkiln"
for f in qkiln/*.py; do ln -s "$PWD/$f" "$work/pkg/qkiln/"; done
ln -s "$PWD/qkiln/kernels" "$work/pkg/qkiln/kernels"
ln -s "$PWD/quantize" "$work/pkg/qkiln/quantize"
ln -s "$PWD/model" "$work/pkg/qkiln/model"
# gguf-py's constants (GGML_QUANT_SIZES, the one block-size table), pure Python, without the package's
# other modules (they need more than NumPy)
mkdir -p "$work/pkg/gguf" && : > "$work/pkg/gguf/__init__.py"
ln -s "$("$PY" -c 'import gguf.constants as c; print(c.__file__)')" "$work/pkg/gguf/constants.py"
lib="$root/usr/lib/aarch64-linux-gnu"
status=0
for cpu in "$@"; do
  qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu "$cpu" \
    -E "LD_LIBRARY_PATH=$lib:$lib/blas:$lib/lapack:$root/lib/aarch64-linux-gnu" \
    -E "PYTHONHOME=$root/usr" -E "PYTHONPATH=$work/pkg:$root/usr/lib/python3/dist-packages" \
    -E "QKILN_KERNELS_LIB=$work/libqkiln_kernels.so" -E PYTHONDONTWRITEBYTECODE=1 \
    "$root/usr/bin/python3.11" "$PWD/tests/kernels/arm_python_check.py" "cpu=$cpu" || status=1
done
exit $status
