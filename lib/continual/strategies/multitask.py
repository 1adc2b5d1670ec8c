"""Strategy ``multitask``: one LoRA retrained from scratch on every skill seen so far (the upper bound)."""
from __future__ import annotations

from lib.continual.strategies import STRATEGIES
from lib.continual.strategies._common import result
from lib.core.training import count_parameters


@STRATEGIES.register("multitask", paper='Caruana 1997, "Multitask Learning" (joint training on every task seen '
                     "so far: the usual upper bound of continual learning)",
                     url="https://doi.org/10.1023/A:1007379606734", random=True)
def multitask(study, order, skills, seed):
    """After every task, one LoRA trained from scratch on all skills seen so far (training
    sets concatenated and shuffled) for ``steps_per_task × tasks seen`` steps
    (``multitask_budget: cumulative``) or ``steps_per_task`` (``per_task``). Row 1 is the
    sequential strategies' shared first task; rows for the same set of seen skills are
    trained once per seed."""
    c, S = study.c, study.c.steps_per_task
    rows, wall, trainable = [], 0.0, 0
    for i in range(1, len(skills) + 1):
        seen = [t for t in study.tasks if t in skills[:i]]  # canonical order: same set, same data
        if i == 1:  # one skill for S steps: exactly the sequential strategies' first task
            hit = study.first_task("lora", seed, skills[0])
            rows.append(hit["row"])
            wall += hit["seconds"]
            trainable = count_parameters(hit["model"], trainable_only=True)
            continue
        steps = S * i if c.multitask_budget == "cumulative" else S
        key = ("multitask", seed, tuple(seen), steps)
        if key not in study.cache:
            model = study.fresh_lora(seed)
            pooled = [r for t in seen for r in study.rows[t]]
            secs = study.train_one(model, pooled, steps, seed, "+".join(seen), lr=study.e.lr)
            study.cache[key] = {"row": study.accuracies(model, study.test), "seconds": secs}
        rows.append(study.cache[key]["row"])
        wall += study.cache[key]["seconds"]
    held = study.base_params + trainable
    return result(study, "multitask", order, skills, seed, rows, [], trainable, held, wall)
