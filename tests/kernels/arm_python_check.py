"""Python-level kernel checks without pytest, for an aarch64 Python under qemu (scripts/arm/run_arm_python.sh):
the C library loaded through qkiln.kernels.api equals the NumPy reference on every path the CPU allows; the GPTQ
loops and the portable attention (prefill and the decode step's) are checked once.
Prints one line per path and `python-check ok` / exits 1 on the first mismatch."""

from __future__ import annotations

import platform
import sys

import numpy as np

from qkiln.kernels import api, numpy_ref
from qkiln.kernels.types import WType


def random_blocks(wtype: WType, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    from qkiln.kernels.types import BLOCK, block_bytes

    raw = rng.integers(0, 256, block_bytes(wtype, n, k), dtype=np.uint8)
    blk = raw.reshape(-1, BLOCK[wtype][1])
    d = rng.uniform(-0.02, 0.02, (len(blk), 2)).astype(np.float16).view(np.uint8)  # (blocks, 4)
    if wtype in (WType.Q3_K, WType.Q6_K):  # d ends the block
        blk[:, -2:] = d[:, :2]
    elif wtype in (WType.Q2_K, WType.Q4_K, WType.Q5_K):  # d, dmin >= 0 (Q2_K's after its scales and codes)
        at = 80 if wtype == WType.Q2_K else 0
        blk[:, at:at + 4] = np.abs(d.view(np.float16)).view(np.uint8)
    elif wtype in (WType.Q4_1, WType.Q5_1):
        blk[:, 0:4] = d  # d and m
    else:
        blk[:, 0:2] = d[:, :2]
    return raw


def check_gptq_loops(rng: np.random.Generator) -> bool:
    """kernels.gptq's C loops (the portable variant on aarch64) give quantize/'s NumPy definitions' bits:
    a whole GPTQ run (scan and weighted INT fit) with the library and with QKILN_KERNEL=numpy."""
    import os

    from qkiln.kernels import gptq as c_loops
    from qkiln.quantize.gptq import PreparedHessian, gptq_quantize
    from qkiln.quantize.int_grid import IntGrid

    w = rng.standard_normal((21, 128)).astype(np.float32)
    x = rng.standard_normal((512, 128)) * rng.uniform(0.1, 3.0, 128)
    h = 2 * x.T @ x / len(x)
    # the prepared inverse made here with NumPy (prepare_hessian's LAPACK is scipy's, which this Python lacks): the
    # loops under test take it as it is, with act-order's permutation
    perm = np.argsort(-np.diag(h), kind="stable")
    hp = h[np.ix_(perm, perm)] + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
    upper = np.linalg.cholesky(np.linalg.inv(hp)).T.astype(np.float32)
    h = PreparedHessian(perm=perm, hinv=np.ascontiguousarray(upper), damp=0.01,
                        importance=(np.diag(h) / 2).astype(np.float32))
    runs = []
    for env in ("", "numpy"):
        os.environ["QKILN_KERNEL"] = env
        runs.append(gptq_quantize(w, h, IntGrid("int4_g32_asym", bits=4, group=32, symmetric=False),
                                  act_order=True, block_size=64))
    os.environ.pop("QKILN_KERNEL")
    (c, ref) = runs
    same = np.array_equal(c.codes, ref.codes) and all(np.array_equal(c.params[k], ref.params[k]) for k in ref.params)
    print(f"gptq loops: {'ok' if same else 'FAIL'} (C library in use: {c_loops.available()})")
    return same and c_loops.available()


def _softmax_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal GQA attention in float64: q (b, s, heads, d), k/v (b, kvh, t, d) -> (b * s, heads * d) float32
    (kernels.reference's definition, restated here: it imports ml_dtypes, which this Python lacks)."""
    b, s, heads, d = q.shape
    kvh, t = k.shape[1], k.shape[2]
    out = np.empty((b, s, heads, d))
    for bi in range(b):
        for h in range(heads):
            g = h // (heads // kvh)
            sc = q[bi, :, h].astype(np.float64) @ k[bi, g].T.astype(np.float64) / np.sqrt(d)  # (s, t)
            sc[np.arange(t)[None, :] > (t - s + np.arange(s))[:, None]] = -np.inf
            p = np.exp(sc - sc.max(axis=1, keepdims=True))
            out[bi, :, h] = (p / p.sum(axis=1, keepdims=True)) @ v[bi, g].astype(np.float64)
    return out.reshape(b * s, heads * d).astype(np.float32)


def check_attention(rng: np.random.Generator) -> bool:
    """The portable attention entry points through ctypes: qk_causal_attention_ex (the prefill units) and
    qk_decode_attention (the C decode step's), within 1e-5 of max|v| of a float64 NumPy reference, the same bits
    on 1 and 2 threads (GQA, head_dim 64 and 24, a key count off the 16- and 64-key blocks)."""
    import ctypes
    import os

    lib = ctypes.CDLL(os.environ["QKILN_KERNELS_LIB"])
    vp, ci = ctypes.c_void_p, ctypes.c_int
    lib.qk_causal_attention_ex.argtypes = [ci, vp, vp, vp, vp, ci, ci, ci, ci, ci, ci, vp, vp, vp, ci]
    lib.qk_decode_attention.argtypes = [ci, vp, vp, vp, vp, ci, ci, ci, ci, ci, vp, vp, vp, ci]
    ok = True
    for b, s, t, heads, kvh, d in ((2, 1, 37, 6, 2, 64), (1, 1, 130, 9, 3, 24), (1, 5, 40, 4, 2, 64)):
        q = rng.standard_normal((b, s, heads, d)).astype(np.float32)
        k, v = (rng.standard_normal((b, kvh, t, d)).astype(np.float32) for _ in range(2))
        want = _softmax_attention(q, k, v)
        runs = []
        for threads in (1, 2):
            out = np.empty((b * s, heads * d), np.float32)
            ptrs = [a.ctypes.data for a in (q, k, v, out)]
            if s == 1:
                rc = lib.qk_decode_attention(1, *ptrs, b, t, heads, kvh, d, None, None, None, threads)
            else:
                rc = lib.qk_causal_attention_ex(1, *ptrs, b, s, t, heads, kvh, d, None, None, None, threads)
            runs.append(out)
            err = float(np.abs(out - want).max()) / float(np.abs(v).max())
            if rc != 0 or err > 1e-5:
                print(f"FAIL attention {(b, s, t, heads, kvh, d)} threads {threads}: rc {rc}, error {err:.2e}")
                ok = False
        if not np.array_equal(runs[0], runs[1]):
            print(f"FAIL attention {(b, s, t, heads, kvh, d)}: 1 and 2 threads differ")
            ok = False
    print(f"attention: {'ok' if ok else 'FAIL'}")
    return ok


def main() -> int:
    rng = np.random.default_rng(0)
    print(f"{' '.join(sys.argv[1:])} machine={platform.machine()} numpy={np.__version__} "
          f"auto={api.kernel_path()} available={','.join(api.available_paths())} sve_bytes={api.sve_bytes()}")
    x = rng.standard_normal((3, 512)).astype(np.float32)
    ref_act = numpy_ref.quantize_q8(x)
    for path in api.available_paths():
        api.set_kernel_path(path)
        act = api.quantize_activations_q8(x)
        if not (np.array_equal(act.qs, ref_act.qs) and np.array_equal(act.d, ref_act.d)):
            print(f"FAIL {path}: activation quantization differs")
            return 1
        worst = 0.0
        for wtype in (WType.Q4_0, WType.Q8_0, WType.Q5_0, WType.Q4_1, WType.Q5_1, WType.Q2_K, WType.Q3_K, WType.Q4_K,
                      WType.Q5_K, WType.Q6_K):
            for n in (1, 7, 64):
                w = random_blocks(wtype, n, 512, rng)
                ref, yabs = numpy_ref.gemm(wtype, w, n, 512, ref_act, with_abs=True)
                ws, wt = (api.repack_q4_0x2(w, n, 512), WType.Q4_0X2) if wtype == WType.Q4_0 else (w, wtype)
                for weights, t in ((w, wtype), (ws, wt)):
                    y = api.gemm(t, weights, n, 512, ref_act)
                    err = float(np.max(np.abs(y - ref) / (yabs + 1e-30)))
                    worst = max(worst, err)
                    if err > numpy_ref.TOLERANCE:
                        print(f"FAIL {path} {t.name} n={n}: relative error {err}")
                        return 1
        codes = rng.integers(0, 256, (9, 256), dtype=np.uint8)
        scales = rng.uniform(0.01, 0.1, (9, 4)).astype(np.float32)
        zeros = rng.integers(0, 16, (9, 4), dtype=np.uint8)
        ref, yabs = numpy_ref.gemm_int4g(codes, scales, zeros, 128, 9, 512, ref_act, with_abs=True)
        y = api.gemm_int4g(codes, scales, zeros, 128, 9, 512, ref_act)
        if np.any(np.abs(y - ref) > numpy_ref.TOLERANCE * yabs + 1e-30):
            print(f"FAIL {path} int4 g128")
            return 1
        print(f"path {path}: ok (worst relative error {worst:.2e})")
    if not check_gptq_loops(rng) or not check_attention(rng):
        return 1
    print("python-check ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
