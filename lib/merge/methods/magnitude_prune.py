"""Merge method ``magnitude_prune``: Yadav et al. 2023 (the TIES trim step alone)."""
from __future__ import annotations

from typing import Sequence

import torch  # noqa: F401  (Tensor)
from peft.utils import merge_utils as mu

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import _check, _check_density, _quiet_full_density

Tensor = torch.Tensor


@MERGE_METHODS.register("magnitude_prune", paper='Yadav et al. 2023 (the TIES trim step alone)',
                        url="https://arxiv.org/abs/2306.01708")
def magnitude_prune(deltas: Sequence[Tensor], weights=None, *, density: float) -> Tensor:
    """Keep each ΔW_i's top ``density`` fraction by magnitude (TIES' trim step alone, no sign
    election), then ``Σ_i w_i prune(ΔW_i)``. peft's ``merge_utils.magnitude_prune``."""
    deltas, w = _check(deltas, weights, "magnitude_prune")
    density = _check_density(density, "magnitude_prune")
    with _quiet_full_density():
        return mu.magnitude_prune(deltas, w, density)
