"""Strategy ``olora``: a new LoRA per task, earlier ones frozen, orthogonal to them (O-LoRA)."""
from __future__ import annotations

from lib.continual import loop as CT
from lib.continual.strategies import STRATEGIES
from lib.continual.strategies._common import Plain, sequential


class OLoRA(Plain):
    """After every task but the last: keep its LoRA's A matrices, merge the LoRA into the
    weights (frozen) and start a new LoRA; later tasks train with λ Σ ||A_new A_oldᵀ||_F²
    (``lib.continual.loop.olora_penalty``) plus, if ``olora.l2``, λ₂ ||θ_new||²."""

    def __init__(self, p):
        self.p, self.old = p, []

    def penalty(self, model):
        if not self.old:
            return None
        new_a, params = CT.lora_a(model), CT.trainable(model)

        def pen():
            out = CT.olora_penalty(new_a, self.old, self.p.lam)
            if self.p.l2:
                out = out + self.p.l2 * sum((p.float() ** 2).sum() for p in params.values())
            return out
        return pen

    def after_task(self, study, model, skill, seed, t, last):
        if last:
            return model
        self.old.append({m: a.detach().float().clone() for m, a in CT.lora_a(model).items()})
        merged = model.merge_and_unload()  # W += ΔW_t: the frozen earlier LoRAs, summed into the weights
        for p in merged.parameters():
            p.requires_grad_(False)
        return CT.add_lora(merged, study.e, CT.stable_seed(seed, "lora-init", t + 1))

    def held(self) -> int:
        return CT.count(self.old)


@STRATEGIES.register("olora", paper='Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual '
                     'Learning" (O-LoRA)', url="https://arxiv.org/abs/2310.14152", random=True)
def olora(study, order, skills, seed):
    """O-LoRA (params ``continual.olora``)."""
    return sequential(study, "olora", order, skills, seed, reg=OLoRA(study.c.olora))
