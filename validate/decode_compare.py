"""Decode speed of one GGUF file through qkiln's runtime (packed weights, C kernels, one C call per token
through kernels.decode.DecodeStep as runtime.generate decodes) and through llama.cpp
(llama-cpp-python), measured in the same process one after the other so both see the same machine load.

Both decode greedily from the same prompt with a KV cache; tokens/s counts generated tokens over the time
spent generating them (prompt processing excluded, timed separately).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from qkiln.demo import cache_dir, demo_gguf_path
from qkiln.formats.gguf_model import load_gguf_model
from qkiln.kernels import api
from qkiln.runtime.generate import KVCache, fast_decode_step

PROMPT = "The GNU General Public License is a free, copyleft license for software and other kinds of works."


def demo_q4_0_gguf() -> Path:
    """The demo model as a Q4_0 GGUF, made once by llama.cpp's own quantizer from the bundled Q4_1 file
    (re-quantized: llama.cpp falls back to Q8_0 for the 576-wide embedding, as for any Q4_0 model)."""
    import ctypes

    import llama_cpp

    dest = cache_dir() / "bench" / "demo-q4_0.gguf"
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(demo_gguf_path()).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    tmp.replace(dest)
    return dest


def qkiln_decode(path: str | Path, tokens: int = 64, threads: int | None = None, prompt: str = PROMPT,
                 fast: bool = True, prompt_tokens: int | None = None, prompt_reps: int = 1) -> dict:
    """Greedy decode through qkiln's runtime; `fast=False` runs every token through the NumPy layer code
    (runtime/llama.py) instead of the C decode step, for comparison. `prompt_tokens` repeats the prompt's tokens to
    that length (llama-bench's pp128 is 128 tokens); the prompt is processed `prompt_reps` times into a fresh cache
    and prompt_tps is the mean of the runs' tokens/s (llama-bench's avg_ts), the last run's cache decoding after."""
    lm = load_gguf_model(path, nthreads=threads)
    model = lm.model
    ids = lm.encode(prompt)  # (s,)
    if prompt_tokens is not None:
        ids = np.resize(ids, prompt_tokens)  # the prompt's tokens repeated, cut to prompt_tokens
    model.forward(ids[None, :1])  # warm: dequantize the embeddings, start the thread pool
    rates = []
    for _ in range(max(1, prompt_reps)):
        cache = KVCache(model.config, ids.size + tokens + 1, batch=1)
        t0 = time.perf_counter()
        h = model.hidden(ids[None, :], start_pos=0, cache=cache)
        logits = model.head(h[:, -1:])[0, -1]  # (vocab,)
        rates.append(ids.size / (time.perf_counter() - t0))
    out: list[int] = []
    pos = ids.size
    t0 = time.perf_counter()
    step = fast_decode_step(model, cache) if fast else None  # as runtime.generate decodes
    for _ in range(tokens):
        tok = int(np.argmax(logits))
        out.append(tok)
        if step is not None:
            logits = step(tok, pos)
        else:
            h = model.hidden(np.array([[tok]], dtype=np.int64), start_pos=pos, cache=cache)
            logits = model.head(h)[0, -1]
        pos += 1
    t_decode = time.perf_counter() - t0
    return {"runtime": "qkiln", "kernel_path": api.kernel_path(), "c_decode_step": step is not None, "prompt_tokens": int(ids.size),
            "prompt_tps": float(np.mean(rates)), "decode_tokens": tokens, "decode_tps": tokens / t_decode,
            "text": lm.tokenizer.decode(out)}


def llamacpp_decode(path: str | Path, tokens: int = 64, threads: int | None = None, prompt: str = PROMPT) -> dict:
    import llama_cpp

    n_threads = threads or 2
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=n_threads, n_threads_batch=n_threads,
                          n_batch=512, verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    llm.eval(ids[:1])  # warm
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t_prompt = time.perf_counter() - t0
    out: list[int] = []
    t0 = time.perf_counter()
    for _ in range(tokens):
        last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the logits of the last evaluated token
        tok = int(np.argmax(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),))))
        out.append(tok)
        llm.eval([tok])
    t_decode = time.perf_counter() - t0
    return {"runtime": "llama.cpp", "prompt_tokens": len(ids), "prompt_tps": len(ids) / t_prompt,
            "decode_tokens": tokens, "decode_tps": tokens / t_decode,
            "text": llm.detokenize(out).decode("utf-8", "replace")}


def compare_decode(path: str | Path, tokens: int = 64, threads: int | None = None, rounds: int = 2) -> dict:
    """Alternate qkiln and llama.cpp `rounds` times; report each one's best and the ratio of the bests."""
    runs_q, runs_l = [], []
    for _ in range(rounds):
        runs_q.append(qkiln_decode(path, tokens, threads))
        runs_l.append(llamacpp_decode(path, tokens, threads))
    best_q = max(runs_q, key=lambda r: r["decode_tps"])
    best_l = max(runs_l, key=lambda r: r["decode_tps"])
    return {"file": str(path), "qkiln": best_q, "llama_cpp": best_l,
            "decode_ratio": round(best_q["decode_tps"] / best_l["decode_tps"], 3),
            "all_decode_tps": {"qkiln": [round(r["decode_tps"], 1) for r in runs_q],
                               "llama_cpp": [round(r["decode_tps"], 1) for r in runs_l]}}
