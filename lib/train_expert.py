"""Stage 03 training step: one LoRA expert per skill, or the joint multi-skill LoRA.

    python -m lib.train_expert <skill>                     -> models/experts/<skill>/
    python -m lib.train_expert joint --budget same_steps   -> models/joint/same_steps/
    python -m lib.train_expert joint --budget total_steps  -> models/joint/total_steps/

The joint baseline trains on the union of all training skills under two budgets: the
steps of one expert, and the steps of all experts together, so "experts + merge" is
compared with "one model on everything" at equal and at equal-total compute.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datasets import concatenate_datasets

from . import config, data
from .training import train_lora

BUDGETS = ("same_steps", "total_steps")


def joint_train_set(skill_names: list[str], root: Path, seed: int):
    parts = [data.load(root / "datasets" / "skills" / s, ("train",))["train"] for s in skill_names]
    return concatenate_datasets(parts).shuffle(seed=seed)


def run(name: str, budget: str | None = None, root: str | Path = ".", params: str = "params.yaml",
        profile: str | None = None, progress: bool = True) -> dict:
    root = Path(root)
    cfg = config.load(["skills", "experts"], root / params, profile)
    skills, e = cfg["skills"], cfg["experts"]
    resolved = {"experts": e.model_dump(mode="json"), "name": name}
    if name == "joint":
        if budget not in BUDGETS:
            raise config.ParamsError(f"joint needs --budget, one of {', '.join(BUDGETS)}; got {budget!r}")
        train = joint_train_set(skills.train, root, e.seed)
        steps = e.steps if budget == "same_steps" else e.steps * len(skills.train)
        out = root / "models" / "joint" / budget
        resolved.update(budget=budget, skills=skills.train)
    else:
        if name not in skills.train:
            raise config.ParamsError(f"{name!r} is not a training skill; skills.train is {skills.train}")
        train = data.load(root / "datasets" / "skills" / name, ("train",))["train"]
        steps = e.steps
        out = root / "models" / "experts" / name
    resolved["steps"] = steps
    return train_lora(root / "models" / "base", train, e, steps, e.seed, out, progress, resolved)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a training skill, or 'joint'")
    ap.add_argument("--budget", choices=BUDGETS)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    args = ap.parse_args(argv)
    try:
        info = run(args.name, args.budget, params=args.params, profile=args.profile)
    except (config.ParamsError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
