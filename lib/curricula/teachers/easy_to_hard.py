"""Teacher ``easy_to_hard``: a hand-made schedule. At step t of ``total`` the task is drawn
uniformly from the box's first ``frac = t / total`` along every dimension (at least
``start``), so training starts on the easiest corner (low digits, few carries) and ends on
the whole box. Knows nothing about the student: it is the fixed curriculum a researcher would
write by hand."""
from __future__ import annotations

import numpy as np

from lib.curricula.teachers import TEACHERS
from lib.curricula.teachers._base import BoxTeacher


@TEACHERS.register("easy_to_hard", paper="hand-made schedule (Bengio et al. 2009 curriculum learning)", random=True)
class EasyToHardTeacher(BoxTeacher):
    def __init__(self, bounds, rng: np.random.Generator, *, total: int, start: float = 0.2):
        super().__init__(bounds, rng)
        if total < 1 or not 0 < start <= 1:
            raise ValueError(f"easy_to_hard needs total >= 1 and 0 < start <= 1, got total={total}, start={start}")
        self.total, self.start, self.t = int(total), float(start), 0

    def sample(self) -> np.ndarray:
        frac = max(self.start, min(1.0, self.t / self.total))
        self.t += 1
        lo, hi = self.bounds[:, 0], self.bounds[:, 1]
        return self.rng.uniform(lo, lo + frac * (hi - lo))
