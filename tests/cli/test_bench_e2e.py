"""`qkiln bench --e2e` runs a prompt of --prompt-tokens tokens through the full runtime (llama-bench's pp128 is 128
tokens), then decodes; the JSON names the prompt's length beside its speed."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from qkiln.cli.main import app

TYPES = {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q4_0", "ffn_gate": "Q4_0",
         "ffn_up": "Q4_0", "ffn_down": "Q6_K", "token_embd": "Q8_0", "output": "Q8_0"}


def test_e2e_prompt_has_the_asked_length(make_gguf):
    path = make_gguf(types=TYPES, hidden=256, intermediate=512)
    r = CliRunner().invoke(app, ["bench", str(path), "--json", "--e2e", "--seconds", "0", "--prompt-tokens", "40",
                                 "--threads", "2"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["e2e_prompt_tokens"] == 40
    assert doc["e2e_prompt_tokens_per_s"] > 0 and doc["e2e_decode_tokens_per_s"] > 0
