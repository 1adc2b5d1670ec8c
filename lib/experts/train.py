"""Stage 03's training: one LoRA expert per skill, the joint multi-skill LoRA, the general
LoRA, for the primary seed and every replicate seed.

    python -m lib.experts.train adapters                    -> models/experts/<skill>/ (every skill),
                                                               models/joint/{same_steps,total_steps}/, models/general/,
                                                               models/replicates/<seed>/{experts/<skill>,joint/total_steps}/
    python -m lib.experts.train <skill>                     -> models/experts/<skill>/
    python -m lib.experts.train joint --budget same_steps   -> models/joint/same_steps/
    python -m lib.experts.train joint --budget total_steps  -> models/joint/total_steps/
    python -m lib.experts.train general                     -> models/general/
    python -m lib.experts.train replicate --seed 1          -> models/replicates/1/{experts/<skill>,joint/total_steps}/

``adapters`` is DVC's stage of the same name; the other commands train one of its adapters (or
one replicate seed's set) by hand, with the same inputs and so the same result.

``general`` is a LoRA trained on the base's own corpus (plain language modelling, the same
recipe as an expert): the "general knowledge" adapter GenKnowSub subtracts in stage 04.

The joint baseline trains on the union of all training skills under two budgets: the steps
of one expert (``experts.steps``; the mean cap when ``experts.step_factor`` gives a skill
more), and the steps of all experts together (the sum of their caps), so "experts + merge" is
compared with "one model on everything" at equal and at equal-total compute. Both are the
experts' step *cap*: with early stopping (``experts.stop_loss``, which the joint runs follow
too) an expert may run fewer, so the joint LoRA gets at least the experts' compute, never less
(the conservative side for "experts + merging beat joint training"), and it can train side by
side with the experts instead of waiting for their step counts.

``experts.replay`` mixes lines of the base's own corpus into every expert's and the joint
LoRA's training rows (that share of the rows), so an update binds a skill to its instruction
without rewriting what the base does elsewhere (issue 15's testbed).

Seeds: the primary set uses ``experts.seed``; each of ``replicates.seeds`` retrains every
expert and the joint LoRA at the total steps (models/replicates/<seed>), so that the claims'
intervals in stage 04 are over seeds.

How it runs: every adapter of every seed is one job in a pool of ``replicates.workers``
processes with one torch thread each, longest first, so the adapters are the same as one at a
time (each is one thread either way) in about half the wall time on two cores. An adapter
already in place that was made from the same inputs (its ``run_key.json``: params, data, base
weights, library versions) is kept, which is how a killed stage resumes (DVC keeps the stage's
outputs: ``persist``) and why a changed skill retrains only its experts and the joint LoRAs;
adapters of skills or seeds no longer in params are removed.
"""
from __future__ import annotations

import argparse
import sys
import zlib
from pathlib import Path

from datasets import Dataset, concatenate_datasets

from lib.core import config, data
from lib.core.modeling import ModelLoadError, check_local
from lib.core.pool import pool_map, remove_stale
from lib.core.training import TrainingDiverged, one_cpu_thread, train_lora
from lib.experts.seeds import replicate_dir

BUDGETS = ("same_steps", "total_steps")


def joint_train_set(skill_names: list[str], root: Path, seed: int):
    parts = [data.load(root / "datasets" / "skills" / s, ("train",), verify_answers=True)["train"] for s in skill_names]
    return concatenate_datasets(parts).shuffle(seed=seed)


def with_replay(train, root: Path, share: float, seed: int, name: str, corpus: Path | None = None):
    """``train`` (prompt/answer rows) with lines of the base's corpus (``corpus``, default
    root/datasets/corpus) mixed in so that they are ``share`` of the rows, shuffled; the corpus
    rows and the order depend on ``seed`` and ``name`` only."""
    if share <= 0:
        return train
    from lib.synth.datasets import corpus_rows

    texts = data.load(corpus or root / "datasets" / "corpus", ("train",))["train"]["text"]
    pool = Dataset.from_dict(corpus_rows(list(texts)))
    salt = zlib.crc32(name.encode()) % 100_000  # a fixed draw per adapter, not Python's salted hash
    n = min(len(pool), round(len(train) * share / (1 - share)))
    replay = pool.shuffle(seed=seed * 100_003 + salt).select(range(n))
    return concatenate_datasets([train.select_columns(["prompt", "answer"]), replay]).shuffle(seed=seed + salt)


