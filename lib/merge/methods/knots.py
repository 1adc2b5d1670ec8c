"""Merge methods ``knots_ties`` and ``knots_dare``: Stoica et al. 2025, "Model merging with SVD to tie the KnOTS"."""
from __future__ import annotations

from typing import Sequence

import torch
from peft.utils import merge_utils as mu

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import SignMethod, _check, _check_density, _check_sign_method, _quiet_full_density, dare_zero
from lib.merge.methods._spectral import svd_cut

Tensor = torch.Tensor
PAPER = 'Stoica et al. 2025, "Model merging with SVD to tie the KnOTS"'
URL = "https://arxiv.org/abs/2410.19735"


def align(deltas: list[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """KnOTS' alignment: the SVD of the updates side by side, ``[ΔW_1 … ΔW_T] = U Σ [V_1ᵀ … V_Tᵀ]``,
    kept to its numerical rank, so that ``ΔW_i = U Σ V_iᵀ``: every task in one shared basis
    ``U Σ``, with its own coordinates ``V_iᵀ`` (rank × n). FusionBench 0.2.33's
    ``subspace_alignment`` does the same with a fixed cut ``σ > 1e-4``; ``bench.reference_merges``
    compares the two."""
    u, s, vh = svd_cut(torch.cat(deltas, dim=1))
    return u, s, list(torch.split(vh, deltas[0].shape[1], dim=1))


def _knots(deltas: list[Tensor], w: Tensor, merge) -> Tensor:
    if deltas[0].dim() != 2:  # no basis to align a vector in: the merge itself
        return merge(deltas, w)
    u, s, coords = align(deltas)
    if s.numel() == 0:
        return torch.zeros_like(deltas[0])
    return ((u * s) @ merge([c.to(deltas[0].dtype) for c in coords], w).double()).to(deltas[0].dtype)


@MERGE_METHODS.register("knots_ties", paper=f"{PAPER} (KnOTS-TIES)", url=URL)
def knots_ties(deltas: Sequence[Tensor], weights=None, *, density: float,
               majority_sign_method: SignMethod = "total") -> Tensor:
    """KnOTS-TIES: :func:`align` the updates, merge their coordinates ``V_iᵀ`` with TIES (trim
    to ``density``, elect signs, disjoint mean; peft's ``merge_utils.ties``, as our ``ties``),
    and map back, ``U Σ V_mergedᵀ``. Aligned, the tasks' entries refer to the same directions,
    which is what TIES' entry-wise sign election assumes and LoRA updates in their own bases
    do not give. A tensor that is not a matrix is merged by TIES as it is."""
    deltas, w = _check(deltas, weights, "knots_ties")
    density = _check_density(density, "knots_ties")
    sign = _check_sign_method(majority_sign_method, "knots_ties")
    with _quiet_full_density():
        return _knots(deltas, w, lambda coords, w: mu.ties(coords, w, density, sign))


@MERGE_METHODS.register("knots_dare", paper=f"{PAPER} (KnOTS-DARE-TIES)", url=URL, random=True)
def knots_dare(deltas: Sequence[Tensor], weights=None, *, density: float,
               majority_sign_method: SignMethod = "total") -> Tensor:
    """KnOTS with DARE-TIES on the aligned coordinates (random drop to ``density`` with
    ``1 / density`` rescale, sign election, disjoint mean; peft's ``merge_utils.dare_ties``)."""
    deltas, w = _check(deltas, weights, "knots_dare")
    density = _check_density(density, "knots_dare")
    sign = _check_sign_method(majority_sign_method, "knots_dare")
    if density == 0:
        return dare_zero(deltas)
    with _quiet_full_density():
        return _knots(deltas, w, lambda coords, w: mu.dare_ties(coords, w, density, sign))
