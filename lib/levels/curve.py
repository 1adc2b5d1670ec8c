"""The merge curve across levels of latent skill knowledge (issue 15), from what the stages wrote:
``metrics/levels/<fraction>.json`` (stages levels and level_score@<fraction>) and, for the main study's level
``synthesize.corpus_skill_fraction``, its first seed in ``metrics/merge_route.json`` and
``metrics/base.json`` (the same single seed as the other levels).

:func:`table` gives one row per level: the base's worst case (its best study skill, and the
least well-formed skill), the weakest expert, the joint LoRA at equal total steps and each
merge (normalised accuracy, 95% prompt-bootstrap interval), and the verdict of "experts +
merging beat joint training" at that level (:func:`lib.report.claims.verdict` on the best
merge's and the joint LoRA's intervals, so it can come out either way). Each system's plain
mean accuracy is there too (``<system>_mean_acc``): normalised accuracy leaves out skills whose
expert scored 0 and grows as the experts weaken, so at a level with weak experts it flatters.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lib.report.claims import Interval, MissingMetric, verdict

JOINT = "joint_total_steps"


def _read(path: Path) -> dict:
    if not path.is_file():
        raise MissingMetric(f"{path}: missing; run its stage (dvc repro)")
    return json.loads(path.read_text())


def main_level(root: Path, merges: list[str]) -> dict:
    """The main study's first seed in the shape of a level's metrics."""
    mr, base = _read(root / "metrics" / "merge_route.json"), _read(root / "metrics" / "base.json")
    systems = {}
    for name in [JOINT, *(f"merge:{m}" for m in merges)]:
        if name not in mr["systems"]:
            raise MissingMetric(f"{root / 'metrics' / 'merge_route.json'}: no system {name!r} (is {name.split(':')[-1]} "
                                "in merge_route.merges?)")
        s = mr["systems"][name]
        systems[name] = {k: s.get(k) for k in ("norm_acc", "norm_lo", "norm_hi", "mean_acc")}
    return {"base": {"accuracy": base["accuracy"], "well_formed": base["well_formed"],
                     "max_accuracy": max(base["accuracy"].values())},
            "expert_own": mr["expert_own"], "systems": systems}


def table(root: str | Path, fractions: list[float], main_fraction: float, merges: list[str]) -> pd.DataFrame:
    """One row per level, sorted by fraction (see the module docstring)."""
    root = Path(root)
    levels = {f: _read(root / "metrics" / "levels" / f"{f}.json") for f in fractions}
    levels[main_fraction] = main_level(root, merges)
    rows = []
    for f in sorted(levels):
        m = levels[f]
        row = {"fraction": f, "main": f == main_fraction, "base_max": m["base"]["max_accuracy"],
               "base_well_formed_min": min(m["base"]["well_formed"].values()),
               "expert_min": min(m["expert_own"].values())}
        for name, s in m["systems"].items():
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = s["norm_acc"], s["norm_lo"], s["norm_hi"]
            # plain mean accuracy too: where experts are weak, dividing by them inflates the normalised value
            row[f"{name}_mean_acc"] = s.get("mean_acc")
        best = max((f"merge:{x}" for x in merges), key=lambda n: -1 if row[n] is None else row[n])
        row["best_merge"] = best
        try:
            iv = [Interval.of({"mean": row[n], "lo": row[f"{n}_lo"], "hi": row[f"{n}_hi"]}) for n in (best, JOINT)]
            row["merge_beats_joint"] = verdict(*iv, ">")
        except MissingMetric:  # normalised accuracy undefined (every expert at 0): no data, no verdict
            row["merge_beats_joint"] = "inconclusive"
        rows.append(row)
    return pd.DataFrame(rows)


def long(tab: pd.DataFrame) -> pd.DataFrame:
    """fraction, system, norm_acc, lo, hi: one row per level and scored system (for the figure)."""
    names = [c for c in tab.columns if c == JOINT or c.startswith("merge:")]
    names = [n for n in names if not n.endswith(("_lo", "_hi", "_mean_acc"))]
    return pd.DataFrame([{"fraction": r["fraction"], "system": n, "norm_acc": r[n], "lo": r[f"{n}_lo"], "hi": r[f"{n}_hi"]}
                         for _, r in tab.iterrows() for n in names])


def figure(tab: pd.DataFrame):
    """Normalised accuracy against the level, one line per system with its interval; caption computed."""
    import matplotlib.pyplot as plt

    from lib.core.plotting import set_style

    set_style()
    pts = long(tab).dropna(subset=["norm_acc"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, g in pts.groupby("system", sort=False):
        g = g.sort_values("fraction")
        ax.errorbar(g.fraction, g.norm_acc, yerr=[g.norm_acc - g.lo, g.hi - g.norm_acc], marker="o", capsize=3,
                    label=name, ls="--" if name == JOINT else "-")
    ax.axhline(0.6, c="grey", lw=1, ls=":")
    ax.set(xlabel="share of the base's corpus showing the skills under alias names (level)",
           ylabel="normalised accuracy", ylim=(-0.02, 1.05), title="Merging across levels of latent skill knowledge")
    ax.legend(fontsize=8)
    held = tab[tab.merge_beats_joint == "held"].fraction.tolist()
    parts = []
    for _, r in tab.iterrows():
        if pd.notna(r[r.best_merge]) and pd.notna(r[JOINT]):
            parts.append(f"level {r.fraction:g}: best merge ({r.best_merge.split(':', 1)[1]}) {r[r.best_merge]:.3f}, joint "
                         f"{r[JOINT]:.3f}, {r.merge_beats_joint}; base ≤ {r.base_max:.2f}, weakest expert {r.expert_min:.2f}")
    cap = ("One seed per level, 95% intervals over test prompts. 'Experts + merging beat joint training' "
           + (f"held at level(s) {', '.join(f'{x:g}' for x in held)}" if held else "held at no level")
           + ". " + "; ".join(parts) + ".")
    return fig, cap
