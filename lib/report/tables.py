"""Stage 08: the report's tables, read only from what the earlier stages wrote.

Nothing here trains or scores a model: the headline table comes from ``metrics/*.json`` and
the per-skill table ``plots/merge_route_per_skill.csv``; the claims table from
``lib.report.claims``. Every stage's metrics file must be there: a missing one is an error
naming it (a claim's "inconclusive" is a verdict about data, never about a missing file).
Within a present file, a key a stage did not compute (a strategy left out of params, a value
written as null) leaves its rows out and its claims "not measured".
"""
from __future__ import annotations

from pathlib import Path
from statistics import median

import pandas as pd

from lib.report.claims import best_system, evaluate_claims
from lib.core.io import read_json

# The stages' metrics files, in pipeline order.
METRICS = ("synthesize", "base", "experts", "merge_route", "continual", "localize", "curricula", "teacher_data")


class MissingInput(FileNotFoundError):
    """A file the report reads is not there: its stage has not run (or its output was deleted)."""


def load_metrics(root: str | Path, required: bool = True) -> dict:
    """{stem: parsed JSON} of every stage's metrics file under ``root/metrics``. A missing file
    is a :class:`MissingInput` naming every missing one, unless ``required`` is False (then the
    files present are read: for reading a partial run by hand)."""
    root = Path(root)
    missing = [f"metrics/{name}.json" for name in METRICS if not (root / "metrics" / f"{name}.json").is_file()]
    if missing and required:
        raise MissingInput(f"{', '.join(missing)} missing under {root.resolve()}: the report needs every stage's "
                           "metrics; run the stages that write them (dvc repro)")
    return {name: read_json(p) for name in METRICS if (p := root / "metrics" / f"{name}.json").is_file()}


def _ci(mean, lo, hi) -> str:
    if mean is None:  # a metric the stage could not compute (written as null, e.g. a ratio over 0)
        return "n/a"
    if lo is None or hi is None:
        return f"{mean:.3f}"
    return f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


COLUMNS = ["system", "what", "accuracy [95% CI]", "normalised [95% CI]", "normalised over seeds [95% CI]: per seed",
           "composed", "held-out"]


def _row(system: str, what: str, acc, norm=None, composed=None, heldout=None, seeds=None) -> dict:
    return {"system": system, "what": what, "accuracy [95% CI]": acc, "normalised [95% CI]": norm or "",
            "normalised over seeds [95% CI]: per seed": seeds or "", "composed": composed or "", "held-out": heldout or ""}


def _over_seeds(s: dict) -> str:
    """'mean [lo, hi]: a, b, c' for a system scored on several seeds (stage 04's ``seeds``)."""
    seeds = s.get("seeds")
    if not seeds:
        return ""
    per = ", ".join(_num(v) for v in seeds.get("per_seed", {}).values())
    return f"{_ci(seeds['mean'], seeds['lo'], seeds['hi'])}: {per}"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _system_row(label: str, what: str, s: dict) -> dict:
    return _row(label, what, _ci(s["mean_acc"], s["mean_lo"], s["mean_hi"]), _ci(s["norm_acc"], s["norm_lo"], s["norm_hi"]),
                _num(s.get("composed")), _num(s.get("heldout")), _over_seeds(s))


def headline(metrics: dict, per_skill: pd.DataFrame | None = None) -> pd.DataFrame:
    """Base, each expert on its own skill, the joint LoRAs, the best merge, the best router
    (oracle excluded: it is told the skill), the best continual strategy; each with its CI.

    Accuracy is the mean over the training skills (exact match, 200 test prompts per skill
    in the default profile); normalised = accuracy / the skill's own expert's accuracy. The
    first seed's intervals are over prompts; "over seeds" is the mean over every seed (each
    divided by its own experts) with the two-stage bootstrap over seeds and prompts.
    """
    rows = []
    systems = metrics.get("merge_route", {}).get("systems", {})
    if "base" in systems:
        rows.append(_system_row("base", "the pretrained model, no adapter", systems["base"]))
    if per_skill is not None and not per_skill.empty:
        own = per_skill[per_skill["system"] == "expert:" + per_skill["skill"]]
        for r in own.itertuples():
            rows.append(_row(f"expert: {r.skill}", "its own skill only", _ci(r.accuracy, r.ci_low, r.ci_high), "1 (by definition)"))
    elif "experts" in metrics:
        for skill, acc in metrics["experts"]["expert_own"].items():
            rows.append(_row(f"expert: {skill}", "its own skill only", f"{acc:.3f}", "1 (by definition)"))
    for budget, what in (("joint_same_steps", "one LoRA on all skills, one expert's steps"),
                         ("joint_total_steps", "one LoRA on all skills, all experts' steps")):
        if budget in systems:
            rows.append(_system_row(budget.replace("_", " "), what, systems[budget]))
    for kinds, label in ((("merge", "peft_merge"), "best merge"), (("router",), "best router")):
        best = best_system(systems, *kinds)
        if best is not None:
            rows.append(_system_row(label, best, systems[best]))
    cont = metrics.get("continual", {})
    if cont.get("best_strategy") in cont.get("strategies", {}):
        name = cont["best_strategy"]
        acc = cont["strategies"][name]["ACC"]
        tasks = sorted({s for order in cont.get("tasks", {}).values() for s in order})
        rows.append(_row("best continual strategy", f"{name}: final accuracy over its task sequence ({', '.join(tasks)})",
                         _ci(acc["mean"], acc["lo"], acc["hi"])))
    graft = metrics.get("localize", {}).get("graft_merge", {}).get("mean_normalised")
    if graft:
        rows.append(_row("grafted union", "union of the skills' grafted regions (stage 06)", "",
                         _ci(graft["mean"], graft["lo"], graft["hi"])))
    return pd.DataFrame(rows, columns=COLUMNS)


