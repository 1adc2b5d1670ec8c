"""Stage 05 strategies: the registry ``STRATEGIES`` (name in ``continual.strategies`` -> function).

Every strategy function takes ``(study, order_name, skills, seed)`` and returns a
:class:`lib.continual.runs.RunResult`. Definitions of the measurements are in ``lib/continual/study.py``,
the training recipe and the penalties in ``lib/continual/loop.py``.

* ``sequential_lora``: one LoRA (the experts' recipe), trained on task 1, continued on task 2, ...
* ``sequential_full``: the same with every weight of the base trainable (``continual.full_lr``).
* ``replay``: sequential LoRA; from task 2 on, ``replay.fraction`` of every batch is drawn
  from a buffer of ``replay.buffer`` training rows kept from each finished task.
* ``ewc`` / ``l2``: sequential LoRA with the EWC / L2-to-previous-weights penalty.
* ``olora``: a new LoRA per task, earlier ones frozen, orthogonality penalty on the A's.
* ``library_merge``: the stage-03 expert of every task seen so far (trained independently,
  never retrained here), merged in weight-update space with ``library.merge``; the merge's
  λ is chosen on the seen skills' validation prompts from ``library.lam_grid`` after every
  task (one λ in the grid = fixed).
* ``library_route``: the same experts behind lib/route/routing.py's ``TaskRouter``, retrained
  after every task on ``library.router.n_train`` training prompts of each seen skill.
* ``multitask``: one LoRA trained from scratch after every task on all skills seen so far
  (their training sets concatenated and shuffled), for ``steps_per_task × tasks seen``
  steps (``multitask_budget: cumulative``, the steps a sequential run has taken by then) or
  ``steps_per_task`` (``per_task``).

Work shared, since the results are identical: every LoRA strategy's first task (same init,
same batches: replay and penalties only act from task 2 on), and multitask's first row,
is one training per seed and first skill; rows for the same set of seen skills are computed
once (multitask, library). Each run's ``wall_s`` still counts the shared work, as if it had
run alone.
"""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.continual import loop as CT
from lib.core import data
from lib.continual.runs import RunResult
from lib.core.sft_data import encode
from lib.core.evaluation import evaluate
from lib.core.training import count_parameters

STRATEGIES: dict[str, Callable[..., RunResult]] = {}


def strategy(name: str):
    def register(fn):
        STRATEGIES[name] = fn
        return fn
    return register


