"""Teacher ``oracle``: told which tasks are learnable (a predicate on the task parameters, from
the difficulty space's construction), it draws uniformly from them only. An upper reference
for what a teacher can gain by avoiding the unlearnable part, as the paper's oracle is."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lib.curricula.teachers import TEACHERS
from lib.curricula.teachers._base import BoxTeacher


@TEACHERS.register("oracle", paper="Portelas et al. 2019 (oracle reference)", url="https://arxiv.org/abs/1910.07224", random=True)
class OracleTeacher(BoxTeacher):
    def __init__(self, bounds, rng: np.random.Generator, *, learnable: Callable[[np.ndarray], bool], tries: int = 10_000):
        super().__init__(bounds, rng)
        self.learnable, self.tries = learnable, int(tries)

    def sample(self) -> np.ndarray:
        for _ in range(self.tries):  # rejection sampling: uniform over the learnable region
            task = self.uniform()
            if self.learnable(task):
                return task
        raise ValueError(f"oracle: no learnable task in {self.tries} uniform draws; is any of the box learnable?")
