"""Stage 04 end to end, in the order notebook 04 shows it.

:func:`setup` loads everything once (the peft model holding every expert and joint LoRA, a
clean base for merged weights, the task vectors, the test and validation sets) into a
:class:`MergeRoute`; each ``score_*`` call builds one family of systems and scores it on the
shared :class:`lib.core.bench.Bench`; :func:`metrics` turns the finished leaderboard into
``metrics/merge_route.json``. The notebook only calls these and shows what they return.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib.core import data
from lib.core.bench import Bench, System, lora_parameters, seed_everything, timed
from lib.core.stats import SEED_SUMMARY, per_seed_columns, seed_macro_ci, spearman
from lib.core.evaluation import BASE_ADAPTER
from lib.core.modeling import load_on_device
from lib.experts import adapters as X
from lib.experts.seeds import replicate_dir
from lib.merge import leaderboard as MR, task_vectors as M
from lib.route.routers import ROUTERS

KIND_ORDER = {"base": 0, "expert": 1, "joint": 2, "merge": 3, "peft_merge": 4, "router": 5}


@dataclass
class MergeRoute:
    """What every part of stage 04 shares. ``cache`` holds what several routers reuse (the
    trained task router); ``found`` what the metrics need from each step."""

    S: Any
    E: Any
    P: Any
    dirs: dict[str, Path]
    peft_model: Any
    tok: Any
    base: Any
    tests: dict
    val: dict
    bench: Bench
    tvs: dict
    tv_s: float
    cache: dict = field(default_factory=dict)
    found: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.S.train)

    @property
    def joints(self) -> list[str]:
        return [n for n in self.dirs if n.startswith("joint_")]


def setup(cfg: dict) -> MergeRoute:
    """Load stage 04's inputs from the project root (the current directory)."""
    seed_everything(cfg["merge_route"].seed)
    return load(cfg, "models/base", X.adapter_dirs(".", cfg["skills"].train))


def load(cfg: dict, base_dir: str | Path, dirs: dict[str, Path], root: str | Path = ".",
         test_sets: tuple[str, ...] | None = None) -> MergeRoute:
    """A :class:`MergeRoute` over the adapters ``dirs`` (every expert by skill name, joint
    LoRAs as joint_<budget>) on the base in ``base_dir``; ``test_sets`` keeps only those of
    the project's test sets (skills, composed, heldout), default all."""
    S, EX, E, P = cfg["skills"], cfg["experts"], cfg["evaluation"], cfg["merge_route"]
    peft_model, tok = X.load_with_adapters(base_dir, dirs, EX)  # every expert and the joint LoRAs, side by side
    base, _ = load_on_device(base_dir)  # a clean copy for merged weights
    tests = data.test_sets(root, S)
    if test_sets is not None:
        tests = {k: v for k, v in tests.items() if k in test_sets}
    val = data.test_sets(root, S, split="validation")
    tvs, tv_s = timed(lambda: M.task_vectors(peft_model, list(S.train)))
    return MergeRoute(S, E, P, dirs, peft_model, tok, base, tests, val, Bench(tok, tests, E), tvs, tv_s)


def replicate_dirs(names: list[str], seed: int) -> dict[str, Path]:
    """The adapters of the replicate trained with ``seed`` (models/replicates/<seed>): its
    experts and its joint LoRA at the total steps."""
    root = replicate_dir(".", seed)  # relative: the stage runs in its workdir
    return {s: root / "experts" / s for s in names} | {"joint_total_steps": root / "joint" / "total_steps"}


def _score_replicate(job: dict) -> tuple[dict, dict[str, float]]:
    """In a worker process (one torch thread): load replicate ``job["seed"]`` on the base and
    score its references, ΔW merges and routers as for the first seed (peft merges,
    diagnostics and the re-factored merge are first-seed only). Returns each result's
    examples by (system, test set) and the replicate's experts on their own skills."""
    from lib.core import config, io
    from lib.core.training import one_cpu_thread

    io.quiet_notebook()  # a worker's library chatter would land in the executed notebook
    one_cpu_thread()
    os.chdir(job["root"])
    cfg = config.from_notebook(**job["params"])
    seed_everything(cfg["merge_route"].seed)
    r = load(cfg, "models/base", replicate_dirs(list(cfg["skills"].train), job["seed"]))
    score_references(r)
    score_merges(r)
    score_routers(r)
    return _examples(r.bench), r.found["expert_acc"]


