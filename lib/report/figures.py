"""The report's figures, drawn from the CSV tables the stages wrote under ``plots/``.

Each function takes a DataFrame and returns ``(Axes or Figure, caption)``: the caption is a
sentence computed from the same numbers, so the report never states a number it did not read.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from lib.core.plotting import set_style


def loss_curves(loss: pd.DataFrame):
    set_style()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    sns.lineplot(loss, x="step", y="loss", hue="model", ax=ax)
    ax.set_yscale("log")
    ax.set_title("Expert training loss (stage 03)")
    last = loss.groupby("model")["step"].max()
    caption = (f"Training loss of each skill expert (log scale); early stopping ended them after "
               f"{int(last.min())}–{int(last.max())} steps.")
    return fig, caption


def interference(table: pd.DataFrame):
    """Heatmap of each model's accuracy on each skill (rows: base, experts, joint runs)."""
    set_style()
    grid = table.pivot(index="model", columns="skill", values="accuracy")
    skills = list(grid.columns)
    order = [m for m in ["base", *skills] if m in grid.index] + [m for m in grid.index if m not in ["base", *skills]]
    grid = grid.loc[order, skills]
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(skills), 0.5 + 0.45 * len(grid)))
    sns.heatmap(grid, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", cbar=False, ax=ax)
    ax.set_title("Accuracy of each model on each skill (stage 03)")
    experts = [s for s in skills if s in grid.index]
    diag = np.mean([grid.loc[s, s] for s in experts]) if experts else float("nan")
    off = np.mean([grid.loc[e, s] for e in experts for s in skills if s != e]) if experts else float("nan")
    return fig, (f"Each expert scores {diag:.2f} on its own skill on average and {off:.3f} on the others: "
                 "the experts specialise, and any merge has to keep eight narrow updates at once.")


def leaderboard(board: pd.DataFrame):
    """Normalised accuracy with its 95% interval, one bar per system (experts alone left out)."""
    set_style()
    rows = board[board["kind"] != "expert"].sort_values("norm_acc")
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1))
    colors = dict(zip(sorted(rows["kind"].unique()), sns.color_palette("colorblind")))
    ax.barh(rows["system"], rows["norm_acc"], color=[colors[k] for k in rows["kind"]],
            xerr=[rows["norm_acc"] - rows["norm_lo"], rows["norm_hi"] - rows["norm_acc"]], capsize=2)
    ax.set_xlabel("normalised accuracy (1 = each skill's own expert)")
    ax.set_title("Merging and routing leaderboard (stage 04)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, colors.keys(), loc="lower right", fontsize="small")
    best = rows.iloc[-1]
    merges = rows[rows["kind"].isin(["merge", "peft_merge"])]
    bm = merges.iloc[-1] if len(merges) else None
    cap = f"{best['system']} leads with {best['norm_acc']:.3f}"
    if bm is not None:
        cap += f"; the best weight merge, {bm['system']}, keeps {bm['norm_acc']:.3f} of the experts' accuracy"
    return fig, cap + "."


def lambda_sweep(sweep: pd.DataFrame):
    set_style()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    summed = sweep[sweep["method"] != "linear"]
    sns.lineplot(summed, x="lam", y="val_accuracy", hue="method", marker="o", ax=ax)
    ax.set_xlabel("λ (scale of the summed task vectors)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("λ sweep of the summed merges (stage 04)")
    ta = summed[summed["method"] == "task_arithmetic"]
    if len(ta):
        best = ta.loc[ta["val_accuracy"].idxmax()]
        cap = (f"Task arithmetic peaks at λ = {best['lam']:g} ({best['val_accuracy']:.3f} validation accuracy); "
               "too small a λ leaves the skills out, too large a one lets them collide.")
    else:
        cap = "Validation accuracy of each summed merge against its scale λ."
    return fig, cap


def stability_gap(curves: pd.DataFrame, strategies: tuple[str, ...] = ("sequential_lora", "replay", "ewc", "olora")):
    """Accuracy on every skill against training step, one panel per strategy, with the task
    switches (the first step of each task) as dashed lines; seeds averaged, first order only."""
    set_style()
    order = curves["order"].iloc[0]
    data = curves[curves["order"] == order]
    shown = [s for s in strategies if s in set(data["strategy"])] or list(dict.fromkeys(data["strategy"]))[:4]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.4), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], shown):
        d = data[data["strategy"] == s]
        sns.lineplot(d, x="step", y="accuracy", hue="skill", ax=ax, errorbar=None, legend=ax is axes[0][-1])
        if "task" in d.columns:
            for x in sorted(d.groupby("task")["step"].min())[1:]:
                ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(s)
    return fig, (f"Accuracy on each skill while the tasks of order '{order}' arrive one by one (dashed: task "
                 "switches); a dip right after a switch that later recovers is the stability gap.")


