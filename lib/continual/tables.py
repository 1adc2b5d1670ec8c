"""Notebook 05's tables and its closing summary, read from the stage's results.

Inputs are what :mod:`lib.continual.study` returns (``metrics`` from ``summarize``, the
runs table, the switch table, the runs themselves). These describe the numbers; no claim
is judged here (every claim is judged once, in ``lib/report/claims.py``).
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from lib.continual import study as C
from lib.continual.runs import RunResult


def orders_table(orders: dict[str, list[str]]) -> pd.DataFrame:
    """One row per order, one column per task position."""
    n = len(next(iter(orders.values()))) if orders else 0
    return pd.DataFrame(orders, index=[f"task {i + 1}" for i in range(n)]).T


def interval(v: dict) -> str:
    """``mean [lo, hi]`` of a :func:`lib.core.stats.t_interval` dict ('' without a mean)."""
    return f"{v['mean']:+.3f} [{v['lo']:+.2f}, {v['hi']:+.2f}]" if v["mean"] is not None else ""


def strategy_table(metrics: dict) -> pd.DataFrame:
    """Per strategy: ACC, BWT, FWT and forgetting with their intervals, and the costs (with
    the parameters held as fp32 megabytes)."""
    return pd.DataFrame([{"strategy": s, **{m: interval(v[m]) for m in C.METRICS},
                          "trainable_params": v["trainable_params"], "params_held": v["params_held"],
                          "held_MB (fp32)": round(v["params_held"] * 4 / 2**20, 2), "wall_s": v["wall_s"]}
                         for s, v in metrics["strategies"].items()]).set_index("strategy")


def gap_table(metrics: dict) -> pd.DataFrame:
    """Per strategy with a curve: depth, recovery and minimum after a switch, with intervals."""
    return pd.DataFrame([{"strategy": s, **{k: interval(v[k]) for k in C.GAP}}
                         for s, v in metrics["stability_gap"].items()]).set_index("strategy")


def per_switch_table(switches: pd.DataFrame) -> pd.DataFrame:
    """The minimum just after each switch, per strategy and order (mean over seeds and the
    skills learned before the switch)."""
    return (switches.groupby(["strategy", "order", "switch"]).min_after.mean().unstack("switch")
            .rename(columns=lambda t: f"switch to task {t}"))


def _by_order(runs: pd.DataFrame, orders: dict) -> pd.DataFrame:
    by_order = runs.groupby(["strategy", "order"])[["ACC", "BWT"]].mean().unstack("order")
    if {"alternating", "grouped"} <= set(orders):
        for m in ("ACC", "BWT"):
            by_order[(m, "alternating − grouped")] = by_order[(m, "alternating")] - by_order[(m, "grouped")]
    return by_order


def order_table(runs: pd.DataFrame, orders: dict, strategies: Sequence[str]) -> pd.DataFrame:
    """ACC and BWT per order (mean over seeds), and alternating − grouped when both ran;
    strategies in ``strategies``' order."""
    by_order = _by_order(runs, orders)
    return by_order.loc[[s for s in strategies if s in by_order.index]]


def findings(metrics: dict, results: Sequence[RunResult], runs: pd.DataFrame, c, orders: dict) -> str:
    """The notebook's closing summary (markdown bullets): the strategy that forgot most, the
    final accuracies, what not forgetting cost against sequential LoRA, which skills forgot,
    each regularizer's BWT change, the stability gap, and the effect of the order."""
    st = metrics["strategies"]
    acc_ = {s: v["ACC"]["mean"] for s, v in st.items()}
    bwt_ = {s: v["BWT"]["mean"] for s, v in st.items()}
    worst = min(bwt_, key=bwt_.get)
    best = metrics["best_strategy"]
    lines = [f"- **Most forgetting**: `{worst}`, BWT {bwt_[worst]:+.3f} (forgetting {st[worst]['forgetting']['mean']:.3f}): "
             f"its final model keeps on average {st[worst]['ACC']['mean']:.3f} accuracy over the {len(c.tasks)} skills."]
    ranked = sorted((s for s in st if s != "multitask"), key=lambda s: -acc_[s])
    lines.append("- **Final accuracy (ACC), best first**: " + ", ".join(f"`{s}` {acc_[s]:.3f}" for s in ranked)
                 + (f"; the multitask upper bound reaches {acc_['multitask']:.3f}." if "multitask" in acc_ else "."))
    if "sequential_lora" in st and best != "sequential_lora":
        ref = st["sequential_lora"]
        steps_best = next((sum(r.info["expert_steps"]) for r in results if r.strategy == best and "expert_steps" in r.info),
                          None)
        steps_note = (f" (its experts were trained in stage 03 for {steps_best:,} steps in all, with early stopping, "
                      f"against {c.steps_per_task * len(c.tasks):,} for a sequential run)" if steps_best else "")
        lines.append(f"- **Cost of not forgetting**: `{best}` (best ACC without multitask) holds {st[best]['params_held']:,} "
                     f"parameters and took {st[best]['wall_s']:.1f} s to learn the sequence{steps_note}, against "
                     f"{ref['params_held']:,} and {ref['wall_s']:.1f} s for `sequential_lora`, for ACC {acc_[best]:.3f} "
                     f"instead of {acc_['sequential_lora']:.3f}.")
    per_skill = pd.DataFrame([{"strategy": r.strategy, "skill": sk, "forgetting": f} for r in results
                              if r.strategy in C.CURVE_STRATEGIES for sk, f in zip(r.skills, C.forgetting_per_task(r.R))])
    if len(per_skill):
        fs = per_skill.groupby("skill").forgetting.mean().sort_values(ascending=False)
        lines.append("- **Which skills forgot** (mean forgetting_j over the strategies that train one model and their "
                     "runs, when the skill was not the last task): " + ", ".join(f"`{k}` {v:.3f}" for k, v in fs.items())
                     + ".")
    regs = [s for s in ("ewc", "l2", "olora", "replay") if s in st and "sequential_lora" in st]
    if regs:
        lines.append("- **Against plain sequential LoRA** (BWT change): " + ", ".join(
            f"`{s}` {bwt_[s] - bwt_['sequential_lora']:+.3f}" for s in regs) + ".")
    if metrics["stability_gap"]:
        depth = {s: v["depth"]["mean"] for s, v in metrics["stability_gap"].items()}
        deep = max(depth, key=depth.get)
        lines.append(f"- **Stability gap**: deepest for `{deep}` (old skills drop {depth[deep]:.3f} on average in the "
                     f"first {c.gap_window:.0%} of a new task, recovering "
                     f"{metrics['stability_gap'][deep]['recovery']['mean']:+.3f} by its end); "
                     f"shallowest for `{min(depth, key=depth.get)}` ({min(depth.values()):.3f}).")
    if {"alternating", "grouped"} <= set(orders):
        diff = _by_order(runs, orders)[("ACC", "alternating − grouped")]
        big = diff.abs().idxmax()
        lines.append(f"- **Order**: the largest ACC difference between orders is for `{big}` (alternating − grouped = "
                     f"{diff[big]:+.3f}); over all strategies the mean difference is {diff.mean():+.3f}.")
    return "\n".join(lines)


def headline(metrics: dict) -> dict:
    """ACC and BWT (means, 3 decimals) per strategy."""
    return {s: {"ACC": round(v["ACC"]["mean"], 3), "BWT": round(v["BWT"]["mean"], 3)}
            for s, v in metrics["strategies"].items()}
