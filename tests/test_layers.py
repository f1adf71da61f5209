"""Imports run one way: each folder imports only its own layer and the layers below it (README, "Layout").

An AST walk over every source file: every `import qkiln.x` / `from qkiln.x import ...`, at module level or
inside a function (a lazy import does not make an upward dependency acceptable), is checked against the
layer table. Outside cli/ a qkiln import inside a function is refused as well: with the direction held, the
only reason left for one would be dodging a cycle. cli/ may import lazily inside a command, which keeps
`qkiln --help` fast.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module prefix -> layer; the longest matching prefix wins. Lower layers never import higher ones.
LAYERS: dict[str, int] = {
    "qkiln": 0,  # errors, atomic outputs, the version
    "qkiln.model": 1,  # what a Llama is: config, tensor names, shapes, tensor sources
    "qkiln.kernels": 2,  # C kernels and their NumPy references
    "qkiln.runtime": 3,  # the float32 forward, KV cache, generation
    "qkiln.quantize": 4,  # grids, QuantizedTensor, RTN, GPTQ, AWQ, layer-streamed calibration
    "qkiln.formats": 5,  # readers and writers (HF, GGUF, safetensors)
    "qkiln.pipeline": 6,  # checkpoint -> rules -> stream of tensors -> a writer
    "qkiln.demo": 6,  # the demo model (imported from its GGUF)
    "qkiln.validate": 7,  # accuracy and speed
    "qkiln.targets": 8,  # recipes and the build of a target's artifacts
    "qkiln.cli": 9,  # the commands
}
# folder -> the import package it is installed as: pyproject.toml's package-dir, so a new folder is checked
# (and must be given a layer) as soon as it is packaged.
FOLDERS = {folder: package for package, folder in
           tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].items()}
LAZY_OK = ("qkiln.cli",)


def layer(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer; add it to LAYERS and to the README's layout table")


def source_modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def qkiln_imports(path: Path, module: str) -> list[tuple[int, str, bool]]:
    """(line, imported module, inside a function) for every import of a qkiln module in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str, bool]] = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: no import at run time
            if isinstance(child, ast.Import):
                found.extend([(child.lineno, a.name, in_function) for a in child.names if a.name.split(".")[0] == "qkiln"])
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "qkiln":  # `from qkiln.x import y`: y may be a module or a name in x
                    found.extend((child.lineno, f"{base}.{a.name}", in_function) for a in child.names)
            visit(child, nested)

    visit(tree, False)
    return found


def violations() -> list[str]:
    modules = source_modules()
    bad = []
    for module, path in modules.items():
        own = layer(module)
        for line, target, lazy in qkiln_imports(path, module):
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]  # `qkiln.x.name` where name is not a module: qkiln.x
            if layer(target) > own:
                bad.append(f"{path.relative_to(ROOT)}:{line} {module} (layer {own}) imports {target} (layer {layer(target)})")
            elif lazy and not module.startswith(LAZY_OK) and target != module:
                bad.append(f"{path.relative_to(ROOT)}:{line} {module} imports {target} inside a function")
    return sorted(set(bad), key=bad.index)  # one line per (place, imported module)


def test_imports_run_downwards() -> None:
    bad = violations()
    assert not bad, f"{len(bad)} import(s) against the layering:\n" + "\n".join(bad)


def test_every_module_has_a_layer() -> None:
    for module in source_modules():
        layer(module)


if __name__ == "__main__":
    for v in violations():
        print(v)
