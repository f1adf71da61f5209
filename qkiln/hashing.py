"""sha256 of files as provenance records them: one file, or several files concatenated in order."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file, read in chunks (a model file need not fit in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_of(paths: Iterable[Path]) -> str:
    """Hex sha256 of the files concatenated in the given order (e.g. a calibration text exactly as it was fed)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
