"""Merge method ``dare_ties``: Yu et al. 2023 (DARE) + Yadav et al. 2023 (TIES)."""
from __future__ import annotations

from typing import Sequence

import torch  # noqa: F401  (Tensor)
from peft.utils import merge_utils as mu

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import SignMethod, _check, _check_density, _check_sign_method, _quiet_full_density, dare_zero

Tensor = torch.Tensor


@MERGE_METHODS.register("dare_ties", paper='Yu et al. 2023 (DARE) + Yadav et al. 2023 (TIES)',
                        url="https://arxiv.org/abs/2311.03099", random=True)
def dare_ties(deltas: Sequence[Tensor], weights=None, *, density: float,
              majority_sign_method: SignMethod = "total") -> Tensor:
    """DARE's random drop and ``1 / (1 - p)`` rescale (Yu et al. 2023) in place of TIES' trim,
    then TIES' sign election and disjoint mean (Yadav et al. 2023). peft's
    ``merge_utils.dare_ties``; ``density = 0`` returns zeros (hand-written guard, peft gives NaN)."""
    deltas, w = _check(deltas, weights, "dare_ties")
    density = _check_density(density, "dare_ties")
    if density == 0:
        return dare_zero(deltas)
    with _quiet_full_density():
        return mu.dare_ties(deltas, w, density, _check_sign_method(majority_sign_method, "dare_ties"))
