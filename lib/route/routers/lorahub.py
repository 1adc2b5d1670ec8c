"""Router ``lorahub``: one weight per expert searched gradient-free for each target task, then merged."""
from __future__ import annotations

from lib.core.bench import System
from lib.route.lorahub import compose, lorahub_search
from lib.route.routers import ROUTERS


@ROUTERS.register("lorahub", paper='Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA Composition"',
                  url="https://arxiv.org/abs/2307.13269", random=True)
def lorahub(stage):
    P = stage.P
    for target in P.lorahub.targets:
        if target not in stage.val:
            continue
        val = stage.val[target]
        shots = val.shuffle(seed=P.seed).select(range(min(P.lorahub.n_examples, len(val))))
        found = lorahub_search(stage.base, stage.tok, stage.tvs, shots, budget=P.lorahub.budget, l1=P.lorahub.l1, seed=P.seed)
        # Each row is a model for its target; its skill columns show what the search gave up.
        yield System(f"lorahub→{target}", "router", compose(stage.base, stage.tvs, found["weights"]),
                     build_s=found["seconds"], info={"weights": found["weights"]})
