"""Strategy ``l2``: sequential LoRA pulled towards the previous task's weights."""
from __future__ import annotations

from lib.continual import loop as CT
from lib.continual.strategies import STRATEGIES
from lib.continual.strategies._common import Plain, sequential


class L2(Plain):
    """After every task but the last, a snapshot of the weights; the next task trains with
    (λ/2) Σ (θ_i − θ*_i)² towards it (``lib.continual.loop.l2_penalty``)."""

    def __init__(self, p):
        self.p, self.anchor = p, None

    def penalty(self, model):
        if self.anchor is None:
            return None
        params = CT.trainable(model)
        return lambda: CT.l2_penalty(params, self.anchor, self.p.lam)

    def after_task(self, study, model, skill, seed, t, last):
        if not last:
            self.anchor = CT.snapshot(CT.trainable(model))
        return model

    def held(self) -> int:
        return CT.count(self.anchor) if self.anchor else 0


@STRATEGIES.register("l2", paper='Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks" '
                     "(the L2 baseline: EWC with every Fisher entry 1)",
                     url="https://arxiv.org/abs/1612.00796", random=True)
def l2(study, order, skills, seed):
    """Sequential LoRA with the L2-to-previous-weights penalty (params ``continual.l2``)."""
    return sequential(study, "l2", order, skills, seed, reg=L2(study.c.l2))
