"""`qkiln inspect FILE.gguf`: what a GGUF holds — tensor types, sizes, bits per weight, metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from qkiln.cli.common import console, handles_errors, print_json
from qkiln.formats.gguf_read import read_gguf

# Metadata arrays longer than this are summarised (a vocabulary has tens of thousands of entries).
_MAX_LIST = 8


def _summarise(value: Any) -> Any:
    if isinstance(value, list) and len(value) > _MAX_LIST:
        return {"length": len(value), "head": value[:_MAX_LIST]}
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value


def inspect_gguf(path: Path) -> dict[str, Any]:
    """A JSON-able description of a GGUF file: per-type totals, per-tensor rows, metadata."""
    f = read_gguf(path)
    tensors = []
    by_type: dict[str, dict[str, int]] = {}
    n_weights = 0
    n_bytes = 0
    for t in f.tensors.values():
        kind = t.ggml_type.name
        tensors.append(
            {
                "name": t.name,
                "type": kind,
                "shape": list(t.shape),
                "bytes": t.nbytes,
                "bits_per_weight": round(8 * t.nbytes / max(1, t.n_elements), 4),
            }
        )
        agg = by_type.setdefault(kind, {"tensors": 0, "weights": 0, "bytes": 0})
        agg["tensors"] += 1
        agg["weights"] += t.n_elements
        agg["bytes"] += t.nbytes
        n_weights += t.n_elements
        n_bytes += t.nbytes
    return {
        "path": str(path),
        "file_bytes": f.file_size,
        "version": f.version,
        "n_tensors": len(tensors),
        "n_weights": n_weights,
        "tensor_bytes": n_bytes,
        "bits_per_weight": round(8 * n_bytes / max(1, n_weights), 4),
        "types": {k: {**v, "bits_per_weight": round(8 * v["bytes"] / max(1, v["weights"]), 4)} for k, v in sorted(by_type.items())},
        "metadata": {k: _summarise(v) for k, v in f.metadata.items()},
        "tensors": tensors,
    }


@handles_errors
def inspect(
    file: Annotated[Path, typer.Argument(help="A .gguf file or an ONNX folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor (always included with --json).")] = False,
) -> None:
    """Show a GGUF file's (or ONNX folder's) tensor types, sizes, bits per weight and metadata."""
    if file.is_dir():
        _inspect_onnx(file, as_json)
        return
    doc = inspect_gguf(file)
    if as_json:
        print_json(doc)
        return
    console.print(
        f"[bold]{file}[/]: {doc['n_tensors']} tensors, {doc['n_weights']:,} weights, "
        f"{doc['file_bytes'] / 2**20:.1f} MiB, {doc['bits_per_weight']:.3f} bits/weight"
    )
    table = Table("type", "tensors", "weights", "MiB", "bits/weight")
    for kind, v in doc["types"].items():
        table.add_row(kind, str(v["tensors"]), f"{v['weights']:,}", f"{v['bytes'] / 2**20:.2f}", f"{v['bits_per_weight']:.3f}")
    console.print(table)
    meta = Table("key", "value")
    for k, v in doc["metadata"].items():
        shown = f"[{v['length']} items] {v['head']!r:.80}" if isinstance(v, dict) and "length" in v else f"{v!r:.100}"
        meta.add_row(k, shown)
    console.print(meta)
    if tensors:
        tt = Table("name", "type", "shape", "bytes", "bits/weight")
        for t in doc["tensors"]:
            tt.add_row(t["name"], t["type"], "x".join(map(str, t["shape"])), str(t["bytes"]), f"{t['bits_per_weight']:.3f}")
        console.print(tt)


def _inspect_onnx(folder: Path, as_json: bool) -> None:
    from qkiln.errors import UserError
    from qkiln.formats.onnx_run import describe_folder

    if not (folder / "genai_config.json").is_file():
        raise UserError(f"{folder} is a folder without genai_config.json; inspect takes a .gguf file or an ONNX folder")
    doc = describe_folder(folder)
    if as_json:
        print_json(doc)
        return
    console.print(f"[bold]{folder}[/]: ONNX (IR {doc['ir_version']}, opsets {doc['opsets']}), "
                  f"{doc['folder_bytes'] / 2**20:.1f} MiB in {len(doc['files'])} files")
    table = Table("MatMulNBits", "tensors", "weights", "MiB", "bits/weight", "accuracy_level")
    for kind, v in doc["matmulnbits"].items():
        table.add_row(kind, str(v["tensors"]), f"{v['weights']:,}", f"{v['bytes'] / 2**20:.2f}",
                      f"{v['bits_per_weight']:.3f}", str(v["accuracy_level"]))
    console.print(table)
    ops = Table("op", "nodes")
    for op, n in doc["ops"].items():
        ops.add_row(op, str(n))
    console.print(ops)
    meta = Table("key", "value")
    for k, v in {**doc["genai_config"], **doc.get("qkiln", {})}.items():
        meta.add_row(k, f"{v!r:.100}")
    console.print(meta)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
