"""Teachers choosing the student's tasks on the ``add`` (digits, carries) grid (Portelas et al. 2019).

One run = (teacher, unlearnable fraction, seed). Each step the teacher proposes
``tasks_per_step`` points of the unit square; each point is ``prompts_per_task`` fresh prompts
of its cell; the student answers them greedily first (the task's reward is its accuracy there,
what the teacher learns from), then takes one LoRA step on all of them. Every ``eval_every``
steps the student answers ``eval_n`` held-out prompts per cell (the same prompts for every
teacher and seed); a cell is **mastered** at accuracy ≥ ``mastery``, and the **mastered
fraction** is the area of the square the mastered cells cover (the paper's share of a uniform
test set of tasks). Seeds pair the runs: the same seed gives every teacher the same LoRA
initialisation.
"""
from __future__ import annotations

import random
import time

import numpy as np

from lib.continual.loop import stable_seed
from lib.curricula.space import AddSpace
from lib.curricula.student import Optimizer, greedy_correct, load_student
from lib.curricula.teachers import TEACHERS

BOX = [(0.0, 1.0), (0.0, 1.0)]


def heldout(space: AddSpace, n: int) -> list[dict]:
    """``n`` prompts per cell, fixed by the cell alone (every teacher and seed sees the same)."""
    return [r for cell in space.cells for r in space.examples(cell, n, random.Random(stable_seed("heldout", cell)))]


def make_teacher(name: str, space: AddSpace, T, rng: np.random.Generator):
    """The registered teacher with this study's settings (easy_to_hard's length, ALP-GMM's
    params, the oracle's knowledge of the unlearnable cells)."""
    kwargs = {"easy_to_hard": {"total": T.steps * T.tasks_per_step},
              "alp_gmm": dict(T.alp_gmm),
              "oracle": {"learnable": space.learnable}}.get(name, {})
    return TEACHERS.get(name).obj(BOX, rng, **kwargs)


def mastered_fraction(space: AddSpace, accuracy: dict[str, float], mastery: float) -> float:
    return float(sum(space.area(c) for c in space.cells if accuracy[space.name(c)] >= mastery))


def run_teacher(job: dict) -> dict:
    """One run; ``job`` has root, teacher, fraction, seed, the ``curricula`` section (C) and the
    experts' target modules. Returns the curve, where the teacher sampled and the timing."""
    from lib.core.evaluation import max_new_tokens_for
    from lib.core.training import one_cpu_thread

    one_cpu_thread()
    C, name, fraction, seed = job["C"], job["teacher"], job["fraction"], job["seed"]
    T = C.teachers
    t0 = time.perf_counter()
    space = AddSpace(T.max_digits, fraction)
    model, tok = load_student(job["root"], C.student, job["target_modules"], seed)
    opt = Optimizer(model, C.student.lr)
    test = heldout(space, T.eval_n)
    budget = max_new_tokens_for(tok, [r["answer"] for r in test])
    teacher = make_teacher(name, space, T, np.random.default_rng(stable_seed(name, fraction, seed)))
    data_rng = random.Random(stable_seed("data", name, fraction, seed))
    curve, samples = [], []

    def evaluate(step: int) -> None:
        correct = greedy_correct(model, tok, [r["prompt"] for r in test], [r["answer"] for r in test], budget)
        acc = {space.name(c): float(np.mean(correct[i * T.eval_n:(i + 1) * T.eval_n])) for i, c in enumerate(space.cells)}
        curve.append({"step": step, "mastered": mastered_fraction(space, acc, T.mastery), "accuracy": acc})

    evaluate(0)
    for step in range(1, T.steps + 1):
        tasks = [teacher.sample() for _ in range(T.tasks_per_step)]
        rows = [r for t in tasks for r in space.examples(space.cell(t), T.prompts_per_task, data_rng)]
        prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
        correct = greedy_correct(model, tok, prompts, answers, budget)
        for i, t in enumerate(tasks):
            teacher.update(t, float(np.mean(correct[i * T.prompts_per_task:(i + 1) * T.prompts_per_task])))
            samples.append({"step": step, "x": float(t[0]), "y": float(t[1]), "cell": space.name(space.cell(t)),
                            "learnable": bool(space.learnable(t))})
        opt.step(tok, prompts, answers)
        if step % T.eval_every == 0 or step == T.steps:
            evaluate(step)
    return {"teacher": name, "fraction": fraction, "seed": seed, "curve": curve, "samples": samples,
            "unlearnable_area": float(sum(space.area(c) for c in space.unlearnable)),
            "seconds": time.perf_counter() - t0}
