"""Notebook 07's figures: mastered fraction per teacher, where the teachers sample, Auto-CEI's
precision and refusal by difficulty, Skill-it's mixture and losses. Each returns its figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from lib.curricula.space import AddSpace


def mastered_curves(curves: pd.DataFrame):
    """Mastered area over training steps, one panel per unlearnable fraction, mean ± 95% (seeds)."""
    fractions = sorted(curves["fraction"].unique())
    fig, axes = plt.subplots(1, len(fractions), figsize=(5 * len(fractions), 3.6), squeeze=False, sharey=True)
    for ax, f in zip(axes[0], fractions):
        sns.lineplot(curves[curves["fraction"] == f], x="step", y="mastered", hue="teacher", errorbar=("ci", 95),
                     marker="o", ax=ax)
        ax.set(title=f"unlearnable share {f:g}", ylabel="mastered share of the task space", ylim=(-0.02, 1.02))
    fig.tight_layout()
    return fig


def sampling_maps(samples: pd.DataFrame, max_digits: int, fraction: float):
    """Share of each teacher's tasks per (digits, carries) cell in each quarter of training
    (rows: teachers; columns: quarters); × marks the unlearnable cells."""
    space = AddSpace(max_digits, fraction)
    sub = samples[samples["fraction"] == fraction]
    teachers, quarters = sorted(sub["teacher"].unique()), sorted(sub["quarter"].unique())
    fig, axes = plt.subplots(len(teachers), len(quarters), figsize=(2.4 * len(quarters), 2.0 * len(teachers)),
                             squeeze=False, sharex=True, sharey=True)
    for i, t in enumerate(teachers):
        for j, q in enumerate(quarters):
            grid = np.full((max_digits, max_digits + 1), np.nan)
            for c in space.cells:
                grid[c[0] - 1, c[1]] = 0.0
            for row in sub[(sub["teacher"] == t) & (sub["quarter"] == q)].itertuples():
                d, c = int(row.cell.split("d")[0]), int(row.cell.split("d")[1][:-1])
                grid[d - 1, c] = row.share
            ax = axes[i, j]
            sns.heatmap(pd.DataFrame(grid, index=range(1, max_digits + 1)), vmin=0, vmax=0.5, cmap="magma", cbar=False,
                        annot=True, fmt=".2f", annot_kws={"size": 7}, ax=ax)
            for d, c in space.unlearnable:
                ax.text(c + 0.5, d - 0.5 + 0.35, "×", ha="center", va="center", color="cyan")
            ax.set(title=f"{t}, quarter {q}", xlabel="carries" if i == len(teachers) - 1 else "",
                   ylabel="digits" if j == 0 else "")
            ax.title.set_size(8)
    fig.suptitle(f"where each teacher samples (share of its tasks), unlearnable share {fraction:g}; × unlearnable", y=1.0)
    fig.tight_layout()
    return fig


def refusal_by_difficulty(table: pd.DataFrame):
    """Accuracy, precision and refusal rate per digit count, one line per method (mean over seeds)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), sharey=True)
    for ax, what in zip(axes, ("accuracy", "precision", "refusal_rate")):
        sns.lineplot(table, x="digits", y=what, hue="method", marker="o", errorbar=("ci", 95), ax=ax)
        ax.set(title=what.replace("_", " "), ylim=(-0.02, 1.02), xticks=sorted(table["digits"].unique()))
    fig.tight_layout()
    return fig


def mixture_over_time(curves: pd.DataFrame, target: float):
    """Skill-it's mixture weights per skill over training (left, mean over seeds) and the
    highest validation loss over skills for both methods against the target (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    sk = curves[curves["method"] == "skill_it"]
    sns.lineplot(sk, x="step", y="weight", hue="skill", marker="o", errorbar=None, ax=axes[0])
    axes[0].set(title="Skill-it mixture weights (mean over seeds)", ylim=(0, 1))
    worst = curves.groupby(["method", "seed", "step"])["loss"].max().reset_index()
    sns.lineplot(worst, x="step", y="loss", hue="method", marker="o", errorbar=("ci", 95), ax=axes[1])
    axes[1].axhline(target, ls="--", c="k", lw=1)
    axes[1].set(yscale="log", title="highest validation loss over skills (dashed: target)", ylabel="loss (nats/token)")
    fig.tight_layout()
    return fig
