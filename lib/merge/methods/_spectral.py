"""Helpers of the spectral merges (``iso_c``, ``tsv_m``): the SVD of a low-rank update, cut at
its numerical rank.

Why the cut: the papers (Marczak et al. 2025; Gargiulo et al. 2025) and FusionBench's code
take the SVD over the whole ``min(m, n)`` spectrum of updates that are full rank after full
fine-tuning. A LoRA expert's ΔW has rank ``r`` (2 by default), so past ``r`` its singular
values are zero and its singular vectors are *any* orthonormal completion of the null space,
chosen by the LAPACK routine. Iso-C would spread the mean singular value over those arbitrary
directions and TSV-M would rotate the kept ones by them. Keeping only the components above
``max(m, n) · eps · σ_max`` (numpy's ``matrix_rank`` tolerance), with ``eps`` of the
*input's* dtype, removes that arbitrariness and changes nothing for a full-rank update. (The
SVD itself runs in float64, but a ΔW = B·A computed in float32 has rounding-level singular
values near 1e-7·σ_max past its rank: float64's eps would keep them all.)
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def numerical_rank(s: Tensor, shape: tuple[int, ...], eps: float) -> int:
    """How many of the descending singular values ``s`` are above ``max(shape) · eps · s[0]``."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > max(shape) * eps * float(s[0])).sum())


def svd_cut(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, Vh)`` of the 2-D ``x``, computed in float64 and kept to its numerical rank at
    ``x``'s own precision."""
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    k = numerical_rank(s, tuple(x.shape), torch.finfo(x.dtype if x.dtype.is_floating_point else torch.float32).eps)
    return u[:, :k], s[:k], vh[:k]


def orthonormalise(a: Tensor) -> Tensor:
    """The orthonormal matrix nearest ``a`` in Frobenius norm (orthogonal Procrustes:
    ``P Qᵀ`` for ``a = P Σ Qᵀ``); columns that are already orthonormal stay as they are."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def weighted_mean(deltas: list[Tensor], w: Tensor) -> Tensor:
    """``Σ w_i ΔW_i / N``: what both methods do with a tensor that is not a matrix (as the
    references do with biases and norms)."""
    return sum(wi * d for wi, d in zip(w, deltas)) / len(deltas)
