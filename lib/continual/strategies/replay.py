"""Strategy ``replay``: sequential LoRA whose batches mix in rows kept from earlier tasks."""
from __future__ import annotations

from lib.continual.strategies import STRATEGIES
from lib.continual.strategies._common import sequential


@STRATEGIES.register("replay", paper='Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning" '
                     "(experience replay)", url="https://arxiv.org/abs/1902.10486", random=True)
def replay(study, order, skills, seed):
    """Experience replay: from task 2 on, ``replay.fraction`` of every batch is drawn from a
    buffer of ``replay.buffer`` training rows kept from each finished task (seeded subset)."""
    p = study.c.replay
    return sequential(study, "replay", order, skills, seed, fraction=p.fraction, buffer=p.buffer)
