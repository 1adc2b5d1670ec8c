"""Strategy ``sequential_full``: every weight of the base fine-tuned on one task after another."""
from __future__ import annotations

from lib.continual.strategies import STRATEGIES
from lib.continual.strategies._common import sequential


@STRATEGIES.register("sequential_full", paper='McCloskey & Cohen 1989, "Catastrophic interference in connectionist '
                     'networks: the sequential learning problem" (full fine-tuning, one task after another)',
                     url="https://doi.org/10.1016/S0079-7421(08)60536-8", random=True)
def sequential_full(study, order, skills, seed):
    """Sequential fine-tuning of the whole model (learning rate ``continual.full_lr``)."""
    return sequential(study, "sequential_full", order, skills, seed, kind="full")
