"""Strategy ``library_route``: the stage-03 experts of the tasks seen so far behind a task-level router."""
from __future__ import annotations

import time

import numpy as np
import torch

from lib.continual.strategies import STRATEGIES
from lib.continual.strategies._common import result


@STRATEGIES.register("library_route", paper='Kudugunta et al. 2021, "Beyond Distillation: Task-level '
                     'Mixture-of-Experts for Efficient Inference" (the router over the stage-03 experts, '
                     "retrained as skills arrive)", url="https://arxiv.org/abs/2110.03742", random=True)
def library_route(study, order, skills, seed):
    """The stage-03 experts behind :class:`lib.route.task_router.TaskRouter` (a classifier on
    base-model features), retrained after every task on ``library.router.n_train`` training
    prompts of each seen skill; each test prompt is answered by the expert it routes to."""
    from lib.route.task_router import TaskRouter

    lib, rp = study.library(), study.c.library.router
    if lib["features"] is None:  # base-model features of the router's training prompts and of the test set
        t0 = time.perf_counter()
        prompts = {t: list(study.train[t].select(range(min(rp.n_train, len(study.train[t]))))["prompt"]) for t in study.tasks}
        probe = TaskRouter(study.tasks, hidden_layer=rp.hidden_layer)
        lib["features"] = {
            "train": {t: probe.features(lib["model"], study.tok, prompts[t]) for t in study.tasks},
            "test": probe.features(lib["model"], study.tok, list(study.test.prompt)),
            "seconds": time.perf_counter() - t0,
        }
    feats = lib["features"]
    rows, wall, router_params = [], feats["seconds"], 0
    for i in range(1, len(skills) + 1):
        seen = skills[:i]
        key = ("route", frozenset(seen), seed)
        if key not in lib["rows"]:
            t0 = time.perf_counter()
            router = TaskRouter(seen, hidden_layer=rp.hidden_layer, hidden=rp.hidden, epochs=rp.epochs, lr=rp.lr,
                                weight_decay=rp.weight_decay, seed=seed)
            x = torch.cat([feats["train"][t] for t in seen])
            router.fit_features(x, [t for t in seen for _ in range(len(feats["train"][t]))])
            secs = time.perf_counter() - t0
            names = [seen[k] for k in router.proba_from_features(feats["test"]).argmax(-1).tolist()]
            row = study.accuracies(lib["model"], study.test, adapter_names=names)
            routed = float(np.mean([n == s for n, s in zip(names, study.test.skill)]))
            lib["rows"][key] = {"row": row, "seconds": secs, "params": router.n_parameters, "routed_right": routed}
        hit = lib["rows"][key]
        rows.append(hit["row"])
        wall += hit["seconds"] + lib["train_s"][skills[i - 1]]
        router_params = hit["params"]
    trainable = max(lib["params"][t] for t in skills)
    held = study.base_params + sum(lib["params"][t] for t in skills) + router_params
    return result(study, "library_route", order, skills, seed, rows, [], trainable, held, wall,
                  expert_steps=[lib["steps"][t] for t in skills])
