"""Routers ``arrow`` and ``arrow_gks``: Arrow's zero-shot token-level routing, without and with GenKnowSub."""
from __future__ import annotations

import copy

from lib.core.bench import System, lora_parameters, timed
from lib.route.arrow import build_arrow_model
from lib.route.routers import ROUTERS


def _arrow(stage, name: str, general_dirs):
    P = stage.P
    model, secs = timed(lambda: build_arrow_model(copy.deepcopy(stage.base), {s: stage.dirs[s] for s in stage.names},
                                                  top_k=P.arrow.top_k, temperature=P.arrow.temperature,
                                                  general_dirs=general_dirs))
    yield System(f"route:{name}", "router", model, extra_params=lora_parameters(stage.peft_model, stage.names), build_s=secs)


@ROUTERS.register("arrow", paper='Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of LoRAs"',
                  url="https://arxiv.org/abs/2405.11157")
def arrow(stage):
    yield from _arrow(stage, "arrow", None)


@ROUTERS.register("arrow_gks", paper="GenKnowSub (Belanec et al., ACL 2025 short): Arrow after subtracting a general LoRA",
                  url="https://aclanthology.org/2025.acl-short.54/")
def arrow_gks(stage):
    # The general LoRA (models/general, stage "adapters", trained on the base corpus) is subtracted from every expert.
    yield from _arrow(stage, "arrow_gks", {"general": "models/general"})
