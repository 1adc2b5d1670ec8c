"""The merge curve across levels of latent skill knowledge (issue 15), from what stage
``level_score`` wrote: ``metrics/levels.json``, every level by its fraction, the main study's
level (synthesize.corpus_skill_fraction) included, each scored on every seed of the study with
the experts of ``levels.skills``.

:func:`table` gives one row per level: the base's worst case on every training skill (its best
study skill, and the least well-formed skill), the weakest expert (over skills and seeds), the
joint LoRA at equal total steps and each merge (normalised accuracy, mean over seeds with its
95% interval over seeds and prompts), and the verdict of "experts + merging beat joint
training" at that level (:func:`lib.report.claims.verdict` on the best merge's and the joint
LoRA's intervals, so it can come out either way). Each system's plain mean accuracy is there
too (``<system>_mean_acc``): normalised accuracy leaves out skills whose expert scored 0 and
grows as the experts weaken, so at a level with weak experts it flatters.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lib.levels.common import level_name, metrics_path
from lib.report.claims import Interval, MissingMetric, verdict

JOINT = "joint_total_steps"


def read_levels(root: Path, fractions: list[float]) -> dict[float, dict]:
    """Each of ``fractions``' metrics from metrics/levels.json; MissingMetric naming what is absent."""
    path = metrics_path(root)
    if not path.is_file():
        raise MissingMetric(f"{path}: missing; run its stage (dvc repro level_score)")
    found = json.loads(path.read_text())
    if "skipped" in found:
        raise MissingMetric(f"{path}: the levels were not run: {found['skipped']}")
    missing = [f for f in fractions if level_name(f) not in found]
    if missing:
        raise MissingMetric(f"{path}: no level {missing} (it has {sorted(found)}); rerun stage level_score")
    return {f: found[level_name(f)] for f in fractions}


def table(root: str | Path, fractions: list[float], main_fraction: float, merges: list[str]) -> pd.DataFrame:
    """One row per level, sorted by fraction (see the module docstring)."""
    levels = read_levels(Path(root), [*fractions, main_fraction])
    rows = []
    for f in sorted(levels):
        m = levels[f]
        row = {"fraction": f, "main": f == main_fraction, "n_seeds": len(m["expert_own"]), "base_max": m["base"]["max_accuracy"],
               "base_well_formed_min": min(m["base"]["well_formed"].values()),
               "expert_min": min(a for seed in m["expert_own"].values() for a in seed.values())}
        for name in [JOINT, *(f"merge:{x}" for x in merges)]:
            if name not in m["systems"]:
                raise MissingMetric(f"{metrics_path(Path(root))}: level {f:g} has no system {name!r} (is "
                                    f"{name.split(':')[-1]} in levels.merges? rerun stage level_score)")
            s = m["systems"][name]
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


def per_seed(root: str | Path, fractions: list[float], main_fraction: float) -> pd.DataFrame:
    """fraction, system, seed, norm_acc: each seed's value behind the table's intervals."""
    levels = read_levels(Path(root), [*fractions, main_fraction])
    return pd.DataFrame([{"fraction": f, "system": name, "seed": int(seed), "norm_acc": v}
                         for f, m in sorted(levels.items()) for name, s in m["systems"].items()
                         for seed, v in s["norm_per_seed"].items()])


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
    n = int(tab.n_seeds.min())
    cap = (f"{n} seeds per level, the experts of levels.skills merged; 95% intervals over seeds and test prompts. "
           "'Experts + merging beat joint training' "
           + (f"held at level(s) {', '.join(f'{x:g}' for x in held)}" if held else "held at no level")
           + ". " + "; ".join(parts) + ".")
    return fig, cap
