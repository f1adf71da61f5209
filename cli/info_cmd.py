"""`qkiln info --model DIR [--json]`: what a checkpoint holds, after every cheap validity check.

Useful on its own (is this folder a Llama checkpoint qkiln can read, how big is it) and as the first
thing to run on a download: a bad folder fails here in a second with one line saying what is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from qkiln.cli.common import handles_errors, print_json
from qkiln.errors import CheckpointError, GGUFError
from qkiln.formats.hf import Checkpoint
from qkiln.formats.tokenizer_to_gguf import tokenizer_from_folder
from qkiln.pipeline.load import resolve_model_path

# How `info` lays out the shapes summary: embeddings, attention, MLP (layer 0; all layers match).
SHAPE_GROUPS = (
    ("embed_tokens", "lm_head"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def _tokenizer_info(ckpt: Checkpoint) -> dict[str, Any]:
    """Whether the tokenizer is there and loads; a broken tokenizer is reported, not fatal, for `info`."""
    if not (ckpt.path / "tokenizer.json").exists():
        return {"present": False}
    try:
        tok = ckpt.tokenizer()
    except CheckpointError as e:
        return {"present": True, "error": str(e)}
    info: dict[str, Any] = {"present": True, "vocab_size": tok.get_vocab_size()}
    try:
        gguf_tok = tokenizer_from_folder(ckpt.path, max(ckpt.config.vocab_size, tok.get_vocab_size()))
    except GGUFError as e:
        info["gguf"] = f"cannot be expressed: {e}"
    else:
        info["gguf"] = gguf_tok.model + (f", scores from {gguf_tok.scores_source}" if gguf_tok.scores_source else "")
    return info


def _fmt_shape(shape: Any) -> str:
    return " x ".join(map(str, shape)) if isinstance(shape, tuple) else str(shape)


@handles_errors
def info(
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="Hugging Face checkpoint folder; default: the bundled demo model."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Validate a checkpoint and show its architecture, shapes, parameter count, dtypes and tokenizer."""
    ckpt = Checkpoint.open(resolve_model_path(model))
    s = ckpt.summary()
    s["tokenizer"] = _tokenizer_info(ckpt)
    if as_json:
        print_json(s)
        return
    tok = s["tokenizer"]
    tok_line = (
        f"yes (vocab {tok['vocab_size']}), GGUF {tok['gguf']}" if "vocab_size" in tok
        else f"unreadable: {tok['error']}" if "error" in tok
        else "missing (tokenizer.json)"
    )
    lines = [
        f"checkpoint   {s['path']}",
        f"architecture {s['architecture']}",
        f"layers       {s['num_hidden_layers']}, hidden {s['hidden_size']}, intermediate {s['intermediate_size']}",
        f"attention    {s['num_attention_heads']} heads, {s['num_key_value_heads']} KV heads, head_dim {s['head_dim']}",
        f"vocab        {s['vocab_size']}, tied embeddings: {'yes' if s['tie_word_embeddings'] else 'no'}",
        f"positions    {s['max_position_embeddings']}, {s['rope']}",
        f"parameters   {_human_count(s['parameters'])} ({s['parameters']:,}) in {s['tensors']} tensors, "
        f"{_human_bytes(s['bytes'])} on disk in {len(s['files'])} file(s)",
        "dtypes       " + ", ".join(f"{k} {_human_count(v)}" for k, v in sorted(s["dtype_parameters"].items())),
        *(
            f"{'shapes' if i == 0 else '':<13}" + ", ".join(f"{k} {_fmt_shape(s['shapes'][k])}" for k in group)
            for i, group in enumerate(SHAPE_GROUPS)
        ),
        f"tokenizer    {tok_line}",
    ]
    if s["ignored_tensors"]:
        lines.append(f"ignored      {len(s['ignored_tensors'])} extra tensor(s), e.g. {s['ignored_tensors'][0]}")
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    app.command("info")(info)
