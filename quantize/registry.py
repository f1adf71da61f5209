"""Every weight grid qkiln knows, by name (`get_scheme("q4_0")`)."""

from __future__ import annotations

import functools

from qkiln.errors import QuantizeError
from qkiln.quantize.scheme import Scheme

# Short names that mean a canonical scheme.
ALIASES = {
    "fp8_e4m3fn": "fp8_e4m3fn_pc",
    "fp8_e4m3fnuz": "fp8_e4m3fnuz_pc",
    "int4": "int4_g128",
}


@functools.cache
def _table() -> dict[str, Scheme]:
    from qkiln.quantize.fp8 import fp8_schemes
    from qkiln.quantize.ggml_legacy import legacy_schemes
    from qkiln.quantize.int_grid import int_schemes

    schemes: list[Scheme] = [*int_schemes(), *legacy_schemes(), *fp8_schemes()]
    try:
        from qkiln.quantize.kquants import kquant_schemes
    except ImportError:  # pragma: no cover - only while the module is being written
        pass
    else:
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
