"""Stage 03 training step: one LoRA expert per skill, or the joint multi-skill LoRA.

    python -m lib.experts.train <skill>                     -> models/experts/<skill>/
    python -m lib.experts.train joint --budget same_steps   -> models/joint/same_steps/
    python -m lib.experts.train joint --budget total_steps  -> models/joint/total_steps/
    python -m lib.experts.train general                     -> models/general/

``general`` is a LoRA trained on the base's own corpus (plain language modelling, the same
recipe as an expert): the "general knowledge" adapter GenKnowSub subtracts in stage 04.

The joint baseline trains on the union of all training skills under two budgets: the
steps of one expert, and the steps of all experts together, so "experts + merge" is
compared with "one model on everything" at equal and at equal-total compute.
With early stopping (``experts.stop_loss``) the experts run different numbers of steps,
read from each expert's train_info.json: "all experts' steps" is their sum and "one
expert's steps" their mean (rounded); the joint runs follow the same stopping rule.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datasets import concatenate_datasets

from lib.core import config, data
from lib.core.modeling import ModelLoadError
from lib.core.training import TrainingDiverged, train_lora

BUDGETS = ("same_steps", "total_steps")


def joint_train_set(skill_names: list[str], root: Path, seed: int):
    parts = [data.load(root / "datasets" / "skills" / s, ("train",), verify_answers=True)["train"] for s in skill_names]
    return concatenate_datasets(parts).shuffle(seed=seed)


def experts_steps(skill_names: list[str], root: Path) -> list[int]:
    """Steps each trained expert actually ran; an expert not trained yet is a clear error."""
    steps = []
    for s in skill_names:
        info = root / "models" / "experts" / s / "train_info.json"
        if not info.exists():
            raise data.DataError(f"{info}: missing; the joint budgets need every expert trained first "
                                 f"(dvc repro expert@{s})")
        saved = json.loads(info.read_text())
        steps.append(saved.get("steps_run", saved["steps"]))
    return steps


def joint_budget(budget: str, skill_names: list[str], root: Path) -> int:
    """same_steps: the mean steps of one expert; total_steps: all experts' steps together."""
    steps = experts_steps(skill_names, root)
    return max(1, round(sum(steps) / len(steps))) if budget == "same_steps" else sum(steps)


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
        steps = joint_budget(budget, skills.train, root)
        out = root / "models" / "joint" / budget
        resolved.update(budget=budget, skills=skills.train)
    elif name == "general":
        train = data.load(root / "datasets" / "corpus", ("train",))["train"]
        steps = e.steps
        out = root / "models" / "general"
    else:
        if name not in skills.train:
            raise config.ParamsError(f"{name!r} is not a training skill, 'joint' or 'general'; skills.train is {skills.train}")
        train = data.load(root / "datasets" / "skills" / name, ("train",), verify_answers=True)["train"]
        steps = e.steps
        out = root / "models" / "experts" / name
    resolved["steps"] = steps
    return train_lora(root / "models" / "base", train, e, steps, e.seed, out, progress, resolved)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a training skill, 'joint' or 'general'")
    ap.add_argument("--budget", choices=BUDGETS)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--workdir", default=".", help="project root (where params.yaml, datasets/ and models/ are)")
    args = ap.parse_args(argv)
    try:
        info = run(args.name, args.budget, root=args.workdir, params=args.params, profile=args.profile)
    except (config.ParamsError, data.DataError, ModelLoadError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
