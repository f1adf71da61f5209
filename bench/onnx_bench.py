"""Benchmark (not a timed test): qkiln's ONNX int4 against onnxruntime-genai's own model builder, same run.

    python bench/onnx_bench.py [--builder-algos rtn,k_quant,default] [--samples 36] [--seq-len 512]
                               [--max-windows N] [--prompt 256] [--decode 64] [--rounds 3] [--work DIR]

On the demo model (SmolLM2-135M-Instruct):
- the builder (`python -m onnxruntime_genai.models.builder -p int4 -e cpu`, block_size=32) with each of its
  data-free int4 methods; its best (lowest mean KL) is the one compared;
- qkiln `convert --to onnx --scheme int4_g32` with --algo rtn, gptq and awq+gptq, calibrated on GPL-3 +
  LGPL-2.1 + GFDL-1.3 (disjoint from the evaluation text), --samples x --seq-len;
- llama.cpp's Q4_0 of the same model (`qkiln convert --to gguf --scheme q4_0`, byte-identical to llama.cpp's
  own quantizer), scored by llama-cpp-python and timed by `llama-bench` built for this CPU (bench/llamacpp_ref.py).
Accuracy: windows of 512 tokens of GPL-2 + Apache-2.0 + MPL-2.0, each model's logits (ONNX through
onnxruntime, Q4_0 through llama.cpp) against the unquantized model (qkiln's float32 runtime): mean KL,
perplexity, top-1 agreement. Speed: onnxruntime-genai prompt (append_tokens of --prompt tokens) and decode
(--decode greedy tokens) tokens/s, rounds interleaved between the models, median reported; llama.cpp by
`llama-bench -p PROMPT -n DECODE` in each of llamacpp_speed.VARIANTS (its OpenMP threads spin on a shared host;
the best configuration's median counts: never a figure that flatters qkiln). Conversion: wall time and peak RSS of each converting process (os.wait4).
Prints one JSON document on stdout (progress on stderr) and writes it to WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_vs_llamacpp import CALIB_FILES, EVAL_FILES, llamacpp_model, windows_for
from llamacpp_ref import tools as llamacpp_tools
from llamacpp_speed import VARIANTS, llama_bench

from qkiln.validate.artifact import llamacpp_window_logits

BIN = Path(sys.executable).parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_measured(cmd: list[str], cwd: Path) -> dict:
    """Run `cmd`; its wall time and peak RSS (its own, from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)}


def onnx_bytes(folder: Path) -> int:
    return sum((folder / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))


def convert_all(args: argparse.Namespace, demo: Path, work: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for algo in args.builder_algos.split(","):
        dest = work / f"builder-{algo}"
        log(f"builder int4 block 32 {algo} ...")
        r = run_measured([str(BIN / "python"), "-P", "-m", "onnxruntime_genai.models.builder", "-i", str(demo), "-o", str(dest),
                          "-p", "int4", "-e", "cpu", "-c", str(work / "hf-cache"), "--extra_options", "block_size=32",
                          f"algo_config={algo}"], work)
        out[f"builder-{algo}"] = {**r, "path": str(dest), "bytes": onnx_bytes(dest), "kind": "onnx"}
    calib = [str(p) for p in CALIB_FILES]
    for algo in args.qkiln_algos.split(","):
        dest = work / f"qkiln-{algo}"
        log(f"qkiln int4_g32 {algo} ...")
        cmd = [str(BIN / "qkiln"), "convert", "--to", "onnx", "--model", str(demo), "--scheme", "int4_g32", "--algo", algo,
               "-o", str(dest), "--force"]
        if algo != "rtn":
            cmd += [a for p in calib for a in ("--calib", p)] + ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
        r = run_measured(cmd, work)
        out[f"qkiln-{algo}"] = {**r, "path": str(dest), "bytes": onnx_bytes(dest), "kind": "onnx"}
    gguf = work / "llamacpp-q4_0.gguf"
    log("Q4_0 GGUF ...")
    r = run_measured([str(BIN / "qkiln"), "convert", "--to", "gguf", "--model", str(demo), "--scheme", "q4_0", "-o", str(gguf)], work)
    out["llamacpp-q4_0"] = {**r, "path": str(gguf), "bytes": gguf.stat().st_size, "kind": "gguf"}
    return out


def accuracy(models: dict[str, dict], demo: Path, max_windows: int | None) -> None:
    from qkiln.formats.hf import Checkpoint
    from qkiln.formats.onnx_run import OnnxLlama
    from qkiln.runtime.llama import LlamaModel
    from qkiln.validate.metrics import TokenScores

    windows = windows_for(demo / "tokenizer.json", 512, max_windows)
    ref = LlamaModel(Checkpoint.open(demo))
    runners = {}
    for name, m in models.items():
        runners[name] = (llamacpp_window_logits(llamacpp_model(Path(m["path"]), 512)) if m["kind"] == "gguf"
                         else OnnxLlama(Path(m["path"])).forward)
    scores = {name: TokenScores() for name in models}
    for i, w in enumerate(windows):
        log(f"window {i + 1}/{len(windows)}")
        want = ref.forward(w[None])[0]
        for name, fn in runners.items():
            scores[name].add_window(w, fn(w[None])[0], want)
    for name, s in scores.items():
        models[name].update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in s.as_dict().items()})


