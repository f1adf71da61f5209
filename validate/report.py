"""report.md, a self-contained report.html (the size-vs-KL plot embedded as a PNG) and one model card per
artifact, all made from the build's manifest — so the report never says anything the manifest does not."""

from __future__ import annotations

import base64
import html
import io
from typing import Any


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _f(v: Any, fmt: str = ".4f") -> str:
    return "—" if v is None else format(v, fmt)


def size_kl_plot(manifest: dict[str, Any]) -> bytes:
    """PNG bytes: artifact size (MiB) against mean KL, one labelled point per artifact (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    arts = [a for a in manifest["artifacts"] if a.get("accuracy", {}).get("mean_kl") is not None]
    fig, ax = plt.subplots(figsize=(7.0, 4.2), dpi=110)
    for a in arts:
        ok = a["verdict"] == "pass"
        x, y = a["size_bytes"] / 2**20, a["accuracy"]["mean_kl"]
        ax.scatter([x], [y], s=60, color="#2a7d2e" if ok else "#c0392b", zorder=3)
        ax.annotate(f"{a['name']} ({a['bits_per_weight']:.2f} bpw)", (x, y), textcoords="offset points",
                    xytext=(8, 9), fontsize=9)
        own = a.get("thresholds", {}).get("max_mean_kl")
        if own is not None:  # the artifact's own gate, a tick above (or at) its point
            ax.plot([x], [own], marker="_", markersize=22, markeredgewidth=2, color="#555", linestyle="none",
                    label="the artifact's max mean KL" if a is arts[0] else None)
    limit = manifest["recipe"]["thresholds"].get("max_mean_kl")
    if limit is not None:
        ax.axhline(limit, color="#888", linestyle="--", linewidth=1, label=f"recipe's floor: max mean KL {limit:g}")
    if arts:
        ax.legend(loc="center right", fontsize=9, frameon=False)
    ax.set_xlabel("artifact size (MiB)")
    ax.set_ylabel("mean KL vs unquantized (nats)")
    ax.set_title(f"{manifest['recipe']['target']['name']}: size against accuracy", fontsize=11)
    ax.grid(True, alpha=0.3)
    if arts:
        ax.set_ylim(bottom=0)
        ax.margins(x=0.25)  # room for the labels of the outermost points
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _not_run(artifact: dict[str, Any]) -> str:
    return "n/a (GGUF only)" if artifact["format"] != "gguf" else "not run"


def _accuracy_rows(manifest: dict[str, Any]) -> list[list[str]]:
    rows = []
    for a in manifest["artifacts"]:
        acc, isa = a.get("accuracy", {}), a.get("isa_check", {})
        # the artifact through the runtime it ships to: llama.cpp for GGUF, transformers for the GPU folders
        lc = next((a[k] | {"by": k} for k in ("llama_cpp", "transformers") if a.get(k, {}).get("ran")), {})
        rows.append([
            a["name"], a["format"], f"{a['scheme']} / {a['algo']}", _mib(a["size_bytes"]), f"{a['bits_per_weight']:.3f}",
            _f(acc.get("mean_kl")), _f(acc.get("ppl_increase_pct"), "+.2f") + " %", _f(acc.get("top1_agreement"), ".3f"),
            (f"{RUNTIME_NAMES[lc['by']]}: {_f(lc.get('mean_kl'))} vs {_f(lc.get('qkiln_mean_kl_same_windows'))} "
             f"({lc.get('windows')} w)" if lc else
             "onnxruntime (the scores)" if a["format"] == "onnx" else "not run"),
            (_f(isa.get("mean_kl"), ".1e") + f" ({isa.get('kernel_path')})") if isa.get("ran") else _not_run(a),
            a["verdict"].upper(),
        ])
    return rows


RUNTIME_NAMES = {"llama_cpp": "llama.cpp", "transformers": "transformers"}
ACCURACY_HEAD = ["artifact", "format", "scheme / algo", "size", "bits / weight", "mean KL", "ppl increase", "top-1",
                 "real runtime KL vs qkiln's (windows)", "target-ISA KL (path)", "verdict"]


def _speed_rows(manifest: dict[str, Any]) -> list[list[str]]:
    rows = []
    for a in manifest["artifacts"]:
        sp, est = a.get("speed", {}), a.get("target_estimate", {})
        if sp.get("measured") is False:
            rows.append([a["name"], str(sp.get("reason", "not measured here"))] + ["—"] * (len(SPEED_HEAD) - 2))
            continue
        rows.append([
            a["name"], str(sp.get("kernel_path", "—")), _f(sp.get("decode_tokens_per_s"), ".0f"),
            _f(sp.get("prompt_tokens_per_s"), ".0f"), _f(sp.get("bandwidth_share"), ".0%"),
            _f(est.get("decode_tokens_per_s"), ".0f"), _f(est.get("usd_per_million_tokens"), ".4f"),
        ])
    return rows


SPEED_HEAD = ["artifact", "kernel path here", "decode tok/s here", "prompt tok/s here", "share of read bandwidth",
              "target decode tok/s (ESTIMATE)", "$ per M tokens (ESTIMATE)"]


def _notes(manifest: dict[str, Any]) -> list[str]:
    r = manifest["recipe"]
    t = r["target"]
    notes = [
        f"Evaluation: {manifest['evaluation']['windows']} windows of {manifest['evaluation']['ctx']} tokens of "
        f"{', '.join(manifest['evaluation']['text'])} (reference perplexity {_f(manifest['evaluation'].get('reference_perplexity'))}); "
        "KL is mean KL(P_unquantized || P_artifact) per scored token, in nats, through qkiln's runtime on the "
        "artifact's own blocks (an ONNX folder through onnxruntime); thresholds apply to these. Real runtime KL: the same "
        "artifact through the runtime it ships to (llama.cpp for GGUF, transformers for compressed-tensors/GPTQ, when "
        "installed) on the first windows (w), next to qkiln's on the same windows — a cross-check.",
        "Speed here: qkiln's kernels on this machine's weight products (attention, norms and sampling excluded). "
        f"Target figures are ESTIMATES: the bandwidth share measured here x {t['memory_bandwidth_gbs']:g} GB/s "
        f"({t['instance']}, ${t['price_per_hour']:g}/h).",
    ]
    if t["kind"] == "gpu":
        notes.append("GPU target: validated through the CPU runtimes of its formats on this machine, not on the GPU "
                     "(compressed-tensors / GPTQ folders dequantized exactly by qkiln's reader); no GPU speed is "
                     "measured or estimated here — this machine's CPU speed says nothing of an H100 or MI300X.")
    formats = {a["format"] for a in manifest["artifacts"]}
    if "onnx" in formats:
        notes.append("ONNX artifacts: scored and timed through onnxruntime (CPU) on this machine; their speed is the "
                     "whole graph (attention, norms and head included), a decode step after a 64-token prompt. The "
                     "llama.cpp cross-check and the target-ISA check run qkiln's GGUF kernels and do not apply to them.")
    if t.get("qemu_cpu"):
        notes.append(f"Target ISA: qkiln's aarch64 kernels ran the artifact under qemu-aarch64 -cpu {t['qemu_cpu']} "
                     "and their logits were compared with this machine's (mean KL host || target).")
    return notes


def report_md(manifest: dict[str, Any]) -> str:
    r = manifest["recipe"]
    t = r["target"]
    lines = [f"# qkiln build: {t['name']}", "",
             f"{t['description']} — {t['cpu']} ({', '.join(t['isa'])}).", "",
             f"Verdict: **{manifest['verdict'].upper()}** · recipe `{r['file']}` (sha256 {r['sha256'][:12]}) · "
             f"model `{manifest['model']['name']}` · qkiln {manifest['qkiln_version']}", "",
             "## Accuracy", "", "| " + " | ".join(ACCURACY_HEAD) + " |", "|" + "---|" * len(ACCURACY_HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in _accuracy_rows(manifest)]
    lines += ["", "## Speed and cost", "", "| " + " | ".join(SPEED_HEAD) + " |", "|" + "---|" * len(SPEED_HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in _speed_rows(manifest)]
    lines += ["", "## Checks", ""]
    for a in manifest["artifacts"]:
        for c in a.get("checks", []):
            lines.append(f"- {'PASS' if c['passed'] else 'FAIL'} {c['message']}")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in _notes(manifest)] + [""]
    return "\n".join(lines)


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1180px;color:#1d2327;padding:0 1rem}
h1{font-size:1.6rem;margin:.2rem 0}h2{font-size:1.15rem;margin-top:1.8rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#555}.badge{display:inline-block;padding:.15rem .6rem;border-radius:1rem;font-weight:600;color:#fff}
.pass{background:#2a7d2e}.fail{background:#c0392b}
table{border-collapse:collapse;width:100%;font-size:13px;margin-top:.6rem}
th,td{border-bottom:1px solid #e3e3e3;padding:.35rem .45rem;text-align:right;white-space:nowrap}
th{background:#f5f6f7;font-weight:600;white-space:normal;vertical-align:bottom}
table.acc td:nth-child(-n+3),table.acc th:nth-child(-n+3),table.speed td:nth-child(-n+2),table.speed th:nth-child(-n+2){text-align:left}
.plot{margin-top:1rem}.plot img{max-width:100%;border:1px solid #eee}
ul.checks li{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;list-style:none;margin:.15rem 0}
.ok{color:#2a7d2e;font-weight:600}.bad{color:#c0392b;font-weight:600}
.facts td,.facts th{text-align:left}.facts th{width:12rem}
"""


