"""qkiln's GGUF artifacts scored through llama.cpp itself.

Two reports:

  python bench/gguf_vs_llamacpp.py ppl [--types f32,f16,...] [--max-windows N]
      For each type, qkiln writes the demo model's GGUF (RTN); llama.cpp's perplexity over the eval
      text at ctx 512 (from its logits) is compared with qkiln's NumPy runtime on the same artifact
      (weights dequantized from the file). Shows that llama.cpp runs each artifact as qkiln means it.

  python bench/gguf_vs_llamacpp.py compare [--algo gptq] [--max-windows N]
      llama.cpp's own Q4_0 and Q4_K_M (llama_model_quantize from qkiln's F32 GGUF) vs qkiln's calibrated
      Q4_0 and Q4_K_M (calibrated on GPL-3 + LGPL-2.1 + GFDL-1.3), all scored through llama.cpp's logits
      against the unquantized model: mean KL, perplexity, top-1 agreement, file size.

Windows, scored tokens and metrics follow validate/ (tokenized once without BOS, non-overlapping
windows of ctx tokens, each run on its own).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qkiln.validate.artifact import llamacpp_window_logits

LICENSES = Path("/usr/share/common-licenses")
EVAL_FILES = [LICENSES / n for n in ("GPL-2", "Apache-2.0", "MPL-2.0")]
CALIB_FILES = [LICENSES / n for n in ("GPL-3", "LGPL-2.1", "GFDL-1.3")]
CTX = 512

LogitsFn = Callable[[np.ndarray], np.ndarray]


def eval_text(files: list[Path] = EVAL_FILES) -> str:
    """`cat` of the files, exactly."""
    return "".join(p.read_text(encoding="utf-8") for p in files)


def llamacpp_model(path: Path, ctx: int = CTX, threads: int | None = None, *, repack: bool = True):
    """llama.cpp (llama-cpp-python) with logits for every position of a window.

    `repack=False` turns off llama.cpp's load-time repacking of Q4_0 (and IQ4_NL) into its
    interleaved SIMD layouts (`use_extra_bufts`): on this x86 machine the repacked Q4_0 GEMM gives
    measurably different logits from the plain Q4_0 dot product on the very same file.
    """
    import llama_cpp.llama_cpp as lc
    from llama_cpp import Llama

    default_params = lc.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = repack
        return p

    lc.llama_model_default_params = params
    try:
        return Llama(
            model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False,
            n_threads=threads or os.cpu_count() or 1, seed=0,
        )
    finally:
        lc.llama_model_default_params = default_params




def qkiln_logits(path: Path) -> LogitsFn:
    """ids (1, n) -> logits from qkiln's NumPy runtime on the weights dequantized from the GGUF file."""
    from qkiln.formats.gguf_import import config_from_gguf, load_llama_tensors
    from qkiln.formats.gguf_read import read_gguf
    from qkiln.model.source import DictSource
    from qkiln.runtime.llama import LlamaModel

    f = read_gguf(path)
    cfg = config_from_gguf(f)
    model = LlamaModel(DictSource(cfg, load_llama_tensors(f, cfg)))
    return lambda ids: model.forward(ids)


def windows_for(tokenizer_json: Path, ctx: int = CTX, max_windows: int | None = None) -> np.ndarray:
    """Eval windows (n, ctx) tokenized by the HF tokenizer (llama.cpp's tokenization equals it; tested)."""
    import tokenizers

    from qkiln.validate.windows import make_windows

    tok = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    ids = tok.encode(eval_text(), add_special_tokens=False).ids
    return make_windows(ids, ctx, max_windows=max_windows)


def score(fn: LogitsFn, windows: np.ndarray, reference: LogitsFn | None = None) -> dict:
    from qkiln.validate.evaluate import evaluate

    return evaluate(fn, windows, reference=reference).as_dict()


def llamacpp_quantize(src: Path, dest: Path, ftype: int, threads: int = 2) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize, RTN/importance-free) from an F32/F16 GGUF."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")
    return dest


# ---------------------------------------------------------------------------------------------


