"""What one continual-learning run returns; the strategies build it, the study summarises it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class RunResult:
    """One strategy on one order with one seed. ``R``: (T + 1) × T accuracy matrix, columns
    in the order's task order. ``curve``: global ``step, task, skill, accuracy`` probe points
    (empty for strategies without a curve)."""

    strategy: str
    order: str
    seed: int
    skills: list[str]
    R: np.ndarray
    curve: pd.DataFrame
    trainable_params: int
    params_held: int
    wall_s: float
    info: dict[str, Any] = field(default_factory=dict)