def expert_steps(e, skill: str) -> int:
    """A skill's expert's step cap: ``experts.steps`` times its ``experts.step_factor`` (default 1)."""
    return max(1, round(e.steps * e.step_factor.get(skill, 1.0)))


def joint_budget(budget: str, skills: list[str], e) -> int:
    """same_steps: one expert's step cap (their mean); total_steps: the caps of all ``skills``' experts."""
    total = sum(expert_steps(e, s) for s in skills)
    return round(total / len(skills)) if budget == "same_steps" else total


def train_one(job: dict, progress: bool = False) -> dict:
    """One adapter from plain arguments (a worker's entry point): ``job`` names the project
    ``root``, the ``experts`` recipe (a dict), ``name`` (a training skill, ``joint`` or ``general``), the
    ``skills`` a joint LoRA trains on, ``seed``, ``steps``, the ``base`` and its ``corpus``
    (for replay) and the ``out`` directory."""
    one_cpu_thread()
    root, e = Path(job["root"]), config.ExpertsParams.model_validate(job["experts"])
    if job["name"] == "general":  # plain language modelling on the corpus itself: nothing to replay
        train = data.load(Path(job["corpus"]), ("train",))["train"]
    else:
        # ``data``: another dataset folder for a skill's expert (stage teacher_data's generated prompts)
        skill_data = Path(job.get("data") or root / "datasets" / "skills" / job["name"])
        train = (joint_train_set(job["skills"], root, job["seed"]) if job["name"] == "joint" else
                 data.load(skill_data, ("train",), verify_answers=True)["train"])
        train = with_replay(train, root, e.replay, job["seed"], job["name"], Path(job["corpus"]))
    resolved = {"experts": job["experts"], "name": job["name"], "seed": job["seed"], "steps": job["steps"],
                **({"budget": job["budget"], "skills": job["skills"]} if job["name"] == "joint" else {})}
    return train_lora(Path(job["base"]), train, e, job["steps"], job["seed"], Path(job["out"]), progress, resolved)


def set_jobs(root: Path, skills: list[str], e, seed: int, base: Path, corpus: Path, out: Path,
             budgets: tuple[str, ...] = ("total_steps",), general: bool = False) -> list[dict]:
    """The jobs of one seed's set of adapters on ``base``: every expert (out/experts/<skill>), the
    joint LoRA at each of ``budgets`` (out/joint/<budget>) and, with ``general``, the general LoRA
    (out/general)."""
    # Paths as given (the workers start in this process's directory): errors name them as the user does.
    common = {"root": str(root), "experts": e.model_dump(mode="json"), "seed": seed, "skills": list(skills),
              "base": str(base), "corpus": str(corpus)}
    jobs = [{**common, "name": "joint", "budget": b, "steps": joint_budget(b, skills, e), "out": str(out / "joint" / b)}
            for b in budgets]
    jobs += [{**common, "name": s, "steps": expert_steps(e, s), "out": str(out / "experts" / s)} for s in skills]
    if general:
        jobs.append({**common, "name": "general", "steps": e.steps, "out": str(out / "general")})
    return jobs


def run_jobs(jobs: list[dict], workers: int = 1, progress: bool = True) -> list[dict]:
    """Train every job (:func:`train_one`) in ``workers`` processes with one torch thread each,
    so the adapters are the same for any number of workers; longest first (by step cap), which
    keeps the workers busy until close to the end. Returns each job's train info, in order."""
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i]["steps"])
    if workers <= 1:  # in this process: progress bars, and a launcher's processes share each adapter
        done = [train_one(jobs[i], progress) for i in order]
    else:
        done = pool_map(train_one, [jobs[i] for i in order], workers)
    infos = dict(zip(order, done))
    return [infos[i] for i in range(len(jobs))]


def steps_run(jobs: list[dict], infos: list[dict]) -> dict:
    return {(f"joint_{j['budget']}" if j["name"] == "joint" else j["name"]): i.get("steps_run") for j, i in zip(jobs, infos)}


