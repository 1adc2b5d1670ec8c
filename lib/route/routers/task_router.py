"""Routers ``router_top1`` and ``router_soft``: one learned task-level router used two ways.

The router (:class:`lib.route.task_router.TaskRouter`) is trained once per stage run on
``router.n_train`` training prompts per skill and shared by both systems; :func:`diagnostics`
reads its routes afterwards (confusion matrix, whether mistakes stay in the skill family).
"""
from __future__ import annotations

import numpy as np

from lib import skills as skill_lib
from lib.core import data
from lib.core.bench import System, lora_parameters, timed
from lib.route.routers import ROUTERS
from lib.route.soft_mixture import SoftMixture
from lib.route.task_router import TaskRouter, confusion_matrix, family_mass

KUDUGUNTA = ('Kudugunta et al. 2021, "Beyond Distillation: Task-level Mixture-of-Experts for Efficient Inference"',
             "https://arxiv.org/abs/2110.03742")


def trained_router(stage) -> tuple[TaskRouter, float]:
    """The stage's task router and the seconds its training took (trained on first use)."""
    if "task_router" not in stage.cache:
        P, names = stage.P, stage.names
        train_rows = {}
        for s in names:
            ds = data.load(f"datasets/skills/{s}", ("train",))["train"]
            train_rows[s] = ds.select(range(min(P.router.n_train, len(ds))))
        prompts = [p for s in names for p in train_rows[s]["prompt"]]
        labels = [s for s in names for _ in range(len(train_rows[s]))]
        router = TaskRouter(names, hidden_layer=P.router.hidden_layer, hidden=P.router.hidden, epochs=P.router.epochs,
                            lr=P.router.lr, weight_decay=P.router.weight_decay, seed=P.seed)
        _, secs = timed(lambda: router.fit(stage.peft_model, stage.tok, prompts, labels))
        stage.cache["task_router"] = (router, secs)
    return stage.cache["task_router"]


@ROUTERS.register("router_top1", paper=KUDUGUNTA[0], url=KUDUGUNTA[1])
def router_top1(stage):
    router, secs = trained_router(stage)
    yield System("route:router_top1", "router", stage.peft_model,
                 extra_params=lora_parameters(stage.peft_model, stage.names) + router.n_parameters, build_s=secs,
                 adapter_names=lambda d: router.predict(stage.peft_model, stage.tok, list(d["prompt"])))


@ROUTERS.register("router_soft", paper="soft mixture of LoRA outputs at task level (MoLE, Wu et al. 2024)",
                  url="https://arxiv.org/abs/2404.13628")
def router_soft(stage):
    router, secs = trained_router(stage)
    k = min(stage.P.router.top_k, len(stage.names))  # the label says the k the mixture really uses
    yield System(f"route:router_soft_top{k}", "router", SoftMixture(stage.peft_model, router, top_k=k),
                 extra_params=lora_parameters(stage.peft_model, stage.names) + router.n_parameters, build_s=secs)


def diagnostics(stage):
    """(confusion matrix on the test prompts, the family analysis dict), or (None, None) when
    no task router was trained. The family analysis: the share of misrouted prompts sent to
    an expert of the true skill's family against random misrouting; ``family_mass``, the
    share of the probability given to wrong skills that stays in the family (with so few
    mistakes it says more); where composed prompts go (their first or second skill)."""
    if "task_router" not in stage.cache:
        return None, None
    router, _ = stage.cache["task_router"]
    names, tests = stage.names, stage.tests
    true = list(tests["skills"]["skill"])
    proba = router.predict_proba(stage.peft_model, stage.tok, list(tests["skills"]["prompt"]))
    pred = [router.names[i] for i in proba.argmax(axis=1)]
    family = {s: skill_lib.get_skill(s).family for s in names}
    wrong = [(t, p) for t, p in zip(true, pred) if t != p]
    same = float(np.mean([family[t] == family[p] for t, p in wrong])) if wrong else float("nan")
    # Random misrouting: a wrong expert drawn uniformly among the other skills.
    chance = float(np.mean([np.mean([family[o] == family[t] for o in names if o != t]) for t, _ in wrong])) if wrong else float("nan")
    out = {"router_accuracy": float(np.mean([p == t for p, t in zip(pred, true)])), "misrouted": len(wrong),
           "same_family_share": same, "chance_same_family": chance,
           "family_mass": family_mass(proba, true, names, family, n_boot=stage.E.n_boot, seed=stage.P.seed)}
    comp_pred = router.predict(stage.peft_model, stage.tok, list(tests["composed"]["prompt"])) if "composed" in tests else []
    if comp_pred:
        first = [sk.split(">")[0] for sk in tests["composed"]["skill"]]
        second = [sk.split(">")[1] for sk in tests["composed"]["skill"]]
        out["composed_to_first_skill"] = float(np.mean([p == f for p, f in zip(comp_pred, first)]))
        out["composed_to_second_skill"] = float(np.mean([p == s2 for p, s2 in zip(comp_pred, second)]))
    return confusion_matrix(true, pred, names), out
