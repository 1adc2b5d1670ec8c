"""Merge method ``iso_c``: Marczak et al. 2025, "No task left behind: isotropic model merging with common and task-specific subspaces"."""
from __future__ import annotations

from typing import Sequence

import torch

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import _check
from lib.merge.methods._spectral import svd_cut, weighted_mean

Tensor = torch.Tensor


@MERGE_METHODS.register("iso_c", paper='Marczak et al. 2025, "No task left behind: isotropic model merging with '
                        'common and task-specific subspaces" (Iso-C)', url="https://arxiv.org/abs/2502.04959")
def iso_c(deltas: Sequence[Tensor], weights=None) -> Tensor:
    """Iso-C: the task-arithmetic sum ``M = Σ_i w_i ΔW_i`` with its singular spectrum made
    flat, ``σ̄ · U Vᵀ`` where ``M = U Σ Vᵀ`` and ``σ̄`` is the mean singular value.

    The spectrum is cut at M's numerical rank (``lib.merge.methods._spectral``): for a
    full-rank M this is the paper's (and FusionBench's ``iso_c``) formula; for a sum of LoRA
    updates it keeps σ̄ off the null space, whose singular vectors are arbitrary. The weights
    are the paper's scaling factor when equal (``[λ] · N`` scales the result by λ); a tensor
    that is not a matrix gets the weighted mean.
    """
    deltas, w = _check(deltas, weights, "iso_c")
    if deltas[0].dim() != 2:
        return weighted_mean(deltas, w)
    m = sum(wi * d for wi, d in zip(w, deltas))
    u, s, vh = svd_cut(m)
    if s.numel() == 0:
        return torch.zeros_like(deltas[0])
    return (s.mean() * (u @ vh)).to(deltas[0].dtype)
