"""Merge method ``task_arithmetic``: Ilharco et al. 2023, "Editing models with task arithmetic"."""
from __future__ import annotations

from typing import Sequence

import torch  # noqa: F401  (Tensor)

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import _check, weighted_sum

Tensor = torch.Tensor


@MERGE_METHODS.register("task_arithmetic", paper='Ilharco et al. 2023, "Editing models with task arithmetic"',
                        url="https://arxiv.org/abs/2212.04089")
def task_arithmetic(deltas: Sequence[Tensor], weights=None, *, lam: float = 1.0) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic"):
    ``λ · Σ_i w_i ΔW_i`` (weights default to 1): peft's ``merge_utils.task_arithmetic``, one
    expert at a time (:func:`~lib.merge.methods._checks.weighted_sum`, bit-equal)."""
    deltas, w = _check(deltas, weights, "task_arithmetic")
    return weighted_sum(deltas, w * float(lam))
