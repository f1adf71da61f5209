"""manifest.json helpers: file hashes, the fields that are plainly times, and regression against a baseline.

A build's manifest is deterministic except for the entries named in TIME_KEYS (wall times and measured
speeds): `stable_view` drops them, which is what "two builds give the same manifest" compares.
`baseline_checks` compares an artifact's accuracy with the same-named artifact of an earlier manifest:
a regression beyond REGRESSION's slack fails (more than 10% more mean KL, 1 point more perplexity increase,
1 point less top-1 agreement).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from qkiln.errors import UserError
from qkiln.hashing import sha256_file
from qkiln.validate.gates import Check

TIME_KEYS = ("timings", "speed", "target_estimate")  # measured on this machine at this moment


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder, by relative path (a .gguf: the file itself)."""
    if folder.is_file():
        return {folder.name: sha256_file(folder)}
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def folder_sha256(path: Path) -> str:
    """One sha256 for an artifact: a file's own; a folder's is the sha256 of `sha256sum`-style lines
    ("<sha256>  <relative path>\n", sorted by path) of every file in it, so
    `(cd F && find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum) | sha256sum` reproduces it."""
    if path.is_file():
        return sha256_file(path)
    lines = "".join(f"{h}  {name}\n" for name, h in sorted(folder_hashes(path).items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def artifact_size(path: Path) -> int:
    """Bytes of a file, or the sum of the file sizes of a folder."""
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stable_view(doc: Any) -> Any:
    """The manifest without the entries that are times or measured speeds (recursively)."""
    if isinstance(doc, dict):
        return {k: stable_view(v) for k, v in doc.items() if k not in TIME_KEYS}
    if isinstance(doc, list):
        return [stable_view(v) for v in doc]
    return doc


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"baseline manifest {path} not found; pass the manifest.json of an earlier build") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"baseline manifest {path} is not JSON ({e}); pass a manifest.json written by qkiln build") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("artifacts"), list):
        raise UserError(f"baseline manifest {path} has no artifacts list; pass a manifest.json written by qkiln build")
    return doc


def baseline_artifact(doc: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The baseline's entry for artifact `name` (by artifact name, or by file name), or the only one."""
    arts = doc["artifacts"]
    for a in arts:
        if name in (a.get("name"), a.get("file")):
            return a
    return arts[0] if len(arts) == 1 else None


# How much worse than the baseline an artifact may be before it is a regression, per metric:
# (metric, direction, slack). The slack is absolute: equal to noise of the same evaluation is not a regression.
REGRESSION = (
    ("mean_kl", "max", 0.1),  # relative: 10% more KL than the baseline
    ("ppl_increase_pct", "max", 1.0),  # absolute: one percentage point more perplexity increase
    ("top1_agreement", "min", 0.01),  # absolute: one point less top-1 agreement
)


def baseline_checks(artifact: str, metrics: dict[str, Any], baseline: dict[str, Any]) -> list[Check]:
    """One Check per accuracy metric: this artifact's value against the baseline's, with REGRESSION's slack.

    mean KL may grow by 10% of the baseline's value, the perplexity increase by 1 point, top-1 agreement may
    drop by 1 point; identical evaluations give identical numbers, so any real regression shows."""
    base = baseline.get("accuracy", {})
    out = []
    for metric, direction, slack in REGRESSION:
        old, new = base.get(metric), metrics.get(metric)
        if old is None:
            continue
        if metric == "mean_kl":
            limit = old * (1 + slack)
        else:
            limit = old + slack if direction == "max" else old - slack
        ok = new is not None and (new <= limit if direction == "max" else new >= limit)
        op = "<=" if direction == "max" else ">="
        msg = (f"{artifact}: {metric} {new if new is None else f'{new:.6g}'} {'meets' if ok else 'regresses against'} "
               f"baseline {old:.6g} (allowed {op} {limit:.6g})")
        out.append(Check(artifact, f"baseline:{metric}", metric, new, limit, ok, msg))
    return out
