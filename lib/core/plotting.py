"""Figures shared by the notebooks: seaborn/matplotlib, each function draws on and returns an Axes.

Functions take tables (pandas DataFrames) or results, never load files, so a notebook can
restyle or combine them; the figure is saved by the notebook that owns it.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

_STYLED = False


def set_style(**overrides) -> None:
    """Apply the workbook's seaborn theme once per process (later calls are no-ops unless overrides are given)."""
    global _STYLED
    if _STYLED and not overrides:
        return
    sns.set_theme(**{"context": "notebook", "style": "whitegrid", "palette": "colorblind", **overrides})
    _STYLED = True


def reliability_diagram(table_or_result, ax=None, title: str | None = None, n_bins: int | None = None):
    """Accuracy per equal-width confidence bin against the diagonal of perfect calibration.

    ``table_or_result``: a table from ``lib.core.evaluation.reliability_table`` (columns
    ``bin_low, bin_high, confidence, accuracy, count``) or an ``EvalResult`` (binned with
    ``n_bins``, default its own; its ECE goes in the legend title). Bars are accuracy per
    bin; the hatched gap up or down to each bin's mean confidence is the miscalibration
    that ECE weighs by bin size. Empty bins are left blank. Returns the Axes.
    """
    ece = None
    if isinstance(table_or_result, pd.DataFrame):
        table = table_or_result
    elif hasattr(table_or_result, "examples"):  # an EvalResult
        from lib.core.evaluation import expected_calibration_error, reliability_table

        ex = table_or_result.examples
        bins = n_bins or getattr(table_or_result, "n_bins", 10)
        table = reliability_table(ex["confidence"], ex["correct"], bins)
        ece = expected_calibration_error(ex["confidence"], ex["correct"], bins)
    else:
        raise TypeError(f"reliability_diagram needs a reliability table or an EvalResult, got {type(table_or_result).__name__}")
    missing = {"bin_low", "bin_high", "confidence", "accuracy", "count"} - set(table.columns)
    if missing:
        raise ValueError(f"reliability table lacks column(s) {sorted(missing)}")

    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    colors = sns.color_palette("colorblind")
    full = table[table["count"] > 0]
    centers = ((full["bin_low"] + full["bin_high"]) / 2).to_numpy()
    widths = (full["bin_high"] - full["bin_low"]).to_numpy() * 0.95
    acc = full["accuracy"].to_numpy(dtype=float)
    conf = full["confidence"].to_numpy(dtype=float)
    ax.bar(centers, acc, width=widths, color=colors[0], edgecolor="black", linewidth=0.5, label="accuracy")
    ax.bar(centers, conf - acc, bottom=acc, width=widths, color=colors[3], alpha=0.35, hatch="//",
           edgecolor=colors[3], linewidth=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (model's probability of its answer)")
    ax.set_ylabel("accuracy")
    ax.set_aspect("equal")
    handles, labels = ax.get_legend_handles_labels()
    n = int(table["count"].sum())
    extra = f"n = {n}" + (f", ECE = {ece:.3f}" if ece is not None and np.isfinite(ece) else "")
    ax.legend(handles, labels, loc="upper left", fontsize="small", title=extra, title_fontsize="small")
    if title:
        ax.set_title(title)
    return ax
