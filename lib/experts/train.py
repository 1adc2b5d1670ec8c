"""Stage 03 training step: one LoRA expert per skill, or the joint multi-skill LoRA.

    python -m lib.experts.train <skill>                     -> models/experts/<skill>/
    python -m lib.experts.train joint --budget same_steps   -> models/joint/same_steps/
    python -m lib.experts.train joint --budget total_steps  -> models/joint/total_steps/
    python -m lib.experts.train general                     -> models/general/
    python -m lib.experts.train replicate --seed 1          -> models/replicates/1/{experts/<skill>,joint/total_steps}/

``general`` is a LoRA trained on the base's own corpus (plain language modelling, the same
recipe as an expert): the "general knowledge" adapter GenKnowSub subtracts in stage 04.

The joint baseline trains on the union of all training skills under two budgets: the
steps of one expert, and the steps of all experts together, so "experts + merge" is
compared with "one model on everything" at equal and at equal-total compute.
With early stopping (``experts.stop_loss``) the experts run different numbers of steps,
read from each expert's train_info.json: "all experts' steps" is their sum and "one
expert's steps" their mean (rounded); the joint runs follow the same stopping rule.

``experts.replay`` mixes lines of the base's own corpus into every expert's and the joint
LoRA's training rows (that share of the rows), so an update binds a skill to its instruction
without rewriting what the base does elsewhere (issue 15's testbed).

``replicate --seed K`` retrains the whole recipe with seed K (every expert, then the joint LoRA
at the total steps those experts ran): the seed replicates stage 04 scores so that the
claims' intervals are over seeds (``replicates.seeds``).
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

from datasets import Dataset, concatenate_datasets

from lib.core import config, data
from lib.core.modeling import ModelLoadError, check_local
from lib.core.training import TrainingDiverged, one_cpu_thread, train_lora

BUDGETS = ("same_steps", "total_steps")


def joint_train_set(skill_names: list[str], root: Path, seed: int):
    parts = [data.load(root / "datasets" / "skills" / s, ("train",), verify_answers=True)["train"] for s in skill_names]
    return concatenate_datasets(parts).shuffle(seed=seed)


def with_replay(train, root: Path, share: float, seed: int, name: str):
    """``train`` (prompt/answer rows) with corpus lines mixed in so that they are ``share`` of
    the rows, shuffled; the corpus rows and the order depend on ``seed`` and ``name`` only."""
    if share <= 0:
        return train
    from lib.synth.datasets import corpus_rows

    texts = data.load(root / "datasets" / "corpus", ("train",))["train"]["text"]
    pool = Dataset.from_dict(corpus_rows(list(texts)))
    salt = zlib.crc32(name.encode()) % 100_000  # a fixed draw per adapter, not Python's salted hash
    n = min(len(pool), round(len(train) * share / (1 - share)))
    replay = pool.shuffle(seed=seed * 100_003 + salt).select(range(n))
    return concatenate_datasets([train.select_columns(["prompt", "answer"]), replay]).shuffle(seed=seed + salt)


def experts_steps(skill_names: list[str], root: Path, experts_dir: Path | None = None) -> list[int]:
    """Steps each trained expert actually ran; an expert not trained yet is a clear error."""
    steps = []
    for s in skill_names:
        info = (experts_dir or root / "models" / "experts") / s / "train_info.json"
        if not info.exists():
            raise data.DataError(f"{info}: missing; the joint budgets need every expert trained first "
                                 f"(dvc repro expert@{s})")
        saved = json.loads(info.read_text())
        steps.append(saved.get("steps_run", saved["steps"]))
    return steps


def joint_budget(budget: str, skill_names: list[str], root: Path, experts_dir: Path | None = None) -> int:
    """same_steps: the mean steps of one expert; total_steps: all experts' steps together."""
    steps = experts_steps(skill_names, root, experts_dir)
    return max(1, round(sum(steps) / len(steps))) if budget == "same_steps" else sum(steps)