def _examples(bench: Bench) -> dict:
    return {key: res.examples for key, res in bench.results.items()}


def start_replicates(st: MergeRoute, cfg: dict) -> None:
    """Start scoring every seed in ``replicates.seeds`` in ``merge_route.workers`` spawned
    processes while this process scores the first seed; :func:`score_replicates` collects
    them. Every process runs one torch thread (this one too, from here on), so the two
    cores are both busy and a seed's numbers do not depend on the number of workers."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from lib.core.training import one_cpu_thread

    seeds = list(cfg["replicates"].seeds)
    st.found["replicate_futures"] = {}
    one_cpu_thread()
    if not seeds:
        return
    params = {k: cfg[k].model_dump(mode="json") for k in ("skills", "experts", "evaluation", "merge_route")}
    pool = ProcessPoolExecutor(max_workers=min(cfg["merge_route"].workers, len(seeds)), mp_context=mp.get_context("spawn"))
    st.found["replicate_futures"] = {s: pool.submit(_score_replicate, {"root": os.getcwd(), "params": params, "seed": s})
                                     for s in seeds}
    pool.shutdown(wait=False)  # the futures still run; the workers exit once they are done


def score_replicates(st: MergeRoute, cfg: dict) -> pd.DataFrame:
    """The replicates started by :func:`start_replicates` (started here if they were not), next
    to the first seed. Returns :func:`seed_table`: each system's normalised accuracy per seed
    and over seeds."""
    if "replicate_futures" not in st.found:
        start_replicates(st, cfg)
    st.found["seeds"] = {cfg["experts"].seed: (_examples(st.bench), st.found["expert_acc"])}
    for seed, future in st.found.pop("replicate_futures").items():
        st.found["seeds"][seed] = future.result()
    return seed_table(st)


def seed_table(st: MergeRoute) -> pd.DataFrame:
    """One row per system scored on every seed: normalised accuracy per seed (each seed's
    experts as its denominators) and over seeds (:func:`lib.core.stats.seed_macro_ci`)."""
    seeds = st.found.get("seeds") or {}
    rows = []
    for name, system in st.bench.systems.items():
        results = [examples.get((name, "skills")) for examples, _ in seeds.values()]
        if len(seeds) < 2 or any(r is None for r in results):
            continue
        ci = seed_macro_ci(results, [acc for _, acc in seeds.values()], st.E.n_boot)
        nan = lambda v: np.nan if v is None else v  # noqa: E731  (a seed whose experts all scored 0 has no normalised value)
        rows.append({"system": name, "kind": system.kind, "n_seeds": ci["n"], "seed_mean": nan(ci["mean"]),
                     "seed_lo": nan(ci["lo"]), "seed_hi": nan(ci["hi"]),
                     **{f"seed_{k}": nan(v) for k, v in zip(seeds, ci["per_seed"])}})
    st.found["seed_table"] = pd.DataFrame(rows)
    return st.found["seed_table"]


def versus(st: MergeRoute, baseline: str = "merge:ties", kind: str = "merge") -> dict:
    """Each ``kind`` system against ``baseline`` skill by skill, over the seeds: per skill the
    mean over seeds of the accuracy difference on the same test prompts, with a two-stage
    paired bootstrap (seeds, then prompts; :func:`lib.core.stats.seed_macro_ci` on the
    per-prompt differences). ``better_on`` / ``worse_on``: the skills whose interval is above /
    below 0. Only systems scored on every seed; {} before :func:`score_replicates`."""
    seeds = st.found.get("seeds") or {}
    found = {}
    for name, system in st.bench.systems.items():
        if system.kind != kind or name == baseline:
            continue
        pairs = [(ex.get((name, "skills")), ex.get((baseline, "skills"))) for ex, _ in seeds.values()]
        if not pairs or any(a is None or b is None for a, b in pairs):
            continue
        skills = {}
        for skill in st.names:
            diffs = []
            for a, b in pairs:
                a, b = a[a.skill == skill], b[b.skill == skill]
                if list(a.prompt) != list(b.prompt):
                    raise ValueError(f"{name} and {baseline} were scored on different {skill} prompts")
                diffs.append(pd.DataFrame({"skill": skill, "correct": a.correct.to_numpy(float) - b.correct.to_numpy(float)}))
            ci = seed_macro_ci(diffs, n_boot=st.E.n_boot)
            skills[skill] = {k: ci[k] for k in ("mean", "lo", "hi", "per_seed")}
        found[name] = {"skills": skills, "better_on": [k for k, v in skills.items() if v["lo"] > 0],
                       "worse_on": [k for k, v in skills.items() if v["hi"] < 0]}
    st.found["versus"] = {"baseline": baseline, "systems": found}
    return st.found["versus"]


def _adapter_system(st: MergeRoute, name: str, kind: str, adapter: str) -> System:
    return System(name, kind, st.peft_model, extra_params=lora_parameters(st.peft_model, [adapter]),
                  adapter_names=lambda d: [adapter] * len(d))


def score_references(st: MergeRoute) -> dict[str, float]:
    """The base, each expert alone and the joint LoRAs; returns each expert's accuracy on its
    own skill (the denominator of normalised accuracy)."""
    st.bench.score(System("base", "base", st.peft_model, adapter_names=lambda d: [BASE_ADAPTER] * len(d)))
    for s in st.names:
        st.bench.score(_adapter_system(st, f"expert:{s}", "expert", s))
    for j in st.joints:
        st.bench.score(_adapter_system(st, j, "joint", j))
    per = st.bench.per_skill()
    st.found["expert_acc"] = {s: float(per[(per.system == f"expert:{s}") & (per.skill == s)].accuracy.iloc[0])
                              for s in st.names}
    return st.found["expert_acc"]


def merge_variants(P) -> list[tuple[str, Any]]:
    """(system key, params) of every ΔW merge stage 04 scores: each of ``merges`` with the
    section as it is, then each of ``both_trim_scopes`` once more with the other
    ``trim_scope`` (keyed ``<method>@<scope>``), so the leaderboard shows both scopes once."""
    other = "global" if P.trim_scope == "module" else "module"
    return ([(m, P) for m in P.merges]
            + [(f"{m}@{other}", P.model_copy(update={"trim_scope": other})) for m in P.both_trim_scopes])


def score_merges(st: MergeRoute) -> pd.DataFrame:
    """Every ΔW merge (:func:`merge_variants`) at its λ chosen on validation; returns the λ
    curves (one row per merge and λ)."""
    curves, st.found["merged_by"] = [], {}
    for key, p in merge_variants(st.P):
        method = key.split("@")[0]
        found = MR.merge_on_validation(st.base, st.tok, st.tvs, method, p, st.val["skills"], st.E)
        curves.append(found["curve"].assign(method=key))
        st.found["merged_by"][key] = found["merged"]
        # Build time: the merge at the chosen λ, plus the task vectors every method shares.
        st.bench.score(System(f"merge:{key}", "merge", found["model"], build_s=found["build_s"] + st.tv_s,
                              info={"lam": found["lam"]}))
    st.found["chosen_lambda"] = {k: st.bench.systems[f"merge:{k}"].info["lam"] for k, _ in merge_variants(st.P)}
    st.found["lam_curves"] = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(
        columns=["lam", "val_accuracy", "build_s", "method"])
    return st.found["lam_curves"]


def score_refactored(st: MergeRoute) -> dict | None:
    """The best ΔW merge (highest validation accuracy) re-factored to a LoRA of rank
    ``refactor_rank`` by truncated SVD; its relative Frobenius distance to the exact merge."""
    st.found["refactor"] = None
    curves, rank = st.found.get("lam_curves"), st.P.refactor_rank
    if not rank or curves is None or not len(curves):
        return None
    best = max(st.found["merged_by"], key=lambda m: curves[curves.method == m].val_accuracy.max())
    exact = st.found["merged_by"][best]
    lora_model, secs = timed(lambda: M.merged_lora_model(st.base, exact, rank))
    dist = M.relative_frobenius_distance(M.task_vectors(lora_model, ["merged"])["merged"], exact)
    st.bench.score(System(f"merge:{best}→lora{rank}", "merge", lora_model, extra_params=lora_parameters(lora_model, ["merged"]),
                          build_s=secs, info={"distance_to_exact": dist}))
    st.found["refactor"] = {"method": best, "rank": rank, "distance_to_exact": dist}
    return st.found["refactor"]


def score_peft_merges(st: MergeRoute) -> pd.DataFrame:
    """peft's ``add_weighted_adapter`` types, weight chosen on validation; the table of their
    distances to the exact ΔW merge each approximates."""
    rows = []
    for ctype in st.P.peft_merges:
        found = MR.peft_merge_on_validation(st.peft_model, st.tok, st.tvs, st.names, ctype, st.P, st.val["skills"], st.E)
        st.bench.score(System(f"peft:{ctype}", "peft_merge", st.peft_model,
                              extra_params=lora_parameters(st.peft_model, [found["adapter"]]), build_s=found["build_s"],
                              adapter_names=lambda d, n=found["adapter"]: [n] * len(d), info=found))
        rows.append({k: found[k] for k in ("type", "lam", "exact_counterpart", "distance_to_exact")})
    st.found["peft"] = pd.DataFrame(rows, columns=["type", "lam", "exact_counterpart", "distance_to_exact"])
    return st.found["peft"]


def score_routers(st: MergeRoute, names: list[str] | None = None) -> list[str]:
    """Build and score every router in ``names`` (default ``merge_route.routers``), each from
    its registered file in ``lib/route/routers``; returns the systems scored."""
    scored = []
    for name in st.P.routers if names is None else names:
        for system in ROUTERS[name](st):
            st.bench.score(system)
            scored.append(system.name)
    return scored


def lorahub_weights(st: MergeRoute) -> dict[str, dict[str, float]]:
    """LoraHub's searched weights per target (from the systems the ``lorahub`` router built)."""
    return {name.split("→", 1)[1]: s.info["weights"] for name, s in st.bench.systems.items() if name.startswith("lorahub→")}


