"""What the levels' stages share: the params they read, where a level lives, the stage's argument."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

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




def cli(argv: list[str] | None, doc: str, step: Callable[..., dict], show: Callable[[dict], object],
        fraction_arg: bool = True) -> int:
    """A level stage's command line: ``[<fraction>] [--params] [--profile] [--workdir]``; runs
    ``step([fraction,] workdir, params, profile)`` and prints ``show`` of its result, or one error line."""
    from lib.core import data
    from lib.core.modeling import ModelLoadError
    from lib.core.training import TrainingDiverged

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if fraction_arg:
        ap.add_argument("fraction", help="one of levels.fractions, as written there")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--workdir", default=".", help="project root (where params.yaml, datasets/ and models/ are)")
    args = ap.parse_args(argv)
    try:
        found = step(*([args.fraction] if fraction_arg else []), args.workdir, args.params, args.profile)
    except (config.ParamsError, data.DataError, ModelLoadError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(show(found))
    return 0
