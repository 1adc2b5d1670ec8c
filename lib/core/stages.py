"""The pipeline's stages: notebook, params sections read, and nothing else.

dvc.yaml declares the same sections under each stage's ``params:``; a test keeps the two
in agreement so DVC reruns a stage exactly when a section it reads changes.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: str
    sections: tuple[str, ...]


STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("synthesize", "01_synthesize.ipynb", ("skills", "synthesize")),
        Stage("base", "02_base.ipynb", ("skills", "model", "evaluation")),
        Stage("experts", "03_experts.ipynb", ("skills", "experts", "evaluation")),
        Stage("merge_route", "04_merge_route.ipynb", ("skills", "experts", "evaluation", "replicates", "merge_route")),
        Stage("continual", "05_continual.ipynb", ("skills", "experts", "evaluation", "continual")),
        Stage("localize", "06_localize.ipynb", ("skills", "experts", "evaluation", "localize")),
        Stage("curricula", "07_curricula.ipynb", ("skills", "experts", "curricula")),
        Stage("report", "08_report.ipynb", ("synthesize", "levels")),
    ]
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    return STAGES[name]
