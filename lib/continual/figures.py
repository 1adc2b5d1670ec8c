"""Notebook 05's figures: accuracy matrices, final accuracy against costs, stability curves.

Each function draws one figure from the stage's results (:func:`lib.continual.study.summarize`,
:func:`lib.continual.study.stability_table`) and returns it; the notebook shows it.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


def accuracy_matrices(metrics: dict, order: str, skills: list[str], ncols: int = 3):
    """One heatmap of the mean accuracy matrix R per strategy for one order: row i the model
    after learning tasks 1..i (row 0 the base), column j a skill, in the order learned."""
    strategies = list(metrics["strategies"])
    nrows = -(-len(strategies) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax, s in zip(axes.flat, strategies):
        R = pd.DataFrame(metrics["strategies"][s]["R"][order], columns=skills,
                         index=["base"] + [f"after {k}" for k in skills])
        sns.heatmap(R, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", cbar=False, ax=ax)
        ax.set(title=s, xlabel="skill", ylabel="")
    for ax in list(axes.flat)[len(strategies):]:
        ax.axis("off")
    fig.suptitle(f'accuracy matrix R per strategy, order "{order}" ({" → ".join(skills)})', y=1.0)
    fig.tight_layout()
    return fig


def accuracy_against_costs(summary: pd.DataFrame):
    """Final accuracy (ACC, with its interval) against parameters held at the end (left) and
    seconds spent learning the sequence (right); one point per strategy."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, x, label in ((axes[0], "params_held", "parameters held at the end"),
                         (axes[1], "wall_s", "seconds to learn the sequence")):
        ax.errorbar(summary[x], summary.ACC, yerr=[summary.ACC - summary.ACC_lo, summary.ACC_hi - summary.ACC],
                    fmt="o", capsize=3)
        for _, r in summary.iterrows():
            ax.annotate(r.strategy, (r[x], r.ACC), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set(xlabel=label, ylabel="ACC (final mean accuracy)", ylim=(-0.05, 1.05))
    axes[0].set_title("accuracy against memory")
    axes[1].set_title("accuracy against learning time")
    fig.tight_layout()
    return fig


def stability_curves(stability: pd.DataFrame, order: str, skills: list[str], steps_per_task: int):
    """Probe accuracy of every skill against the global step, one panel per strategy with a
    curve, mean over seeds; dashed lines at the task switches, each segment labelled with
    the task being learned."""
    sub = stability[stability.order == order]
    g = sns.relplot(sub, x="step", y="accuracy", hue="skill", hue_order=skills, col="strategy", col_wrap=3,
                    kind="line", errorbar=None, height=2.8, aspect=1.5, facet_kws={"sharex": True})
    g.set_titles("{col_name}")
    for ax in g.axes.flat:
        for t in range(1, len(skills)):
            ax.axvline(t * steps_per_task, color="grey", ls="--", lw=0.8)
        for t, sk in enumerate(skills):
            ax.text((t + 0.5) * steps_per_task, 1.12, f"learning {sk}", ha="center", va="center", fontsize=7,
                    color="dimgray")
        ax.set_ylim(-0.05, 1.2)
    g.figure.suptitle(f'probe accuracy during training, order "{order}"', y=1.03)
    return g.figure
