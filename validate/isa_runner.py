"""Run an exported GGUF bundle through qkiln's runtime and kernels and save the logits: the program the
target-ISA check (validate/isa_check.py) runs twice, on the host and under `qemu-aarch64 -cpu MODEL`.

The aarch64 Python under qemu has NumPy and nothing else (no tokenizers, safetensors or the gguf-py
package): the bundle already holds the packed weight rows as the GGUF stores them, the float tensors (norms,
embedding) and the token windows. So this module imports only NumPy, the qkiln packages in QKILN_PACKAGES and
the pure-Python gguf-py modules in GGUF_MODULES (model/names.py's tables). isa_check builds the qemu side's
package tree from those two lists, and tests/validate/test_isa_runner.py holds the module's import closure
to them.

    python -P -m qkiln.validate.isa_runner BUNDLE_DIR OUT.npy
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from qkiln.kernels import api
from qkiln.kernels.linear import PackedLinear, fuse_shared_inputs, plug_packed_linears
from qkiln.kernels.types import WType
from qkiln.model.config import LlamaConfig
from qkiln.runtime.llama import LlamaModel

# Everything this module imports besides NumPy (and ml_dtypes, which isa_check stubs under qemu): the qkiln
# packages linked into the qemu side's tree (with qkiln's own top-level modules), and gguf-py's modules linked
# without the package's __init__ (the rest of gguf-py needs more than NumPy).
QKILN_PACKAGES = ("qkiln.kernels", "qkiln.model", "qkiln.runtime", "qkiln.validate")
GGUF_MODULES = ("constants", "tensor_mapping")


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
    bundle, out = Path(argv[1]), Path(argv[2])
    model = load_bundle_model(bundle)
    windows = np.load(bundle / "windows.npy")  # (n, ctx) int64
    logits = np.stack([model.forward(w[None, :])[0] for w in windows])  # (n, ctx, vocab) float32
    np.save(out, logits.astype(np.float32))
    print(f"kernel_path={api.kernel_path()} windows={len(windows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
