"""qkiln's runtime on the real demo model agrees with transformers, and the model is the trained one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qkiln.cli.main import app

LICENSES = "/usr/share/common-licenses"
EVAL_TEXT = ("GPL-2", "Apache-2.0", "MPL-2.0")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eval_text_file(tmp_path_factory):
    """`cat /usr/share/common-licenses/{GPL-2,Apache-2.0,MPL-2.0}`, byte for byte."""
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_bytes(b"".join(open(f"{LICENSES}/{n}", "rb").read() for n in EVAL_TEXT))
    return path


@pytest.fixture(scope="module")
def demo_dir():
    from qkiln.demo import demo_model_dir

    return demo_model_dir()


@pytest.mark.torch
def test_perplexity_equals_transformers_on_the_demo_model(demo_dir, eval_text_file):
    torch = pytest.importorskip("torch", reason="transformers comparison needs torch (setup.sh test installs it)")
    transformers = pytest.importorskip("transformers")
    from typer.testing import CliRunner

    from qkiln.pipeline.load import load_model
    from qkiln.validate.evaluate import evaluate
    from qkiln.validate.windows import make_windows

    result = CliRunner().invoke(app, ["eval", "--model", str(demo_dir), "--text", str(eval_text_file), "--ctx", "512", "--json"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)
    assert ours["windows"] == 9923 // 512  # the three licenses are 9923 tokens with this tokenizer

    lm = load_model(demo_dir)
    windows = make_windows(lm.encode(eval_text_file.read_text()), 512)
    # transformers' own tokenizer reads our tokenizer.json to the same ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(demo_dir)
    sample = eval_text_file.read_text()[:5000]
    assert hf_tok(sample, add_special_tokens=False)["input_ids"] == lm.encode(sample).tolist()

    torch.set_num_threads(2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32)
    hf.eval()

    def hf_logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return hf(torch.from_numpy(ids)).logits.float().numpy()

    theirs = evaluate(hf_logits, windows)
    assert theirs.scores.n_tokens == ours["scored_tokens"]
    rel = abs(ours["perplexity"] - theirs.scores.perplexity) / theirs.scores.perplexity
    assert rel < 1e-3, (ours["perplexity"], theirs.scores.perplexity)
    # a trained model, not noise: SmolLM2-135M reads license text well below ~30 perplexity
    assert math.isfinite(ours["perplexity"]) and ours["perplexity"] < 30


def test_greedy_continuation_names_paris(demo_dir):
    from qkiln.pipeline.load import load_model
    from qkiln.runtime.generate import generate_greedy

    lm = load_model(demo_dir)
    prompt = lm.encode("The capital of France is").tolist()
    out = generate_greedy(lm.model, prompt, max_new_tokens=8)
    text = lm.tokenizer.decode(out)  # generate_greedy returns the new tokens only
    assert "Paris" in text, text
