"""Strategy ``sequential_lora``: one LoRA trained on task 1, continued on task 2, ... (the naive baseline)."""
from __future__ import annotations

from lib.continual.strategies import STRATEGIES
from lib.continual.strategies._common import sequential


@STRATEGIES.register("sequential_lora", paper='Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" '
                     "(fine-tuned on one task after another: the naive baseline)",
                     url="https://arxiv.org/abs/2106.09685", random=True)
def sequential_lora(study, order, skills, seed):
    """One LoRA with the experts' recipe, fine-tuned on each task in turn with nothing against forgetting."""
    return sequential(study, "sequential_lora", order, skills, seed)
