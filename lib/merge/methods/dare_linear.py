"""Merge method ``dare_linear``: Yu et al. 2023, "Language models are Super Mario" (DARE)."""
from __future__ import annotations

from typing import Sequence

import torch  # noqa: F401  (Tensor)
from peft.utils import merge_utils as mu

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import _check, _check_density, _quiet_full_density, dare_zero

Tensor = torch.Tensor


@MERGE_METHODS.register("dare_linear", paper='Yu et al. 2023, "Language models are Super Mario" (DARE)',
                        url="https://arxiv.org/abs/2311.03099", random=True)
def dare_linear(deltas: Sequence[Tensor], weights=None, *, density: float) -> Tensor:
    """DARE (Yu et al. 2023, "Language models are Super Mario"), then a weighted sum.

    Drop: each entry of each ΔW_i is kept with probability ``density = 1 - p`` (Bernoulli) and
    the kept ones are rescaled by ``1 / (1 - p)``, so ``E[DARE(ΔW)] = ΔW``. Then
    ``Σ_i w_i DARE(ΔW_i)``. peft's ``merge_utils.dare_linear`` (``random_pruning`` draws from
    torch's global RNG: seed it, or use :func:`merge_task_vectors` with ``seed``).
    Hand-written guard: ``density = 0`` drops everything and returns zeros (peft would
    compute ``0 / 0 = NaN``).
    """
    deltas, w = _check(deltas, weights, "dare_linear")
    density = _check_density(density, "dare_linear")
    if density == 0:
        return dare_zero(deltas)
    with _quiet_full_density():
        return mu.dare_linear(deltas, w, density)