def leaderboard(st: MergeRoute, out_dir: str = "plots") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(leaderboard, per-skill table), both also written to ``out_dir`` as CSV."""
    board = st.bench.leaderboard(st.found["expert_acc"])
    seeds = st.found.get("seed_table")
    if seeds is not None and len(seeds):
        board = board.merge(seeds.drop(columns="kind"), on="system", how="left")
    per_skill = st.bench.per_skill()
    os.makedirs(out_dir, exist_ok=True)
    board.to_csv(f"{out_dir}/merge_route_leaderboard.csv", index=False)
    per_skill.to_csv(f"{out_dir}/merge_route_per_skill.csv", index=False)
    if "lam_curves" in st.found:
        st.found["lam_curves"].to_csv(f"{out_dir}/merge_lambda.csv", index=False)
    return board, per_skill


def readable(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard for reading: each accuracy as ``value [lo, hi]``, rows grouped by kind."""
    show = board.copy()

    def fmt(r, k, lo=None):
        lo = lo or k
        return f"{r[k]:.3f} [{r[lo + '_lo']:.2f}, {r[lo + '_hi']:.2f}]" if pd.notna(r.get(k)) else ""

    for k, lo in (("mean_acc", "mean"), ("norm_acc", "norm"), ("composed", None), ("heldout", None)):
        if k in board:
            show[k] = [fmt(r, k, lo) for _, r in board.iterrows()]
    if "seed_mean" in board:
        show["over_seeds"] = [f"{r.seed_mean:.3f} [{r.seed_lo:.2f}, {r.seed_hi:.2f}]" if pd.notna(r.seed_mean) else ""
                              for r in board.itertuples()]
    cols = ["system", "kind", "mean_acc", "norm_acc", "over_seeds", "composed", "heldout", "extra_params", "build_s",
            "tokens_per_s_rel"]
    show = show[[c for c in cols if c in show]]
    return show.sort_values("kind", key=lambda k: k.map(KIND_ORDER), kind="stable").round(3)


