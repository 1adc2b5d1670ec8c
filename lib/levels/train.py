"""Stage ``levels``: the study's training again on bases whose corpus holds the training skills'
alias lines ('esrever abc = cba') in other shares of their lines (issue 15's axis, one level
per entry of ``levels.fractions``); stage ``level_score`` (:mod:`lib.levels.score`) scores them.

    python -m lib.levels.train   -> models/levels/<fraction>/{corpus, base, seeds/<seed>/{experts/<skill>, joint/total_steps}}
                                    models/levels/main/seeds/<seed>/joint/total_steps

Everything but ``synthesize.corpus_skill_fraction`` is the main study's: the same corpus knobs,
pretraining, skill datasets (datasets/skills: they do not depend on the corpus), expert recipe
and seeds ([experts.seed, *replicates.seeds]). A level trains the experts of ``levels.skills``
only, and their joint LoRA at the total steps: three seeds of all eight skills at every level
would not fit the study's time budget, so each seed's work is smaller instead. The main study
is the level ``synthesize.corpus_skill_fraction``: its base and experts are already trained
(stages base, adapters), so there only the joint LoRAs of ``levels.skills`` are (models/levels/main).

How it runs: the levels' bases are pretrained side by side (``levels.workers`` processes, one
torch thread each, so a level's base does not depend on the number of workers), then every
level's and seed's adapters go into one pool (:func:`lib.experts.train.run_jobs`), longest
first. A level's folder is named by its fraction as ``str(float)`` writes it ("0.0", "0.35").
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from lib.cli import stage_command
from lib.core import config, data, io
from lib.experts.seeds import study_seeds
from lib.levels.common import MAIN, SECTIONS, level_dir, level_name, seed_dir, skipped, skipped_path


def build_base(cfg: dict, f: float, out: Path, progress: bool = True) -> dict:
    """The level's corpus (out/corpus) and base (out/base), pretrained as stage 02's."""
    from lib.experts.base import prepare_base
    from lib.synth.datasets import corpus

    syn = cfg["synthesize"].model_copy(update={"corpus_skill_fraction": f})
    data.save(corpus(cfg["skills"], syn), out / "corpus")
    info, _ = prepare_base(cfg["model"], out / "corpus", out / "base", progress=progress)
    return info


def level_base(job: dict) -> dict:
    """One level's corpus and base in a process of its own (a worker's entry point): one torch thread."""
    from lib.core.training import one_cpu_thread

    one_cpu_thread()
    cfg = config.load(SECTIONS, Path(job["params"]), job["profile"])
    t0 = time.perf_counter()
    info = build_base(cfg, job["fraction"], Path(job["out"]), progress=False)
    return {**info, "seconds": round(time.perf_counter() - t0, 1)}


def level_jobs(root: Path, cfg: dict, name: str) -> dict[int, list[dict]]:
    """Every seed's adapter jobs of a level: the experts of ``levels.skills`` and their joint LoRA
    on the level's base; at the main level the joint LoRAs alone, on the main study's base."""
    from lib.experts.train import set_jobs

    e, skills = cfg["experts"], cfg["levels"].skills
    if name == MAIN:
        base, corpus = root / "models" / "base", root / "datasets" / "corpus"
    else:
        base, corpus = level_dir(root, name) / "base", level_dir(root, name) / "corpus"
    sets = {seed: set_jobs(root, skills, e, seed, base, corpus, seed_dir(root, name, seed)) for seed in study_seeds(cfg)}
    if name == MAIN:
        sets = {seed: [j for j in js if j["name"] == "joint"] for seed, js in sets.items()}
    return sets


def train(root: str | Path = ".", params: str = "params.yaml", profile: str | None = None,
          progress: bool = True) -> dict:
    """Every level's corpus and base, then every level's and seed's adapters; writes each
    level's ``level_info.json`` and returns them by level name."""
    from lib.core.modeling import check_local
    from lib.core.pool import pool_map
    from lib.experts.train import run_jobs, steps_run

    root = Path(root)
    cfg = config.load(SECTIONS, root / params, profile)
    reason = skipped(cfg)
    if reason:
        import shutil

        shutil.rmtree(root / "models" / "levels", ignore_errors=True)
        io.write_json(skipped_path(root), {"skipped": reason})
        print(f"levels skipped: {reason}", file=sys.stderr)
        return {}
    check_local(root / "models" / "base")  # the main level's joint LoRAs train on it
    workers = cfg["levels"].workers
    fractions = {level_name(f): float(f) for f in cfg["levels"].fractions}
    t0 = time.perf_counter()
    bases = pool_map(level_base, [{"params": str((root / params).resolve()), "profile": profile, "fraction": f,
                                    "out": str(level_dir(root, name).resolve())} for name, f in fractions.items()], workers)
    t1 = time.perf_counter()
    levels = {**fractions, MAIN: cfg["synthesize"].corpus_skill_fraction}
    sets = {name: level_jobs(root, cfg, name) for name in levels}
    jobs = [j for by_seed in sets.values() for js in by_seed.values() for j in js]
    infos = iter(run_jobs(jobs, workers, progress))
    seconds = {"stage_bases": round(t1 - t0, 1), "stage_adapters": round(time.perf_counter() - t1, 1)}
    base_info = dict(zip(fractions, bases))
    found = {}
    for name, f in levels.items():
        runs = {seed: steps_run(js, [next(infos) for _ in js]) for seed, js in sets[name].items()}
        base = base_info.get(name, {})
        found[name] = {"fraction": f, "main": name == MAIN, "skills": list(cfg["levels"].skills),
                       "base_final_loss": base.get("final_loss"), "steps_run": runs,
                       # The levels share one pool: the stage's wall time, and this level's base alone.
                       "seconds": {"base": base.get("seconds"), **seconds}}
        io.write_json(level_dir(root, name) / "level_info.json", found[name])
    return found


def main(argv: list[str] | None = None) -> int:
    return stage_command.main(argv, __doc__, train, lambda found: {k: v["steps_run"] for k, v in found.items()})


if __name__ == "__main__":
    sys.exit(main())
