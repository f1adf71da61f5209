"""Accuracy table of RTN / GPTQ / AWQ / AWQ+GPTQ on the demo model (not a test: minutes per row).

    python bench/quantize_accuracy.py ref                      # reference logits, once
    python bench/quantize_accuracy.py run q4_0 gptq [--grid original] [--samples 32 --seq-len 256]
    python bench/quantize_accuracy.py table                    # markdown table of every row so far

Calibration: GPL-3 + LGPL-2.1 + GFDL-1.3 from /usr/share/common-licenses, consecutive windows.
Evaluation: GPL-2 + Apache-2.0 + MPL-2.0, windows of 512 tokens (no BOS, qkiln's scoring rule from
validate.metrics); mean KL and top-1 agreement against the unquantized model, perplexity.
`--eval-stride 2` scores every other window (to fit the time budget on a busy 2-core machine).
Rows are appended to RESULTS (JSON lines). Q4_K uses the rule fallback (`rules.single`): rows whose
length is not a multiple of 256 fall back to Q5_0, as llama.cpp does; the row records what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

OUT_DIR = Path(os.environ.get("QKILN_BENCH_DIR", "/tmp/qkiln_quant_bench"))
RESULTS = OUT_DIR / "results.jsonl"
LICENSES = Path("/usr/share/common-licenses")
CALIB = ("GPL-3", "LGPL-2.1", "GFDL-1.3")
EVAL = ("GPL-2", "Apache-2.0", "MPL-2.0")
CTX = 512


def _text(names: tuple[str, ...]) -> str:
    return "".join((LICENSES / n).read_text(encoding="utf-8") for n in names)


def _windows(tok, stride: int) -> np.ndarray:
    from qkiln.validate.windows import make_windows

    ids = np.asarray(tok.encode(_text(EVAL), add_special_tokens=False).ids, dtype=np.int64)
    return make_windows(ids, CTX)[::stride]


def _ckpt():
    from qkiln.demo import demo_model_dir
    from qkiln.formats.hf import Checkpoint

    return Checkpoint.open(demo_model_dir())


def cmd_ref(args: argparse.Namespace) -> None:
    from qkiln.runtime.llama import LlamaModel
    from qkiln.validate.metrics import TokenScores

    ck = _ckpt()
    wins = _windows(ck.tokenizer(), args.eval_stride)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    model = LlamaModel(ck)
    ref = np.lib.format.open_memmap(OUT_DIR / f"ref_s{args.eval_stride}.npy", mode="w+", dtype=np.float32,
                                    shape=(len(wins), CTX, ck.config.vocab_size))
    scores = TokenScores()
    for i, w in enumerate(wins):
        ref[i] = model.forward(w[None])[0]
        scores.add_window(w, ref[i])
    ref.flush()
    _append({"grid": "float32", "algo": "none", "ppl": scores.perplexity, "kl": 0.0, "top1": 1.0,
             "windows": len(wins), "eval_stride": args.eval_stride})


def _append(row: dict) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
    print(json.dumps(row, sort_keys=True), flush=True)


def cmd_run(args: argparse.Namespace) -> None:
    from qkiln.model.source import DictSource
    from qkiln.quantize.calibrate import QuantizeReport, calibration_ids, quantize_model
    from qkiln.quantize.registry import get_scheme
    from qkiln.quantize.rules import Rule, RuleSet, single
    from qkiln.quantize.tensor import QuantizedTensor
    from qkiln.runtime.llama import LlamaModel
    from qkiln.validate.metrics import TokenScores

    ck = _ckpt()
    tok = ck.tokenizer()
    rules = single(args.grid) if args.fallback else get_scheme(args.grid)
    if args.embed:  # the tied embedding / head on its own grid, as llama.cpp keeps its output tensor finer
        rules = RuleSet((Rule("model.embed_tokens.weight", args.embed), Rule("lm_head.weight", args.embed)),
                        args.grid, fallback=args.fallback)
    ids = None
    if args.algo != "rtn":
        calib_tokens = np.asarray(tok.encode(_text(CALIB), add_special_tokens=False).ids, dtype=np.int64)
        ids = calibration_ids(calib_tokens, args.samples, args.seq_len)
    report = QuantizeReport(algo=args.algo)
    t0 = time.perf_counter()
    out = dict(quantize_model(ck, rules, args.algo, ids, grid=args.gptq_grid, act_order=args.act_order,
                              weighted_fit=args.weighted_fit, awq_clip=args.awq_clip, calib_dtype=args.calib_dtype,
                              report=report))
    wall = time.perf_counter() - t0
    peak = report.peak_rss_bytes
    dense = {n: v.dequantize() if isinstance(v, QuantizedTensor) else v for n, v in out.items()}
    del out
    model = LlamaModel(DictSource(ck.config, dense))
    ref = np.load(OUT_DIR / f"ref_s{args.eval_stride}.npy", mmap_mode="r")
    wins = _windows(tok, args.eval_stride)
    scores = TokenScores()
    for i, w in enumerate(wins):
        scores.add_window(w, model.forward(w[None])[0], np.asarray(ref[i]))
    fallbacks = sorted({f"{report.schemes[n]}" for n in report.fallbacks})
    _append({
        "grid": args.grid, "embed": args.embed or args.grid, "algo": args.algo, "gptq_grid": args.gptq_grid, "act_order": args.act_order,
        "weighted_fit": args.weighted_fit, "calib_dtype": args.calib_dtype,
        "awq_clip": report.settings.get("awq_clip"), "samples": int(ids.shape[0]) if ids is not None else 0,
        "seq_len": args.seq_len if ids is not None else 0, "kl": scores.mean_kl, "ppl": scores.perplexity,
        "top1": scores.top1_agreement, "wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20),
        "fallbacks": {"count": len(report.fallbacks), "to": fallbacks}, "windows": len(wins),
        "eval_stride": args.eval_stride,
    })


def cmd_table(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    print("| grid | embed | algo | KL | ppl | top-1 | KL / RTN | wall s | peak RSS MB | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def key(r: dict) -> tuple[str, str]:
        return r["grid"], r.get("embed", r["grid"])

    rtn = {key(r): r["kl"] for r in rows if r["algo"] == "rtn"}
    for r in rows:
        ratio = r["kl"] / rtn[key(r)] if key(r) in rtn and rtn[key(r)] else float("nan")
        notes = []
        if r.get("gptq_grid") == "original" and "gptq" in r["algo"]:
            notes.append("grid from original W")
        if r.get("act_order"):
            notes.append("act-order")
        if r.get("weighted_fit"):
            notes.append("weighted fit")
        if r.get("calib_dtype"):
            notes.append(f"{r['calib_dtype']} calibration")
        if r.get("fallbacks", {}).get("count"):
            notes.append(f"{r['fallbacks']['count']} tensors fell back to {', '.join(r['fallbacks']['to'])}")
        if r.get("samples"):
            notes.append(f"{r['samples']}x{r['seq_len']} calib")
        print(f"| {r['grid']} | {key(r)[1]} | {r['algo']} | {r['kl']:.4f} | {r['ppl']:.3f} | {100 * r['top1']:.1f}% | "
              f"{ratio:.2f} | {r.get('wall_s', '')} | {r.get('peak_rss_mb', '')} | {'; '.join(notes)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("ref", "run", "table"):
        p = sub.add_parser(name)
        p.add_argument("--eval-stride", type=int, default=2)
        if name == "run":
            p.add_argument("grid")
            p.add_argument("algo", choices=["rtn", "gptq", "awq", "awq+gptq"])
            p.add_argument("--samples", type=int, default=32)
            p.add_argument("--seq-len", type=int, default=256)
            p.add_argument("--gptq-grid", default="updated", choices=["updated", "original"])
            p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
            p.add_argument("--weighted-fit", action=argparse.BooleanOptionalAction, default=True)
            p.add_argument("--calib-dtype", default="bfloat16", choices=["float32", "bfloat16"])
            p.add_argument("--awq-clip", default=None, type=lambda s: s == "1")
            p.add_argument("--fallback", action="store_true")
            p.add_argument("--embed", default=None, help="scheme for the embedding / lm_head (default: the grid)")
    args = ap.parse_args()
    {"ref": cmd_ref, "run": cmd_run, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
