"""Merge method ``linear``: Wortsman et al. 2022, "Model soups"."""
from __future__ import annotations

from typing import Sequence

import torch  # noqa: F401  (Tensor)

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import MergeError, _check, weighted_sum

Tensor = torch.Tensor


@MERGE_METHODS.register("linear", paper='Wortsman et al. 2022, "Model soups"',
                        url="https://arxiv.org/abs/2203.05482")
def linear(deltas: Sequence[Tensor], weights=None) -> Tensor:
    """Weighted average ``Σ_i w_i ΔW_i / Σ_i w_i`` (equal weights: the plain mean).

    peft's ``merge_utils.task_arithmetic`` with the normalised weights (accumulated one expert
    at a time, bit-equal: :func:`~lib.merge.methods._checks.weighted_sum`). Note that peft's
    ``add_weighted_adapter(combination_type="linear")`` does *not* normalise the weights.
    """
    deltas, w = _check(deltas, weights, "linear")
    total = w.sum()
    if total == 0:
        raise MergeError(f"linear: weights sum to 0 ({w.tolist()}); a weighted average is undefined")
    return weighted_sum(deltas, w / total)
