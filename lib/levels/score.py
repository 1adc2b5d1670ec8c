"""Stage ``level_score``: score every level trained by stage ``levels`` (:mod:`lib.levels.train`),
the main study's level included.

    python -m lib.levels.score   -> metrics/levels.json: every level by its fraction (the main study's too)

Per level: the base on every training skill (accuracy and well-formed answers; it must fail
them all at every level), and on every seed of the study the experts of ``levels.skills`` on
their own skill, their joint LoRA at the total steps and ``levels.merges`` (λ chosen on
validation from ``merge_route.lam_grid``), on those skills' test prompts, as stage 04 scores
them. A system's normalised accuracy is the mean over seeds of each seed's (its own experts
as denominators) with a 95% interval from the two-stage bootstrap over seeds and prompts
(:func:`lib.core.stats.seed_macro_ci`), as stage 04's intervals; per-seed values are kept.
Every (level, seed) is a job in ``levels.workers`` processes with one torch thread each, so
a seed's numbers do not depend on the number of workers. A separate stage from the training,
so that a merge parameter rescores the levels without retraining them.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lib.cli import stage_command
from lib.core import config, data, io
from lib.experts.seeds import study_seeds
from lib.levels.common import MAIN, SECTIONS, adapter_dirs, level_dir, level_name, metrics_path, skipped

JOINT = "joint_total_steps"


def _level_cfg(cfg: dict) -> dict:
    """The params a level is scored with: its skills as the training skills, its merges as stage 04's."""
    lv = cfg["levels"]
    return {**cfg, "skills": cfg["skills"].model_copy(update={"train": list(lv.skills)}),
            "merge_route": cfg["merge_route"].model_copy(update={"merges": list(lv.merges), "both_trim_scopes": []})}


def score_base(cfg: dict, base_dir: Path, root: Path) -> dict:
    """The level's base on every training skill's test prompts: accuracy and well-formed share per skill."""
    from lib.core.bench import Bench, System
    from lib.core.modeling import load_on_device
    from lib.experts.base import well_formed

    model, tok = load_on_device(base_dir)
    bench = Bench(tok, {"skills": data.test_sets(root, cfg["skills"])["skills"]}, cfg["evaluation"])
    res = bench.score(System("base", "base", model))["skills"]
    acc = res.per_skill().set_index("skill").accuracy
    wf = well_formed(res.examples)
    names = cfg["skills"].train
    return {"accuracy": {s: float(acc[s]) for s in names}, "well_formed": {s: float(wf[s]) for s in names},
            "max_accuracy": float(acc[list(names)].max())}


def score_seed(cfg: dict, base_dir: Path, dirs: dict[str, Path], root: Path) -> dict:
    """One seed of a level: its experts, joint LoRA and merges on the level's skills. Returns each
    system's examples, the experts' accuracy on their own skill and each merge's chosen λ."""
    from lib.core.bench import seed_everything
    from lib.merge import stage as MS

    cfg = _level_cfg(cfg)
    seed_everything(cfg["merge_route"].seed)
    st = MS.load(cfg, base_dir, dirs, root, test_sets=("skills",))
    expert_acc = MS.score_references(st)
    MS.score_merges(st)
    names = [JOINT, *(f"merge:{m}" for m in cfg["merge_route"].merges)]
    return {"examples": {n: st.bench.results[(n, "skills")].examples for n in names}, "expert_acc": expert_acc,
            "chosen_lambda": st.found["chosen_lambda"]}


def run_job(job: dict) -> dict:
    """A worker's entry point: one level's base (``job["seed"]`` None) or one seed, on one torch thread."""
    from lib.core.training import one_cpu_thread

    one_cpu_thread()
    io.quiet_notebook()
    root = Path(job["root"])
    cfg = config.load(SECTIONS, Path(job["params"]), job["profile"])
    t0 = time.perf_counter()
    if job["seed"] is None:
        out = score_base(cfg, Path(job["base"]), root)
    else:
        out = score_seed(cfg, Path(job["base"]), adapter_dirs(root, job["level"], job["seed"], list(cfg["levels"].skills),
                                                              cfg["experts"].seed), root)
    return {**out, "seconds": round(time.perf_counter() - t0, 1)}