def metrics(st: MergeRoute, board: pd.DataFrame, router: dict | None) -> dict:
    """``metrics/merge_route.json``: per system its accuracies (with intervals) and costs, the
    chosen λ, the peft distances, the re-factored merge, the router analysis, LoraHub's weights."""

    def clean(v):  # io.write_json turns NaN into null
        return round(v, 4) if isinstance(v, float) else v

    merges = board[board.kind == "merge"]
    peft = st.found.get("peft")
    per_seed = per_seed_columns(board.columns)

    def system(r):
        row = {k: clean(r[k]) for k in board.columns if k != "system" and k not in (*SEED_SUMMARY, *per_seed)}
        if "seed_mean" in board and pd.notna(r["seed_mean"]):  # normalised accuracy over seeds
            row["seeds"] = {"mean": clean(r["seed_mean"]), "lo": clean(r["seed_lo"]), "hi": clean(r["seed_hi"]),
                            "n": int(r["n_seeds"]), "per_seed": {c.removeprefix("seed_"): clean(r[c]) for c in per_seed}}
        return row

    return {
        "systems": {r["system"]: system(r) for _, r in board.iterrows()},
        "expert_own": st.found["expert_acc"],
        "expert_own_by_seed": {str(k): acc for k, (_, acc) in (st.found.get("seeds") or {}).items()},
        "chosen_lambda": st.found.get("chosen_lambda", {}),
        # max() over rows, not idxmax: with every normalised accuracy NaN (experts at 0, as in
        # the smoke profile) it still names the first merge, and the accuracy below is null.
        "best_merge": max((r for _, r in merges.iterrows()), key=lambda r: r.norm_acc)["system"] if len(merges) else None,
        "best_merge_norm_acc": float(merges.norm_acc.max()) if len(merges) else None,
        "peft_distance_to_exact": {} if peft is None else {r["type"]: round(float(r["distance_to_exact"]), 4) for _, r in peft.iterrows()},
        "refactor": st.found.get("refactor"), "router": router, "lorahub_weights": lorahub_weights(st),
        "diagnostics": st.found.get("diagnostics"), "versus": st.found.get("versus"),
    }


