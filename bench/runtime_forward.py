"""Speed of the NumPy runtime on a SmolLM2-135M-shaped model with random weights (no download needed).

    python bench/runtime_forward.py [--tokens 512] [--repeats 3] [--decode 32]

Prints the prompt forward's tokens/s (best of the repeats, wall clock and process CPU time, split into
decoder layers and head) and greedy decoding tokens/s with the KV cache. Not a test: wall time on a
shared machine is noisy, and OpenBLAS with more threads than free cores slows down many-fold (its
threads spin); compare with OPENBLAS_NUM_THREADS=1 when other jobs run.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from qkiln.model.config import LlamaConfig
from qkiln.model.names import expected_shapes
from qkiln.model.source import DictSource
from qkiln.runtime.generate import generate_greedy
from qkiln.runtime.llama import LlamaModel

SMOLLM2_135M = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


def random_model(cfg: LlamaConfig, seed: int = 0) -> LlamaModel:
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in expected_shapes(cfg, with_head=True).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if len(shape) == 1:
            tensors[name] = 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            tensors[name] = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(shape[1]))
    return LlamaModel(DictSource(cfg, tensors))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args()

    model = random_model(SMOLLM2_135M)
    ids = np.random.default_rng(1).integers(0, SMOLLM2_135M.vocab_size, size=(1, args.tokens))  # (1, s)
    model.forward(ids[:, :8])  # fuse and cache the weights outside the timing
    best_wall, best_cpu, best_layers, best_head = math.inf, math.inf, math.inf, math.inf
    for _ in range(args.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        h = model.hidden(ids)
        w1 = time.perf_counter()
        model.head(h)
        w2, c2 = time.perf_counter(), time.process_time()
        best_wall, best_cpu = min(best_wall, w2 - w0), min(best_cpu, c2 - c0)
        best_layers, best_head = min(best_layers, w1 - w0), min(best_head, w2 - w1)
    print(
        f"prompt (1, {args.tokens}): {best_wall:.3f} s wall = {args.tokens / best_wall:.0f} tokens/s "
        f"(layers {best_layers:.3f} s, head {best_head:.3f} s; process CPU {best_cpu:.3f} s)"
    )
    if args.decode:
        t0 = time.perf_counter()
        generate_greedy(model, ids[0, :16], args.decode, eos_ids=set())
        dt = time.perf_counter() - t0
        print(f"greedy decode: {args.decode} tokens after a 16-token prompt in {dt:.2f} s = {args.decode / dt:.1f} tokens/s")


if __name__ == "__main__":
    main()