def get_strategy(name: str):
    if name not in STRATEGIES:
        raise KeyError(f"unknown continual strategy {name!r}; known strategies: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


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
            fn = get_strategy(name)
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
            from lib.merge import task_vectors as M
            from lib.experts.adapters import load_with_adapters
            from lib.merge.leaderboard import lora_parameters

            dirs = {t: self.root / "models" / "experts" / t for t in self.tasks}
            peft_model, _ = load_with_adapters(self.root / "models" / "base", dirs)
            infos = {t: json.loads((d / "train_info.json").read_text()) for t, d in dirs.items()}
            self._library = {
                "model": peft_model, "tvs": M.task_vectors(peft_model, self.tasks),
                "params": {t: lora_parameters(peft_model, [t]) for t in self.tasks},
                "train_s": {t: float(infos[t].get("seconds", 0.0)) for t in self.tasks},
                "steps": {t: int(infos[t].get("steps_run", infos[t].get("steps", 0))) for t in self.tasks},
                "rows": {}, "features": None,
            }
        return self._library


def _result(study: Study, name: str, order: str, skills: list[str], seed: int, rows: list[dict], curve: list,
            trainable: int, held: int, wall: float, **info) -> RunResult:
    R = np.array([[study.base_row[s] for s in skills]] + [[row[s] for s in skills] for row in rows])
    return RunResult(name, order, seed, skills, R, pd.DataFrame(curve, columns=["step", "task", "skill", "accuracy"]),
                     int(trainable), int(held), float(wall), info)


# --------------------------------------------------------------------------- sequential strategies


class _Plain:
    """No penalty, nothing kept between tasks."""

    def penalty(self, model):
        return None

    def after_task(self, study, model, skill, seed, t, last):
        return model

    def held(self) -> int:
        return 0


class _EWC(_Plain):
    def __init__(self, p):
        self.p, self.anchors = p, []

    def penalty(self, model):
        if not self.anchors:
            return None
        params = CT.trainable(model)
        return lambda: CT.ewc_penalty(params, self.anchors, self.p.lam)

    def after_task(self, study, model, skill, seed, t, last):
        if last:  # no later task to protect it for
            return model
        rows = CT.replay_buffer(study.rows[skill], self.p.fisher_n, CT.stable_seed(seed, "fisher", skill))
        fisher = CT.fisher_diagonal(model, rows, study.pad_id, self.p.fisher_batch)
        self.anchors.append((fisher, CT.snapshot(CT.trainable(model))))
        return model

    def held(self) -> int:
        return CT.count([list(a) for a in self.anchors])


class _L2(_Plain):
    def __init__(self, p):
        self.p, self.anchor = p, None

    def penalty(self, model):
        if self.anchor is None:
            return None
        params = CT.trainable(model)
        return lambda: CT.l2_penalty(params, self.anchor, self.p.lam)

    def after_task(self, study, model, skill, seed, t, last):
        if not last:
            self.anchor = CT.snapshot(CT.trainable(model))
        return model

    def held(self) -> int:
        return CT.count(self.anchor) if self.anchor else 0


class _OLoRA(_Plain):
    def __init__(self, p):
        self.p, self.old = p, []

    def penalty(self, model):
        if not self.old:
            return None
        new_a, params = CT.lora_a(model), CT.trainable(model)

        def pen():
            out = CT.olora_penalty(new_a, self.old, self.p.lam)
            if self.p.l2:
                out = out + self.p.l2 * sum((p.float() ** 2).sum() for p in params.values())
            return out
        return pen

    def after_task(self, study, model, skill, seed, t, last):
        if last:
            return model
        self.old.append({m: a.detach().float().clone() for m, a in CT.lora_a(model).items()})
        merged = model.merge_and_unload()  # W += ΔW_t: the frozen earlier LoRAs, summed into the weights
        for p in merged.parameters():
            p.requires_grad_(False)
        return CT.add_lora(merged, study.e, CT.stable_seed(seed, "lora-init", t + 1))

    def held(self) -> int:
        return CT.count(self.old)


def _sequential(study: Study, name: str, order: str, skills: list[str], seed: int, *, kind: str = "lora",
                reg=None, fraction: float = 0.0, buffer: int | None = None) -> RunResult:
    c, S = study.c, study.c.steps_per_task
    reg = reg or _Plain()
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
    return _result(study, name, order, skills, seed, rows, curve, trainable, held, wall,
                   replay_rows=len(pool))


@strategy("sequential_lora")
def sequential_lora(study, order, skills, seed):
    return _sequential(study, "sequential_lora", order, skills, seed)


@strategy("sequential_full")
def sequential_full(study, order, skills, seed):
    return _sequential(study, "sequential_full", order, skills, seed, kind="full")


@strategy("replay")
def replay(study, order, skills, seed):
    p = study.c.replay
    return _sequential(study, "replay", order, skills, seed, fraction=p.fraction, buffer=p.buffer)


@strategy("ewc")
def ewc(study, order, skills, seed):
    return _sequential(study, "ewc", order, skills, seed, reg=_EWC(study.c.ewc))


@strategy("l2")
def l2(study, order, skills, seed):
    return _sequential(study, "l2", order, skills, seed, reg=_L2(study.c.l2))


@strategy("olora")
def olora(study, order, skills, seed):
    return _sequential(study, "olora", order, skills, seed, reg=_OLoRA(study.c.olora))


# --------------------------------------------------------------------------- multitask upper bound


@strategy("multitask")
def multitask(study, order, skills, seed):
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
    return _result(study, "multitask", order, skills, seed, rows, [], trainable, held, wall)


# --------------------------------------------------------------------------- the expert library


@strategy("library_merge")
def library_merge(study, order, skills, seed):
    from lib.merge import task_vectors as M
    from lib.merge.leaderboard import choose_lambda
    from lib.merge.methods import MERGE_METHODS

    lib, p = study.library(), study.c.library
    rows, wall, lams = [], 0.0, []
    for i in range(1, len(skills) + 1):
        seen = skills[:i]
        key = ("merge", frozenset(seen), seed if MERGE_METHODS.get(p.merge).random else None)
        if key not in lib["rows"]:
            tvs = {t: lib["tvs"][t] for t in seen}
            val = study.val[study.val.skill.isin(seen)]

            def build(lam):
                weights = None if p.merge == "linear" else [lam] * len(seen)
                merged = M.merge_task_vectors(tvs, p.merge, weights=weights, seed=seed, **M.method_kwargs(p.merge, p))
                return M.apply_merged(study.base, merged)

            def score(model):
                return float(np.mean(list(study.accuracies(model, val).values())))

            t0 = time.perf_counter()
            grid = [1.0] if p.merge == "linear" else p.lam_grid
            lam, model, _, _ = choose_lambda(build, grid, score)
            lib["rows"][key] = {"row": study.accuracies(model, study.test), "seconds": time.perf_counter() - t0, "lam": lam}
        hit = lib["rows"][key]
        rows.append(hit["row"])
        lams.append(hit["lam"])
        wall += hit["seconds"] + lib["train_s"][skills[i - 1]]
    trainable = max(lib["params"][t] for t in skills)
    held = study.base_params + sum(lib["params"][t] for t in skills)
    return _result(study, "library_merge", order, skills, seed, rows, [], trainable, held, wall, lam=lams,
                   expert_steps=[lib["steps"][t] for t in skills])


@strategy("library_route")
def library_route(study, order, skills, seed):
    from lib.route.routing import TaskRouter

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
    return _result(study, "library_route", order, skills, seed, rows, [], trainable, held, wall,
                   expert_steps=[lib["steps"][t] for t in skills])