def report_html(manifest: dict[str, Any]) -> str:
    """One HTML file, no external resources: the table, the plot (base64 PNG), the checks, the target's facts."""
    r = manifest["recipe"]
    t = r["target"]
    esc = html.escape
    png = base64.b64encode(size_kl_plot(manifest)).decode("ascii")
    verdict = manifest["verdict"]

    def table(head: list[str], rows: list[list[str]], cls: str) -> str:
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table class='{cls}'><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr></thead><tbody>{body}</tbody></table>"

    checks = "".join(
        f"<li><span class='{'ok' if c['passed'] else 'bad'}'>{'PASS' if c['passed'] else 'FAIL'}</span> {esc(c['message'])}</li>"
        for a in manifest["artifacts"] for c in a.get("checks", []))
    facts = [("CPU / GPU", t["cpu"]), ("ISA features", ", ".join(t["isa"])), ("instance", t["instance"]),
             ("price", f"${t['price_per_hour']:g} / hour"), ("memory bandwidth", f"{t['memory_bandwidth_gbs']:g} GB/s"),
             ("qemu CPU model", t.get("qemu_cpu") or "—")]
    facts_html = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in facts)
    notes = "".join(f"<li>{esc(n)}</li>" for n in _notes(manifest))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qkiln build: {esc(t['name'])}</title><style>{CSS}</style></head>
