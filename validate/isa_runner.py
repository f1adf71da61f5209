"""Run an exported GGUF bundle through qkiln's runtime and kernels and save the logits: the program the
target-ISA check (validate/isa_check.py) runs twice, on the host and under `qemu-aarch64 -cpu MODEL`.

It imports only NumPy, `qkiln.runtime` and `qkiln.kernels` (no tokenizers, gguf-py or safetensors, which
the aarch64 Python under qemu does not have): the bundle already holds the packed weight rows as the
GGUF stores them, the float tensors (norms, embedding) and the token windows.

    python isa_runner.py BUNDLE_DIR OUT.npy
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


class BundleSource:
    """The bundle's float tensors by HF name, read on request (memory-mapped)."""

    def __init__(self, bundle: Path, config, names: list[str], dense: dict[str, str]):
        self.config, self._bundle, self._names, self._dense = config, bundle, names, dense

    def names(self) -> list[str]:
        return list(self._names)

    def tensor(self, name: str) -> np.ndarray:
        if name not in self._dense:
            raise KeyError(f"{name} is packed in the bundle; the runtime must use its plugged kernel")
        return np.load(self._bundle / self._dense[name], mmap_mode="r")


def load_bundle_model(bundle: Path):
    """A runtime.llama.LlamaModel over the bundle, every packed linear plugged into the C kernels."""
    from qkiln.kernels.linear import PackedLinear, fuse_shared_inputs, plug_packed_linears
    from qkiln.kernels.types import WType
    from qkiln.runtime.config import LlamaConfig
    from qkiln.runtime.llama import LlamaModel

    meta = json.loads((bundle / "meta.json").read_text())
    config = LlamaConfig.from_dict(meta["config"], source=str(bundle / "meta.json"))
    model = LlamaModel(BundleSource(bundle, config, meta["names"], meta["dense"]))
    packed = {
        module: PackedLinear(WType(spec["wtype"]), np.load(bundle / spec["file"]), spec["out"], spec["in"])
        for module, spec in meta["packed"].items()
    }
    plug_packed_linears(model, fuse_shared_inputs(packed))
    return model


def main(argv: list[str]) -> int:
    from qkiln.kernels import api

    bundle, out = Path(argv[1]), Path(argv[2])
    model = load_bundle_model(bundle)
    windows = np.load(bundle / "windows.npy")  # (n, ctx) int64
    logits = np.stack([model.forward(w[None, :])[0] for w in windows])  # (n, ctx, vocab) float32
    np.save(out, logits.astype(np.float32))
    print(f"kernel_path={api.kernel_path()} windows={len(windows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