def _replicate_expert(root: str, experts: dict, skill: str, seed: int, progress: bool) -> dict:
    """One expert of a replicate, in this process (a worker's entry point: plain arguments)."""
    one_cpu_thread()
    root_p, e = Path(root), config.ExpertsParams.model_validate(experts)
    train = with_replay(data.load(root_p / "datasets" / "skills" / skill, ("train",), verify_answers=True)["train"],
                        root_p, e.replay, seed, skill)
    resolved = {"experts": experts, "name": skill, "seed": seed, "steps": e.steps}
    out = root_p / "models" / "replicates" / str(seed) / "experts" / skill
    return train_lora(root_p / "models" / "base", train, e, e.steps, seed, out, progress, resolved)


def replicate(seed: int, root: Path, skills, e, workers: int = 1, progress: bool = True) -> dict:
    """Every expert (in ``workers`` processes, one torch thread each, so the adapters are the
    same for any number of workers), then the joint LoRA at their total steps, all with
    ``seed``, under models/replicates/<seed>/ (experts/<skill>, joint/total_steps)."""
    out = root / "models" / "replicates" / str(seed)
    args = [(str(root.resolve()), e.model_dump(mode="json"), s, seed) for s in skills.train]
    if workers <= 1:
        infos = {a[2]: _replicate_expert(*a, progress) for a in args}
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(args)), mp_context=mp.get_context("spawn")) as pool:
            futures = {a[2]: pool.submit(_replicate_expert, *a, False) for a in args}
            infos = {s: f.result() for s, f in futures.items()}
    steps = joint_budget("total_steps", skills.train, root, out / "experts")
    train = with_replay(joint_train_set(skills.train, root, seed), root, e.replay, seed, "joint")
    resolved = {"experts": e.model_dump(mode="json"), "name": "joint", "budget": "total_steps",
                "skills": skills.train, "seed": seed, "steps": steps}
    infos["joint_total_steps"] = train_lora(root / "models" / "base", train, e, steps, seed,
                                            out / "joint" / "total_steps", progress, resolved)
    return {k: v.get("steps_run") for k, v in infos.items()}


def run(name: str, budget: str | None = None, root: str | Path = ".", params: str = "params.yaml",
        profile: str | None = None, progress: bool = True, seed: int | None = None) -> dict:
    one_cpu_thread()  # every adapter trains on one thread (faster here, and the same on any core count)
    root = Path(root)
    check_local(root / "models" / "base")  # before reading any data: the usual first mistake
    if name == "replicate":
        cfg = config.load(["skills", "experts", "replicates"], root / params, profile)
        if seed not in cfg["replicates"].seeds:
            raise config.ParamsError(f"replicate needs --seed, one of replicates.seeds {cfg['replicates'].seeds}; "
                                     f"got {seed!r}")
        return replicate(seed, root, cfg["skills"], cfg["experts"], cfg["replicates"].workers, progress)
    cfg = config.load(["skills", "experts"], root / params, profile)
    skills, e = cfg["skills"], cfg["experts"]
    resolved = {"experts": e.model_dump(mode="json"), "name": name}
    if name == "joint":
        if budget not in BUDGETS:
            raise config.ParamsError(f"joint needs --budget, one of {', '.join(BUDGETS)}; got {budget!r}")
        train = with_replay(joint_train_set(skills.train, root, e.seed), root, e.replay, e.seed, "joint")
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
        train = with_replay(data.load(root / "datasets" / "skills" / name, ("train",), verify_answers=True)["train"],
                            root, e.replay, e.seed, name)
        steps = e.steps
        out = root / "models" / "experts" / name
    resolved["steps"] = steps
    return train_lora(root / "models" / "base", train, e, steps, e.seed, out, progress, resolved)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="a training skill, 'joint', 'general' or 'replicate'")
    ap.add_argument("--budget", choices=BUDGETS)
    ap.add_argument("--seed", type=int, default=None, help="replicate: one of replicates.seeds")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--workdir", default=".", help="project root (where params.yaml, datasets/ and models/ are)")
    args = ap.parse_args(argv)
    try:
        info = run(args.name, args.budget, root=args.workdir, params=args.params, profile=args.profile, seed=args.seed)
    except (config.ParamsError, data.DataError, ModelLoadError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
