"""Merge method ``cart``: Choi et al. 2024, "Revisiting weight averaging for model merging" (CART)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import MergeError, _check
from lib.merge.methods._spectral import svd_cut

Tensor = torch.Tensor


@MERGE_METHODS.register("cart", paper='Choi et al. 2024, "Revisiting weight averaging for model merging" (CART: '
                        'centered arithmetic with rank-reduced task vectors)', url="https://arxiv.org/abs/2412.12153")
def cart(deltas: Sequence[Tensor], weights=None, *, rank_ratio: float) -> Tensor:
    """CART: ``τ̄ + Σ_i w_i · SVD_k(ΔW_i − τ̄)`` with ``τ̄ = mean_i ΔW_i`` (the weight average,
    as an update of the base) and ``SVD_k`` the best rank-``k`` approximation,
    ``k = max(1, round(rank_ratio · r_i))``, ``r_i`` the numerical rank of ``ΔW_i − τ̄``.

    The paper's θ_avg + λ Σ_t SVD_k(θ_t − θ_avg) written in updates (θ_t = θ_0 + ΔW_t); equal
    weights ``[λ] · N`` are its λ. The centred updates sum to zero, so at full rank CART is the
    weight average whatever λ; the low-rank cut keeps each task's main directions around the
    average. The paper takes ``k`` as a share of ``min(m, n)``, the rank of a full fine-tuning
    update; for T LoRA updates of rank r the centred ones have rank at most T·r (16 here, of
    128), so that share would keep nearly all of them and CART would be the plain average (it
    scored 0.065 normalised that way on the default study's experts). Counted on the centred
    update's own rank, the two agree for full-rank updates. A tensor that is not a matrix gets
    ``τ̄ + Σ_i w_i (ΔW_i − τ̄)`` (no rank to cut).
    """
    deltas, w = _check(deltas, weights, "cart")
    if not 0 < rank_ratio <= 1 or math.isnan(rank_ratio):
        raise MergeError(f"cart: rank_ratio is the share of the rank kept and must be in (0, 1], got {rank_ratio!r}")
    mean = sum(deltas) / len(deltas)
    if deltas[0].dim() != 2:
        return mean + sum(wi * (d - mean) for wi, d in zip(w, deltas))
    out = mean.double()
    for wi, d in zip(w, deltas):
        u, s, vh = svd_cut(d - mean)
        k = max(1, round(rank_ratio * s.numel()))
        out = out + float(wi) * (u[:, :k] * s[:k]) @ vh[:k]
    return out.to(deltas[0].dtype)
