"""Do linearised experts merge better? (issue 19; Ortiz-Jimenez et al. 2023, Tang et al. 2023)

    python -m lib.experts.linearised_study [--lr 0.03] [--seeds 0 1 2] [--workers 2] [--out results/linearised]

Trains, for each seed, one linearised LoRA expert per training skill (:mod:`lib.experts.linearised`:
the same rows, replay, step caps and recipe as the ``adapters`` stage's experts, through the
model's first-order expansion; ``--lr`` replaces ``experts.lr``, since the linearised model
learns more slowly), under models/linearised/lr<lr>/<seed>/<skill>/, then scores them as
stage 04 scores ordinary experts: each linearised expert on its own skill (the denominators of
normalised accuracy) and ``levels.merges``-style ΔW merges (task arithmetic and TIES, λ chosen
on the validation splits from ``merge_route.lam_grid``), evaluated two ways: in the linearised
model (where the paper evaluates them) and, post hoc, in the ordinary model with the merged ΔW
added. The ordinary experts' merges are read from stage 04's per-seed values
(``plots/merge_route_leaderboard.csv``), so the comparison is on the same seeds and prompts.

Not a DVC stage: three seeds of linearised experts cost about as much as the whole default
study on the 2-core CPU (each step is a forward-mode pass through the model and its backward),
so it runs on demand and its results are committed under ``--out`` (metrics JSON and a table).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lib.core import config, io
from lib.experts.seeds import study_seeds

SECTIONS = ["skills", "experts", "replicates", "evaluation", "merge_route"]
METHODS = ("task_arithmetic", "ties")


def train_job(job: dict) -> dict:
    """One linearised expert in a worker (one torch thread); skipped when its files exist."""
    from safetensors.torch import save_file

    from lib.core import data
    from lib.core.modeling import load_on_device
    from lib.core.training import one_cpu_thread
    from lib.experts.linearised import train_linearised
    from lib.experts.train import expert_steps, with_replay

    one_cpu_thread()
    out = Path(job["out"])
    if (out / "info.json").is_file():
        return json.loads((out / "info.json").read_text())
    root, e = Path(job["root"]), config.ExpertsParams.model_validate(job["experts"])
    rows = data.load(root / "datasets" / "skills" / job["skill"], ("train",), verify_answers=True)["train"]
    rows = with_replay(rows, root, e.replay, job["seed"], job["skill"], root / "datasets" / "corpus")
    model, tok = load_on_device(root / "models" / "base")
    delta, info = train_linearised(model, tok, rows, e, expert_steps(e, job["skill"]), job["seed"])
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in delta.items()}, str(out / "delta.safetensors"))
    io.write_json(out / "info.json", info)
    return info


def score_seed(job: dict) -> dict:
    """A seed's linearised experts alone and merged (TA, TIES), in the linearised and the ordinary model."""
    import os

    from safetensors.torch import load_file

    from lib.core import data
    from lib.core.bench import Bench, System, seed_everything
    from lib.core.modeling import load_on_device
    from lib.core.training import one_cpu_thread
    from lib.experts.linearised import LinearisedLM
    from lib.merge import leaderboard as MR, task_vectors as M

    one_cpu_thread()
    io.quiet_notebook()
    os.chdir(job["root"])
    cfg = config.load(SECTIONS, Path("params.yaml"))
    S, E, P = cfg["skills"], cfg["evaluation"], cfg["merge_route"]
    seed_everything(P.seed)
    base, tok = load_on_device("models/base")
    tvs = {s: load_file(str(Path(job["dir"]) / s / "delta.safetensors")) for s in S.train}
    tests, val = data.test_sets(".", S)["skills"], data.test_sets(".", S, split="validation")["skills"]
    bench = Bench(tok, {"skills": tests}, E)
    t0 = time.perf_counter()
    for s in S.train:
        bench.score(System(f"expert:{s}", "expert", LinearisedLM(base, tvs[s])))
    per = bench.per_skill()
    expert_acc = {s: float(per[(per.system == f"expert:{s}") & (per.skill == s)].accuracy.iloc[0]) for s in S.train}
    lam = {}
    for method in METHODS:
        for space in ("linearised", "ordinary"):
            def build(x, method=method, space=space):
                merged = M.merge_task_vectors(tvs, method, weights=[x] * len(tvs), seed=P.seed, **M.method_kwargs(method, P))
                return LinearisedLM(base, merged) if space == "linearised" else M.apply_merged(base, merged)
            best, model, _, _ = MR.choose_lambda(build, P.lam_grid, lambda m: MR.validation_accuracy(m, tok, val, E))
            bench.score(System(f"{space}:{method}", "merge", model))
            lam[f"{space}:{method}"] = best
    return {"seed": job["seed"], "expert_acc": expert_acc, "lam": lam, "seconds": round(time.perf_counter() - t0, 1),
            "examples": {n: bench.results[(n, "skills")].examples[["skill", "correct"]]
                         for n in bench.systems if not n.startswith("expert:")}}


