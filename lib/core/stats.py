"""Every interval and correlation the study reports, in one place, on ``scipy.stats``.

* :func:`bootstrap_ci`: percentile bootstrap of a mean (``scipy.stats.bootstrap``), for
  accuracies over examples and means over skills.
* :func:`macro_ci`: the mean over skills of per-skill accuracy (optionally normalised by a
  reference per skill), with a bootstrap that resamples examples *within* each skill
  (``scipy.stats.bootstrap`` over one sample per skill, so every replicate keeps every skill).
* :func:`seed_macro_ci`: the same normalised mean over several seeds (independent trainings),
  with a two-stage bootstrap: seeds resampled with replacement, then examples within each
  skill of each drawn seed, so seed-to-seed variation is inside the interval.
* :func:`t_interval`: Student-t interval over runs or seeds (``scipy.stats.t``).
* :func:`spearman` (``scipy.stats.spearmanr``) and :func:`mantel_spearman`, Spearman's ρ
  between two skill-by-skill matrices with a bootstrap over pairs and a Mantel permutation
  p-value. The Mantel test is hand-written: scipy has none, and pairs of skills share
  skills, so the permutation has to move skill labels, not pairs.

Seeds are explicit everywhere (``numpy.random.default_rng(seed)``): the same data and seed
give the same interval.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.asarray([v for v in np.asarray(values, dtype=object).ravel()
                       if v is not None and np.isfinite(float(v))], dtype=np.float64)


def _check(alpha: float, n_boot: int) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")


def _percentile_bootstrap(samples: list[np.ndarray], statistic, n_boot: int, alpha: float, seed: int) -> tuple[float, float]:
    """(low, high): the ``alpha/2`` and ``1 - alpha/2`` quantiles (numpy's linear rule) of
    ``scipy.stats.bootstrap``'s resampling distribution of ``statistic``; each sample is
    resampled on its own, in order, from one ``default_rng(seed)``. A sample of one
    observation is constant under resampling (scipy needs two), so it is held fixed."""
    varying = [i for i, s in enumerate(samples) if s.size >= 2]
    if not varying:
        v = float(statistic(*[s[None, :] for s in samples], axis=-1)[0])
        return v, v

    def stat(*xs, axis=-1):
        full = [s[None, :] for s in samples]
        for i, x in zip(varying, xs):
            full[i] = x
        shape = xs[0].shape[:-1]
        return statistic(*[np.broadcast_to(f, (*shape, f.shape[-1])) for f in full], axis=axis)

    res = stats.bootstrap([samples[i] for i in varying], stat, n_resamples=n_boot, method="percentile",
                          vectorized=True, rng=np.random.default_rng(seed))
    lo, hi = np.quantile(res.bootstrap_distribution, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float] | np.ndarray, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: percentile bootstrap interval of the mean of ``values`` (0/1 per
    example for an accuracy), ``n_boot`` resamples drawn from ``default_rng(seed)``."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    _check(alpha, n_boot)
    lo, hi = _percentile_bootstrap([x], np.mean, n_boot, alpha, seed)
    return float(x.mean()), lo, hi


def mean_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``{"mean", "lo", "hi", "n"}``: :func:`bootstrap_ci` of the finite values (None and NaN
    dropped); all NaN when none is left."""
    x = _finite(values)
    if x.size == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean, lo, hi = bootstrap_ci(x, n_boot=n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi, "n": int(x.size)}


def macro_ci(examples: pd.DataFrame, reference: Mapping[str, float] | None = None, n_boot: int = 1000,
             alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """Mean over skills of per-skill accuracy (``examples``: columns ``skill`` and ``correct``),
    each divided by ``reference[skill]`` when given (normalised accuracy), with a percentile
    bootstrap that resamples examples within each skill. References are treated as fixed;
    skills whose reference is 0 or missing are left out of the normalised mean."""
    _check(alpha, n_boot)
    samples, denoms = [], []
    for skill, g in examples.groupby("skill", sort=True):
        denom = 1.0 if reference is None else reference.get(skill, np.nan)
        if not denom or np.isnan(denom):
            continue
        samples.append(g["correct"].to_numpy(dtype=float))
        denoms.append(float(denom))
    if not samples:
        return float("nan"), float("nan"), float("nan")
    d = np.asarray(denoms)

    def statistic(*xs, axis=-1):
        return np.mean([x.mean(axis=axis) / di for x, di in zip(xs, d)], axis=0)

    point = float(np.mean([s.mean() / di for s, di in zip(samples, d)]))
    lo, hi = _percentile_bootstrap(samples, statistic, n_boot, alpha, seed)
    return point, lo, hi


def _macro_draws(examples: pd.DataFrame, reference: Mapping[str, float] | None, n_boot: int,
                 rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """(point, n_boot resampled values) of :func:`macro_ci`'s statistic, examples resampled
    within each skill; (nan, empty) when no skill has a usable reference."""
    point_parts, draw_parts = [], []
    for skill, g in examples.groupby("skill", sort=True):
        denom = 1.0 if reference is None else reference.get(skill, np.nan)
        if not denom or np.isnan(denom):
            continue
        x = g["correct"].to_numpy(dtype=float)
        point_parts.append(x.mean() / denom)
        draw_parts.append(x[rng.integers(0, x.size, (n_boot, x.size))].mean(axis=1) / denom)
    if not point_parts:
        return float("nan"), np.empty(0)
    return float(np.mean(point_parts)), np.mean(draw_parts, axis=0)


def seed_macro_ci(examples_by_seed: Sequence[pd.DataFrame], references: Sequence[Mapping[str, float] | None] | None = None,
                  n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """``{"mean", "lo", "hi", "n", "per_seed"}``: the mean over seeds of each seed's (normalised)
    macro accuracy, and a two-stage percentile bootstrap: each replicate draws the seeds with
    replacement, then one within-skill resample of each drawn seed's examples. With one seed
    it is :func:`macro_ci`'s interval; with several, a seed far from the others widens it (a
    bootstrap over prompts alone would not see it). ``references[i]``: seed i's denominators
    (its own experts' accuracy). A seed with no usable reference is left out (``per_seed``
    shows None for it); none left: mean, lo and hi are None."""
    _check(alpha, n_boot)
    refs = list(references) if references is not None else [None] * len(examples_by_seed)
    if len(refs) != len(examples_by_seed):
        raise ValueError(f"{len(examples_by_seed)} seeds of examples but {len(refs)} references")
    rng = np.random.default_rng(seed)
    per_seed, draws = [], []
    for ex, ref in zip(examples_by_seed, refs):
        point, d = _macro_draws(ex, ref, n_boot, rng)
        per_seed.append(point if np.isfinite(point) else None)
        if np.isfinite(point):
            draws.append(d)
    if not draws:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "per_seed": per_seed}
    D = np.stack(draws)
    k = len(draws)
    boot = D[rng.integers(0, k, (n_boot, k)), rng.integers(0, n_boot, (n_boot, k))].mean(axis=1)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    mean = float(np.mean([p for p in per_seed if p is not None]))
    return {"mean": mean, "lo": float(min(lo, mean)), "hi": float(max(hi, mean)), "n": k, "per_seed": per_seed}


# A table of systems over seeds (stage 04's leaderboard): these summary columns of
# :func:`seed_macro_ci`, and one ``seed_<k>`` column per seed.
SEED_SUMMARY = ("n_seeds", "seed_mean", "seed_lo", "seed_hi")


def per_seed_columns(columns) -> list[str]:
    """The one-value-per-seed columns (``seed_<k>``) of such a table."""
    return [c for c in columns if c.startswith("seed_") and c not in SEED_SUMMARY]


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """``{"mean", "lo", "hi", "n"}``: Student-t interval of the mean over runs (None and NaN
    dropped; lo = hi = mean for one run; all None for none)."""
    x = _finite(values)
    if x.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(x.mean())
    if x.size == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "n": 1}
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(x.size)}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ (``scipy.stats.spearmanr``); NaN for fewer than 3 points or a constant side."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def mantel_spearman(a: pd.DataFrame, b: pd.DataFrame, n_boot: int = 1000, n_perm: int = 1000,
                    seed: int = 0) -> dict[str, Any]:
    """Spearman's ρ between the upper triangles of two square skill-by-skill matrices (``b``
    symmetrised), a 95% percentile bootstrap interval over skill pairs, and a two-sided
    Mantel p-value: ``b``'s skill labels permuted ``n_perm`` times."""
    skills = [s for s in a.index if s in b.index]
    A = a.loc[skills, skills].to_numpy(float)
    B = b.loc[skills, skills].to_numpy(float)
    B = (B + B.T) / 2
    iu = np.triu_indices(len(skills), 1)
    x, y = A[iu], B[iu]
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    r = spearman(x, y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(x), len(x))
        v = spearman(x[idx], y[idx])
        if np.isfinite(v):
            boots.append(v)
    lo, hi = (np.quantile(boots, [0.025, 0.975]) if boots else (float("nan"), float("nan")))
    hits = 0
    for _ in range(n_perm):
        p = rng.permutation(len(skills))
        v = spearman(x, B[np.ix_(p, p)][iu][ok])
        if np.isfinite(v) and np.isfinite(r) and abs(v) >= abs(r) - 1e-12:
            hits += 1
    return {"r": r, "lo": float(lo), "hi": float(hi), "n_pairs": int(len(x)),
            "p_permutation": (hits + 1) / (n_perm + 1) if np.isfinite(r) else float("nan"),
            "method": "spearman over skill pairs; 95% CI: bootstrap over pairs; p: Mantel permutation of skill labels"}
