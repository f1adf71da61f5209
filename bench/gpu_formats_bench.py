"""Benchmark (not a test): W4A16 GPTQ of the demo model, group 64, as compressed-tensors — llm-compressor's
GPTQModifier against qkiln's GPTQ and AWQ+GPTQ on the same grid and the same calibration windows, every
artifact scored by transformers (+ compressed-tensors) against the float model.

    python bench/gpu_formats_bench.py [--samples 128] [--seq-len 512] [--eval-windows 19] [--skip-llmc]
                                      [--keep DIR] [--only llmc|qkiln|score] [--llmc-dtype float32|bfloat16]

With --keep DIR the runs can be split over invocations (each tool on a quiet machine: llm-compressor alone
takes ~25 CPU-minutes): every run's measurement is saved beside its artifact (DIR/runs.json, with the
load average before and after it), a later invocation with the same DIR and --only skips the runs it does
not name, and the table scores every artifact the folder holds.

llm-compressor is never installed into the locked test environment: this script makes its own virtual
environment under qkiln's cache folder (qkiln.demo.cache_dir(): ~/.cache/qkiln)/llmcompressor-<version>/ (torch 2.13.0+cpu from /opt/wheels, as in the
lock, plus llmcompressor from PyPI) the first time, and runs it there as a child process.

Each quantization runs in its own child process, which reports its wall time, CPU seconds and peak RSS
(getrusage, the whole process: interpreter, torch, model, calibration data). On a shared 2-core host the
CPU seconds are the fairer figure: other guests stretch the wall time of whichever run they overlap. Calibration: GPL-3 + LGPL-2.1 + GFDL-1.3
repeated end to end to fill `samples` windows of `seq-len` tokens (qkiln's windows, handed to both tools as
the same token ids). Score: mean KL(P_float ‖ P_quant) and perplexity over windows of 512 tokens of
GPL-2 + Apache-2.0 + MPL-2.0, every model run by transformers in float32.

llm-compressor runs the model in the dtype it is loaded in: float32 by default (the demo checkpoint's dtype);
--llmc-dtype bfloat16 loads it in bfloat16 instead, as qkiln's calibration products round to bfloat16 (its GPTQ
Hessians stay float32 either way), saved as a separate run ("llm-compressor gptq bf16").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

LLMC_VERSION = "0.14.0.1"
LICENSES = Path("/usr/share/common-licenses")
CALIB = ("GPL-3", "LGPL-2.1", "GFDL-1.3")
EVAL = ("GPL-2", "Apache-2.0", "MPL-2.0")


def llmc_python() -> Path:
    """The llm-compressor environment's python, created on first use."""
    from qkiln.demo import cache_dir

    venv = cache_dir() / f"llmcompressor-{LLMC_VERSION}"
    py = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--find-links", "/opt/wheels",
                        "torch==2.13.0+cpu", f"llmcompressor=={LLMC_VERSION}"], check=True)
        (venv / ".complete").write_text("")
    return py


RSS = ("import resource; ru = resource.getrusage(resource.RUSAGE_SELF); rss = ru.ru_maxrss * 1024; "
       "cpu = ru.ru_utime + ru.ru_stime")

