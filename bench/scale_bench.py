"""Benchmark (not a test): 8B-class checkpoints on this machine in bounded memory (issue #20).

    python bench/scale_bench.py [--work DIR] [--configs llama-3.2-1b,llama-3-8b] [--layers N]
                                [--samples 32] [--seq-len 512] [--no-reference] [--no-generate]

For each model shape, a synthetic BF16 checkpoint (`qkiln synth`: random weights of the real shape, the real
config and a tokenizer of its vocabulary size; --layers N cuts it to N decoder layers, for a quicker run whose
per-layer memory is the full model's), then, each in its own process, measured by wait4 (wall seconds, CPU
seconds, peak RSS) with the load average after it:
- qkiln RTN to GGUF Q4_K_M (`qkiln convert --to gguf --scheme q4_k_m --algo rtn`);
- qkiln GPTQ to INT4 g128 compressed-tensors (`--to compressed-tensors --scheme int4_g128 --algo gptq`),
  --samples x --seq-len calibration tokens of GPL-3 + LGPL-2.1 + GFDL-1.3;
- for scale, llama.cpp's own path to the same Q4_K_M file: `convert_hf_to_gguf.py --outtype bf16` (from the
  llama-cpp-python sources that bench/llamacpp_ref.py builds, with their gguf-py), then `llama-quantize`;
- the qkiln Q4_K_M file loaded by llama.cpp (llama-cpp-python) and 16 tokens generated (greedy).
Prints one JSON document (and a table on stderr) with every measurement and, between consecutive shapes, how
peak RSS and time grew; writes it to WORK/results.json. Steps already measured (WORK/steps.json) are reused.
Timings are only comparable within a run on an otherwise idle machine: each step records its load average.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imatrix_bench import Steps, cat
from llamacpp_ref import PASSIVE_OMP, log, tools

BIN = Path(sys.executable).parent
CALIB_FILES = [Path("/usr/share/common-licenses") / n for n in ("GPL-3", "LGPL-2.1", "GFDL-1.3")]
GENERATE = """
import sys, time
from llama_cpp import Llama
t = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
load = time.perf_counter() - t
t = time.perf_counter()
out = []
for tok in llm.generate(llm.tokenize(b"The quick brown fox", add_bos=True), top_k=1, temp=0.0):
    out.append(tok)
    if len(out) == 16:
        break
print(f"loaded in {load:.1f} s, {len(out)} tokens in {time.perf_counter() - t:.1f} s: {out}")
"""


def shape_steps(steps: Steps, config: str, args: argparse.Namespace, work: Path) -> dict[str, dict]:
    label = config + (f"-{args.layers}l" if args.layers else "")
    synth = work / f"synth-{label}"
    layers = ["--layers", str(args.layers)] if args.layers else []
    out = {"synth": steps.run(f"{label} synth", synth, [str(BIN / "qkiln"), "synth", "-c", config, "-o", str(synth),
                                                         *layers], work)}
    q4km = work / f"{label}-q4_k_m-rtn.gguf"
    out["qkiln rtn q4_k_m"] = steps.run(f"{label} qkiln rtn q4_k_m", q4km, [
        str(BIN / "qkiln"), "convert", "-m", str(synth), "--to", "gguf", "--scheme", "q4_k_m", "--algo", "rtn",
        "-o", str(q4km)], work)
    calib = cat(CALIB_FILES, work / "calib.txt")
    int4 = work / f"{label}-int4_g128-gptq"
    out["qkiln gptq int4_g128"] = steps.run(f"{label} qkiln gptq int4_g128", int4, [
        str(BIN / "qkiln"), "convert", "-m", str(synth), "--to", "compressed-tensors", "--scheme", "int4_g128",
        "--algo", "gptq", "--calib", str(calib), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
        "-o", str(int4)], work)
    if not args.no_reference:
        bin_dir, _ = tools()
        src = next(bin_dir.parent.glob("llama_cpp_python-*/vendor/llama.cpp"))
        bf16 = work / f"{label}-llamacpp-bf16.gguf"
        out["llama.cpp convert_hf_to_gguf bf16"] = steps.run(f"{label} llama.cpp convert bf16", bf16, [
            "env", f"PYTHONPATH={src / 'gguf-py'}", sys.executable, str(src / "convert_hf_to_gguf.py"), str(synth),
            "--outtype", "bf16", "--outfile", str(bf16)], work)
        ref = work / f"{label}-llamacpp-q4_k_m.gguf"
        out["llama.cpp llama-quantize q4_k_m"] = steps.run(f"{label} llama.cpp quantize q4_k_m", ref, [
            "env", *(f"{k}={v}" for k, v in PASSIVE_OMP.items()), str(bin_dir / "llama-quantize"), str(bf16), str(ref),
            "Q4_K_M", "2"], work)
    if not args.no_generate:
        out["llama.cpp loads qkiln q4_k_m"] = steps.run(f"{label} llama.cpp generate", None, [
            sys.executable, "-c", GENERATE, str(q4km)], work, keep_output=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qkiln-scale-bench"))
    ap.add_argument("--configs", default="llama-3.2-1b,llama-3-8b")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers of each synth (0: the model's own)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--no-reference", action="store_true", help="skip llama.cpp's converter and quantizer")
    ap.add_argument("--no-generate", action="store_true", help="skip loading the Q4_K_M file in llama.cpp")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    steps = Steps(args.work / "steps.json")
    results: dict = {"samples": args.samples, "seq_len": args.seq_len, "layers": args.layers or "all", "shapes": {}}
    for config in args.configs.split(","):
        results["shapes"][config] = shape_steps(steps, config, args, args.work)
    names = list(results["shapes"])
    for a, b in itertools.pairwise(names):
        growth = {}
        for step, m in results["shapes"][b].items():
            base = results["shapes"][a].get(step)
            if base and base.get("peak_rss_mb"):
                growth[step] = {"peak_rss": round(m["peak_rss_mb"] / base["peak_rss_mb"], 2),
                                "wall": round(m["seconds"] / base["seconds"], 2),
                                "cpu": round(m["cpu_seconds"] / base["cpu_seconds"], 2)}
        results[f"growth {a} -> {b}"] = growth
    for config, shape in results["shapes"].items():
        for step, m in shape.items():
            log(f"{config:14s} {step:36s} peak RSS {m['peak_rss_mb'] / 1024:6.2f} GiB  wall {m['seconds']:8.1f} s  "
                f"CPU {m['cpu_seconds']:8.1f} s  load {m['load_average']}")
    text = json.dumps(results, indent=2)
    (args.work / "results.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