def speed(models: dict[str, dict], demo: Path, prompt_len: int, decode: int, rounds: int) -> None:
    import onnxruntime_genai as og
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(demo / "tokenizer.json"))
    prompt = tok.encode("".join(p.read_text() for p in EVAL_FILES), add_special_tokens=False).ids[:prompt_len]
    loaded: dict[str, object] = {name: og.Model(m["path"]) for name, m in models.items() if m["kind"] == "onnx"}
    times: dict[str, dict[str, list[float]]] = {n: {"prompt": [], "decode": []} for n in models}
    bin_dir, _ = llamacpp_tools()  # llama.cpp built for this CPU (llamacpp_ref), not the AVX2-only test wheel
    llama_variants: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    gguf = next(m["path"] for m in models.values() if m["kind"] == "gguf")
    for r in range(rounds):
        for v, (env, threads) in VARIANTS.items():  # its best configuration counts (OpenMP spinning, see llamacpp_speed)
            llama_variants[v].append(llama_bench(bin_dir, gguf, prompt_len, prompt_len, decode, threads or 2, 1,
                                                 Path(models[next(iter(loaded))]["path"]).parent, env))
        for name, model in loaded.items():
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=prompt_len + decode, do_sample=False)
            gen = og.Generator(model, params)
            t0 = time.perf_counter()
            gen.append_tokens(prompt)
            t1 = time.perf_counter()
            for _ in range(decode):
                gen.generate_next_token()
            t2 = time.perf_counter()
            del gen
            times[name]["prompt"].append(len(prompt) / (t1 - t0))
            times[name]["decode"].append(decode / (t2 - t1))
            log(f"round {r + 1} {name}: prompt {times[name]['prompt'][-1]:.0f} tok/s, decode {times[name]['decode'][-1]:.1f} tok/s")
    for name in loaded:
        models[name]["prompt_tok_s"] = round(statistics.median(times[name]["prompt"]), 1)
        models[name]["decode_tok_s"] = round(statistics.median(times[name]["decode"]), 1)
    med = {v: {k: statistics.median(r[k] for r in runs) for k in (f"pp{prompt_len}", f"tg{decode}")}
           for v, runs in llama_variants.items()}
    name = next(n for n, m in models.items() if m["kind"] == "gguf")
    models[name]["prompt_tok_s"] = round(max(m[f"pp{prompt_len}"] for m in med.values()), 1)
    models[name]["decode_tok_s"] = round(max(m[f"tg{decode}"] for m in med.values()), 1)
    models[name]["llama_bench_variants"] = med
    models[name]["timed_by"] = "llama-bench built for this CPU (bench/llamacpp_ref.py), best configuration's median"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qkiln-onnx-bench"))
    ap.add_argument("--builder-algos", default="rtn,k_quant,default")
    ap.add_argument("--qkiln-algos", default="rtn,gptq,awq+gptq")
    ap.add_argument("--samples", type=int, default=36)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-convert", action="store_true", help="reuse WORK/results.json's artifacts")
    ap.add_argument("--skip-accuracy", action="store_true", help="reuse WORK/results.json's accuracy figures too")
    ap.add_argument("--skip-speed", action="store_true", help="stop after accuracy (time on an idle machine later)")
    args = ap.parse_args()
    from qkiln.demo import demo_model_dir

    demo = demo_model_dir()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    reuse = args.skip_convert or args.skip_accuracy
    models = json.loads((work / "results.json").read_text())["models"] if reuse else convert_all(args, demo, work)
    if not args.skip_accuracy:
        accuracy(models, demo, args.max_windows)
    builders = {n: m for n, m in models.items() if n.startswith("builder-")}
    best = min(builders, key=lambda n: builders[n]["mean_kl"])
    timed = {n: models[n] for n in (best, *[n for n in models if n.startswith("qkiln-") and n != "qkiln-rtn"], "llamacpp-q4_0")}
    if not args.skip_speed:
        speed(timed, demo, args.prompt, args.decode, args.rounds)
    doc = {
        "models": models,
        "builder_best": best,
        "kl_ratio_vs_builder": {n: round(models[n]["mean_kl"] / models[best]["mean_kl"], 3) for n in models if n.startswith("qkiln-")},
        "speed_ratio_vs_builder": {n: {k: round(models[n][k] / models[best][k], 3) for k in ("prompt_tok_s", "decode_tok_s")}
                                   for n in timed if n.startswith("qkiln-") and "decode_tok_s" in models[n]},
        "load_average": os.getloadavg(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu": os.cpu_count(),
    }
    (work / "results.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(json.dumps(doc, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
