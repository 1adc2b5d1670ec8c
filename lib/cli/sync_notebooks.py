"""Rewrite each stage notebook's ``parameters`` cell from params.yaml.

    python -m lib.cli.sync_notebooks

Run after changing a default in params.yaml, so a notebook opened in JupyterLab runs with
the same values as ``dvc repro`` (tests/test_pipeline_files.py fails until you do).
"""
from __future__ import annotations

from pathlib import Path

import nbformat

from lib.core.config import read_yaml
from lib.core.stages import STAGES

REPO = Path(__file__).resolve().parents[2]
HEADER = [
    "# Parameters: papermill replaces these with the validated params.yaml sections.",
    "# Defaults equal params.yaml (a test checks); edit here to explore, then move the",
    "# value into params.yaml to make it part of the study.",
    'workdir = ".."  # project root, relative to this notebook',
]


def sync(params: Path = REPO / "params.yaml", root: Path = REPO) -> list[Path]:
    """The notebooks under ``root``/notebooks rewritten from ``params``; returns those changed."""
    values = read_yaml(params)
    changed = []
    for stage in STAGES.values():
        path = Path(root) / "notebooks" / stage.notebook
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        source = "\n".join(HEADER + [f"{s} = {values[s]!r}" for s in stage.sections])
        if cell.source != source:
            cell.source = source
            nbformat.write(nb, path)
            changed.append(path)
    return changed


if __name__ == "__main__":
    for p in sync():
        print(f"updated {p.relative_to(REPO)}")