def ordinary(root: Path, seeds: list[int]) -> dict[str, list[float]]:
    """Stage 04's per-seed normalised accuracy of the ordinary experts' task arithmetic and TIES."""
    import pandas as pd

    board = pd.read_csv(root / "plots" / "merge_route_leaderboard.csv").set_index("system")
    return {m: [float(board.loc[f"merge:{m}", f"seed_{s}"]) for s in seeds] for m in METHODS}


def run(root: Path, seeds: list[int], workers: int, out: Path, lr: float | None = None) -> dict:
    from lib.core.pool import pool_map
    from lib.core.stats import seed_macro_ci, t_interval

    cfg = config.load(SECTIONS, root / "params.yaml")
    e = cfg["experts"] if lr is None else cfg["experts"].model_copy(update={"lr": lr})
    models = root / "models" / "linearised" / f"lr{e.lr:g}"
    every = study_seeds(cfg)
    bad = [s for s in seeds if s not in every]
    if bad:
        raise config.ParamsError(f"seeds {bad} are not the study's ({every}): the ordinary experts to compare with "
                                 "exist for those only")
    t0 = time.perf_counter()
    jobs = [{"root": str(root.resolve()), "experts": e.model_dump(mode="json"), "seed": s, "skill": k,
             "out": str((models / str(s) / k).resolve())} for s in seeds for k in cfg["skills"].train]
    infos = pool_map(train_job, jobs, workers)
    t_train = time.perf_counter() - t0
    scored = pool_map(score_seed, [{"root": str(root.resolve()), "seed": s,
                                    "dir": str((models / str(s)).resolve())} for s in seeds], workers)
    old = ordinary(root, seeds)
    systems = {}
    for name in scored[0]["examples"]:
        ex = [r["examples"][name] for r in scored]
        ci = seed_macro_ci(ex, [r["expert_acc"] for r in scored], cfg["evaluation"].n_boot)
        plain = seed_macro_ci(ex, None, cfg["evaluation"].n_boot)  # no denominators: weak experts cannot flatter it
        systems[name] = {k: ci[k] for k in ("mean", "lo", "hi", "per_seed")} | {
            "mean_acc": plain["mean"], "mean_acc_per_seed": plain["per_seed"], "lam": [r["lam"][name] for r in scored]}
    diffs = {}
    for m in METHODS:  # paired over seeds: the linearised experts' merge (in their model) minus the ordinary experts'
        # a seed whose linearised experts all scored 0 has no normalised value: no difference either
        d = [None if a is None or b is None else a - b for a, b in zip(systems[f"linearised:{m}"]["per_seed"], old[m])]
        diffs[m] = {"per_seed": d, **{k: v for k, v in t_interval(d).items() if k in ("mean", "lo", "hi")}}
    found = {"seeds": seeds, "lr": e.lr, "systems": systems, "ordinary_experts_merges": old, "linearised_minus_ordinary": diffs,
             "linearised_expert_own": {str(r["seed"]): r["expert_acc"] for r in scored},
             "train": {f"{j['seed']}/{j['skill']}": {k: i[k] for k in ("steps_run", "final_loss", "seconds")}
                       for j, i in zip(jobs, infos)},
             "seconds": {"train_wall": round(t_train, 1), "score_wall": round(time.perf_counter() - t0 - t_train, 1)}}
    io.write_json(out / "linearised.json", found)
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: every seed of the study")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=None, help="learning rate of the linearised experts (default experts.lr)")
    ap.add_argument("--workdir", default=".")
    ap.add_argument("--out", default="results/linearised")
    args = ap.parse_args(argv)
    root = Path(args.workdir)
    try:
        cfg = config.load(SECTIONS, root / "params.yaml")
        seeds = args.seeds or study_seeds(cfg)
        found = run(root, seeds, args.workers, Path(args.out), args.lr)
    except (config.ParamsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    r3 = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731  (no normalised value: every expert at 0)
    for name, s in found["systems"].items():
        print(f"{name:28s} {r3(s['mean'])} [{r3(s['lo'])}, {r3(s['hi'])}] per seed {[r3(v) for v in s['per_seed']]} λ {s['lam']}")
    for m, o in found["ordinary_experts_merges"].items():
        print(f"{'ordinary experts ' + m:28s} per seed {[r3(v) for v in o]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
