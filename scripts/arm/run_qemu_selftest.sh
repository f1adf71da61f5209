#!/usr/bin/env bash
# Cross-compile the kernel self-test for aarch64 and run it under qemu-aarch64 on each CPU model.
#   scripts/arm/run_qemu_selftest.sh [OUT_DIR]
# Needs Debian's gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user (scripts/setup.sh test installs
# them). Each run prints the path the dispatcher chose and checks every available path against scalar.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-$(mktemp -d)}
mkdir -p "$out"
PY=${PYTHON:-.venv/bin/python}
"$PY" -m qkiln.kernels.build --arch aarch64 --cc aarch64-linux-gnu-gcc --test-binary "$out/qk_selftest" >/dev/null
status=0
while read -r cpu expect; do
  log=$(qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu "$cpu" "$out/qk_selftest") || status=1
  got=$(printf '%s\n' "$log" | sed -n 's/^auto=\([a-z0-9]*\).*/\1/p')
  summary=$(printf '%s\n' "$log" | tail -1)
  if [ "$got" != "$expect" ]; then status=1; fi
  printf '%-40s auto=%-8s expected=%-8s %s\n' "$cpu" "$got" "$expect" "$summary"
done <<'CPUS'
cortex-a72 neon
neoverse-n1 dotprod
a64fx sve
max i8mm
max,sve-default-vector-length=16 i8mm
max,sve-default-vector-length=32 i8mm
CPUS
exit $status