def merges_versus(metrics: dict) -> pd.DataFrame:
    """Every ΔW merge of stage 04 against its ``versus`` baseline (TIES): normalised accuracy
    over seeds, the accuracy difference averaged over skills, and the skills where the paired
    95% interval of the difference lies above / below 0. Empty when stage 04 wrote no
    ``versus`` (a run on one seed)."""
    vs = (metrics.get("merge_route") or {}).get("versus") or {}
    systems = metrics.get("merge_route", {}).get("systems", {})
    rows = []
    for name, v in (vs.get("systems") or {}).items():
        diffs = [d["mean"] for d in v["skills"].values() if d["mean"] is not None]
        rows.append({"merge": name.split(":", 1)[1], "normalised over seeds [95% CI]": _over_seeds(systems.get(name, {})).split(":")[0],
                     f"accuracy minus {vs['baseline'].split(':', 1)[1]}, mean over skills": round(sum(diffs) / len(diffs), 3) if diffs else None,
                     "better on": ", ".join(v["better_on"]), "worse on": ", ".join(v["worse_on"]),
                     "_sort": (systems.get(name, {}).get("seeds") or {}).get("mean") or -1})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).sort_values("_sort", ascending=False).drop(columns="_sort").reset_index(drop=True)


def linearised(root: str | Path) -> pd.DataFrame:
    """The committed linearised-experts study (``results/linearised/lr<lr>/linearised.json``,
    written by ``python -m lib.experts.linearised_study``; not regenerated by ``dvc repro``):
    per learning rate, the linearised experts' own-skill accuracy and their merges against the
    ordinary experts' task arithmetic on the same seeds."""
    rows = []
    for path in sorted(Path(root).glob("results/linearised/*/linearised.json")):
        r = read_json(path)
        own = sorted(v for seed in r["linearised_expert_own"].values() for v in seed.values())
        s, d = r["systems"], r["linearised_minus_ordinary"]["task_arithmetic"]
        rows.append({"lr": r["lr"], "experts, own skill (min / median / max)": f"{own[0]:.2f} / {median(own):.2f} / {own[-1]:.2f}",
                     "task arithmetic, linearised": _ci(*(s["linearised:task_arithmetic"][k] for k in ("mean", "lo", "hi"))),
                     "task arithmetic, post hoc in the ordinary model": _ci(*(s["ordinary:task_arithmetic"][k] for k in ("mean", "lo", "hi"))),
                     "TIES, linearised": _ci(*(s["linearised:ties"][k] for k in ("mean", "lo", "hi"))),
                     "minus ordinary experts' task arithmetic": _ci(d["mean"], d["lo"], d["hi"]), "seeds": len(r["seeds"])})
    return pd.DataFrame(rows)


def teacher_data(metrics: dict) -> tuple[pd.DataFrame, pd.DataFrame] | str:
    """Stage teacher_data's two tables (generation: counts per skill, reasons and a few prompts;
    accuracy: teacher-data against programmatic-data experts per skill, then the mean and the
    paired difference over seeds), or why there are none."""
    td = metrics.get("teacher_data")
    if not td or "skipped" in td:
        return f"Stage teacher_data did not compare: {td['skipped'] if td else 'metrics/teacher_data.json missing'}."
    gen = pd.DataFrame([{"skill": k, **{c: n for c, n in v.items() if c not in ("examples", "splits")},
                         "trained on": v["splits"]["train"],
                         "examples kept": " | ".join(v["examples"].get("kept", [])),
                         "examples rejected": " | ".join(x for o, xs in v["examples"].items() if o != "kept" for x in xs[:2])}
                        for k, v in td["generation"].items()]).fillna(0)
    rows = [{"skill": k, "teacher prompts": v["teacher"], "programmatic prompts": v["programmatic"]}
            for k, v in td["per_skill"].items()]
    acc, diff = td["accuracy"], td["difference"]
    rows.append({"skill": f"mean over skills ({diff['n']} seeds)",
                 "teacher prompts": _ci(*(acc["teacher"][k] for k in ("mean", "lo", "hi"))),
                 "programmatic prompts": _ci(*(acc["programmatic"][k] for k in ("mean", "lo", "hi"))),
                 "paired difference": _ci(diff["mean"], diff["lo"], diff["hi"])})
    return gen, pd.DataFrame(rows)


def claims_table(metrics: dict) -> pd.DataFrame:
    return pd.DataFrame(evaluate_claims(metrics))


def verdict_counts(claims: pd.DataFrame) -> dict[str, int]:
    from lib.report.claims import VERDICTS

    return {v: int((claims["verdict"] == v).sum()) for v in VERDICTS}


def write_tables(root: str | Path, head: pd.DataFrame, claims: pd.DataFrame) -> Path:
    """The two tables the HTML index shows, as CSV under reports/tables/."""
    out = Path(root) / "reports" / "tables"
    out.mkdir(parents=True, exist_ok=True)
    head.to_csv(out / "headline.csv", index=False)
    claims.to_csv(out / "claims.csv", index=False)
    return out
