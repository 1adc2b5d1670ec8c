"""What every teacher shares: the box of task parameters and uniform draws from it."""
from __future__ import annotations

import numpy as np


class BoxTeacher:
    """Holds ``bounds`` (d × 2: low, high per dimension) and ``rng``; ``uniform()`` draws a task."""

    def __init__(self, bounds, rng: np.random.Generator):
        self.bounds = np.asarray(bounds, dtype=float).reshape(-1, 2)
        if np.any(self.bounds[:, 1] <= self.bounds[:, 0]):
            raise ValueError(f"every dimension needs low < high, got {self.bounds.tolist()}")
        self.rng = rng
        self.history: list[tuple[np.ndarray, float]] = []

    @property
    def dim(self) -> int:
        return len(self.bounds)

    def uniform(self) -> np.ndarray:
        return self.rng.uniform(self.bounds[:, 0], self.bounds[:, 1])

    def clip(self, task) -> np.ndarray:
        return np.clip(np.asarray(task, dtype=float), self.bounds[:, 0], self.bounds[:, 1])

    def update(self, task, reward: float) -> None:
        self.history.append((np.asarray(task, dtype=float), float(reward)))