def _replicate_jobs(root: Path, skills: list[str], e, seed: int) -> list[dict]:
    """Replicate ``seed``'s set (experts and the joint LoRA at the total steps) under
    models/replicates/<seed>/, its adapters of dropped skills removed."""
    out = replicate_dir(root, seed)
    remove_stale(out / "experts", skills)
    remove_stale(out / "joint", ["total_steps"])
    return set_jobs(root, skills, e, seed, root / "models" / "base", root / "datasets" / "corpus", out)


def _primary_jobs(root: Path, skills: list[str], e) -> list[dict]:
    """The primary seed's set (``experts.seed``): experts, both joint budgets, the general LoRA."""
    models = root / "models"
    return set_jobs(root, skills, e, e.seed, models / "base", root / "datasets" / "corpus", models, BUDGETS, general=True)


def all_adapters(root: Path, skills, e, replicates, progress: bool = True) -> dict:
    """The ``adapters`` stage: the primary seed's set (``experts.seed``: experts, both joint
    budgets, the general LoRA under models/) and every replicate seed's (experts and the joint
    LoRA at the total steps under models/replicates/<seed>/), all in one pool of
    ``replicates.workers`` processes; adapters of dropped skills or seeds are removed. Returns
    the steps run per seed."""
    models = root / "models"
    remove_stale(models / "experts", skills.train)
    remove_stale(models / "joint", list(BUDGETS))
    remove_stale(models / "replicates", [str(s) for s in replicates.seeds])
    sets = {e.seed: _primary_jobs(root, skills.train, e)}
    sets.update({seed: _replicate_jobs(root, skills.train, e, seed) for seed in replicates.seeds})
    infos = iter(run_jobs([j for js in sets.values() for j in js], replicates.workers, progress))
    return {seed: steps_run(js, [next(infos) for _ in js]) for seed, js in sets.items()}


def replicate(seed: int, root: Path, skills, e, workers: int = 1, progress: bool = True) -> dict:
    """The whole expert recipe with ``seed`` under models/replicates/<seed>/ (one seed of the
    ``adapters`` stage, by hand)."""
    jobs = _replicate_jobs(root, skills.train, e, seed)
    return steps_run(jobs, run_jobs(jobs, workers, progress))


def run(name: str, budget: str | None = None, root: str | Path = ".", params: str = "params.yaml",
        profile: str | None = None, progress: bool = True, seed: int | None = None) -> dict:
    one_cpu_thread()  # every adapter trains on one thread (faster here, and the same on any core count)
    root = Path(root)
    check_local(root / "models" / "base")  # before reading any data: the usual first mistake
    if name == "adapters":
        cfg = config.load(["skills", "experts", "replicates"], root / params, profile)
        return all_adapters(root, cfg["skills"], cfg["experts"], cfg["replicates"], progress)
    if name == "replicate":
        cfg = config.load(["skills", "experts", "replicates"], root / params, profile)
        if seed not in cfg["replicates"].seeds:
            raise config.ParamsError(f"replicate needs --seed, one of replicates.seeds {cfg['replicates'].seeds}; "
                                     f"got {seed!r}")
        return replicate(seed, root, cfg["skills"], cfg["experts"], cfg["replicates"].workers, progress)
    cfg = config.load(["skills", "experts"], root / params, profile)
    skills, e = cfg["skills"], cfg["experts"]
    # One expert, joint or general LoRA: its job in the `adapters` stage's primary set (and so
    # the same adapter and run key).
    if name == "joint" and budget not in BUDGETS:
        raise config.ParamsError(f"joint needs --budget, one of {', '.join(BUDGETS)}; got {budget!r}")
    found = [j for j in _primary_jobs(root, skills.train, e) if j["name"] == name and j.get("budget") in (None, budget)]
    if not found:
        raise config.ParamsError(f"{name!r} is not a training skill, 'adapters', 'joint', 'general' or 'replicate'; "
                                 f"skills.train is {skills.train}")
    job = found[0]
    return train_one(job, progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help="'adapters' (every expert and joint LoRA), a training skill, 'joint', 'general' or 'replicate'")
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
