"""Merge method ``breadcrumbs``: Davari & Belilovsky 2023, "Model Breadcrumbs"."""
from __future__ import annotations

from typing import Sequence

import torch

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import MergeError, _check, _check_density, _n_kept, weighted_sum

Tensor = torch.Tensor


def breadcrumbs_mask(delta: Tensor, *, density: float, beta: float) -> Tensor:
    """Boolean mask of Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: scaling
    multi-task model merging with sparse masks"): rank the entries by magnitude, drop the
    largest ``floor(beta · n)`` (outliers) and keep the next ``floor(density · n)``, so the
    smallest ``n - top - kept`` are dropped too. Equal magnitudes are ranked by position.
    Hand-written (peft has no breadcrumbs); needs ``beta + density <= 1``."""
    density = _check_density(density, "breadcrumbs")
    if beta is None or not (0.0 <= float(beta) <= 1.0):
        raise MergeError(f"breadcrumbs: beta is the fraction of largest entries dropped and must be in [0, 1], got {beta!r}")
    if float(beta) + density > 1.0 + 1e-9:
        raise MergeError(f"breadcrumbs: beta + density must be <= 1 (drop the top beta, keep the next density); "
                         f"got beta={beta}, density={density}")
    flat = delta.reshape(-1)
    n = flat.numel()
    n_top, n_keep = _n_kept(float(beta), n), _n_kept(density, n)
    n_keep = min(n_keep, n - n_top)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_top:n_top + n_keep]] = True
    return mask.reshape(delta.shape)


@MERGE_METHODS.register("breadcrumbs", paper='Davari & Belilovsky 2023, "Model Breadcrumbs"',
                        url="https://arxiv.org/abs/2312.06795")
def breadcrumbs(deltas: Sequence[Tensor], weights=None, *, density: float, beta: float) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): per expert and module, mask out the largest
    ``beta`` fraction by magnitude and the smallest so that ``density`` remain
    (:func:`breadcrumbs_mask`, hand-written), then ``Σ_i w_i (m_i ⊙ ΔW_i)`` (as peft's
    ``merge_utils.task_arithmetic``, bit-equal; the paper's α is a common weight)."""
    deltas, w = _check(deltas, weights, "breadcrumbs")
    masked = [d * breadcrumbs_mask(d, density=density, beta=beta) for d in deltas]
    return weighted_sum(masked, w)
