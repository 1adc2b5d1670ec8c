"""The mergeability trade-off: one row per expert recipe that was run end to end.

    python -m lib.report.recipes record [--root PROJECT] [--note TEXT] [--levels]

After a full ``dvc repro`` (or ``dvc exp run``) of stages 01-04 in PROJECT, appends the
recipe (the params that shape the experts and the base) and what it gave (expert accuracy
on its own skill, the best merge's normalised accuracy, the router and joint baselines) to
``docs/mergeability_recipes.csv`` in this repository. Stage 04's notebook plots the file:
expert accuracy against mergeability, one point per recipe. Rows are only ever appended
from measured metrics files, never typed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from lib.core.config import read_yaml
from lib.core.io import read_json

REPO = Path(__file__).resolve().parents[2]
RECIPES_CSV = REPO / "docs" / "mergeability_recipes.csv"
RECIPE_KEYS = {
    "synthesize": ("corpus_skill_fraction", "alias_separator", "echo_fraction", "echo_answer"),
    "model": ("hidden_size", "num_layers", "pretrain_steps"),
    "experts": ("rank", "alpha", "lr", "steps", "stop_loss", "weight_decay", "target_modules", "seed", "replay",
                "step_factor"),
}


def recipe_row(root: str | Path, note: str = "") -> dict:
    """One row from a finished run in ``root``: its recipe params and measured results."""
    root = Path(root)
    params = read_yaml(root / "params.yaml")
    row: dict = {}
    for section, keys in RECIPE_KEYS.items():
        for k in keys:
            v = params.get(section, {}).get(k)
            row[f"{section}.{k}"] = (",".join(v) if isinstance(v, list) else
                                     ",".join(f"{a}:{b:g}" for a, b in v.items()) if isinstance(v, dict) else v)
    experts = read_json(root / "metrics" / "experts.json")
    mr = read_json(root / "metrics" / "merge_route.json")
    base = read_json(root / "metrics" / "base.json")
    systems = mr["systems"]
    routers = {k: v for k, v in systems.items()  # the oracle is told the skill: not a router to compare
               if v.get("kind") == "router" and k != "route:oracle" and v.get("norm_acc") is not None}
    row.update({
        "base_max": base["max_skill_accuracy"],
        "expert_own_min": experts["expert_own_min"],
        "expert_own_median": experts["expert_own_median"],
        "best_merge": mr["best_merge"],
        "best_merge_norm_acc": mr["best_merge_norm_acc"],
        "task_arithmetic_norm_acc": systems.get("merge:task_arithmetic", {}).get("norm_acc"),
        "ties_norm_acc": systems.get("merge:ties", {}).get("norm_acc"),
        "best_router_norm_acc": max((v["norm_acc"] for v in routers.values()), default=None),
        "joint_total_norm_acc": systems.get("joint_total_steps", {}).get("norm_acc"),
        "note": note,
        "source": "full dvc repro (python -m lib.report.recipes record)",
    })
    return row


def level_rows(root: str | Path, note: str = "") -> list[dict]:
    """One row per level of ``levels.fractions`` (stage level_score): the run's recipe with that
    corpus fraction, and the level's measured results (the experts of ``levels.skills``, means
    over the study's seeds; no routers at a level)."""
    import statistics

    from lib.levels.curve import read_levels

    root = Path(root)
    params = read_yaml(root / "params.yaml")
    recipe = {k: v for k, v in recipe_row(root).items() if "." in k}  # the run's recipe columns, read once
    rows = []
    for f, m in read_levels(root, (params.get("levels") or {}).get("fractions", [])).items():
        row = dict(recipe)
        row["synthesize.corpus_skill_fraction"] = f
        merges = {k: v["norm_acc"] for k, v in m["systems"].items() if k.startswith("merge:") and v["norm_acc"] is not None}
        best = max(merges, key=merges.get, default=None)
        own = [a for seed in m["expert_own"].values() for a in seed.values()]
        row.update({
            "base_max": m["base"]["max_accuracy"],
            "expert_own_min": min(own),
            "expert_own_median": statistics.median(own),
            "best_merge": best, "best_merge_norm_acc": merges.get(best),
            "task_arithmetic_norm_acc": m["systems"].get("merge:task_arithmetic", {}).get("norm_acc"),
            "ties_norm_acc": m["systems"].get("merge:ties", {}).get("norm_acc"),
            "best_router_norm_acc": None,
            "joint_total_norm_acc": m["systems"]["joint_total_steps"]["norm_acc"],
            "note": note, "source": (f"level {f} (stage levels: experts of {','.join(m['skills'])}, mean over "
                                     f"{len(m['expert_own'])} seeds) of a full dvc repro "
                                     "(python -m lib.report.recipes record --levels)"),
        })
        rows.append(row)
    return rows


def record(root: str | Path, note: str = "", csv: Path = RECIPES_CSV, levels: bool = False) -> pd.DataFrame:
    """Append the run's row (and with ``levels`` one row per level) to ``csv``."""
    row = pd.DataFrame([recipe_row(root, note), *(level_rows(root, note) if levels else [])])
    if csv.exists():
        row = pd.concat([pd.read_csv(csv), row], ignore_index=True)
    csv.parent.mkdir(parents=True, exist_ok=True)
    row.to_csv(csv, index=False)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["record"])
    ap.add_argument("--root", default=".")
    ap.add_argument("--note", default="")
    ap.add_argument("--levels", action="store_true", help="also one row per level (stage level_score)")
    args = ap.parse_args(argv)
    table = record(args.root, args.note, levels=args.levels)
    print(table.tail(1).T.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
