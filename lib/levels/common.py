"""What the levels' stages share: the params they read, where a level lives, the stage's argument."""
from __future__ import annotations

from pathlib import Path

from lib.core import config

SECTIONS = ["skills", "synthesize", "model", "experts", "evaluation", "merge_route", "levels"]


def level_dir(root: Path, fraction: str) -> Path:
    return root / "models" / "levels" / fraction


def metrics_path(root: Path, fraction: str) -> Path:
    return root / "metrics" / "levels" / f"{fraction}.json"


def parse_fraction(fraction: str, levels) -> float:
    """The stage's argument as one of ``levels.fractions`` (DVC passes the list item as written)."""
    try:
        f = float(fraction)
    except ValueError:
        raise config.ParamsError(f"level {fraction!r} is not a number; levels.fractions is {levels.fractions}") from None
    if f not in levels.fractions:
        raise config.ParamsError(f"level {fraction!r} is not in levels.fractions {levels.fractions}")
    return f


