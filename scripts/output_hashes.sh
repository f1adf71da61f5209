#!/usr/bin/env bash
# sha256 of every artifact qkiln writes from the demo model, so a refactor can show "every output byte
# unchanged": one GGUF per type/mix `qkiln convert --to gguf` takes with --algo rtn (also --uniform for the
# mixes whose uniform meaning differs), gptq / awq / awq+gptq for q4_0 and q4_k_m on a short calibration, and
# the weights `qkiln quantize` writes (rtn and gptq). Run it before and after and diff the two lists:
#   scripts/output_hashes.sh /tmp/before > before.sha256   (...change...)   scripts/output_hashes.sh /tmp/after > after.sha256
# QKILN overrides the command (e.g. "python -P -m qkiln.cli.main" against another install). Slow: ~20-30 min
# on 2 cores, most of it AWQ.
set -euo pipefail
out=${1:?usage: output_hashes.sh OUTDIR}
mkdir -p "$out"
read -r -a qk <<<"${QKILN:-qkiln}"
calib=(--calib /usr/share/common-licenses/GPL-3 --samples 8 --seq-len 256)

rtn_types="f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m"
for t in $rtn_types; do
  "${qk[@]}" convert --to gguf --scheme "$t" --algo rtn -o "$out/rtn-$t.gguf" >/dev/null 2>&1
done
for t in q8_0 q4_0 q4_k q6_k; do
  "${qk[@]}" convert --to gguf --scheme "$t" --uniform --algo rtn -o "$out/rtn-uniform-$t.gguf" >/dev/null 2>&1
done
for a in gptq awq awq+gptq; do
  for t in q4_0 q4_k_m; do
    "${qk[@]}" convert --to gguf --scheme "$t" --algo "$a" "${calib[@]}" -o "$out/$a-$t.gguf" >/dev/null 2>&1
  done
done
"${qk[@]}" quantize --scheme int4_g64_asym --algo rtn -o "$out/sim-rtn-int4_g64_asym" --force >/dev/null 2>&1
"${qk[@]}" quantize --preset q4_k_m --algo gptq "${calib[@]}" -o "$out/sim-gptq-q4_k_m" --force >/dev/null 2>&1
cd "$out" && sha256sum ./*.gguf ./sim-*/*.safetensors
