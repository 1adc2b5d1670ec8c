"""Stage 07: every run of the curricula study, and the numbers the claims read.

The runs (teacher × unlearnable fraction × seed; Auto-CEI and its baselines per seed; Skill-it's
graph, then uniform and Skill-it per seed) go to ``curricula.workers`` processes, longest first.
Intervals are Student-t 95% over seeds; comparisons are paired by seed (the same seed gives
every method the same LoRA initialisation), so each difference's interval is over per-seed
differences.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from lib.core.stats import t_interval


def run_job(job: dict) -> dict:
    kind = job["kind"]
    if kind == "teacher":
        from lib.curricula.teaching import run_teacher
        return {"kind": kind, **run_teacher(job)}
    if kind == "refusal":
        from lib.curricula.refusal import run_refusal
        return {"kind": kind, **run_refusal(job)}
    if kind == "graph":
        from lib.curricula.mixing import measure_graph
        return {"kind": kind, "graph": measure_graph(job).tolist()}
    from lib.curricula.mixing import run_mixture
    return {"kind": kind, **run_mixture(job)}


def run_study(root: str | Path, C, target_modules) -> tuple[list[dict], float]:
    """Every run; ``(results, wall seconds)``."""
    from lib.core.pool import pool_map
    from lib.curricula.mixing import METHODS

    t0 = time.perf_counter()
    common = {"root": str(root), "C": C, "target_modules": list(target_modules)}
    first = ([{**common, "kind": "refusal", "seed": s} for s in C.seeds]
             + [{**common, "kind": "graph", "seed": C.seeds[0]}]
             + [{**common, "kind": "teacher", "teacher": t, "fraction": f, "seed": s}
                for f in sorted(C.teachers.unlearnable_fractions, reverse=True) for t in C.teachers.names for s in C.seeds])
    results = pool_map(run_job, first, C.workers)
    graph = next(r["graph"] for r in results if r["kind"] == "graph")
    results += pool_map(run_job, [{**common, "kind": "mixture", "method": m, "seed": s, "graph": graph}
                                  for m in METHODS for s in C.seeds], C.workers)
    return results, time.perf_counter() - t0


def _of(results, kind):
    return [r for r in results if r["kind"] == kind]


def _paired(a: dict, b: dict) -> dict:
    """t-interval of ``a[seed] − b[seed]`` over the seeds both have."""
    return t_interval([a[s] - b[s] for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None])


# --------------------------------------------------------------------------- teachers


def teacher_curves(results) -> pd.DataFrame:
    """One row per (teacher, fraction, seed, step): mastered fraction."""
    return pd.DataFrame([{"teacher": r["teacher"], "fraction": r["fraction"], "seed": r["seed"], "step": c["step"],
                          "mastered": c["mastered"]} for r in _of(results, "teacher") for c in r["curve"]])


def teacher_samples(results, quarters: int = 4) -> pd.DataFrame:
    """Share of each teacher's tasks per cell in each quarter of training, pooled over seeds."""
    rows = []
    for r in _of(results, "teacher"):
        steps = max(s["step"] for s in r["samples"])
        for s in r["samples"]:
            rows.append({"teacher": r["teacher"], "fraction": r["fraction"], "cell": s["cell"],
                         "quarter": min(quarters, 1 + (s["step"] - 1) * quarters // steps), "learnable": s["learnable"]})
    df = pd.DataFrame(rows)
    counts = df.groupby(["teacher", "fraction", "quarter", "cell"]).size().rename("n").reset_index()
    counts["share"] = counts["n"] / counts.groupby(["teacher", "fraction", "quarter"])["n"].transform("sum")
    return counts


def teacher_metrics(results, C) -> dict:
    runs = _of(results, "teacher")
    out = {"by_fraction": {}}
    for f in C.teachers.unlearnable_fractions:
        final = {t: {r["seed"]: r["curve"][-1]["mastered"] for r in runs if r["teacher"] == t and r["fraction"] == f}
                 for t in C.teachers.names}
        learnable_share = {t: float(np.mean([np.mean([s["learnable"] for s in r["samples"]]) for r in runs
                                             if r["teacher"] == t and r["fraction"] == f])) for t in C.teachers.names}
        area = next(r["unlearnable_area"] for r in runs if r["fraction"] == f)
        entry = {"unlearnable_area": area,
                 "mastered": {t: t_interval(list(v.values())) for t, v in final.items()},
                 "learnable_share_of_tasks": learnable_share}
        if "alp_gmm" in final and "random" in final:
            entry["alp_gmm_minus_random"] = _paired(final["alp_gmm"], final["random"])
        out["by_fraction"][str(f)] = entry
    out["seconds_per_run"] = {t: float(np.mean([r["seconds"] for r in runs if r["teacher"] == t])) for t in C.teachers.names}
    return out


# --------------------------------------------------------------------------- Auto-CEI


def refusal_table(results) -> pd.DataFrame:
    """One row per (method, seed, digits): accuracy, precision, refusal rate."""
    return pd.DataFrame([{"method": m, "seed": r["seed"], "digits": int(d), **{k: v[k] for k in ("accuracy", "precision", "refusal_rate")}}
                         for r in _of(results, "refusal") for m, s in r["methods"].items() for d, v in s["per_digit"].items()])


def refusal_metrics(results, limit: float = 0.5) -> dict:
    """Per method the held-out accuracy, precision and refusal rate; Auto-CEI's paired
    differences; and where its refusals fall: mean refusal rate on the digit counts beyond the
    SFT model's limit (SFT accuracy < ``limit`` on that seed) minus on those within it."""
    runs = _of(results, "refusal")
    methods = list(runs[0]["methods"]) if runs else []
    per = {m: {k: {r["seed"]: r["methods"][m][k] for r in runs} for k in ("accuracy", "precision", "refusal_rate")}
           for m in methods}
    out = {"methods": {m: {k: t_interval([x for x in v.values() if x is not None]) for k, v in per[m].items()} for m in methods},
           "limit_accuracy": limit}
    if {"auto_cei", "sft", "ei"} <= set(methods):
        out["precision_minus"] = {b: _paired(per["auto_cei"]["precision"], per[b]["precision"]) for b in ("sft", "ei", "r_tuning")
                                  if b in methods}
        sft_error = {s: 1 - a for s, a in per["sft"]["accuracy"].items()}
        out["refusal_minus_sft_error"] = _paired(per["auto_cei"]["refusal_rate"], sft_error)
        gaps = {}
        for r in runs:
            sft, cei = r["methods"]["sft"]["per_digit"], r["methods"]["auto_cei"]["per_digit"]
            beyond = [cei[d]["refusal_rate"] for d in cei if sft[d]["accuracy"] < limit]
            within = [cei[d]["refusal_rate"] for d in cei if sft[d]["accuracy"] >= limit]
            if beyond and within:
                gaps[r["seed"]] = float(np.mean(beyond) - np.mean(within))
        out["refusal_beyond_minus_within"] = t_interval(list(gaps.values()))
        out["refusal_beyond_minus_within_per_seed"] = {str(s): g for s, g in gaps.items()}
        out["c1"] = {str(r["seed"]): {k: r["auto_cei"][k] for k in ("c1_start", "c1_step", "c2", "c1_best")} for r in runs}
    if runs:
        table = refusal_table(results)
        out["per_digit"] = {m: {str(d): {k: t_interval(g[k].dropna().tolist()) for k in ("accuracy", "precision", "refusal_rate")}
                                for d, g in table[table["method"] == m].groupby("digits")} for m in methods}
    return out


# --------------------------------------------------------------------------- Skill-it


def mixture_curves(results) -> pd.DataFrame:
    """One row per (method, seed, step, skill): validation loss and the mixture weight used next."""
    return pd.DataFrame([{"method": r["method"], "seed": r["seed"], "step": c["step"], "skill": s, "loss": c["loss"][s],
                          "weight": c["weights"][s]} for r in _of(results, "mixture") for c in r["curve"] for s in c["loss"]])


def mixture_metrics(results, C) -> dict:
    runs = _of(results, "mixture")
    steps = {m: {r["seed"]: r["steps_to_target"] for r in runs if r["method"] == m} for m in ("uniform", "skill_it")}
    return {"graph": next(r["graph"] for r in results if r["kind"] == "graph"), "skills": list(C.skill_it.skills),
            "target_loss": C.skill_it.target_loss, "budget": C.skill_it.steps,
            "steps_to_target": {m: t_interval(list(v.values())) for m, v in steps.items()},
            "steps_to_target_per_seed": {m: {str(s): v for s, v in d.items()} for m, d in steps.items()},
            "reached": {m: int(sum(r["reached"] for r in runs if r["method"] == m)) for m in steps},
            "skill_it_minus_uniform": _paired(steps["skill_it"], steps["uniform"])}


# --------------------------------------------------------------------------- outputs


def summarize(results, C, wall_s: float) -> dict:
    return {"teachers": teacher_metrics(results, C), "auto_cei": refusal_metrics(results),
            "skill_it": mixture_metrics(results, C), "stage_wall_s": round(wall_s, 1)}


def write_outputs(root: str | Path, metrics: dict, results) -> None:
    """``metrics/curricula.json`` and the curves in ``plots/`` (mastered fraction, Skill-it losses)."""
    from lib.core import io

    root = Path(root)
    (root / "plots").mkdir(parents=True, exist_ok=True)
    curves = teacher_curves(results)
    curves.groupby(["teacher", "fraction", "step"])["mastered"].mean().reset_index().round(4).to_csv(
        root / "plots" / "curricula_mastered.csv", index=False)
    mixture_curves(results).round(5).to_csv(root / "plots" / "curricula_skill_it.csv", index=False)
    io.write_json(root / "metrics" / "curricula.json", metrics)
