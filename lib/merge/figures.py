"""Stage 04's figures, drawn from the tables :mod:`lib.merge.stage` returns (seaborn on pandas)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from lib.core.stats import per_seed_columns


def lambda_curves(curves: pd.DataFrame):
    """Validation accuracy against λ per summed merge method (``linear`` has no λ)."""
    g = sns.relplot(curves[curves.method != "linear"], x="lam", y="val_accuracy", hue="method", kind="line",
                    marker="o", height=3.5, aspect=1.8)
    g.set(xlabel="λ (scale of the summed update)", ylabel="validation accuracy (mean over skills)",
          title="choosing λ per merge method")
    return g


def confusion(conf: pd.DataFrame, accuracy: float):
    """The task router's confusion matrix on the test prompts."""
    n = len(conf)
    plt.figure(figsize=(1 + 0.6 * n, 0.8 + 0.5 * n))
    ax = sns.heatmap(conf, annot=True, fmt="d", cmap="Blues", cbar=False)
    ax.set(xlabel="routed to", ylabel="true skill", title=f"router on the test prompts: accuracy {accuracy:.3f}")
    return ax


def lorahub_weights(weights: dict[str, dict[str, float]]):
    """LoraHub's weight per expert (columns) for each target (rows)."""
    hw = pd.DataFrame(weights).T
    plt.figure(figsize=(1 + 0.7 * hw.shape[1], 1 + 0.5 * len(hw)))
    ax = sns.heatmap(hw, annot=True, fmt=".2f", cmap="vlag", center=0)
    ax.set(title="LoraHub weights per target", xlabel="expert")
    return ax


