"""What the levels' stages share: the params they read and where a level's models live."""
from __future__ import annotations

from pathlib import Path

from lib.experts.seeds import experts_dir


SECTIONS = ["skills", "synthesize", "model", "experts", "replicates", "evaluation", "merge_route", "levels"]
MAIN = "main"
"""The main study's level (its base, synthesize.corpus_skill_fraction): under models/levels/main
only the joint LoRAs of ``levels.skills``; its base and experts are the main study's."""


def skipped(cfg: dict) -> str | None:
    """Why the levels do not apply to this study, or None. A level is a scratch base pretrained on
    a corpus with another share of alias lines; a pretrained base (``model.base`` not ``scratch``)
    learnt from a corpus nobody here controls, so there is no level to vary: both level stages
    then record the reason instead of training or scoring anything."""
    base = cfg["model"].base
    if base == "scratch":
        return None
    return (f"model.base is {base!r}: the levels vary the pretraining corpus of a scratch base, which a "
            "pretrained base does not have")


def skipped_path(root: Path) -> Path:
    return root / "models" / "levels" / "skipped.json"


def level_name(fraction: float) -> str:
    """A further level's folder and metrics name: its fraction as ``str(float)`` writes it ("0.0", "0.35")."""
    return str(float(fraction))


def level_dir(root: Path, name: str) -> Path:
    return root / "models" / "levels" / name


def seed_dir(root: Path, name: str, seed: int) -> Path:
    """One seed's adapters of a level: experts/<skill> (not at the main level) and joint/total_steps."""
    return level_dir(root, name) / "seeds" / str(seed)


def metrics_path(root: Path) -> Path:
    """Stage level_score's metrics: every level's, keyed by its fraction (:func:`level_name`), the main study's too."""
    return root / "metrics" / "levels.json"


def adapter_dirs(root: Path, name: str, seed: int, skills: list[str], main_seed: int) -> dict[str, Path]:
    """A level's adapters for ``seed``: each skill's expert by name and the joint LoRA (joint_total_steps).
    At the main level the experts are the main study's (models/experts, models/replicates/<seed>/experts)."""
    if name == MAIN:
        experts = experts_dir(root, seed, main_seed)
    else:
        experts = seed_dir(root, name, seed) / "experts"
    return {s: experts / s for s in skills} | {"joint_total_steps": seed_dir(root, name, seed) / "joint" / "total_steps"}
