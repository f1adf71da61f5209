"""Prompt-processing speed of `qkiln eval` against transformers on the demo model, measured in the same run.

    python bench/eval_vs_transformers.py [--windows 8] [--ctx 512]

Prints tokens/s of both and the ratio qkiln / transformers. Not a test: this machine is noisy, so the
two are measured side by side, alternating, and the best of the repeats is kept for each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import torch
    import transformers

    from qkiln.demo import demo_model_dir
    from qkiln.pipeline.load import load_model
    from qkiln.validate.windows import make_windows

    demo = demo_model_dir()
    text = b"".join(Path(f"/usr/share/common-licenses/{n}").read_bytes() for n in ("GPL-2", "Apache-2.0", "MPL-2.0"))
    lm = load_model(demo)
    windows = make_windows(lm.encode(text.decode()), args.ctx, max_windows=args.windows)
    torch.set_num_threads(2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()

    def run_qkiln() -> float:
        t0 = time.perf_counter()
        for w in windows:
            lm.logits(w[None])
        return time.perf_counter() - t0

    def run_hf() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for w in windows:
                hf(torch.from_numpy(w[None])).logits.numpy()
        return time.perf_counter() - t0

    run_qkiln(), run_hf()  # warm up both
    q = min(run_qkiln() for _ in range(args.repeats))
    h = min(run_hf() for _ in range(args.repeats))
    n = windows.size
    print(f"tokens          {n} ({len(windows)} windows x {args.ctx})")
    print(f"qkiln           {n / q:9.1f} tokens/s")
    print(f"transformers    {n / h:9.1f} tokens/s")
    print(f"ratio           {h / q:9.3f}  (qkiln / transformers)")


if __name__ == "__main__":
    main()
