"""Skill-it (Chen et al. 2023) against uniform mixing, on the study's training skills.

* **The skills graph** is measured here (stage 03 scores each expert on every skill by
  accuracy, which is 0 off the diagonal on this testbed, so it carries no graded transfer):
  from the fresh student, ``graph_steps`` steps on skill i alone; ``A[i, j]`` = the relative
  drop of skill j's validation loss, ``(L_j before − L_j after) / L_j before``, floored at 0.
* **A run** trains one student for ``steps`` steps in rounds of ``round_steps``. At each
  round's start the validation loss ``L_j`` of every skill is measured; Skill-it draws the
  round's rows from skill i with ``p_i ∝ exp(η · Σ_j A_ij · L_j)`` (:mod:`lib.curricula.skill_it`),
  uniform mixing with ``p_i = 1/k``.
* **Steps to target**: the first round boundary at which every skill's validation loss is at
  most ``target_loss``; a run that never gets there counts as its budget (censored, so the
  comparison is conservative for whichever method reaches it less often).
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np

from lib.core.sft_data import encode, make_batches, mean_loss
from lib.curricula import skill_it
from lib.curricula.student import Optimizer, load_student
from lib.continual.loop import stable_seed

METHODS = ("uniform", "skill_it")


def skill_rows(root, skills: list[str], n_val: int | None = None) -> tuple[dict, dict]:
    """``(train, val)``: per skill, lists of (prompt, answer) from stage 01's datasets."""
    from lib.core import data

    train, val = {}, {}
    for s in skills:
        ds = data.load(Path(root) / "datasets" / "skills" / s, splits=("train", "validation"))
        train[s] = list(zip(ds["train"]["prompt"], ds["train"]["answer"]))
        v = list(zip(ds["validation"]["prompt"], ds["validation"]["answer"]))
        val[s] = v[:n_val] if n_val else v
    return train, val


def _val_batches(tok, val: dict, batch_size: int) -> dict:
    return {s: make_batches(encode(tok, [p for p, _ in rows], [a for _, a in rows]), batch_size, tok.pad_token_id)
            for s, rows in val.items()}


def _losses(model, batches: dict) -> np.ndarray:
    return np.array([mean_loss(model, b) for b in batches.values()])


def measure_graph(job: dict) -> np.ndarray:
    """``A`` (k × k): the relative validation-loss drop on j after ``graph_steps`` steps on i."""
    from lib.core.training import one_cpu_thread

    one_cpu_thread()
    C, root, seed = job["C"], job["root"], job["seed"]
    S = C.skill_it
    train, val = skill_rows(root, S.skills, S.n_val)
    rows = []
    for i, s in enumerate(S.skills):
        model, tok = load_student(root, C.student, job["target_modules"], seed)
        batches = _val_batches(tok, val, C.student.batch_size)
        before = _losses(model, batches)
        opt, rng = Optimizer(model, C.student.lr), random.Random(stable_seed("graph", s, seed))
        for _ in range(S.graph_steps):
            pa = [rng.choice(train[s]) for _ in range(C.student.batch_size)]
            opt.step(tok, [p for p, _ in pa], [a for _, a in pa])
        rows.append(np.clip((before - _losses(model, batches)) / before, 0, None))
    return np.array(rows)


def steps_to_target(curve: list[dict], target: float, budget: int) -> int:
    """First step whose every skill's loss is ≤ ``target``; ``budget`` when none is."""
    for point in curve:
        if max(point["loss"].values()) <= target:
            return int(point["step"])
    return int(budget)


def run_mixture(job: dict) -> dict:
    """One (method, seed) run; returns the loss curve and the mixture weights per round."""
    from lib.core.training import one_cpu_thread

    one_cpu_thread()
    C, root, seed, method, A = job["C"], job["root"], job["seed"], job["method"], np.asarray(job["graph"])
    S = C.skill_it
    t0 = time.perf_counter()
    train, val = skill_rows(root, S.skills, S.n_val)
    model, tok = load_student(root, C.student, job["target_modules"], seed)
    batches = _val_batches(tok, val, C.student.batch_size)
    opt, rng = Optimizer(model, C.student.lr), np.random.default_rng(stable_seed("mixture", seed))  # same draws for both methods
    curve, history = [], []
    k = len(S.skills)
    for start in range(0, S.steps + 1, S.round_steps):
        L = _losses(model, batches)
        history.append(L)
        p = skill_it.online_mixture(A, history, S.eta, S.window) if method == "skill_it" else np.full(k, 1 / k)
        curve.append({"step": start, "loss": dict(zip(S.skills, L.tolist())), "weights": dict(zip(S.skills, p.tolist()))})
        if start == S.steps:
            break
        for _ in range(min(S.round_steps, S.steps - start)):
            picks = rng.choice(k, size=C.student.batch_size, p=p)
            pa = [train[S.skills[i]][rng.integers(len(train[S.skills[i]]))] for i in picks]
            opt.step(tok, [x for x, _ in pa], [a for _, a in pa])
    return {"method": method, "seed": seed, "curve": curve, "steps_to_target": steps_to_target(curve, S.target_loss, S.steps),
            "reached": any(max(c["loss"].values()) <= S.target_loss for c in curve), "seconds": time.perf_counter() - t0}