LLMC_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
demo, ids_path, out, dtype = sys.argv[1:5]
torch.set_num_threads(2)
ids = np.load(ids_path)
model = AutoModelForCausalLM.from_pretrained(demo, dtype=getattr(torch, dtype))
tok = AutoTokenizer.from_pretrained(demo)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
recipe = GPTQModifier(ignore=["lm_head"], dampening_frac=0.01, config_groups={"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                       "group_size": 64}}})
oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=len(ids))
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
RSS_LINE
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": cpu, "peak_rss": rss}))
""".replace("RSS_LINE", RSS)

QKILN_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from qkiln.pipeline.gpu import convert_to_gpu
demo, calib, out, algo, samples, seq_len = sys.argv[1:7]
convert_to_gpu(Path(demo), Path(out), "compressed-tensors", "int4_g64", algorithm=algo, calib=[Path(calib)],
               samples=int(samples), seq_len=int(seq_len))
RSS_LINE
print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": cpu, "peak_rss": rss}))
""".replace("RSS_LINE", RSS)


def run_child(cmd: list[str]) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"child failed: {' '.join(cmd[:2])}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def score(folders: dict[str, Path], demo: Path, windows: np.ndarray) -> dict[str, dict]:
    import torch
    import transformers

    from qkiln.validate.artifact import torch_logits
    from qkiln.validate.evaluate import evaluate

    torch.set_num_threads(2)
    ref = torch_logits(transformers.AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval())
    out = {}
    for name, folder in folders.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        r = evaluate(torch_logits(model), windows, reference=ref).as_dict()
        out[name] = {k: r[k] for k in ("perplexity", "mean_kl", "top1_agreement")}
        print(name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=19)
    ap.add_argument("--skip-llmc", action="store_true", help="only qkiln's runs (llm-compressor not installed)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the artifacts (and runs.json) in this folder")
    ap.add_argument("--only", choices=("llmc", "qkiln", "score"), default=None,
                    help="run only these quantizations (or none: score what --keep holds)")
    ap.add_argument("--llmc-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the dtype llm-compressor loads and runs the model in")
    args = ap.parse_args()
    if args.only is not None and args.keep is None:
        ap.error("--only needs --keep: the other runs' artifacts and measurements live there")

    from qkiln.demo import demo_model_dir
    from qkiln.formats.hf import Checkpoint
    from qkiln.pipeline.load import load_model
    from qkiln.pipeline.stream import calibration_windows
    from qkiln.validate.windows import make_windows

    demo = demo_model_dir()
    work = Path(tempfile.mkdtemp(prefix="qkiln-gpu-bench-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    text = "".join((LICENSES / n).read_text() for n in CALIB)
    ckpt = Checkpoint.open(demo)
    n_tokens = len(ckpt.tokenizer().encode(text, add_special_tokens=False).ids)
    reps = -(-args.samples * args.seq_len // max(1, n_tokens)) + 1
    calib = work / "calib.txt"
    calib.write_text(text * reps)
    ids = calibration_windows(ckpt, [calib], args.samples, args.seq_len)
    np.save(work / "calib_ids.npy", ids)
    print(f"calibration: {ids.shape[0]} x {ids.shape[1]} tokens ({n_tokens} distinct tokens, repeated {reps}x)")

    saved = work / "runs.json"
    runs: dict[str, dict] = json.loads(saved.read_text()) if args.only is not None and saved.exists() else {}
    llmc = "llm-compressor gptq" + (" bf16" if args.llmc_dtype == "bfloat16" else "")
    folders = {"llm-compressor gptq": work / "llmc-gptq", "llm-compressor gptq bf16": work / "llmc-gptq-bf16",
               "qkiln gptq": work / "qkiln-gptq", "qkiln awq+gptq": work / "qkiln-awq-gptq"}

    def measure(name: str, cmd: list[str]) -> None:
        load = os.getloadavg()[0]
        runs[name] = {**run_child(cmd), "load_before": load, "load_after": os.getloadavg()[0]}
        saved.write_text(json.dumps(runs, indent=2))
        print(name, runs[name], flush=True)

    if not args.skip_llmc and args.only in (None, "llmc"):
        measure(llmc, [str(llmc_python()), "-P", "-c", textwrap.dedent(LLMC_CHILD), str(demo),
                       str(work / "calib_ids.npy"), str(folders[llmc]), args.llmc_dtype])
    for algo in ("gptq", "awq+gptq") if args.only in (None, "qkiln") else ():
        name = f"qkiln {algo}"
        measure(name, [sys.executable, "-P", "-c", textwrap.dedent(QKILN_CHILD), str(demo), str(calib),
                       str(folders[name]), algo, str(args.samples), str(args.seq_len)])
    folders = {name: folder for name, folder in folders.items() if name in runs}

    lm = load_model(demo)
    text_eval = "".join((LICENSES / n).read_text() for n in EVAL)
    windows = make_windows(lm.encode(text_eval), 512, max_windows=args.eval_windows)
    scores = score(folders, demo, windows)
    print()
    print(f"{'':25s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS GB':>12s} {'mean KL':>9s} {'top-1':>7s} {'ppl':>8s} "
          f"{'load':>9s}")
    for name in folders:
        r, s = runs[name], scores[name]
        print(f"{name:25s} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_rss'] / 1e9:12.2f} {s['mean_kl']:9.4f} "
              f"{s['top1_agreement']:7.3f} {s['perplexity']:8.3f} {r.get('load_before', float('nan')):4.1f}/"
              f"{r.get('load_after', float('nan')):4.1f}")
    print(json.dumps({"runs": runs, "scores": scores, "samples": args.samples, "seq_len": args.seq_len,
                      "eval_windows": len(windows)}, indent=2))


if __name__ == "__main__":
    main()
