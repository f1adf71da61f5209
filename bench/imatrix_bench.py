"""Benchmark (not a test): qkiln's calibrated GGUFs against llama.cpp's importance-matrix quantization (issue #19).

    python bench/imatrix_bench.py [--samples 36] [--seq-len 512] [--chunks 16] [--work DIR] [--only-qkiln]

On the demo model (SmolLM2-135M-Instruct), with llama.cpp built for this CPU (bench/llamacpp_ref.py):
- F32 GGUF: `qkiln convert --to gguf --scheme f32` (the reference every file is scored against and the input
  of llama.cpp's tools);
- llama.cpp: `llama-imatrix` on the calibration text (GPL-3 + LGPL-2.1 + GFDL-1.3, ctx --seq-len, at most
  --samples chunks, so it sees the tokens qkiln sees), then `llama-quantize --imatrix` to Q4_0 and Q4_K_M,
  and `llama-quantize` without it (plain RTN, the baseline);
- qkiln: `qkiln convert --to gguf --scheme q4_0|q4_k_m --algo gptq|awq+gptq` calibrated on the same text,
  --samples x --seq-len; wall, CPU seconds and peak RSS of each converting process (wait4).
Scoring: `llama-perplexity --kl-divergence-base` on the F32 file, then `--kl-divergence` for each quantized
file, over the evaluation text GPL-2 + Apache-2.0 + MPL-2.0 (disjoint from the calibration text), ctx 512,
--chunks chunks (llama.cpp scores the second half of each chunk): mean KL, perplexity, same-top-1 %, file size,
and each file's mean KL over llama.cpp's imatrix file of the same type.
Artifacts and measurements are kept in WORK (steps.json) and reused on a rerun; --only-qkiln stops after the
qkiln conversions (they need no llama.cpp, so they can run while it builds).
Prints one JSON document on stdout (progress on stderr) and writes it to WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_vs_llamacpp import CALIB_FILES, EVAL_FILES
from llamacpp_ref import PASSIVE_OMP, build_info, enabled, log, run_measured, tools

BIN = Path(sys.executable).parent
TYPES = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M"}  # qkiln scheme -> llama-quantize type
QKILN_ALGOS = ("gptq", "awq+gptq")


class Steps:
    """Measurements of finished steps, saved after each one so that a rerun skips them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, out: Path | None, cmd: list[str], cwd: Path, *, keep_output: bool = False) -> dict:
        if name in self.done and (out is None or out.exists()):
            log(f"{name}: done before")
            return self.done[name]
        log(f"{name} ...")
        # llama.cpp's tools wait passively at OpenMP barriers (see llamacpp_ref.PASSIVE_OMP): their results do
        # not depend on it, their wall time on a busy host does.
        meas, out, err = run_measured(cmd, cwd, env=PASSIVE_OMP if Path(cmd[0]).name.startswith("llama-") else None)
        if keep_output:
            meas["output"] = out + err
        log(f"{name}: {meas['seconds']} s wall, {meas['cpu_seconds']} CPU-s, peak RSS {meas['peak_rss_mb']} MB "
            f"(load average {meas['load_average']})")
        self.done[name] = meas
        self.path.write_text(json.dumps(self.done, indent=2) + "\n")
        return meas


def cat(files: list[Path], dest: Path) -> Path:
    dest.write_text("".join(p.read_text(encoding="utf-8") for p in files), encoding="utf-8")
    return dest


def qkiln_convert(steps: Steps, demo: Path, work: Path, args: argparse.Namespace) -> dict[str, dict]:
    """F32 GGUF and qkiln's calibrated Q4_0 / Q4_K_M; {name: {path, conversion measurements}}."""
    out: dict[str, dict] = {}
    f32 = work / "f32.gguf"
    steps.run("convert f32", f32, [str(BIN / "qkiln"), "convert", "--to", "gguf", "--model", str(demo), "--scheme", "f32",
                                   "-o", str(f32)], work)
    calib = [a for p in CALIB_FILES for a in ("--calib", str(p))]
    for scheme in TYPES:  # each type's algorithms one after the other: their wall times compare on the same load
        for algo in args.algos.split(","):
            name = f"qkiln-{algo}-{scheme}"
            dest = work / f"{name}.gguf"
            meas = steps.run(name, dest, [str(BIN / "qkiln"), "convert", "--to", "gguf", "--model", str(demo),
                                          "--scheme", scheme, "--algo", algo, *calib, "--samples", str(args.samples),
                                          "--seq-len", str(args.seq_len), "-o", str(dest)], work)
            out[name] = {"path": str(dest), "type": TYPES[scheme], "method": f"qkiln {algo}", "convert": meas}
    return out


