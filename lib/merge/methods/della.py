"""Merge method ``della``: Deep et al. 2024, "DELLA-Merging: Reducing interference in model merging through magnitude-based sampling"."""
from __future__ import annotations

from typing import Sequence

import torch

from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import MergeError, _check, _check_density

Tensor = torch.Tensor


def magprune(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune as mergekit 0.1.5 implements it (``sparsify.della_magprune`` with an L1
    rescale): within each row, entries ranked by magnitude get keep probabilities spread
    linearly from ``density − epsilon`` (smallest) to ``density + epsilon`` (largest); a
    Bernoulli draw keeps each entry; the kept tensor is rescaled so its L1 norm equals the
    input's (the paper rescales each entry by ``1 / p_i``; mergekit's L1 match is kept here
    so the two can be compared). A 1-D tensor is one row."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    # mergekit's working precision: float32 on the CPU (bfloat16 as it is), the input's elsewhere
    work = delta if delta.device.type != "cpu" or delta.dtype == torch.bfloat16 else delta.float()
    rows = work.unsqueeze(0) if work.dim() < 2 else work
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(rows.dtype) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
    kept = rows * torch.bernoulli(probs)
    before, after = rows.abs().sum(), kept.abs().sum()
    if before >= 1e-7 and after >= 1e-7:  # mergekit's tolerance: an (almost) empty draw is left unscaled
        kept = kept * (before / after)
    return kept.reshape(delta.shape).to(delta.dtype)


@MERGE_METHODS.register("della", paper='Deep et al. 2024, "DELLA-Merging: Reducing interference in model merging '
                        'through magnitude-based sampling"', url="https://arxiv.org/abs/2406.11617", random=True)
def della(deltas: Sequence[Tensor], weights=None, *, density: float, epsilon: float) -> Tensor:
    """DELLA (mergekit's ``della``): drop, elect, fuse.

    1. Drop: :func:`magprune` each ΔW_i (magnitude-ranked stochastic keep around ``density``,
       ± ``epsilon``, L1-rescaled) to ``τ̂_i``.
    2. Elect: ``γ = sgn(Σ_i w_i τ̂_i)`` per entry (a sum of 0 elects ``+``).
    3. Fuse: the weighted mean of the agreeing entries, ``Σ_{i∈A} w_i τ̂_i / Σ_{i∈A} w_i``
       (0 where none agrees), times ``mean(w)``.

    mergekit normalises by the agreeing weights, so equal weights cancel and its separate
    ``lambda`` scales the result; the factor ``mean(w)`` makes equal weights ``[λ] · N`` here
    exactly mergekit's merge with weight 1 and ``lambda = λ`` (the study's λ grid then means
    what it means for the other methods). ``density ± epsilon`` must stay inside (0, 1).
    """
    deltas, w = _check(deltas, weights, "della")
    density = _check_density(density, "della")
    if not 0 <= epsilon < 1 or (0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1)):
        raise MergeError(f"della: density ± epsilon must stay inside (0, 1); got density={density}, epsilon={epsilon}")
    pruned = torch.stack([magprune(d, density, epsilon) for d in deltas])
    wd = pruned * w.reshape(-1, *([1] * deltas[0].dim()))
    elected = torch.where(wd.sum(dim=0) >= 0, 1.0, -1.0).to(wd.dtype)
    agree = (wd.sign() == elected).to(wd.dtype)
    divisor = (w.reshape(-1, *([1] * deltas[0].dim())) * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    return (wd * agree).sum(dim=0) / divisor * w.mean()