def recovery(table: pd.DataFrame):
    set_style()
    mean = table.groupby(["source", "kind", "sparsity"], as_index=False)["recovery"].mean()
    sources = list(dict.fromkeys(mean["source"]))
    fig, axes = plt.subplots(1, len(sources), figsize=(4.5 * len(sources), 3.5), sharey=True, squeeze=False)
    for ax, src in zip(axes[0], sources):
        sns.lineplot(mean[mean["source"] == src], x="sparsity", y="recovery", hue="kind", marker="o", ax=ax)
        ax.set_xscale("log")
        ax.axhline(0.95, color="gray", linestyle=":", linewidth=1)
        ax.set_title(f"grafting the {src} update")
        ax.set_xlabel("fraction of parameters kept")
    graft = mean[mean["kind"] == "graft"]
    smallest = graft[graft["sparsity"] == graft["sparsity"].min()]
    cap = "Fraction of the fine-tuned accuracy recovered by grafting a sparse region (dotted: the paper's 0.95)"
    if len(smallest):
        cap += (f"; at {smallest['sparsity'].iloc[0]:.4%} of the parameters the learned mask recovers "
                + ", ".join(f"{r.recovery:.2f} ({r.source})" for r in smallest.itertuples()))
    return fig, cap + "."


def over_seeds(board: pd.DataFrame):
    """Each system scored on every seed: stage 04's figure (:func:`lib.merge.figures.seeds`: one
    dot per seed, the mean and its 95% interval over seeds), experts left out, with a caption."""
    from lib.merge.figures import seeds
    from lib.core.stats import SEED_SUMMARY, per_seed_columns

    set_style()
    cols = ["system", "kind", *[c for c in SEED_SUMMARY if c in board], *per_seed_columns(board.columns)]
    ax = seeds(board.loc[board["kind"] != "expert", cols]) if "seed_mean" in board else None  # the seed table's columns
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 1))
        ax.axis("off")
        return fig, "No system has a normalised accuracy over seeds in this run (one seed only, or no expert above 0)."
    rows = board.dropna(subset=["seed_mean"]).query("kind != 'expert'").sort_values("seed_mean")
    merges = rows[rows["kind"] == "merge"]
    joint = rows[rows["system"] == "joint_total_steps"]
    cap = f"Mean over {len(per_seed_columns(rows.columns))} seeds with its 95% interval (seeds and prompts resampled)"
    if len(merges):
        m = merges.iloc[-1]
        cap += f"; the best ΔW merge, {m['system']}, {m['seed_mean']:.3f} [{m['seed_lo']:.3f}, {m['seed_hi']:.3f}]"
    if len(joint):
        j = joint.iloc[0]
        cap += f", the joint LoRA at equal total steps {j['seed_mean']:.3f} [{j['seed_lo']:.3f}, {j['seed_hi']:.3f}]"
    return ax.figure, cap + "."


def locality(loc: pd.DataFrame):
    """Accuracy of the base and of each adapter on the base corpus's own forms (stage 03)."""
    set_style()
    grid = loc.pivot(index="model", columns="form", values="accuracy")
    grid = grid.loc[["base", *[m for m in grid.index if m != "base"]]]
    fig, ax = plt.subplots(figsize=(1 + 0.8 * grid.shape[1], 0.5 + 0.45 * len(grid)))
    sns.heatmap(grid, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="viridis", cbar=False, ax=ax)
    ax.set_title("Locality: accuracy on the base corpus's forms (stage 03)")
    change = loc[loc["model"] != "base"].groupby("model")["change"].mean()
    worst = change.abs().idxmax()
    return fig, (f"Mean change from the base over these forms: {change.min():+.3f} to {change.max():+.3f} "
                 f"(largest |change|: {worst}); near 0 means an adapter leaves what the base does elsewhere alone.")


def recipes(rec: pd.DataFrame):
    """Every recorded testbed recipe: its worst expert against its best merge (docs/mergeability_recipes.csv)."""
    set_style()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sns.scatterplot(rec, x="best_merge_norm_acc", y="expert_own_min", hue="synthesize.corpus_skill_fraction",
                    style="experts.rank", s=70, palette="viridis", ax=ax)
    ax.axhline(0.9, ls="--", c="grey", lw=1)
    ax.axvline(0.6, ls="--", c="grey", lw=1)
    ax.set(xlabel="best merge: normalised accuracy", ylabel="worst expert on its own skill", xlim=(0, 1.05), ylim=(0, 1.05),
           title="Testbed recipes tried (issue 15)")
    ok = rec[(rec["expert_own_min"] >= 0.9) & (rec["best_merge_norm_acc"] >= 0.6)]
    best = rec.loc[rec["best_merge_norm_acc"].idxmax()]
    return fig, (f"{len(rec)} recipes; {len(ok)} reach both targets (experts ≥ 0.9, best merge ≥ 0.6). The best merge, "
                 f"{best['best_merge_norm_acc']:.3f}, came from: {best['note']}.")


def mastered(curves: pd.DataFrame):
    """Stage 07: mastered share of the add grid over training, per teacher, one panel per unlearnable share."""
    set_style()
    fractions = sorted(curves["fraction"].unique())
    fig, axes = plt.subplots(1, len(fractions), figsize=(5 * len(fractions), 3.4), squeeze=False, sharey=True)
    for ax, f in zip(axes[0], fractions):
        sns.lineplot(curves[curves["fraction"] == f], x="step", y="mastered", hue="teacher", marker="o", ax=ax)
        ax.set(title=f"unlearnable share {f:g}", ylabel="mastered share", ylim=(-0.02, 1.02))
    fig.tight_layout()
    last = curves[curves["step"] == curves["step"].max()]
    best = last.loc[last["mastered"].idxmax()]
    caption = (f"Mean mastered share of the task space over seeds (stage 07, curricula). The highest at the end: {best['teacher']} "
               f"with {best['mastered']:.2f} at unlearnable share {best['fraction']:g}.")
    return fig, caption