def llamacpp_quantize(steps: Steps, bin_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, dict]:
    """llama.cpp's imatrix from the calibration text, then Q4_0 / Q4_K_M with and without it."""
    f32 = work / "f32.gguf"
    calib = cat(CALIB_FILES, work / "calib.txt")
    imatrix = work / "imatrix.gguf"
    steps.run("llama-imatrix", imatrix, [str(bin_dir / "llama-imatrix"), "-m", str(f32), "-f", str(calib), "-o", str(imatrix),
                                         "-c", str(args.seq_len), "--chunks", str(args.samples), "-t", str(args.threads)],
              work, keep_output=True)
    out: dict[str, dict] = {}
    for scheme, qtype in TYPES.items():
        for with_imatrix in (True, False):
            name = f"llamacpp-{'imatrix' if with_imatrix else 'plain'}-{scheme}"
            dest = work / f"{name}.gguf"
            cmd = [str(bin_dir / "llama-quantize"), *(["--imatrix", str(imatrix)] if with_imatrix else []),
                   str(f32), str(dest), qtype, str(args.threads)]
            meas = steps.run(name, dest, cmd, work)
            out[name] = {"path": str(dest), "type": qtype, "convert": meas,
                         "method": "llama.cpp imatrix" if with_imatrix else "llama.cpp plain (RTN)"}
    return out


def parse_kld(text: str) -> dict:
    """Mean KL, perplexity and same-top-1 % from llama-perplexity --kl-divergence's report."""
    pats = {"mean_kl": r"Mean\s+KLD:\s*([-\d.eE+]+)", "ppl": r"Mean PPL\(Q\)\s*:\s*([\d.eE+]+)",
            "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.eE+]+)", "same_top1_pct": r"Same top p:\s*([\d.]+)",
            "chunks": r"over (\d+) chunks, n_ctx="}
    out = {}
    for key, pat in pats.items():
        m = re.search(pat, text)
        if m is None:
            raise SystemExit(f"llama-perplexity printed no {key}:\n{text[-3000:]}")
        out[key] = float(m.group(1)) if key != "chunks" else int(m.group(1))
    return out


def score(steps: Steps, bin_dir: Path, work: Path, models: dict[str, dict], args: argparse.Namespace) -> None:
    evalf = cat(EVAL_FILES, work / "eval.txt")
    base = work / "f32.kld"
    common = ["-f", str(evalf), "-c", "512", "--chunks", str(args.chunks), "-t", str(args.threads)]
    steps.run("kld base f32", base, [str(bin_dir / "llama-perplexity"), "-m", str(work / "f32.gguf"), *common,
                                     "--kl-divergence-base", str(base)], work)
    for name, m in models.items():
        meas = steps.run(f"kld {name}", None, [str(bin_dir / "llama-perplexity"), "-m", m["path"], *common,
                                               "--kl-divergence-base", str(base), "--kl-divergence"], work, keep_output=True)
        m.update(parse_kld(meas["output"]))
        m["mb"] = round(Path(m["path"]).stat().st_size / 1e6, 2)


def table(models: dict[str, dict]) -> str:
    rows = ["| file | type | method | MB | mean KL | ppl | same top-1 % | KL / llama.cpp imatrix |",
            "|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        rows.append(f"| {name} | {m['type']} | {m['method']} | {m['mb']:.1f} | {m['mean_kl']:.4f} | {m['ppl']:.3f} | "
                    f"{m['same_top1_pct']:.2f} | {m['kl_over_imatrix']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qkiln-imatrix-bench"))
    ap.add_argument("--algos", default=",".join(QKILN_ALGOS))
    ap.add_argument("--samples", type=int, default=36)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16, help="evaluation chunks of 512 tokens (at most what the text holds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only-qkiln", action="store_true", help="stop after the qkiln conversions")
    args = ap.parse_args()
    from qkiln.demo import demo_model_dir

    demo = demo_model_dir()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(work / "steps.json")
    qk = qkiln_convert(steps, demo, work, args)
    if args.only_qkiln:
        return
    bin_dir, options = tools()
    models = {**llamacpp_quantize(steps, bin_dir, work, args), **qk}
    score(steps, bin_dir, work, models, args)
    for m in models.values():
        ref = models[f"llamacpp-imatrix-{'q4_0' if m['type'] == 'Q4_0' else 'q4_k_m'}"]
        m["kl_over_imatrix"] = round(m["mean_kl"] / ref["mean_kl"], 3)
    algos = args.algos.split(",")
    timing: dict[str, dict] = {a: {s: models[f"qkiln-{a}-{s}"]["convert"] for s in TYPES} for a in algos}
    if "gptq" in algos:  # issue #19's goal: AWQ+GPTQ within 2x the wall time of GPTQ alone, same run
        for a in (a for a in algos if a != "gptq"):
            timing[f"{a} / gptq"] = {s: {k: round(timing[a][s][k] / timing["gptq"][s][k], 3)
                                         for k in ("seconds", "cpu_seconds")} for s in TYPES}
    doc = {
        "models": models,
        "qkiln_convert": timing,
        "imatrix": {k: v for k, v in steps.done["llama-imatrix"].items() if k != "output"},
        "llamacpp": {"bin": str(bin_dir), "flags": enabled(options), **build_info(bin_dir)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu": os.cpu_count(),
    }
    (work / "results.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(json.dumps(doc, indent=2, sort_keys=True))
    log(table(models))


if __name__ == "__main__":
    main()
