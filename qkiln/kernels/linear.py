"""Packed linears for qkiln's runtime: a quantized artifact runs on its own blocks through the C kernels.

`PackedLinear` holds one weight matrix in a kernel layout and is the `op` that `LlamaModel.set_linear`
takes (x (tokens, in) f32 -> (tokens, out) f32). `formats.gguf_model.load_gguf_model` builds them from a
GGUF's blocks, `quantize.packed` from QuantizedTensors; this module knows neither format nor quantizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from qkiln.kernels import api
from qkiln.kernels.types import BLOCK, WType, block_bytes
from qkiln.model.names import INPUT_GROUPS

KERNEL_TYPES = {int(t) for t in BLOCK}  # ggml type ids with a kernel


@dataclass
class PackedLinear:
    """One (out, in) weight in a kernel layout; calling it runs y = x W^T on the quantized blocks.

    Q4_0 is repacked once at load where the path has a faster layout (Q4_0X2 row pairs for smmla on i8mm,
    Q4_0X8/Q8_0X8/Q5_0X8 8-row groups on AVX-512 VNNI), as llama.cpp does.
    """

    wtype: WType
    data: np.ndarray  # (bytes,) uint8 in wtype's layout
    out_features: int
    in_features: int
    nthreads: int | None = None
    _run_type: WType = field(init=False)
    _run_data: np.ndarray = field(init=False, repr=False)
    _fn: Callable[[np.ndarray], np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.wtype = WType(self.wtype)
        self.data = np.ascontiguousarray(self.data).view(np.uint8).reshape(-1)
        want = block_bytes(self.wtype, self.out_features, self.in_features)
        if self.data.size != want:
            raise ValueError(f"{self.wtype.name} ({self.out_features}, {self.in_features}) needs {want} bytes, "
                             f"got {self.data.size}")
        self._run_type, self._run_data = self.wtype, self.data
        if api.prefers_repacked():
            self._run_type, self._run_data = api.repacked(self.wtype, self.data, self.out_features, self.in_features)
        self._fn = api.linear_fn(self._run_type, self._run_data, self.out_features, self.in_features, self.nthreads)

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._fn(x)  # x (tokens, in) -> (tokens, out)


class FusedPacked:
    """Linears that read the same input (q/k/v, gate/up) as ONE packed matrix: the first member called with an
    input runs the whole product once and the others return their slice of it. Fewer, larger products per
    token: one activation quantization, one thread hand-off. The cache is keyed by the input object itself
    (the runtime passes the same array to each member, unmodified); any other input recomputes."""

    def __init__(self, members: list[tuple[str, PackedLinear]]):
        first = members[0][1]
        assert all(m.wtype == first.wtype and m.in_features == first.in_features for _, m in members)
        data = np.concatenate([m.data for _, m in members])
        self.names = [name for name, _ in members]
        self.bounds = np.cumsum([0] + [m.out_features for _, m in members])
        self.linear = PackedLinear(first.wtype, data, int(self.bounds[-1]), first.in_features, first.nthreads)
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None
        self._pending: set[int] = set()

    def member(self, i: int) -> FusedMember:
        return FusedMember(self, i)

    def _slice(self, i: int, x: np.ndarray) -> np.ndarray:
        if not (self._x is x and i in self._pending):
            self._x, self._y = x, self.linear(x)
            self._pending = set(range(len(self.names)))
        self._pending.discard(i)
        y = self._y
        assert y is not None
        if not self._pending:
            self._x = self._y = None  # drop the references once every member has its slice
        return y[:, self.bounds[i] : self.bounds[i + 1]]


@dataclass(frozen=True)
class FusedMember:
    """Member `index` of a FusedPacked, as a linear op (the decode step reads `fused` to run the whole product)."""

    fused: FusedPacked
    index: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fused._slice(self.index, x)  # x (tokens, in) -> (tokens, out of this member)


def fuse_shared_inputs(packed: dict[str, PackedLinear]) -> dict[str, object]:
    """Replace each layer's q/k/v and gate/up PackedLinears by members of a FusedPacked when they share a
    weight type; everything else is returned unchanged."""
    out: dict[str, object] = dict(packed)
    groups = (INPUT_GROUPS["attn_in"], INPUT_GROUPS["mlp_in"])
    prefixes = {name.rsplit(".", 2)[0] for name in packed if name.startswith("model.layers.")}
    for prefix in prefixes:
        for group in groups:
            names = [f"{prefix}.{g}" for g in group]
            if not all(n in packed for n in names):
                continue
            ops = [packed[n] for n in names]
            if len({(o.wtype, o.in_features) for o in ops}) != 1:
                continue
            fused = FusedPacked(list(zip(names, ops, strict=True)))
            for i, n in enumerate(names):
                out[n] = fused.member(i)
    return out


def plug_packed_linears(model, packed: dict) -> int:
    """`model.set_linear(name, op)` for every HF module name in `packed`; returns how many were plugged."""
    for name, op in packed.items():
        model.set_linear(name, op)
    return len(packed)
