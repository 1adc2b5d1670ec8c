"""Merge method ``tsv_m``: Gargiulo et al. 2025, "Task singular vectors: reducing task interference in model merging"."""
from __future__ import annotations

from typing import Sequence

import torch

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import _check
from lib.merge.methods._spectral import orthonormalise, svd_cut, weighted_mean

Tensor = torch.Tensor


@MERGE_METHODS.register("tsv_m", paper='Gargiulo et al. 2025, "Task singular vectors: reducing task interference in '
                        'model merging" (TSV-M)', url="https://arxiv.org/abs/2412.00081")
def tsv_m(deltas: Sequence[Tensor], weights=None) -> Tensor:
    """TSV-M, per matrix:

    1. each task's ``w_i ΔW_i = U_i Σ_i V_iᵀ``, kept to its top ``k = ⌊min(m, n) / T⌋``
       components (at least 1; never more than its numerical rank, see below);
    2. the kept ``U_i``, ``Σ_i``, ``V_i`` stacked side by side (``U``, ``Σ``, ``V``);
    3. ``U`` and ``V`` decorrelated by orthogonal Procrustes (the nearest orthonormal
       matrices, ``U⊥ = P Qᵀ`` for ``U = P S Qᵀ``), as the paper and FusionBench's
       ``compute_and_sum_svd_mem_reduction`` do;
    4. ``U⊥ Σ V⊥ᵀ``.

    Each task's spectrum is cut at its numerical rank (``lib.merge.methods._spectral``): a
    rank-2 LoRA update has 2 meaningful singular directions, and the arbitrary null-space
    vectors past them would otherwise enter the Procrustes step and rotate the kept ones. For
    full-rank updates this is the reference's formula. When the tasks' subspaces are already
    orthogonal, TSV-M is the sum of the truncated updates. The weights are the paper's α
    when equal; a tensor that is not a matrix gets the weighted mean.
    """
    deltas, w = _check(deltas, weights, "tsv_m")
    if deltas[0].dim() != 2:
        return weighted_mean(deltas, w)
    k = max(1, min(deltas[0].shape) // len(deltas))
    parts = [svd_cut(wi * d) for wi, d in zip(w, deltas)]
    parts = [(u[:, :k], s[:k], vh[:k]) for u, s, vh in parts if s.numel()]
    if not parts:
        return torch.zeros_like(deltas[0])
    u = torch.cat([p[0] for p in parts], dim=1)
    s = torch.cat([p[1] for p in parts])
    vh = torch.cat([p[2] for p in parts], dim=0)
    out = orthonormalise(u) @ torch.diag(s) @ orthonormalise(vh.T).T
    return out.to(deltas[0].dtype)
