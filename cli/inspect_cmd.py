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
    file: Annotated[Path, typer.Argument(help="A .gguf file, an ONNX folder, or a compressed-tensors / GPTQ safetensors folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor (always included with --json).")] = False,
) -> None:
    """Show a GGUF file's (or an ONNX or GPU safetensors folder's) tensor types, sizes, bits per weight and metadata."""
    if file.is_dir() and (file / "genai_config.json").is_file():
        _inspect_onnx(file, as_json)
        return
    if file.is_dir():
        _inspect_folder(file, as_json, tensors)
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
    from qkiln.formats.onnx_run import describe_folder

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


def _inspect_folder(folder: Path, as_json: bool, tensors: bool) -> None:
    from qkiln.errors import UserError
    from qkiln.formats.gpu_safetensors_read import QuantizedFolder, quant_method

    if not quant_method(folder):
        raise UserError(f"{folder} is neither an ONNX folder (genai_config.json) nor a compressed-tensors or "
                        "GPTQ folder (config.json's quantization_config); use `qkiln info --model` for a float checkpoint")
    doc = QuantizedFolder(folder).summary()
    if as_json:
        print_json(doc)
        return
    qc = doc["quantization_config"]
    console.print(
        f"[bold]{folder}[/]: {doc['format']}, {len(doc['files'])} shard(s), {doc['n_weights']:,} weights, "
        f"{doc['file_bytes'] / 2**20:.1f} MiB, {doc['bits_per_weight']:.3f} bits/weight"
    )
    table = Table("stored as", "tensors")
    for form, n in sorted(doc["tensor_forms"].items()):
        table.add_row(form, str(n))
    console.print(table)
    if doc["format"] == "gptq":
        keys = ("bits", "group_size", "sym", "desc_act", "checkpoint_format", "pack_dtype")
        console.print(", ".join(f"{k}={qc.get(k)!r}" for k in keys))
    else:
        for gname, g in sorted(qc.get("config_groups", {}).items()):
            w = g.get("weights") or {}
            console.print(f"{gname}: {g.get('format')} {w.get('type')}{w.get('num_bits')} {w.get('strategy')} "
                          f"group {w.get('group_size')} sym={w.get('symmetric')} targets={g.get('targets')!r:.80}")
        console.print(f"ignore: {qc.get('ignore')}")
    if tensors:
        tt = Table("name", "dtype", "shape")
        for name, t in doc["tensors"].items():
            tt.add_row(name, t["dtype"], "x".join(map(str, t["shape"])))
        console.print(tt)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
