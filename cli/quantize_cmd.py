"""`qkiln quantize`: RTN / GPTQ / AWQ / AWQ+GPTQ of a checkpoint, layer by layer, into a simulated checkpoint.

The output folder is a Hugging Face checkpoint whose weights are the DEQUANTIZED values (exactly what the
grid holds, in float32), so `qkiln eval --model OUT --ref MODEL` scores the quantization; plus
`quantization.json`: the scheme of every tensor (and why it fell back), the algorithm and its settings,
the calibration text's sha256, samples and length, per-layer timings, wall time and peak RSS.
"""

from __future__ import annotations

import enum
import json
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
from qkiln.errors import QuantizeError, UserError
from qkiln.quantize.defaults import CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN


class Grid(enum.StrEnum):
    updated = "updated"
    original = "original"


class CalibDtype(enum.StrEnum):
    bfloat16 = "bfloat16"
    float32 = "float32"


@handles_errors
def quantize_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output checkpoint folder (simulated: dequantized weights).")],
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Checkpoint folder; default: the bundled demo model.")
    ] = None,
    scheme: Annotated[
        str | None, typer.Option("--scheme", help="One grid for every weight (q4_0, int4_g64_asym, q8_0, fp8_e4m3fn, ...).")
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="llama.cpp mix by rule (q4_k_m, q4_0, q8_0, ...), with its fallbacks.")
    ] = None,
    fallback: Annotated[
        bool,
        typer.Option("--fallback/--strict", help="With --scheme: fall back per tensor (llama.cpp's table) when a "
                     "row does not fit its block, instead of refusing."),
    ] = False,
    algo: Annotated[Algo, typer.Option("--algo", help=ALGO_HELP)] = Algo.auto,
    calib: Annotated[
        Path | None,
        typer.Option("--calib", exists=True, dir_okay=False, readable=True, help="UTF-8 calibration text (needed by gptq/awq)."),
    ] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Calibration samples (consecutive windows).")] = CALIBRATION_SAMPLES,
    seq_len: Annotated[int, typer.Option("--seq-len", min=1, help="Tokens per calibration sample.")] = CALIBRATION_SEQ_LEN,
    act_order: Annotated[
        bool, typer.Option("--act-order/--no-act-order", help="GPTQ: quantize columns by descending Hessian diagonal.")
    ] = True,
    damp: Annotated[float, typer.Option("--damp", min=0.0, help="GPTQ dampening, fraction of the mean Hessian diagonal.")] = 0.01,
    grid: Annotated[
        Grid, typer.Option("--grid", help="GPTQ: fit each group's scale on the error-updated weights or the original ones.")
    ] = Grid.updated,
    calib_dtype: Annotated[
        CalibDtype, typer.Option("--calib-dtype", help="Precision of calibration's products (bfloat16 runs on AMX or AVX512_BF16 where the CPU has them).")
    ] = CalibDtype.bfloat16,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document (the quantization record) on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every tensor's fallback, not one line per rule.")] = False,
    max_memory: Annotated[str | None, typer.Option("--max-memory", help=MAX_MEMORY_HELP)] = None,
) -> None:
    """Quantize a checkpoint layer by layer and write the simulated result with quantization.json."""
    # Imported here, not at the top: `qkiln --help` then loads no NumPy model code (not a cycle).
    from qkiln.formats.hf import Checkpoint
    from qkiln.formats.hf_write import write_checkpoint
    from qkiln.pipeline.load import resolve_model_path
    from qkiln.pipeline.stream import LayerStream, calibration_tokens, read_calibration
    from qkiln.quantize.calibrate import QuantizeReport, calibration_ids, text_sha256
    from qkiln.quantize.registry import get_scheme
    from qkiln.quantize.rules import preset as make_preset
    from qkiln.quantize.rules import single
    from qkiln.quantize.tensor import QuantizedTensor

    t0 = time.perf_counter()
    if (scheme is None) == (preset is None):
        raise UserError("give exactly one of --scheme NAME or --preset NAME")
    if out.exists() and not force:
        raise UserError(f"output {out} already exists; remove it or pass --force")
    src = resolve_model_path(model)
    ckpt = Checkpoint.open(src)
    cfg = ckpt.config
    if preset is not None:
        rules: Any = make_preset(preset, cfg.num_hidden_layers, tied_embeddings=cfg.tie_word_embeddings)
    else:
        assert scheme is not None
        rules = single(get_scheme(scheme).name) if fallback else get_scheme(scheme)
    algorithm = chosen_algorithm(algo, calib)
    if max_memory is not None:
        from qkiln.pipeline.memory import check_memory, convert_plan, parse_size
        from qkiln.quantize.rules import KEEP

        limit = parse_size(max_memory)
        shapes = {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
        if hasattr(rules, "plan"):
            planned = {n: s for n, (s, _) in rules.plan(shapes).items() if s != KEEP}
        else:
            planned = {n: rules.name for n, shp in shapes.items() if len(shp) == 2}
        plan = convert_plan(ckpt, "checkpoint", "", algorithm, [calib] if calib else [], samples, seq_len,
                            schemes=planned, calib_dtype=calib_dtype.value)
        report_memory(check_memory(plan, limit), limit)

    calib_doc: dict[str, Any] | None = None
    ids = None
    if algorithm != "rtn":
        if calib is None:
            raise UserError(f"--algo {algorithm} needs calibration text: pass --calib FILE")
        text = read_calibration([calib])
        tokens = calibration_tokens(ckpt, text)
        ids = calibration_ids(tokens, samples, seq_len)
        calib_doc = {"file": str(calib), "sha256": text_sha256(text), "tokens": len(tokens),
                     "samples": int(ids.shape[0]), "seq_len": seq_len, "samples_requested": samples}

    report = QuantizeReport(algo=algorithm)
    n_layers = cfg.num_hidden_layers
    tensors: dict[str, Any] = {}
    with Progress(
        TextColumn(f"[bold]quantize {algorithm}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
        TimeElapsedColumn(), console=console, disable=json_out and not console.is_terminal,
    ) as bar:
        task = bar.add_task("layers", total=n_layers)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        for name, value in LayerStream(
            ckpt, rules, algorithm, ids, damp=damp, act_order=act_order, grid=grid.value, calib_dtype=calib_dtype.value,
            progress=progress, report=report,
        ):
            if isinstance(value, QuantizedTensor):  # dequantized only when written: memory ~1 byte/weight
                tensors[name] = (np.dtype(np.float32), value.shape, value.dequantize)
            else:
                tensors[name] = np.asarray(value, dtype=np.float32)
    record = {
        "source_model": str(src),
        "algo": algorithm,
        "scheme": scheme,
        "preset": preset,
        "calibration": calib_doc,
        **{k: v for k, v in report.as_dict().items() if k != "algo"},
    }
    try:
        write_checkpoint(out, cfg, sorted(tensors.items()), tokenizer_from=ckpt.path,
                         extra_files={"quantization.json": json.dumps(record, indent=2, sort_keys=True) + "\n"},
                         overwrite=force)
    except OSError as e:
        raise QuantizeError(f"cannot write {out}: {e.strerror or e}") from None
    record["wall_seconds_with_write"] = time.perf_counter() - t0
    if json_out:
        print_json(record)
        return
    print_fallbacks(report.fallbacks, verbose=verbose)
    n_fb = len(report.fallbacks)
    console.print(f"wrote        {out} ({algorithm}, {scheme or preset}{f', {n_fb} fallbacks' if n_fb else ''})")
    console.print(f"time         {report.wall_seconds:.1f} s quantizing, {record['wall_seconds_with_write']:.1f} s total")
    console.print(f"peak RSS     {report.peak_rss_bytes / 2**20:.0f} MiB")


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize_command)
