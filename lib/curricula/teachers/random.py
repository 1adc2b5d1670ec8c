"""Teacher ``random``: every task uniformly from the box (the baseline of Portelas et al. 2019)."""
from __future__ import annotations

import numpy as np

from lib.curricula.teachers import TEACHERS
from lib.curricula.teachers._base import BoxTeacher


@TEACHERS.register("random", paper="Portelas et al. 2019 (Random baseline)", url="https://arxiv.org/abs/1910.07224", random=True)
class RandomTeacher(BoxTeacher):
    def sample(self) -> np.ndarray:
        return self.uniform()