def diagnose(st: MergeRoute) -> dict:
    """Why the merges interfere: the cosine matrix of the task vectors, the weight
    disentanglement error on the first ``diagnostics.pairs`` skill pairs (validation prompts)
    and TSV-M's singular task interference per module."""
    from itertools import combinations, islice

    from lib.merge import diagnostics as DG

    D = st.P.diagnostics
    cos = DG.cosine_matrix(st.tvs)
    val = st.val["skills"]
    rows = {s: [i for i, x in enumerate(val["skill"]) if x == s][:D.n_prompts] for s in st.names}
    prompts = {s: val.select(rows[s]) for s in st.names}
    pairs = list(islice(combinations(st.names, 2), D.pairs))
    error = DG.disentanglement_error(st.base, st.tok, st.tvs, prompts, pairs, D.grid, st.E) if pairs else pd.DataFrame(
        columns=["task_a", "task_b", "alpha_a", "alpha_b", "task", "error"])
    off = cos.values[~np.eye(len(cos), dtype=bool)]
    sti = DG.sti_table(st.tvs)
    kept = _retained_vs_accuracy(st)
    st.found["diagnostics"] = {
        "cosine": {"mean_offdiag": float(off.mean()), "max_offdiag": float(off.max()), "min_offdiag": float(off.min())},
        "disentanglement_error": {f"{a:g},{b:g}": float(v) for (a, b), v in
                                  error.groupby(["alpha_a", "alpha_b"]).error.mean().items()} if len(error) else {},
        "pairs": len(pairs),
        "singular_task_interference": {"mean_relative": float(sti.relative.mean()),
                                       **{f"{k}_relative": float(v) for k, v in sti.groupby("module_type").relative.mean().items()}},
        "retained": {m: dict(zip(g.skill, g.retained.round(4))) for m, g in kept.groupby("method", sort=False)},
        "retained_accuracy_spearman": spearman(kept.retained, kept.accuracy)}
    return {"cosine": cos, "error": error, "sti": sti, "retained": kept}


def _retained_vs_accuracy(st: MergeRoute) -> pd.DataFrame:
    """Each scored ΔW merge's share of every expert's update (:func:`lib.merge.diagnostics.retained`,
    at its chosen λ) beside its test accuracy on that skill (this seed)."""
    from lib.merge import diagnostics as DG

    kept = DG.retained(st.found.get("merged_by", {}), st.tvs)
    per = st.bench.per_skill()
    per = per[per.system.str.startswith("merge:")].assign(method=lambda d: d.system.str.removeprefix("merge:"))
    return kept.merge(per[["method", "skill", "accuracy"]], on=["method", "skill"], how="inner")
