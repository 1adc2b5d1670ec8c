"""Merge method ``iso_cts``: Marczak et al. 2025, "No task left behind: isotropic model merging with common and task-specific subspaces" (Iso-CTS)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import MergeError, _check
from lib.merge.methods._spectral import orthonormalise, svd_cut, weighted_mean

Tensor = torch.Tensor


@MERGE_METHODS.register("iso_cts", paper='Marczak et al. 2025, "No task left behind: isotropic model merging with '
                        'common and task-specific subspaces" (Iso-CTS)', url="https://arxiv.org/abs/2502.04959")
def iso_cts(deltas: Sequence[Tensor], weights=None, *, common_space_fraction: float) -> Tensor:
    """Iso-CTS, per matrix, with ``M = Σ_i w_i ΔW_i`` of numerical rank ``r``:

    1. common subspace: M's top ``k_c`` singular triplets, where the ``r − k_c`` directions
       left are shared equally by the tasks, ``s = round((r − ⌊f · r⌋) / T)``, ``k_c = r − T·s``;
    2. task-specific subspaces: each ``w_i ΔW_i`` with the common left subspace projected out,
       ``(I − U_c U_cᵀ) w_i ΔW_i``, kept to its top ``s`` triplets;
    3. the common and task-specific U (and V) stacked, made orthonormal (orthogonal
       Procrustes), and every singular value set to the mean of the stacked ones:
       ``σ̄ · U⊥ V⊥ᵀ``.

    This is the paper's algorithm (and FusionBench 0.2.33's ``iso_cts``) with one change
    of convention, measured in ``bench.reference_merges``: the fraction ``f`` applies to M's
    numerical rank ``r`` instead of ``min(m, n)``. For full-rank updates the two are the
    same. For a sum of LoRA updates (rank ≤ Σ r_i) the paper's common subspace of
    ``f · min(m, n)`` directions already holds every task's column space, so the
    task-specific part would be empty and Iso-CTS would be Iso-C with arbitrary
    null-space directions added; counted on ``r``, a share ``1 − f`` of the meaningful
    directions goes to the tasks, as the paper intends. ``s = 0`` gives Iso-C.
    """
    deltas, w = _check(deltas, weights, "iso_cts")
    if not 0 <= common_space_fraction <= 1 or math.isnan(common_space_fraction):
        raise MergeError(f"iso_cts: common_space_fraction must be in [0, 1], got {common_space_fraction!r}")
    if deltas[0].dim() != 2:
        return weighted_mean(deltas, w)
    scaled = [(wi * d).double() for wi, d in zip(w, deltas)]
    u, s, vh = svd_cut(sum(scaled).to(deltas[0].dtype))
    r, t = s.numel(), len(deltas)
    if r == 0:
        return torch.zeros_like(deltas[0])
    per_task = round((r - math.floor(common_space_fraction * r)) / t)
    k_c = max(0, r - t * per_task)
    us, ss, vhs = [u[:, :k_c]], [s[:k_c]], [vh[:k_c]]
    for d in scaled:
        if per_task == 0:
            break
        tu, ts, tvh = svd_cut((d - u[:, :k_c] @ (u[:, :k_c].T @ d)).to(deltas[0].dtype))
        us.append(tu[:, :per_task]), ss.append(ts[:per_task]), vhs.append(tvh[:per_task])
    big_u, sig, big_vh = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)
    if sig.numel() == 0:
        return torch.zeros_like(deltas[0])
    out = sig.mean() * orthonormalise(big_u) @ orthonormalise(big_vh.T).T
    return out.to(deltas[0].dtype)
