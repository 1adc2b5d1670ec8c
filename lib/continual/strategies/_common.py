"""What the strategies share: the run result, and the sequential loop with its regularizers' interface.

Not a strategy (the registry skips modules whose name starts with ``_``).
"""
from __future__ import annotations

import time

import numpy as np
import pandas as pd

from lib.continual import loop as CT
from lib.continual.runs import RunResult
from lib.core.training import count_parameters


def result(study, name: str, order: str, skills: list[str], seed: int, rows: list[dict], curve: list,
           trainable: int, held: int, wall: float, **info) -> RunResult:
    """The :class:`RunResult` of one run: ``rows`` are the accuracy rows after each task (row 0,
    the base model, is added here), ``curve`` the probe points (empty without a curve)."""
    R = np.array([[study.base_row[s] for s in skills]] + [[row[s] for s in skills] for row in rows])
    return RunResult(name, order, seed, skills, R, pd.DataFrame(curve, columns=["step", "task", "skill", "accuracy"]),
                     int(trainable), int(held), float(wall), info)


class Plain:
    """No penalty, nothing kept between tasks. A regularizer of :func:`sequential` gives the
    penalty for the next task's training (or None), acts after each task (and may return a
    new model), and counts the parameters it keeps."""

    def penalty(self, model):
        return None

    def after_task(self, study, model, skill, seed, t, last):
        return model

    def held(self) -> int:
        return 0


def sequential(study, name: str, order: str, skills: list[str], seed: int, *, kind: str = "lora",
               reg=None, fraction: float = 0.0, buffer: int | None = None) -> RunResult:
    """One model (``kind`` lora or full) trained through the tasks in order; task 1 is the
    study's shared first task. ``reg``: a :class:`Plain`-like regularizer; ``fraction`` and
    ``buffer``: replay's share of every batch and rows kept per finished task."""
    c, S = study.c, study.c.steps_per_task
    reg = reg or Plain()
    lr = study.e.lr if kind == "lora" else c.full_lr
    first = study.first_task(kind, seed, skills[0])
    model, curve, rows, wall = first["model"], first["curve"], [first["row"]], first["seconds"]
    pool: list = []
    for t, skill in enumerate(skills, start=1):
        if t > 1:
            wall += study.train_one(model, study.rows[skill], S, seed, skill, lr=lr, penalty=reg.penalty(model),
                                    pool=pool, fraction=fraction, curve=curve, offset=(t - 1) * S, task=t,
                                    skills=skills[:t])
            rows.append(study.accuracies(model, study.test))
        t0 = time.perf_counter()
        if fraction:
            pool += CT.replay_buffer(study.rows[skill], buffer, CT.stable_seed(seed, "buffer", skill))
        model = reg.after_task(study, model, skill, seed, t, t == len(skills))
        wall += time.perf_counter() - t0
    trainable = count_parameters(model, trainable_only=True)
    held = count_parameters(model) + reg.held()  # base (updated in place for full / merged O-LoRA) + adapter + kept state
    return result(study, name, order, skills, seed, rows, curve, trainable, held, wall,
                  replay_rows=len(pool))
