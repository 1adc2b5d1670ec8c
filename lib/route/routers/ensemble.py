"""Router ``ensemble``: every expert runs on every prompt; their next-token distributions are averaged."""
from __future__ import annotations

from lib.core.bench import System, lora_parameters
from lib.route.ensemble import LogitEnsemble
from lib.route.routers import ROUTERS


@ROUTERS.register("ensemble", paper='output ensembling, e.g. Lakshminarayanan et al. 2017, "Simple and Scalable Predictive Uncertainty Estimation"',
                  url="https://arxiv.org/abs/1612.01474")
def ensemble(stage):
    yield System("route:ensemble", "router", LogitEnsemble(stage.peft_model, stage.names),
                 extra_params=lora_parameters(stage.peft_model, stage.names))
