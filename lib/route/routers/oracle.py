"""Router ``oracle``: each prompt goes to its own skill's expert, the ceiling for one-expert routing."""
from __future__ import annotations

from lib.core.bench import System, lora_parameters
from lib.route.routers import ROUTERS


@ROUTERS.register("oracle", paper="the true skill picks the expert (the ceiling of one-expert-per-prompt routing)")
def oracle(stage):
    # Composed and held-out prompts have no true expert, so the oracle is scored on the skills only.
    yield System("route:oracle", "router", stage.peft_model, extra_params=lora_parameters(stage.peft_model, stage.names),
                 sets=("skills",), adapter_names=lambda d: list(d["skill"]))
