"""Pure helpers of the benchmarks: summaries over repeats, ratios, growth fits, verdicts.

No timing happens here (tests/test_bench.py checks these on synthetic numbers).
"""
from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence


def summarize(values: Sequence[float]) -> dict:
    """``{min, median, max, n, values}`` of repeated measurements (non-finite values refused)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize needs at least one value")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"summarize: non-finite value in {vals}")
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals), "values": vals}


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Element-wise ``a_i / b_i`` of measurements taken side by side (repeat i of both paths)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"ratios: {len(numerators)} numerators for {len(denominators)} denominators")
    if any(b == 0 for b in denominators):
        raise ValueError("ratios: a denominator is 0")
    return [a / b for a, b in zip(numerators, denominators)]


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """Least-squares ``y = intercept + slope · x`` and its R² (1 when every point is on the line)."""
    n = len(xs)
    if n != len(ys) or n < 2:
        raise ValueError(f"linear_fit needs two or more (x, y) pairs, got {len(xs)} x and {len(ys)} y")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("linear_fit: every x is the same")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    r2 = 1.0 if ss_tot == 0 else 1.0 - ss_res / ss_tot
    return {"slope": slope, "intercept": intercept, "r2": r2}


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Exponent ``k`` of the power law ``y ∝ x^k`` fitted in log-log space (1: linear growth)."""
    if any(x <= 0 for x in xs) or any(y <= 0 for y in ys):
        raise ValueError("loglog_slope needs positive x and y")
    return linear_fit([math.log(x) for x in xs], [math.log(y) for y in ys])["slope"]


def growth(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """How ``ys`` grows with ``xs``: the log-log exponent, a linear fit, and a one-word verdict.

    ``linear`` when a straight line explains the points (R² ≥ 0.95) and the exponent is at
    most 1.2 (a fixed cost on top of linear growth gives an exponent below 1); ``superlinear``
    when the exponent is above 1.2; ``flat`` when y barely moves (max/min < 1.5, e.g. a cost
    that does not depend on x); otherwise ``irregular`` (noisy or non-linear)."""
    fit = linear_fit(xs, ys)
    k = loglog_slope(xs, ys)
    spread = max(ys) / min(ys)
    if spread < 1.5:
        verdict = "flat"
    elif k > 1.2:
        verdict = "superlinear"
    elif fit["r2"] >= 0.95:
        verdict = "linear"
    else:
        verdict = "irregular"
    return {"exponent": k, **fit, "spread": spread, "verdict": verdict}


def verdict(value: float, target: float, higher_is_better: bool = True) -> dict:
    """Met or missed, and by how much (absolute and relative to the target)."""
    met = value >= target if higher_is_better else value <= target
    gap = (target - value) if higher_is_better else (value - target)
    return {"value": value, "target": target, "met": bool(met), "higher_is_better": higher_is_better,
            "missed_by": 0.0 if met else gap, "missed_by_rel": 0.0 if met else gap / abs(target)}


def verdict_text(v: dict, fmt: str = "{:.2f}", unit: str = "") -> str:
    op = "≥" if v["higher_is_better"] else "≤"
    target = f"{op} {fmt.format(v['target'])}{unit}"
    if v["met"]:
        return f"target {target}: **met**"
    return (f"target {target}: **missed** by {fmt.format(v['missed_by'])}{unit} "
            f"({100 * v['missed_by_rel']:.0f}% of the target)")


def fmt_summary(s: dict, fmt: str = "{:.3g}", unit: str = "") -> str:
    """``median [min, max]`` of a :func:`summarize` result."""
    return f"{fmt.format(s['median'])}{unit} [{fmt.format(s['min'])}, {fmt.format(s['max'])}]"


# --------------------------------------------------------------------------- dvc repro logs

RUNNING = re.compile(r"^Running stage '([^']+)'")
LOCKED = re.compile(r"^Updating lock file ")


def stage_spans(lines: Sequence[tuple[float, str]], end: float) -> list[dict]:
    """Per-stage wall time from a timestamped ``dvc repro`` log: ``[(t, line), ...]``.

    A stage runs from its ``Running stage 'name':`` line to the next such line (or ``end``),
    so the time includes DVC's own bookkeeping for the stage (hashing and caching outputs).
    ``ok``: DVC recorded the stage in dvc.lock (``Updating lock file``) before the next one
    started, i.e. it finished; a failed stage never gets there.
    """
    marks = [(i, t, m.group(1)) for i, (t, line) in enumerate(lines) if (m := RUNNING.match(line.strip()))]
    spans = []
    for k, (i, t, name) in enumerate(marks):
        j, stop = (marks[k + 1][0], marks[k + 1][1]) if k + 1 < len(marks) else (len(lines), end)
        ok = any(LOCKED.match(line.strip()) for _, line in lines[i:j])
        spans.append({"stage": name, "start": t, "end": stop, "wall_s": stop - t, "ok": ok})
    return spans


def replace_block(text: str, body: str, start: str = "<!-- bench:start -->", end: str = "<!-- bench:end -->") -> str:
    """``text`` with everything between the two marker lines replaced by ``body`` (markers kept)."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"markers {start!r} ... {end!r} not found in order")
    return text[: i + len(start)] + "\n" + body.strip("\n") + "\n" + text[j:]
