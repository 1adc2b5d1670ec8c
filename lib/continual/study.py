"""Stage 05: learning skills one after another: what each strategy forgets, and what not forgetting costs.

A *run* is one strategy learning the tasks (skills) of one order, with one seed. It
produces an accuracy matrix and, for the strategies that train one model through the
sequence, a stability curve. The strategies are a registry, one file per strategy in
``lib/continual/strategies/`` (``STRATEGIES``, chosen by name in ``continual.strategies``);
:class:`Study` holds what their runs share in one process; the training core is
``lib/continual/loop.py``.

Definitions (tasks numbered 1..T in the order learned; code indexes from 0)
--------------------------------------------------------------------------
``R[i][j]`` is the exact-match accuracy on skill j's full test split after learning tasks
1..i; row 0 is the base model, so ``R`` has T + 1 rows and T columns.

* ``ACC = (1/T) Σ_j R[T][j]``: mean final accuracy.
* ``BWT = 1/(T−1) Σ_{j<T} (R[T][j] − R[j][j])``: backward transfer (negative = forgetting).
* ``FWT = 1/(T−1) Σ_{j>1} (R[j−1][j] − R[0][j])``: forward transfer, accuracy on a skill
  just before it is learned, against the base model.
* ``forgetting_j = max_{l ∈ 1..T−1} R[l][j] − R[T][j]`` for ``j < T`` (Chaudhry et al. 2018;
  the base row is not a candidate for the maximum); ``forgetting`` is its mean over j < T.

(Lopez-Paz & Ranzato 2017 for ACC/BWT/FWT.) A strategy's row ``i`` for a skill it has not
learned yet is still measured: for the expert library a skill with no expert yet is
answered by the merge / the router's best guess among the experts it has.

Stability gap (De Lange et al. 2023): during training every ``eval_every`` steps, and at
every task end, each run is scored on a fixed probe set: the first ``eval_n`` test prompts
of every skill learned so far (the earlier tasks' and the current one's). For the switch to task t (t = 2..T), at global step
``s_t = (t−1)·steps_per_task``, and every earlier skill j < t, with ``a_j(s)`` the probe
accuracy of skill j at step s and ``w = ceil(gap_window · steps_per_task)``:

* ``m = min { a_j(s) : s_t < s ≤ s_t + w }``: the minimum just after the switch
  (``min_after_switch``);
* ``depth = a_j(s_t) − m``: how far accuracy on the old skill falls in the first part of the
  new task (negative when it rises);
* ``recovery = a_j(s_t + steps_per_task) − m``: how much of it comes back by the end of the
  new task (negative when accuracy keeps falling after the first part).

Each is averaged over all (switch, earlier skill) pairs of a run. Only strategies that
train one model through the sequence have a curve (the sequential ones, replay, EWC, L2,
O-LoRA); the expert library does not train, and multitask is retrained from scratch at
every step, so neither has a stability gap.

Confidence intervals (every ``CI`` in ``metrics/continual.json``): over the runs, i.e. the
``len(orders) × len(seeds)`` values of a metric, ``mean ± t_{0.975, n−1} · sd / √n``
(Student t, sample sd); with one run ``lo = hi = mean``. The spread therefore mixes the
effect of the order with that of the seed; the notebook also shows each order separately.
``R`` in the JSON is the mean over seeds, per order.

Costs: ``trainable_params`` are the parameters updated while learning one task (one LoRA,
or the whole model for ``sequential_full``); ``params_held`` every parameter the strategy
keeps at the end to answer and to keep learning (base model + adapters + EWC's Fisher and
anchors, L2's anchor, O-LoRA's earlier A matrices, the expert library, the router);
``wall_s`` the seconds spent learning the whole sequence (training steps, Fisher, merges and
λ choice, router fits; evaluation excluded), mean over runs. The library's experts were
trained in stage 03, so their training seconds (``train_info.json``) are added to its
``wall_s``. Seconds are measured on whatever machine runs the stage, with any contention.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lib.core import config, data
from lib.continual import loop as CT
from lib.continual.runs import RunResult
from lib.continual.strategies import STRATEGIES
from lib.core.evaluation import evaluate
from lib.core.sft_data import encode
from lib.core.stats import t_interval
from lib.core.training import check_max_length, count_parameters
from lib import skills as skill_lib

CURVE_STRATEGIES = ("sequential_lora", "sequential_full", "replay", "ewc", "l2", "olora")
"""Strategies that train one model through the sequence, hence have a stability curve."""


# --------------------------------------------------------------------------- accuracy-matrix metrics


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] + 1 or R.shape[1] < 2:
        raise ValueError(f"an accuracy matrix has T + 1 rows (row 0 = base) and T >= 2 columns, got shape {R.shape}")
    return R


def acc(R) -> float:
    R = _matrix(R)
    return float(R[-1].mean())


def bwt(R) -> float:
    R = _matrix(R)
    T = R.shape[1]
    return float(np.mean([R[T, j] - R[j + 1, j] for j in range(T - 1)]))


def fwt(R) -> float:
    R = _matrix(R)
    T = R.shape[1]
    return float(np.mean([R[j, j] - R[0, j] for j in range(1, T)]))


def forgetting_per_task(R) -> np.ndarray:
    """``forgetting_j`` for j = 1..T−1 (0-based columns 0..T−2)."""
    R = _matrix(R)
    T = R.shape[1]
    return np.array([R[1:T, j].max() - R[T, j] for j in range(T - 1)])


def forgetting(R) -> float:
    return float(forgetting_per_task(R).mean())


def matrix_metrics(R) -> dict[str, float]:
    return {"ACC": acc(R), "BWT": bwt(R), "FWT": fwt(R), "forgetting": forgetting(R)}


# --------------------------------------------------------------------------- stability gap


def switch_points(curve: pd.DataFrame, skills: Sequence[str], steps_per_task: int, gap_window: float) -> pd.DataFrame:
    """One row per task switch t (2..T) and earlier skill j < t: ``switch, step, skill,
    at_switch`` (a_j(s_t)), ``min_after`` (the minimum in (s_t, s_t + w]), ``at_end``
    (a_j(s_t + steps_per_task)), ``depth`` and ``recovery`` (see the module docstring).

    ``curve``: rows ``step, skill, accuracy`` (global steps, the run's probe evaluations).
    Every needed point must be there: the accuracy at each switch and at each task end,
    and at least one evaluation in every window; a missing one is a ValueError.
    """
    skills = list(skills)
    w = max(1, math.ceil(gap_window * steps_per_task))
    by = {sk: g.set_index("step")["accuracy"].sort_index() for sk, g in curve.groupby("skill")}
    rows = []
    for t in range(2, len(skills) + 1):
        s_t = (t - 1) * steps_per_task
        for j in skills[: t - 1]:
            if j not in by:
                raise ValueError(f"no curve points for skill {j!r}")
            a = by[j]
            for s in (s_t, s_t + steps_per_task):
                if s not in a.index:
                    raise ValueError(f"curve of {j!r} lacks step {s} (a switch or a task end)")
            window = a[(a.index > s_t) & (a.index <= s_t + w)]
            if window.empty:
                raise ValueError(f"curve of {j!r} has no evaluation in steps ({s_t}, {s_t + w}]: lower eval_every")
            m = float(window.min())
            rows.append({"switch": t, "step": s_t, "skill": j, "at_switch": float(a[s_t]), "min_after": m,
                         "at_end": float(a[s_t + steps_per_task]), "depth": float(a[s_t]) - m,
                         "recovery": float(a[s_t + steps_per_task]) - m})
    return pd.DataFrame(rows)


def stability_gap(curve: pd.DataFrame, skills: Sequence[str], steps_per_task: int, gap_window: float) -> dict[str, float]:
    """``depth``, ``recovery`` and ``min_after_switch`` of one run: the means over every
    (switch, earlier skill) pair of :func:`switch_points`."""
    pts = switch_points(curve, skills, steps_per_task, gap_window)
    return {"depth": float(pts.depth.mean()), "recovery": float(pts.recovery.mean()),
            "min_after_switch": float(pts.min_after.mean())}


# --------------------------------------------------------------------------- task orders


def _families(tasks: Sequence[str]) -> dict[str, list[str]]:
    fam: dict[str, list[str]] = {}
    for t in tasks:
        fam.setdefault(skill_lib.get_skill(t).family, []).append(t)
    return fam


def build_order(name: str, tasks: Sequence[str]) -> list[str]:
    """A task order from ``continual.tasks``: ``given`` as listed; ``grouped`` keeps each
    family's tasks together (families in order of first appearance); ``alternating`` takes
    one task per family in turn (round robin), so consecutive tasks differ in family
    wherever the family sizes allow. Both start with the first task listed."""
    tasks = list(tasks)
    if name == "given":
        return tasks
    fam = _families(tasks)
    if name == "grouped":
        return [t for group in fam.values() for t in group]
    if name == "alternating":
        out, groups = [], [list(g) for g in fam.values()]
        while any(groups):
            for g in groups:
                if g:
                    out.append(g.pop(0))
        return out
    raise config.ParamsError(f"unknown task order {name!r}; known orders: {', '.join(config.CONTINUAL_ORDER_NAMES)}")


def build_orders(c) -> dict[str, list[str]]:
    return {name: build_order(name, c.tasks) for name in c.orders}


def check_params(skills, c, root: str | Path = ".") -> None:
    """Cross-section checks the schemas cannot make: every task is a training skill with a
    dataset, and the library strategies have their stage-03 experts."""
    not_trained = [t for t in c.tasks if t not in skills.train]
    if not_trained:
        raise config.ParamsError(f"continual.tasks: {not_trained} not in skills.train {skills.train}; "
                                 "a continual task needs its stage-01 data and stage-03 expert")
    root = Path(root)
    for t in c.tasks:
        if not (root / "datasets" / "skills" / t).exists():
            raise config.ParamsError(f"continual.tasks: no dataset {root / 'datasets' / 'skills' / t}; run stage 01")
    if {"library_merge", "library_route"} & set(c.strategies):
        missing = [t for t in c.tasks if not (root / "models" / "experts" / t / "adapter_config.json").exists()]
        if missing:
            raise config.ParamsError(f"the library strategies need the stage-03 experts of {missing} "
                                     f"(models/experts/<skill>); run `dvc repro adapters`")


# --------------------------------------------------------------------------- the per-process study


class Study:
    """Data, base model, caches and evaluation for the runs of one process."""

    def __init__(self, root: Path, skills, e, ev, c):
        from lib.core.modeling import load_on_device

        self.root, self.skills, self.e, self.ev, self.c = Path(root), skills, e, ev, c
        self.base, self.tok = load_on_device(self.root / "models" / "base")
        self.base.eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.tasks = list(c.tasks)
        sets = {t: data.load(self.root / "datasets" / "skills" / t, ("train", "validation", "test")) for t in self.tasks}
        self.train = {t: sets[t]["train"] for t in self.tasks}
        for ds in self.train.values():  # encode() below would cut longer answers silently, as trl would
            check_max_length(self.tok, ds, e.max_length)
        self.rows = {t: encode(self.tok, ds["prompt"], ds["answer"], e.max_length) for t, ds in self.train.items()}
        self.test = pd.concat([sets[t]["test"].to_pandas() for t in self.tasks], ignore_index=True)
        self.probe = pd.concat([sets[t]["test"].to_pandas().head(c.eval_n) for t in self.tasks], ignore_index=True)
        self.val = pd.concat([sets[t]["validation"].to_pandas().head(c.eval_n) for t in self.tasks], ignore_index=True)
        self.base_params = count_parameters(self.base)
        self.cache: dict = {}
        self.base_row = self.accuracies(self.base, self.test)
        self.base_probe = self.accuracies(self.base, self.probe)
        self._library = None

    # ---- evaluation

    def accuracies(self, model, frame: pd.DataFrame, **kw) -> dict[str, float]:
        """Exact-match accuracy per skill with the shared harness. A peft model with one
        active adapter is scored as a merged copy (W + ΔW, peft's ``merge_and_unload``): the
        same function up to float rounding, and 30-40% faster to generate with here."""
        from peft import PeftModel

        if isinstance(model, PeftModel) and "adapter_names" not in kw:
            model = copy.deepcopy(model).merge_and_unload()
        res = evaluate(model, self.tok, frame, batch_size=self.ev.batch_size, progress=False, **kw)
        return {k: float(v) for k, v in res.examples.groupby("skill")["correct"].mean().items()}

    # ---- running everything

    def run_all(self, orders: dict[str, list[str]], seed: int, on_run=None) -> list[RunResult]:
        """Every strategy of ``continual.strategies`` on every order; ``on_run()`` after each run."""
        out = []
        for name in self.c.strategies:
            fn = STRATEGIES[name]
            for order_name, skills in orders.items():
                out.append(fn(self, order_name, list(skills), seed))
                if on_run is not None:
                    on_run()
        return out

    # ---- training helpers

    def fresh_lora(self, seed: int, tag: object = 0):
        return CT.add_lora(copy.deepcopy(self.base), self.e, CT.stable_seed(seed, "lora-init", tag))

    def fresh_full(self):
        return CT.full_finetune(copy.deepcopy(self.base))

    def train_one(self, model, rows, steps: int, seed: int, label: str, *, lr: float, penalty=None,
                  pool=None, fraction: float = 0.0, curve: list | None = None, offset: int = 0, task: int = 1,
                  skills: list[str] | None = None) -> float:
        """Train ``model`` on ``rows`` for ``steps``; probe points go to ``curve`` (global
        steps ``offset + step``). Returns the training seconds."""
        batches = CT.MixedBatches(rows, self.e.batch_size, CT.stable_seed(seed, "batches", label), pool, fraction)

        probe = self.probe[self.probe.skill.isin(skills)] if curve is not None else None

        def on_eval(step):
            acc = self.accuracies(model, probe)
            curve.extend({"step": offset + step, "task": task, "skill": s, "accuracy": acc[s]} for s in skills)

        log = CT.train_task(model, batches, steps, lr, self.pad_id, weight_decay=self.e.weight_decay, penalty=penalty,
                            every=self.c.eval_every if curve is not None else 0,
                            on_eval=on_eval if curve is not None else None)
        return log.seconds

    def first_task(self, kind: str, seed: int, skill: str) -> dict:
        """The model after task 1 (``kind`` lora or full), its curve (task-local steps),
        full-test row and seconds: computed once per (kind, seed, skill), copied out."""
        key = (kind, seed, skill)
        if key not in self.cache:
            model = self.fresh_lora(seed) if kind == "lora" else self.fresh_full()
            lr = self.e.lr if kind == "lora" else self.c.full_lr
            curve = [{"step": 0, "task": 1, "skill": skill, "accuracy": self.base_probe[skill]}]
            secs = self.train_one(model, self.rows[skill], self.c.steps_per_task, seed, skill, lr=lr, curve=curve,
                                  skills=[skill])
            self.cache[key] = {"model": model, "curve": curve, "row": self.accuracies(model, self.test), "seconds": secs}
        hit = self.cache[key]
        return {"model": copy.deepcopy(hit["model"]), "curve": copy.deepcopy(hit["curve"]), "row": dict(hit["row"]),
                "seconds": hit["seconds"]}

    # ---- the expert library (stage-03 experts), loaded once

    def library(self) -> dict:
        if self._library is None:
            from lib.core.bench import lora_parameters
            from lib.experts.adapters import load_with_adapters
            from lib.merge import task_vectors as M

            dirs = {t: self.root / "models" / "experts" / t for t in self.tasks}
            peft_model, _ = load_with_adapters(self.root / "models" / "base", dirs, self.e)
            infos = {t: json.loads((d / "train_info.json").read_text()) for t, d in dirs.items()}
            self._library = {
                "model": peft_model, "tvs": M.task_vectors(peft_model, self.tasks),
                "params": {t: lora_parameters(peft_model, [t]) for t in self.tasks},
                "train_s": {t: float(infos[t].get("seconds", 0.0)) for t in self.tasks},
                "steps": {t: int(infos[t].get("steps_run", infos[t].get("steps", 0))) for t in self.tasks},
                "rows": {}, "features": None,
            }
        return self._library


# --------------------------------------------------------------------------- running the study


def _run_job(root: str, params: dict, orders: dict[str, list[str]], seed: int, queue=None) -> list[RunResult]:
    """Every strategy on ``orders`` for one seed, in one process (task-1 trainings and rows
    shared between strategies, and orders, that start alike are computed once). One item is
    put on ``queue`` (or passed to it, if callable) per finished run, for the progress bar."""
    import torch

    from lib.core import io

    io.quiet_notebook()  # a worker's library chatter would land in the executed notebook
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread per process is fastest (measured) and reproducible
    try:
        cfg = config.from_notebook(**params)
        study = Study(Path(root), cfg["skills"], cfg["experts"], cfg["evaluation"], cfg["continual"])
        tick = queue if callable(queue) or queue is None else (lambda: queue.put(1))
        return study.run_all(orders, seed, on_run=tick)
    finally:
        torch.set_num_threads(before)


def run_study(root: str | Path, skills, e, ev, c, progress: bool = True) -> list[RunResult]:
    """Every strategy × order × seed. In ``continual.workers`` processes (each one torch
    thread), one job per seed and order, so 3 seeds keep 2 workers busy; in one process, one
    job per seed. Every run's randomness comes from its seed and labels (``stable_seed``), so
    the results do not depend on the number of workers; they are returned in the same order
    (seed, strategy, order) either way."""
    from tqdm.auto import tqdm

    check_params(skills, c, root)
    orders = build_orders(c)
    params = {"skills": skills.model_dump(mode="json"), "experts": e.model_dump(mode="json"),
              "evaluation": ev.model_dump(mode="json"), "continual": c.model_dump(mode="json")}
    root = str(Path(root).resolve())
    workers = min(c.workers, len(c.seeds) * len(orders))
    bar = tqdm(total=len(c.seeds) * len(orders) * len(c.strategies), desc="continual runs", disable=not progress)
    try:
        if workers <= 1:
            runs = [r for s in c.seeds for r in _run_job(root, params, orders, s, lambda: bar.update(1))]
        else:
            import multiprocessing as mp
            import queue as queue_lib
            from concurrent.futures import ProcessPoolExecutor

            ctx = mp.get_context("spawn")
            with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                q = manager.Queue()
                futures = [pool.submit(_run_job, root, params, {o: orders[o]}, s, q) for s in c.seeds for o in orders]
                while not all(f.done() for f in futures):
                    try:
                        q.get(timeout=0.5)
                        bar.update(1)
                    except queue_lib.Empty:
                        pass
                runs = [r for f in futures for r in f.result()]
    finally:
        bar.close()
    rank = {key: i for i, key in enumerate(itertools.product(c.seeds, c.strategies, orders))}
    return sorted(runs, key=lambda r: rank[(r.seed, r.strategy, r.order)])


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (the workers)."""
    import resource

    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def run_study_timed(root: str | Path, skills, e, ev, c, progress: bool = False) -> tuple[list[RunResult], float, float]:
    """:func:`run_study` and the seconds it took: ``(results, wall_s, cpu_s)``, CPU time
    counting this process and its workers (``stage_wall_s`` / ``stage_cpu_s`` in the metrics)."""
    import time

    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    results = run_study(root, skills, e, ev, c, progress=progress)
    return results, time.perf_counter() - t0, _cpu_seconds() - cpu0


def runs_table(results: Sequence[RunResult], c) -> pd.DataFrame:
    """One row per run: its metrics, stability gap (NaN without a curve) and costs."""
    rows = []
    for r in results:
        row = {"strategy": r.strategy, "order": r.order, "seed": r.seed, **matrix_metrics(r.R),
               "trainable_params": r.trainable_params, "params_held": r.params_held, "wall_s": r.wall_s}
        if len(r.curve):
            row.update(stability_gap(r.curve, r.skills, c.steps_per_task, c.gap_window))
        rows.append(row)
    return pd.DataFrame(rows)


def switch_table(results: Sequence[RunResult], c) -> pd.DataFrame:
    """:func:`switch_points` of every run with a curve, with its strategy, order and seed."""
    frames = [switch_points(r.curve, r.skills, c.steps_per_task, c.gap_window).assign(strategy=r.strategy, order=r.order,
                                                                                      seed=r.seed)
              for r in results if len(r.curve)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def stability_table(results: Sequence[RunResult]) -> pd.DataFrame:
    frames = [r.curve.assign(strategy=r.strategy, order=r.order, seed=r.seed) for r in results if len(r.curve)]
    cols = ["strategy", "order", "seed", "step", "task", "skill", "accuracy"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


METRICS = ("ACC", "BWT", "FWT", "forgetting")
GAP = ("depth", "recovery", "min_after_switch")


def summarize(results: Sequence[RunResult], c) -> tuple[dict, pd.DataFrame]:
    """(``metrics/continual.json`` content, ``plots/continual_summary.csv`` table)."""
    table = runs_table(results, c)
    orders = build_orders(c)
    strategies = [s for s in c.strategies if s in set(table.strategy)]
    out: dict[str, Any] = {"tasks": orders, "seeds": list(c.seeds), "steps_per_task": c.steps_per_task,
                           "strategies": {}, "stability_gap": {}, "per_order": {}}
    summary = []
    for s in strategies:
        t = table[table.strategy == s]
        entry = {m: t_interval(t[m]) for m in METRICS}
        entry["R"] = {o: np.mean([r.R for r in results if r.strategy == s and r.order == o], axis=0).round(4).tolist()
                      for o in orders if any(r.strategy == s and r.order == o for r in results)}
        entry["trainable_params"] = int(t.trainable_params.max())
        entry["params_held"] = int(t.params_held.max())
        entry["wall_s"] = round(float(t.wall_s.mean()), 2)
        out["strategies"][s] = entry
        out["per_order"][s] = {o: {m: round(float(g[m].mean()), 4) for m in ("ACC", "BWT")} for o, g in t.groupby("order")}
        row = {"strategy": s, "runs": len(t)}
        for m in METRICS:
            row.update({m: entry[m]["mean"], f"{m}_lo": entry[m]["lo"], f"{m}_hi": entry[m]["hi"]})
        if "depth" in t and t["depth"].notna().any():
            out["stability_gap"][s] = {g: t_interval(t[g]) for g in GAP}
            for g in GAP:
                row.update({g: out["stability_gap"][s][g]["mean"], f"{g}_lo": out["stability_gap"][s][g]["lo"],
                            f"{g}_hi": out["stability_gap"][s][g]["hi"]})
        row.update(trainable_params=entry["trainable_params"], params_held=entry["params_held"], wall_s=entry["wall_s"])
        summary.append(row)
    candidates = {s: v["ACC"]["mean"] for s, v in out["strategies"].items() if s != "multitask" and v["ACC"]["mean"] is not None}
    out["best_strategy"] = max(candidates, key=candidates.get) if candidates else None
    return out, pd.DataFrame(summary)


def write_outputs(root: str | Path, metrics: dict, summary: pd.DataFrame, stability: pd.DataFrame,
                  wall_s: float, cpu_s: float) -> None:
    """The stage's outputs under ``root``: ``metrics/continual.json`` (``metrics`` with the
    stage's ``stage_wall_s`` and ``stage_cpu_s`` added), ``plots/continual_stability.csv``
    (every probe point) and ``plots/continual_summary.csv`` (one row per strategy)."""
    from lib.core import io

    root = Path(root)
    metrics["stage_wall_s"] = round(wall_s, 1)
    metrics["stage_cpu_s"] = round(cpu_s, 1)
    (root / "plots").mkdir(parents=True, exist_ok=True)
    stability.to_csv(root / "plots" / "continual_stability.csv", index=False)
    summary.round(4).to_csv(root / "plots" / "continual_summary.csv", index=False)
    io.write_json(root / "metrics" / "continual.json", metrics)
