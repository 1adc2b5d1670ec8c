"""Stage 06's figures (seaborn/matplotlib), drawn from the study's tables and results
(:mod:`lib.localize.study`); each returns its figure (or seaborn grid) and the notebook shows it."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from lib.core import plotting
from lib.core.evaluation import EvalResult
from lib.localize.study import KINDS


def recovery_curves(table: pd.DataFrame) -> sns.FacetGrid:
    """Recovery against sparsity (log scale) per mask kind, one panel per source: the mean over
    skills with a 95% bootstrap band. Recovery is undefined for a skill its fine-tuned model
    never answers (accuracy 0); when it is undefined everywhere, accuracy is plotted instead."""
    y = "recovery" if table.recovery.notna().any() else "accuracy"
    g = sns.relplot(table.dropna(subset=[y]), x="sparsity", y=y, hue="kind", col="source", kind="line", marker="o",
                    errorbar=("ci", 95), height=3.6, aspect=1.2, hue_order=list(KINDS))
    g.set(xscale="log", ylim=(-0.05, 1.15), xlabel="sparsity (fraction of considered parameters kept)",
          ylabel="recovery (grafted / fine-tuned accuracy)" if y == "recovery" else "accuracy (recovery undefined)")
    for ax in g.axes.flat:
        ax.axhline(1, ls="--", c="grey", lw=1)
    return g


def overlap_heatmaps(matrices: Mapping[str, pd.DataFrame], families: Mapping[str, str], sparsity: float) -> plt.Figure:
    """One annotated Jaccard heatmap per source (colour scale capped at the largest off-diagonal
    value, at least 0.05); tick labels carry each skill's family."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(1.2 + 5.2 * len(matrices), 4.6), squeeze=False)
    for ax, (src, m) in zip(axes[0], matrices.items()):
        labels = [f"{s} ({families[s][:5]})" for s in m.index]
        vmax = max(0.05, m.where(~np.eye(len(m), dtype=bool)).max().max())
        sns.heatmap(m, annot=True, fmt=".2f", cmap="viridis", vmin=0, vmax=vmax,
                    xticklabels=labels, yticklabels=labels, ax=ax, cbar_kws={"label": "Jaccard"})
        ax.set_title(f"{src}: graft masks at sparsity {sparsity:g}")
    fig.tight_layout()
    return fig


def overlap_scatter(pairs: pd.DataFrame) -> plt.Figure:
    """Per source, each skill pair's Jaccard against its symmetrised loss transfer, coloured by
    whether the two skills share a family."""
    sources = list(dict.fromkeys(pairs.source))
    fig, axes = plt.subplots(1, len(sources), figsize=(5 * len(sources), 4), squeeze=False)
    for ax, src in zip(axes[0], sources):
        sns.scatterplot(pairs[pairs.source == src], x="loss_transfer", y="jaccard", hue="same_family", ax=ax, s=60)
        ax.set(title=src, xlabel="behavioural similarity (symmetrised loss transfer)", ylabel="Jaccard overlap")
    fig.tight_layout()
    return fig


def reliability_grid(results: Mapping[tuple, EvalResult], names: Sequence[str], sources: Sequence[str],
                     sparsity: float, n_bins: int) -> plt.Figure:
    """Reliability diagrams pooled over skills: per source (rows), the fine-tuned models (left)
    and their grafts at ``sparsity`` (right); ``results`` as :func:`lib.localize.study.recovery_study` returns."""
    fig, axes = plt.subplots(len(sources), 2, figsize=(9.5, 4.6 * len(sources)), squeeze=False)
    for row, src in zip(axes, sources):
        for ax, kind, title in ((row[0], "finetuned", "fine-tuned"), (row[1], "graft", f"grafted (s = {sparsity:g})")):
            sp = 1.0 if kind == "finetuned" else sparsity
            ex = pd.concat([results[(src, kind, sp, s)].examples for s in names], ignore_index=True)
            plotting.reliability_diagram(EvalResult(ex, 0, n_bins=n_bins), ax=ax, title=f"{src}, {title}")
    fig.tight_layout()
    return fig


def merge_bars(merges: pd.DataFrame) -> plt.Figure:
    """Normalised accuracy of each multi-skill system (rows of :func:`lib.localize.study.graft_merge`)
    as horizontal bars with their 95% intervals, in the table's order."""
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(merges) + 1))
    acc = merges["normalised accuracy"]
    ax.barh(merges.system, acc, xerr=[acc - merges.lo, merges.hi - acc], color="C2")
    ax.invert_yaxis()
    ax.set_xlabel("normalised accuracy (mean over skills)")
    ax.set_xlim(0, 1.1)
    return fig
