"""Where each seed of the study keeps its experts, in one place for every stage that reads them
(stage 04's replicates, the levels, the teacher-data comparison, the linearised study)."""
from __future__ import annotations

from pathlib import Path


def study_seeds(cfg: dict) -> list[int]:
    """Every seed of the study, as stage 04 scores them: experts.seed, then replicates.seeds."""
    return [cfg["experts"].seed, *cfg["replicates"].seeds]


def replicate_dir(root: str | Path, seed: int) -> Path:
    """Replicate ``seed``'s adapters (its experts and joint LoRA): models/replicates/<seed>."""
    return Path(root) / "models" / "replicates" / str(seed)


def experts_dir(root: str | Path, seed: int, main_seed: int) -> Path:
    """The experts trained with ``seed`` by stage adapters: models/experts for experts.seed
    (``main_seed``), models/replicates/<seed>/experts for a replicate."""
    return Path(root) / "models" / "experts" if seed == main_seed else replicate_dir(root, seed) / "experts"