def summarise(seeds: dict[int, dict], merges: list[str], n_boot: int) -> dict:
    """Each system's normalised and plain mean accuracy over seeds (interval over seeds and prompts,
    per-seed values), and the experts per seed."""
    from lib.core.stats import seed_macro_ci

    systems = {}
    for name in [JOINT, *(f"merge:{m}" for m in merges)]:
        ex = [s["examples"][name] for s in seeds.values()]
        norm = seed_macro_ci(ex, [s["expert_acc"] for s in seeds.values()], n_boot)
        plain = seed_macro_ci(ex, None, n_boot)
        r4 = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
        systems[name] = {"norm_acc": r4(norm["mean"]), "norm_lo": r4(norm["lo"]), "norm_hi": r4(norm["hi"]),
                         "norm_per_seed": {str(k): r4(v) for k, v in zip(seeds, norm["per_seed"])},
                         "mean_acc": r4(plain["mean"]), "n_seeds": norm["n"]}
    return {"systems": systems, "expert_own": {str(k): s["expert_acc"] for k, s in seeds.items()},
            "chosen_lambda": {str(k): s["chosen_lambda"] for k, s in seeds.items()}}


def score_all(root: str | Path = ".", params: str = "params.yaml", profile: str | None = None) -> dict:
    """Score every level (:func:`run_job` per level base and per level and seed) into
    metrics/levels.json; returns them by level name (the fraction as ``str(float)`` writes it)."""
    from lib.core.pool import pool_map

    root = Path(root)
    cfg = config.load(SECTIONS, root / params, profile)
    reason = skipped(cfg)
    if reason:  # stage levels recorded the same reason; the report says it in place of the curve
        io.write_json(metrics_path(root), {"skipped": reason})
        return {}
    levels = {level_name(f): float(f) for f in cfg["levels"].fractions} | {MAIN: cfg["synthesize"].corpus_skill_fraction}
    for name in levels:
        if not (level_dir(root, name) / "level_info.json").is_file():
            raise data.DataError(f"{level_dir(root, name)}: level not trained; run `dvc repro levels`")
    seeds = study_seeds(cfg)
    common = {"root": str(root.resolve()), "params": str((root / params).resolve()), "profile": profile}
    jobs = []
    for name in levels:
        base = root / "models" / "base" if name == MAIN else level_dir(root, name) / "base"
        jobs += [{**common, "level": name, "seed": s, "base": str(base.resolve())} for s in [None, *seeds]]
    t0 = time.perf_counter()
    results = pool_map(run_job, jobs, cfg["levels"].workers)
    wall = round(time.perf_counter() - t0, 1)
    found = {}
    for name, f in levels.items():
        mine = {j["seed"]: r for j, r in zip(jobs, results) if j["level"] == name}
        trained = json.loads((level_dir(root, name) / "level_info.json").read_text())
        found[level_name(f)] = {
            "fraction": f, "main": name == MAIN, "skills": list(cfg["levels"].skills), "seeds": seeds,
            "base": {k: mine[None][k] for k in ("accuracy", "well_formed", "max_accuracy")},
            **summarise({s: mine[s] for s in seeds}, list(cfg["levels"].merges), cfg["evaluation"].n_boot),
            "base_final_loss": trained["base_final_loss"], "steps_run": trained["steps_run"],
            "seconds": {**trained["seconds"], "score_jobs": round(sum(r["seconds"] for r in mine.values()), 1),
                        "stage_score": wall}}
    io.write_json(metrics_path(root), found)
    return found


def main(argv: list[str] | None = None) -> int:
    return stage_command.main(argv, __doc__, score_all, lambda found: {n: {k: v["norm_acc"] for k, v in m["systems"].items()}
                                                       for n, m in found.items()})


if __name__ == "__main__":
    sys.exit(main())