def cmd_ppl(args: argparse.Namespace) -> list[dict]:
    from qkiln.demo import demo_model_dir
    from qkiln.pipeline.convert import convert_to_gguf

    model = Path(args.model) if args.model else demo_model_dir()
    windows = windows_for(model / "tokenizer.json", max_windows=args.max_windows)
    rows = []
    for t in args.types.split(","):
        out = Path(args.workdir) / f"qkiln-{t}.gguf"
        convert_to_gguf(model, out, t, uniform=True)
        t0 = time.perf_counter()
        llm = llamacpp_model(out)
        ll = score(llamacpp_window_logits(llm), windows)
        del llm
        t1 = time.perf_counter()
        llm = llamacpp_model(out, repack=False)
        plain = score(llamacpp_window_logits(llm), windows)
        del llm
        t2 = time.perf_counter()
        qk = score(qkiln_logits(out), windows)
        t3 = time.perf_counter()
        row = {
            "type": t, "bytes": out.stat().st_size, "ppl_llamacpp": ll["perplexity"],
            "ppl_llamacpp_no_repack": plain["perplexity"], "ppl_qkiln": qk["perplexity"],
            "rel_diff": ll["perplexity"] / qk["perplexity"] - 1,
            "rel_diff_no_repack": plain["perplexity"] / qk["perplexity"] - 1,
            "tokens": ll["scored_tokens"], "s_llamacpp": t1 - t0, "s_qkiln": t3 - t2,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.unlink()
    print(
        "\n| type | MiB | ppl llama.cpp | ppl llama.cpp (no repack) | ppl qkiln runtime | diff | diff (no repack) |"
        "\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['type']} | {r['bytes'] / 2**20:.1f} | {r['ppl_llamacpp']:.4f} | {r['ppl_llamacpp_no_repack']:.4f} | "
            f"{r['ppl_qkiln']:.4f} | {100 * r['rel_diff']:+.3f}% | {100 * r['rel_diff_no_repack']:+.3f}% |"
        )
    return rows


def score_against_reference(
    ref: Path, candidates: list[tuple[str, Path]], windows: np.ndarray, *, repack: bool = True
) -> list[dict]:
    """Window by window: the reference's logits once, then every candidate's, all through llama.cpp."""
    from qkiln.validate.metrics import TokenScores

    ref_fn = llamacpp_window_logits(llamacpp_model(ref))
    fns = [llamacpp_window_logits(llamacpp_model(path, repack=repack)) for _, path in candidates]
    ref_scores = TokenScores()
    scores = [TokenScores() for _ in candidates]
    for i, window in enumerate(windows):
        ref_logits = ref_fn(window[None])[0]
        ref_scores.add_window(window, ref_logits)
        for fn, sc in zip(fns, scores, strict=True):
            sc.add_window(window, fn(window[None])[0], ref_logits)
        print(f"# window {i + 1}/{len(windows)}", file=sys.stderr, flush=True)
    rows = [{"model": "f32 (reference)", "bytes": ref.stat().st_size, **ref_scores.as_dict()}]
    rows += [{"model": label, "bytes": path.stat().st_size, **sc.as_dict()} for (label, path), sc in zip(candidates, scores, strict=True)]
    return rows


def cmd_compare(args: argparse.Namespace) -> list[dict]:
    from gguf import LlamaFileType

    from qkiln.demo import demo_model_dir
    from qkiln.pipeline.convert import convert_to_gguf

    model = Path(args.model) if args.model else demo_model_dir()
    work = Path(args.workdir)
    windows = windows_for(model / "tokenizer.json", max_windows=args.max_windows)
    base = work / "base-f32.gguf"
    if not (args.reuse and base.exists()):
        convert_to_gguf(model, base, "f32")
    candidates: list[tuple[str, Path]] = []
    for preset, ftype in (("q4_0", LlamaFileType.MOSTLY_Q4_0), ("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M)):
        lc = work / f"llamacpp-{preset}.gguf"
        if not (args.reuse and lc.exists()):
            llamacpp_quantize(base, lc, int(ftype))
        candidates.append((f"llama.cpp {preset} (its quantizer)", lc))
        for algo in args.algo.split(","):
            qk = work / f"qkiln-{preset}-{algo}.gguf"
            if not (args.reuse and qk.exists()):
                t0 = time.perf_counter()
                convert_to_gguf(model, qk, preset, algorithm=algo, calib=CALIB_FILES if algo != "rtn" else (),
                                samples=args.samples)
                print(f"# qkiln {preset} {algo}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            candidates.append((f"qkiln {preset} ({algo})", qk))
    rows = score_against_reference(base, candidates, windows)
    for row in rows:
        print(json.dumps(row), flush=True)
    print("\n| model | MiB | mean KL | perplexity | top-1 agreement |\n|---|---:|---:|---:|---:|")
    for r in rows:
        kl = f"{r['mean_kl']:.5f}" if r.get("mean_kl") is not None else "—"
        top1 = f"{100 * r['top1_agreement']:.2f}%" if r.get("top1_agreement") is not None else "—"
        print(f"| {r['model']} | {r['bytes'] / 2**20:.1f} | {kl} | {r['perplexity']:.4f} | {top1} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (default: the demo model)")
    p.add_argument("--workdir", default="/tmp/qkiln-gguf-bench")
    p.add_argument("--max-windows", type=int, default=None)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("ppl")
    pp.add_argument("--types", default="f32,f16,bf16,q8_0,q4_0,q4_1,q5_0,q5_1,q4_k,q5_k,q6_k")
    pc = sub.add_parser("compare")
    pc.add_argument("--algo", default="gptq", help="comma-separated qkiln algorithms (rtn, gptq, awq, awq+gptq)")
    pc.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens (the text holds 36)")
    pc.add_argument("--reuse", action="store_true", help="keep artifacts already in --workdir")
    args = p.parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    {"ppl": cmd_ppl, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    main()
