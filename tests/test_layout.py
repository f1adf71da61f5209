"""The repository's top-level folders never shadow an installed distribution's import name.

`python -m pytest`, `python -c ...` or a REPL started at the repository root put the root first on sys.path,
so a top-level folder named like an installed package wins over it. transformers 5.25 imports the `kernels`
distribution; a top-level `kernels/` here broke every transformers-backed test that way.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN_DISTRIBUTION = "qkiln"


def top_level_packages(root: Path) -> list[str]:
    """Names `import NAME` would resolve to a folder at `root`: folders with an __init__.py."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def shadowed(root: Path) -> dict[str, list[str]]:
    """{folder name: the installed distributions that provide that top-level import name}."""
    provided = importlib.metadata.packages_distributions()
    clashes = {}
    for name in top_level_packages(root):
        others = sorted(d for d in provided.get(name, []) if d.lower() != OWN_DISTRIBUTION)
        if others:
            clashes[name] = others
    return clashes


def test_no_top_level_folder_shadows_an_installed_distribution():
    assert shadowed(ROOT) == {}, (
        "rename these folders or move them under qkiln/: an interpreter started at the repository root "
        "would import them instead of the installed distributions"
    )


def test_the_check_sees_a_clash(tmp_path):
    """A folder named like an installed distribution's import name (numpy) is reported."""
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("")
    (tmp_path / "plain").mkdir()
    assert shadowed(tmp_path) == {"numpy": ["numpy"]}
