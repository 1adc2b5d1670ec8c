"""Strategy ``ewc``: sequential LoRA with the elastic weight consolidation penalty."""
from __future__ import annotations

from lib.continual import loop as CT
from lib.continual.strategies import STRATEGIES
from lib.continual.strategies._common import Plain, sequential


class EWC(Plain):
    """After every task but the last: the diagonal Fisher on ``ewc.fisher_n`` of its training
    rows and a snapshot of the weights (one anchor per task); later tasks train with the
    penalty (λ/2) Σ_k Σ_i F_k,i (θ_i − θ*_k,i)² (``lib.continual.loop.ewc_penalty``)."""

    def __init__(self, p):
        self.p, self.anchors = p, []

    def penalty(self, model):
        if not self.anchors:
            return None
        params = CT.trainable(model)
        return lambda: CT.ewc_penalty(params, self.anchors, self.p.lam)

    def after_task(self, study, model, skill, seed, t, last):
        if last:  # no later task to protect it for
            return model
        rows = CT.replay_buffer(study.rows[skill], self.p.fisher_n, CT.stable_seed(seed, "fisher", skill))
        fisher = CT.fisher_diagonal(model, rows, study.pad_id, self.p.fisher_batch)
        self.anchors.append((fisher, CT.snapshot(CT.trainable(model))))
        return model

    def held(self) -> int:
        return CT.count([list(a) for a in self.anchors])


@STRATEGIES.register("ewc", paper='Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks"',
                     url="https://arxiv.org/abs/1612.00796", random=True)
def ewc(study, order, skills, seed):
    """Sequential LoRA with the EWC penalty (params ``continual.ewc``)."""
    return sequential(study, "ewc", order, skills, seed, reg=EWC(study.c.ewc))