<body>
<h1>qkiln build: {esc(t['name'])} <span class="badge {verdict}">{verdict.upper()}</span></h1>
<p class="meta">{esc(t['description'])}<br>recipe <code>{esc(r['file'])}</code> (sha256 {esc(r['sha256'][:12])}) ·
model <code>{esc(manifest['model']['name'])}</code> · qkiln {esc(manifest['qkiln_version'])}</p>
<h2>Accuracy</h2>
{table(ACCURACY_HEAD, _accuracy_rows(manifest), "acc")}
<div class="plot"><img alt="artifact size against mean KL" src="data:image/png;base64,{png}"></div>
<h2>Speed and cost</h2>
{table(SPEED_HEAD, _speed_rows(manifest), "speed")}
<h2>Checks</h2><ul class="checks">{checks}</ul>
<h2>Target</h2><table class="facts">{facts_html}</table>
<h2>Notes</h2><ul>{notes}</ul>
</body></html>
"""


def _run_it(artifact: dict[str, Any]) -> list[str]:
    f, fmt = artifact["file"], artifact["format"]
    if fmt == "gguf":
        return ["Run it with llama.cpp as it is (no conversion):", "", "```sh", f"llama-cli -m {f} -p 'Hello'", "```", ""]
    if fmt == "onnx":
        return ["A folder for onnxruntime-genai (MatMulNBits weights, genai_config.json):", "", "```python",
                "import onnxruntime_genai as og", f"model = og.Model({f!r})", "```", ""]
    return [f"A {fmt} folder (safetensors + config.json quantization_config) for vLLM:", "", "```sh",
            f"vllm serve ./{f}", "```", ""]


def model_card(manifest: dict[str, Any], artifact: dict[str, Any]) -> str:
    """A short README for one artifact: what it is, how it was made, how well it scored, how to run it."""
    t = manifest["recipe"]["target"]
    acc = artifact.get("accuracy", {})
    lines = [
        f"# {artifact['file']}", "",
        f"{manifest['model']['name']} quantized by qkiln {manifest['qkiln_version']} for **{t['name']}** "
        f"({t['cpu']}): {artifact['format']} `{artifact['scheme']}`, codes chosen by `{artifact['algo']}`.", "",
        f"- size {_mib(artifact['size_bytes'])}, {artifact['bits_per_weight']:.3f} bits per weight, sha256 `{artifact['sha256']}`",
        f"- mean KL {_f(acc.get('mean_kl'))} nats, perplexity {_f(acc.get('perplexity'))} "
        f"({_f(acc.get('ppl_increase_pct'), '+.2f')} % against the unquantized model), top-1 agreement {_f(acc.get('top1_agreement'), '.3f')}",
        f"- verdict against the recipe's thresholds: **{artifact['verdict']}**",
        f"- calibration: {manifest['calibration']['description']}",
        "",
        *_run_it(artifact),
        "Provenance, every metric and the target's speed estimate are in manifest.json beside this file.", "",
    ]
    return "\n".join(lines)
