"""Stage ``levels``: the study's training again on bases whose corpus holds the training skills'
alias lines ('esrever abc = cba') in other shares of their lines (issue 15's axis, one level
per entry of ``levels.fractions``); stage ``level_score@<fraction>`` (:mod:`lib.levels.score`)
scores each.

    python -m lib.levels.train   -> models/levels/<fraction>/{corpus, base, experts/<skill>, joint/total_steps}

Everything but ``synthesize.corpus_skill_fraction`` is the main study's: the same corpus knobs,
pretraining, skill datasets (datasets/skills: they do not depend on the corpus), expert recipe
and seed (``experts``, one seed per level) and joint LoRA at the total steps. The main study's
base is the level ``synthesize.corpus_skill_fraction``; :mod:`lib.levels.curve` puts the
levels together.

How it runs: the levels' bases are pretrained side by side (``levels.workers`` processes, one
torch thread each, so a level's base does not depend on the number of workers), then every
level's adapters go into one pool (:func:`lib.experts.train.run_jobs`), longest first. A level's
folder is named by its fraction as ``str(float)`` writes it ("0.0", "0.35"), which is how DVC
writes the list items that name the ``level_score@`` stages.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from lib.core import config, data, io
from lib.levels.common import cli, SECTIONS, level_dir


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


def train(root: str | Path = ".", params: str = "params.yaml", profile: str | None = None,
          progress: bool = True) -> dict:
    """Every level's corpus and base, then every level's experts and joint LoRA; writes each
    level's ``level_info.json`` and returns them by fraction."""
    from lib.core.pool import pool_map
    from lib.experts.train import run_jobs, set_jobs, steps_run

    root = Path(root)
    cfg = config.load(SECTIONS, root / params, profile)
    e, workers = cfg["experts"], cfg["levels"].workers
    fractions = {str(float(f)): float(f) for f in cfg["levels"].fractions}
    t0 = time.perf_counter()
    bases = pool_map(level_base, [{"params": str((root / params).resolve()), "profile": profile, "fraction": f,
                                    "out": str(level_dir(root, name).resolve())} for name, f in fractions.items()], workers)
    t1 = time.perf_counter()
    sets = {name: set_jobs(root, cfg["skills"].train, e, e.seed, level_dir(root, name) / "base",
                           level_dir(root, name) / "corpus", level_dir(root, name)) for name in fractions}
    infos = iter(run_jobs([j for js in sets.values() for j in js], workers, progress))
    seconds = {"bases": round(t1 - t0, 1), "adapters": round(time.perf_counter() - t1, 1)}
    found = {}
    for (name, f), base in zip(fractions.items(), bases):
        js = sets[name]
        found[name] = {"fraction": f, "base_final_loss": base.get("final_loss"), "steps_run": steps_run(js, [next(infos) for _ in js]),
                       # The levels share one pool: the stage's wall time, and this level's base alone.
                       "seconds": {"base": base["seconds"], "stage_bases": seconds["bases"], "stage_adapters": seconds["adapters"]}}
        io.write_json(level_dir(root, name) / "level_info.json", found[name])
    return found


def main(argv: list[str] | None = None) -> int:
    return cli(argv, __doc__, train, lambda found: {k: v["steps_run"] for k, v in found.items()}, fraction_arg=False)


if __name__ == "__main__":
    sys.exit(main())
