"""Input checks every merge method shares (hand-written: peft's merge_utils does not check).

Not a method: the registry skips modules whose names start with ``_``.
"""
from __future__ import annotations

import math
import warnings
from typing import Literal, Sequence

import torch

Tensor = torch.Tensor
SignMethod = Literal["total", "frequency"]
SIGN_METHODS = ("total", "frequency")


class MergeError(ValueError):
    """Inputs a merge cannot use (no experts, mismatched shapes, bad density...); the message says which."""


def _check(deltas: Sequence[Tensor], weights, method: str) -> tuple[list[Tensor], Tensor]:
    """Validated list of same-shape tensors (promoted to one dtype) and a weights tensor."""
    deltas = list(deltas)
    if not deltas:
        raise MergeError(f"{method}: no task vectors to merge (empty list); give at least one expert's ΔW")
    shapes = [tuple(d.shape) for d in deltas]
    if len(set(shapes)) > 1:
        raise MergeError(f"{method}: task vectors must all have one shape; got shapes {shapes}")
    devices = {d.device for d in deltas}
    if len(devices) > 1:
        raise MergeError(f"{method}: task vectors are on different devices {sorted(map(str, devices))}")
    dtype = deltas[0].dtype
    for d in deltas[1:]:
        dtype = torch.promote_types(dtype, d.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    deltas = [d.to(dtype) for d in deltas]
    if weights is None:
        w = torch.ones(len(deltas), dtype=dtype, device=deltas[0].device)
    else:
        w = torch.as_tensor(weights, dtype=dtype, device=deltas[0].device).reshape(-1)
        if w.numel() != len(deltas):
            raise MergeError(f"{method}: {w.numel()} weights for {len(deltas)} task vectors")
        if not torch.isfinite(w).all():
            raise MergeError(f"{method}: weights must be finite, got {w.tolist()}")
    return deltas, w


def _check_density(density: float, method: str) -> float:
    if density is None or not (0.0 <= float(density) <= 1.0) or math.isnan(float(density)):
        raise MergeError(f"{method}: density is the fraction of entries kept and must be in [0, 1], got {density!r}")
    return float(density)


def _check_sign_method(m: str, method: str) -> str:
    if m not in SIGN_METHODS:
        raise MergeError(f"{method}: majority_sign_method must be one of {SIGN_METHODS}, got {m!r}")
    return m


def _n_kept(fraction: float, n: int) -> int:
    """floor(fraction · n), forgiving float noise such as 0.29 · 100 = 28.999999999999996
    (peft's ``int(density * numel)`` keeps 28 there; only breadcrumbs uses this rounding)."""
    return min(n, int(math.floor(fraction * n + 1e-9)))


class _quiet_full_density(warnings.catch_warnings):
    """peft's ``prune`` warns once per tensor when density >= 1 (no pruning); density 1 is legal here."""

    def __enter__(self):
        out = super().__enter__()
        warnings.filterwarnings("ignore", message=r"The density .* greater than or equal to 1")
        return out


def dare_zero(deltas: list[Tensor]) -> Tensor:
    """DARE at density 0 drops everything: zeros (peft would compute 0 / 0 = NaN)."""
    return torch.zeros_like(deltas[0])


def weighted_sum(deltas: Sequence[Tensor], w: Tensor) -> Tensor:
    """``Σ_i w_i ΔW_i``, accumulated one expert at a time: bit-equal to peft's
    ``merge_utils.task_arithmetic`` (stack, scale, sum over the stacked axis, in the same order;
    tested), without its N-fold stacked copies, so time and memory grow linearly in N."""
    out = deltas[0] * w[0]
    for d, wi in zip(deltas[1:], w[1:]):
        out.add_(d * wi)
    return out