def per_skill_heatmap(per_skill: pd.DataFrame, board: pd.DataFrame, names: list[str]):
    """Test accuracy per system (rows, leaderboard order, experts left out) and skill."""
    heat = per_skill[per_skill.kind != "expert"].pivot(index="system", columns="skill", values="accuracy")[names]
    heat = heat.loc[[s for s in board.system if s in heat.index]]
    plt.figure(figsize=(1.5 + 0.7 * len(names), 1 + 0.38 * len(heat)))
    ax = sns.heatmap(heat, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", cbar_kws={"label": "accuracy"})
    ax.set(xlabel="skill", ylabel="", title="accuracy per system and skill (test)")
    return ax


def costs(board: pd.DataFrame):
    """Normalised accuracy against memory (extra parameters) and against generation speed."""
    pts = board[board.kind != "expert"].copy()
    memory = "extra params (log10, +1)"
    pts[memory] = np.log10(pts.extra_params + 1)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    sns.scatterplot(pts, x=memory, y="norm_acc", hue="kind", s=70, ax=axes[0])
    sns.scatterplot(pts, x="tokens_per_s_rel", y="norm_acc", hue="kind", s=70, ax=axes[1], legend=False)
    for ax, x in zip(axes, (memory, "tokens_per_s_rel")):
        for _, r in pts.iterrows():
            ax.annotate(r.system, (r[x], r.norm_acc), fontsize=7, alpha=0.8, xytext=(3, 2), textcoords="offset points")
    axes[0].set(title="accuracy against memory", ylabel="normalised accuracy")
    axes[1].set(title="accuracy against speed", xlabel="tokens/s relative to the base", ylabel="normalised accuracy")
    fig.tight_layout()
    return fig


RECIPE_COLUMNS = ["note", "synthesize.corpus_skill_fraction", "experts.lr", "experts.stop_loss", "base_max",
                  "expert_own_min", "best_merge", "best_merge_norm_acc", "best_router_norm_acc", "joint_total_norm_acc"]


def recipes(rec: pd.DataFrame):
    """Each recorded expert recipe: its worst expert's own-skill accuracy against its best merge."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.scatterplot(rec, x="best_merge_norm_acc", y="expert_own_min", hue="synthesize.corpus_skill_fraction", s=80,
                    ax=ax, palette="viridis")
    for _, r in rec.iterrows():
        ax.annotate(str(r.note)[:40], (r.best_merge_norm_acc, r.expert_own_min), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    ax.axhline(0.9, ls="--", c="grey", lw=1)
    ax.axvline(0.6, ls="--", c="grey", lw=1)
    ax.set(xlabel="best merge: normalised accuracy", ylabel="worst expert: accuracy on its own skill", xlim=(0, 1.05),
           ylim=(0, 1.05), title="the experts target (≥ 0.9) against the mergeability target (≥ 0.6)")
    return fig


def interference(cos: pd.DataFrame, error: pd.DataFrame, sti: pd.DataFrame | None = None):
    """Left: cosine similarity of the task vectors. Middle: the weight disentanglement error
    per (α_a, α_b), averaged over the measured pairs and both tasks of each pair. Right (with
    ``sti``): TSV-M's singular task interference per module, relative to the sum of the singular
    values, by module type (one dot per layer)."""
    panels = 3 if sti is not None and len(sti) else 2
    fig, axes = plt.subplots(1, panels, figsize=(13 + 4 * (panels - 2), 4.8),
                             gridspec_kw={"width_ratios": [1.4, 1, 1][:panels]})
    sns.heatmap(cos, annot=True, fmt=".2f", cmap="vlag", center=0, vmin=-1, vmax=1, ax=axes[0])
    axes[0].set(title="cosine similarity of the task vectors")
    if len(error):
        heat = error.groupby(["alpha_a", "alpha_b"]).error.mean().unstack("alpha_b")
        sns.heatmap(heat, annot=True, fmt=".2f", cmap="magma_r", vmin=0, vmax=1, ax=axes[1])
        axes[1].set(title=f"disentanglement error ({error[['task_a', 'task_b']].drop_duplicates().shape[0]} pairs)",
                    xlabel="α of the second task", ylabel="α of the first task")
    if panels == 3:
        sns.stripplot(sti, x="relative", y="module_type", ax=axes[2], size=6, jitter=0.1)
        axes[2].set(title="singular task interference (TSV-M)", xlabel="STI / Σσ (0: the tasks' subspaces are orthogonal)",
                    ylabel="")
    fig.tight_layout()
    return fig


def seeds(table: pd.DataFrame):
    """Normalised accuracy per system over seeds: one dot per seed, the bar the mean and its
    95% interval (two-stage bootstrap over seeds and prompts), systems best first."""
    t = table.dropna(subset=["seed_mean"]).sort_values("seed_mean", ascending=False) if len(table) else table
    if not len(t):
        return None
    per_seed = per_seed_columns(t.columns)
    long = t.melt(id_vars=["system"], value_vars=per_seed, var_name="seed", value_name="norm_acc").dropna()
    long["seed"] = long.seed.str.removeprefix("seed_")
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.3 * len(t)))
    y = np.arange(len(t))
    ax.errorbar(t.seed_mean, y, xerr=[t.seed_mean - t.seed_lo, t.seed_hi - t.seed_mean], fmt="|", color="black",
                capsize=3, label="mean, 95% interval over seeds")
    sns.stripplot(long, x="norm_acc", y="system", hue="seed", order=list(t.system), ax=ax, size=5, jitter=0.15)
    ax.set(xlabel="normalised accuracy (each seed's experts = 1)", ylabel="",
           title=f"every system on {int(t.n_seeds.max())} seeds")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    return ax


def versus(found: dict):
    """Each merge's accuracy minus the baseline's (``lib.merge.stage.versus``), per skill, mean
    over seeds; a star where the 95% interval excludes 0."""
    rows = found["systems"]
    if not rows:
        return None
    mean = pd.DataFrame({n.split(":", 1)[-1]: {k: v["mean"] for k, v in r["skills"].items()} for n, r in rows.items()}).T
    star = pd.DataFrame({n.split(":", 1)[-1]: {k: "*" if v["lo"] > 0 or v["hi"] < 0 else "" for k, v in r["skills"].items()}
                         for n, r in rows.items()}).T
    labels = mean.map(lambda x: f"{x:+.2f}") + star
    plt.figure(figsize=(1.5 + 0.8 * mean.shape[1], 1 + 0.4 * len(mean)))
    ax = sns.heatmap(mean, annot=labels, fmt="", cmap="vlag", center=0, cbar_kws={"label": "accuracy difference"})
    ax.set(title=f"each merge minus {found['baseline'].split(':', 1)[-1]}, per skill (mean over seeds; * 95% interval excludes 0)",
           xlabel="skill", ylabel="")
    return ax


def retained(kept: pd.DataFrame):
    """Test accuracy per (merge, skill) against the share of that skill's expert update the
    merge keeps (``lib.merge.diagnostics.retained``), one dot per pair, coloured by merge."""
    if not len(kept):
        return None
    g = sns.relplot(kept, x="retained", y="accuracy", hue="method", style="skill", height=4, aspect=1.6, s=50)
    g.set(xlabel="share of the skill's expert update the merge keeps, ⟨M, τ⟩ / ‖τ‖²", ylabel="test accuracy on the skill",
          title="what a merge keeps of each expert, and what it can still do (seed 0)")
    return g
