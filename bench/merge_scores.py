"""Score ΔW merges that are not in the default study on the study's trained adapters (issue 19).

    python -m bench.merge_scores [--methods iso_c tsv_m ...] [--global-trim ties magnitude_prune] [--workers 2]

Every seed's experts (models/experts, models/replicates/<seed>) merged by each method as stage
04 merges them (``lib.merge.leaderboard.merge_on_validation``: λ from ``merge_route.lam_grid``
on the validation splits, the method's params from ``merge_route``), scored on the test prompts
of the training skills; ``--global-trim`` methods once more with ``merge_route.trim_scope:
global`` (``<method>_global``). Normalised accuracy over seeds as stage 04's (each seed's
experts as denominators, two-stage bootstrap over seeds and prompts), each method's λ per
seed, its accuracy per skill (mean over seeds) and the time one merge of the 8 experts takes.
Seeds run in ``--workers`` processes with one torch thread each, as stage 04's replicates.

For methods registered but left out of ``merge_route.merges`` because the study's time budget
has no room for them; it needs the ``adapters`` stage's outputs (a ``dvc repro`` or ``dvc
pull``). Writes ``bench/results/merge_scores.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["task_arithmetic", "ties", "dare_ties", "magnitude_prune", "iso_c", "tsv_m", "iso_cts", "cart", "della", "knots_ties", "knots_dare"]


def score_seed(job: dict) -> dict:
    import os

    from lib.core import config, io
    from lib.core.bench import System, seed_everything
    from lib.core.training import one_cpu_thread
    from lib.experts import adapters as X
    from lib.merge import leaderboard as MR, stage as ST, task_vectors as M

    io.quiet_notebook()
    one_cpu_thread()
    os.chdir(job["root"])
    cfg = config.load(["skills", "experts", "evaluation", "replicates", "merge_route"], "params.yaml")
    cfg["merge_route"] = cfg["merge_route"].model_copy(update={"merges": job["methods"]})
    P, seed = cfg["merge_route"], job["seed"]
    seed_everything(P.seed)
    names = list(cfg["skills"].train)
    dirs = X.adapter_dirs(".", names) if seed == cfg["experts"].seed else ST.replicate_dirs(names, seed)
    t0 = time.perf_counter()
    st = ST.load(cfg, "models/base", dirs, test_sets=("skills",))
    expert_acc = ST.score_references(st)
    ST.score_merges(st)
    lam = dict(st.found["chosen_lambda"])
    global_p = P.model_copy(update={"trim_scope": "global"})
    for m in job["global_trim"]:
        found = MR.merge_on_validation(st.base, st.tok, st.tvs, m, global_p, st.val["skills"], st.E)
        st.bench.score(System(f"merge:{m}_global", "merge", found["model"], info={"lam": found["lam"]}))
        lam[f"{m}_global"] = found["lam"]
    build = {}
    for m in job["methods"]:
        t = time.perf_counter()
        M.merge_task_vectors(st.tvs, m, weights=[1.0] * len(st.tvs), seed=P.seed, **M.method_kwargs(m, P))
        build[m] = round(time.perf_counter() - t, 4)
    systems = [f"merge:{m}" for m in job["methods"]] + [f"merge:{m}_global" for m in job["global_trim"]]
    per = st.bench.per_skill()
    return {"seed": seed, "expert_acc": expert_acc, "lam": lam, "build_s": build, "seconds": round(time.perf_counter() - t0, 1),
            "examples": {n: st.bench.results[(n, "skills")].examples[["skill", "correct"]] for n in systems},
            "per_skill": per[per.system.isin(systems)][["system", "skill", "accuracy"]].to_dict("records")}


def run(root: Path, methods: list[str], global_trim: list[str], workers: int) -> dict:
    import pandas as pd

    from lib.core import config
    from lib.core.stats import seed_macro_ci

    from lib.merge.methods import MERGE_METHODS

    cfg = config.load(["experts", "replicates", "evaluation", "merge_route"], root / "params.yaml")
    try:
        MERGE_METHODS.check(methods), MERGE_METHODS.check(global_trim)
    except ValueError as e:
        raise config.ParamsError(str(e)) from None
    seeds = [cfg["experts"].seed, *cfg["replicates"].seeds]
    jobs = [{"root": str(root.resolve()), "seed": s, "methods": methods, "global_trim": global_trim} for s in seeds]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        out = list(pool.map(score_seed, jobs))
    rows = []
    for name in out[0]["examples"]:
        ci = seed_macro_ci([o["examples"][name] for o in out], [o["expert_acc"] for o in out], cfg["evaluation"].n_boot)
        key = name.split(":", 1)[1]
        rows.append({"system": name, "mean": ci["mean"], "lo": ci["lo"], "hi": ci["hi"],
                     "per_seed": dict(zip(map(str, seeds), ci["per_seed"])), "lam": dict(zip(map(str, seeds), (o["lam"][key] for o in out))),
                     "build_s_seed0": out[0]["build_s"].get(key)})
    rows.sort(key=lambda r: -(r["mean"] if r["mean"] is not None else -1))
    per = pd.DataFrame([dict(x, seed=o["seed"]) for o in out for x in o["per_skill"]])
    per_skill = per.groupby(["system", "skill"]).accuracy.mean().unstack("skill").round(3)
    return {"seeds": seeds, "systems": rows, "per_skill_mean_over_seeds": per_skill.reset_index().to_dict("records"),
            "seconds_per_seed": [o["seconds"] for o in out]}


def main(argv: list[str] | None = None) -> int:
    from lib.core import config

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=DEFAULT)
    ap.add_argument("--global-trim", nargs="*", default=["ties", "magnitude_prune"],
                    help="also score these with merge_route.trim_scope: global")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", default=".")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "merge_scores.json"))
    args = ap.parse_args(argv)
    try:
        found = run(Path(args.workdir), args.methods, args.global_trim, args.workers)
    except (config.ParamsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(found, indent=1))
    print("| merge | normalised [95% CI], 3 seeds | per seed | λ per seed | one merge of 8 experts (s) |")
    print("|---|---|---|---|---|")
    for r in found["systems"]:
        print(f"| {r['system'].split(':', 1)[1]} | {r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | "
              f"{' / '.join(f'{v:.3f}' for v in r['per_seed'].values())} | {' / '.join(f'{v:g}' for v in r['lam'].values())} | "
              f"{r['build_s_seed0'] if r['build_s_seed0'] is not None else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
