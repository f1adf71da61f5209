"""Every weight grid qkiln knows, by name (`get_scheme("q4_0")`)."""

from __future__ import annotations

import functools

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.quantize.fp8 import fp8_schemes
from qkiln.quantize.ggml_legacy import legacy_schemes
from qkiln.quantize.ggml_types import GGML_TYPES
from qkiln.quantize.int_grid import int_schemes
from qkiln.quantize.kquants import kquant_schemes
from qkiln.quantize.rtn import quantize_rtn
from qkiln.quantize.scheme import Scheme

# Short names that mean a canonical scheme.
ALIASES = {
    "fp8_e4m3fn": "fp8_e4m3fn_pc",
    "fp8_e4m3fnuz": "fp8_e4m3fnuz_pc",
    "int4": "int4_g128",
}


@functools.cache
def _table() -> dict[str, Scheme]:
    schemes: list[Scheme] = [*int_schemes(), *legacy_schemes(), *fp8_schemes()]
    schemes += kquant_schemes()
    table = {s.name: s for s in schemes}
    assert len(table) == len(schemes), "duplicate scheme name"
    return table


def scheme_names() -> list[str]:
    """Canonical scheme names, in registry order (aliases not included)."""
    return list(_table())


def get_scheme(name: str) -> Scheme:
    """The scheme called `name` (case-insensitive; aliases allowed); QuantizeError lists the valid names."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    try:
        return _table()[key]
    except KeyError:
        valid = ", ".join([*scheme_names(), *(f"{a} (= {c})" for a, c in ALIASES.items())])
        raise QuantizeError(f"unknown scheme {name!r}; valid schemes: {valid}") from None


def describe(name: str, row_length: int = 4096) -> dict[str, object]:
    """What a scheme is, for listings: grid family, code bits, columns per scale, stored bits per weight
    on rows of `row_length` (per-channel scales cost less on longer rows; None when such a row does
    not fit the scheme's blocks), its ggml type if any."""
    scheme = get_scheme(name)
    unit = scheme.fit_cols or 1
    cols = row_length if row_length % unit == 0 else unit * max(1, row_length // unit)
    qt = quantize_rtn(np.zeros((1, cols), np.float32), scheme)
    kind = type(scheme).__name__
    return {
        "name": scheme.name,
        "grid": kind,
        "code_bits": int(getattr(scheme, "bits", 8)),
        "group_cols": scheme.group_cols or "row",
        "fit_cols": scheme.fit_cols or "row",
        "params": {k: [str(v.dtype), v.shape[1]] for k, v in qt.params.items()},
        "bits_per_weight": round(qt.bits_per_weight, 4) if cols == row_length else None,
        "ggml_type": GGML_TYPES[scheme.name][0] if scheme.name in GGML_TYPES else None,
    }
