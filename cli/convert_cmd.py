"""`qkiln convert --model M --to gguf --scheme q4_k_m --algo gptq --calib FILE -o OUT.gguf`."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from qkiln.cli.common import (
    ALGO_HELP,
    MAX_MEMORY_HELP,
    Algo,
    chosen_algorithm,
    console,
    handles_errors,
    print_fallbacks,
    print_json,
    report_memory,
)
from qkiln.errors import UserError
from qkiln.quantize.defaults import CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN


class Target(enum.StrEnum):
    gguf = "gguf"
    onnx = "onnx"
    compressed_tensors = "compressed-tensors"  # safetensors folder for vLLM/SGLang/transformers (formats.gpu_convert)
    gptq = "gptq"  # the GPTQ safetensors layout, a folder (formats.gpu_convert)


@handles_errors
def convert(
    output: Annotated[Path, typer.Option("-o", "--output", help="Destination file (gguf) or folder (onnx, compressed-tensors, gptq), written atomically.")],
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Hugging Face checkpoint folder (default: the demo model).")
    ] = None,
    to: Annotated[Target, typer.Option("--to", help="Artifact format.")] = Target.gguf,
    scheme: Annotated[
        str,
        typer.Option(
            "--scheme",
            help="gguf: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, or a llama.cpp mix: q4_k_m, "
            "q4_k_s, q5_k_m; onnx: int4_g32, int4_g64, int4_g128 (…_asym: zero points), int8; compressed-tensors: "
            "int4_g32/g64/g128[_asym], int4_pc[_asym], int8, fp8_e4m3fn; gptq: the int4/int8 ones.",
        ),
    ] = "q4_k_m",
    algo: Annotated[Algo, typer.Option("--algo", help=ALGO_HELP)] = Algo.auto,
    calib: Annotated[
        list[Path] | None, typer.Option("--calib", help="Calibration text file(s) for gptq/awq (repeatable).")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Calibration windows (gptq/awq).")] = CALIBRATION_SAMPLES,
    seq_len: Annotated[int, typer.Option("--seq-len", min=1, help="Tokens per calibration window.")] = CALIBRATION_SEQ_LEN,
    name: Annotated[str | None, typer.Option("--name", help="general.name in the file (default: the folder name).")] = None,
    uniform: Annotated[
        bool, typer.Option("--uniform", help="One scheme for every tensor instead of llama.cpp's mix for that name.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every tensor's fallback, not one line per rule.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="onnx: refuse a row the block does not divide instead of falling back.")] = False,
    accuracy_level: Annotated[
        int, typer.Option("--accuracy-level", help="onnx: MatMulNBits activations, 4 = int8 (KleidiAI / x86 fast path), 0 = float32.")
    ] = 4,
    float_dtype: Annotated[str, typer.Option("--float-dtype", help="onnx: embeddings and norms as fp32 or fp16.")] = "fp32",
    force: Annotated[bool, typer.Option("--force", help="onnx: replace an existing output folder.")] = False,
    max_memory: Annotated[str | None, typer.Option("--max-memory", help=MAX_MEMORY_HELP)] = None,
) -> None:
    """Quantize a checkpoint into a GGUF that llama.cpp runs as it is."""
    # Imported here, not at the top: `qkiln --help` then loads no NumPy model code (not a cycle).
    from qkiln.formats.gguf_write import FLOAT_TYPES
    from qkiln.pipeline.convert import convert_to_gguf
    from qkiln.pipeline.load import resolve_model_path

    for path in calib or []:
        if not path.is_file():
            raise UserError(f"calibration file {path} not found; pass an existing text file to --calib")
    model_path = resolve_model_path(model)
    algorithm = chosen_algorithm(algo, calib, quantizes=scheme.strip().lower() not in FLOAT_TYPES)
    if max_memory is not None:
        from qkiln.formats.hf import Checkpoint
        from qkiln.pipeline.memory import check_memory, convert_plan, parse_size

        limit = parse_size(max_memory)
        plan = convert_plan(Checkpoint.open(model_path), to.value, scheme, algorithm, calib or [], samples, seq_len,
                            uniform=uniform, strict=strict)
        report_memory(check_memory(plan, limit), limit)
    if to is Target.onnx:
        _convert_onnx(model_path, output, scheme, algorithm, calib or [], samples, seq_len, strict=strict,
                      accuracy_level=accuracy_level, float_dtype=float_dtype, force=force, as_json=as_json, verbose=verbose)
        return
    if to is not Target.gguf:
        _convert_gpu(model_path, output, to.value, scheme, algorithm, calib or [], samples, seq_len, as_json, verbose)
        return
    with console.status(f"converting {model_path} to {scheme} ({algorithm})") as status:
        result = convert_to_gguf(
            model_path,
            output,
            scheme,
            algorithm=algorithm,
            calib=calib or [],
            name=name,
            uniform=uniform,
            samples=samples,
            seq_len=seq_len,
            progress=lambda tensor: status.update(f"quantizing {tensor}"),
        )
    summary = result.summary()
    print_fallbacks(dict(line.split(": ", 1) for line in result.fallbacks), verbose=verbose)
    if as_json:
        print_json(summary)
    else:
        types = ", ".join(f"{k}×{v}" for k, v in summary["tensor_types"].items())
        console.print(
            f"wrote {output} ({summary['file_bytes'] / 2**20:.1f} MiB, {summary['bits_per_weight']:.3f} bits/weight; {types})"
        )


def _convert_onnx(model: Path, output: Path, scheme: str, algo: str, calib: list[Path], samples: int, seq_len: int,
                  *, strict: bool, accuracy_level: int, float_dtype: str, force: bool, as_json: bool, verbose: bool) -> None:
    from qkiln.pipeline.onnx import convert_to_onnx

    with console.status(f"converting {model} to ONNX {scheme} ({algo})") as status:
        result, fallbacks = convert_to_onnx(
            model, output, scheme, algorithm=algo, calib=calib, samples=samples, seq_len=seq_len, strict=strict,
            accuracy_level=accuracy_level, float_dtype=float_dtype, overwrite=force,
            progress=lambda stage: status.update(f"quantizing {stage}"),
        )
    summary = result.summary()
    print_fallbacks(dict(line.split(": ", 1) for line in fallbacks), verbose=verbose)
    if as_json:
        print_json(summary)
    else:
        console.print(f"wrote {output} ({summary['folder_bytes'] / 2**20:.1f} MiB: model.onnx + model.onnx.data, "
                      "genai_config.json, tokenizer)")


def _convert_gpu(model: Path, output: Path, target: str, scheme: str, algo: str, calib: list[Path], samples: int,
                 seq_len: int, as_json: bool, verbose: bool) -> None:
    from qkiln.pipeline.gpu import convert_to_gpu

    with console.status(f"converting {model} to {target} {scheme} ({algo})") as status:
        result = convert_to_gpu(model, output, target, scheme, algorithm=algo, calib=calib, samples=samples,
                                seq_len=seq_len, progress=lambda what: status.update(f"quantizing: {what}"))
    summary = result.summary()
    print_fallbacks(dict(line.split(": ", 1) for line in result.fallbacks), verbose=verbose)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    if as_json:
        print_json(summary)
    else:
        console.print(f"wrote {output}/ ({target}, {len(summary['shards'])} shard(s), {summary['bytes'] / 2**20:.1f} MiB)")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)
