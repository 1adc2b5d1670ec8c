"""Merge method ``ties``: Yadav et al. 2023, "TIES-Merging: Resolving interference when merging models"."""
from __future__ import annotations

from typing import Sequence

import torch  # noqa: F401  (Tensor)
from peft.utils import merge_utils as mu

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import SignMethod, _check, _check_density, _check_sign_method, _quiet_full_density

Tensor = torch.Tensor


@MERGE_METHODS.register("ties", paper='Yadav et al. 2023, "TIES-Merging: Resolving interference when merging models"',
                        url="https://arxiv.org/abs/2306.01708")
def ties(deltas: Sequence[Tensor], weights=None, *, density: float,
         majority_sign_method: SignMethod = "total") -> Tensor:
    """TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving interference when merging models").

    1. Trim: keep each ΔW_i's top ``density`` fraction of entries by magnitude (``τ̂_i``).
    2. Elect sign per entry: ``γ = sgn(Σ_i τ̂_i)`` (``"total"``, the paper's rule) or the sign
       held by more experts (``"frequency"``); a tie (sum 0) elects ``+``.
    3. Disjoint mean per entry over the experts whose trimmed entry has sign ``γ``:
       ``Σ_{i: sgn τ̂_i = γ} w_i τ̂_i / |{i: sgn τ̂_i = γ}|``; zero agreeing experts gives 0
       (trimmed zeros have sign 0 and never agree).

    All three steps are peft's ``merge_utils.ties`` (prune, calculate_majority_sign_mask,
    disjoint_merge). In peft the sign is elected from the *unweighted* trimmed tensors, and
    the weights scale the values inside the disjoint mean (the paper's λ is a common weight).
    ``density = 0`` trims everything and gives a zero update; one expert gives its trimmed self.
    """
    deltas, w = _check(deltas, weights, "ties")
    density = _check_density(density, "ties")
    with _quiet_full_density():
        return mu.ties(deltas, w, density, _check_sign_method(majority_sign_method, "ties"))
