"""Skill-it! (Chen et al., NeurIPS 2023): an online data mixture over skills driven by a skills
graph. ``A[i, j]`` > 0 when training on skill i lowers the loss on skill j; at each round the
mixture is ``p_i ∝ exp(η · Σ_j A_ij · L_j)`` over the training skills, with ``L_j`` the current
validation loss on skill j: skills whose training helps the skills still poorly learnt get
more of the next batches. The paper's Algorithm 1 sums the exponent over the last ``w`` rounds'
losses (``window``); ``window = 1`` is the issue's formula.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mixture(A, losses, eta: float) -> np.ndarray:
    """``softmax(η · A @ L)``: the next round's sampling weights (sum 1)."""
    A, L = np.asarray(A, dtype=float), np.asarray(losses, dtype=float)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[1] != L.shape[-1]:
        raise ValueError(f"A must be k × k and losses length k, got {A.shape} and {L.shape}")
    z = eta * (A @ L)
    z = np.exp(z - z.max())
    return z / z.sum()


def online_mixture(A, loss_history: Sequence[Sequence[float]], eta: float, window: int = 1) -> np.ndarray:
    """Algorithm 1's weights: ``p_i ∝ exp(η · Σ_{last window rounds} Σ_j A_ij L_j)``."""
    if window < 1 or not len(loss_history):
        raise ValueError("online_mixture needs window >= 1 and at least one round of losses")
    recent = np.asarray(loss_history[-window:], dtype=float)
    return mixture(A, recent.sum(axis=0), eta)
