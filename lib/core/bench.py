"""The scoring bench every stage-04 system goes through, and what each system cost.

Every method becomes a *system*: something the evaluation harness can score (a plain model,
a peft model with adapter names per example, or a wrapper with its own ``generate``) plus
what it cost to build and to hold. :class:`Bench` scores every system on the same test
sets, keeps the per-example results, and turns them into one leaderboard with bootstrap
confidence intervals, so no method gets its own evaluation code. It lives in ``core``
because merges, routers and the continual library all hand it systems.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from lib.core.evaluation import EvalResult, evaluate
from lib.core.stats import macro_ci

SETS = ("skills", "composed", "heldout")


# --------------------------------------------------------------------------- systems


@dataclass
class System:
    """One way of answering every prompt, and what it cost.

    ``kind``: base, expert, joint, merge (ΔW space), peft_merge (adapter space) or router.
    ``extra_params``: parameters held in memory on top of the base model. ``build_s``:
    seconds to build it (merge, router training, search), excluding expert training.
    ``route``: keyword arguments for :func:`lib.core.evaluation.evaluate` (``adapter_names`` as a
    callable of the dataset, or ``router``), for systems that pick adapters per example.
    """

    name: str
    kind: str
    model: Any
    extra_params: int = 0
    build_s: float = 0.0
    sets: tuple[str, ...] = SETS
    adapter_names: Callable[[Any], list[str]] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def lora_parameters(peft_model, names: list[str]) -> int:
    """Parameters of the named LoRA adapters (their A and B matrices)."""
    total = 0
    for pname, p in peft_model.named_parameters():
        if ".lora_A." in pname or ".lora_B." in pname:
            if any(f".{n}." in pname for n in names):
                total += p.numel()
    return total


# --------------------------------------------------------------------------- scoring


@dataclass
class Bench:
    """Scores systems on fixed test sets and keeps every result.

    ``tests``: {set name: dataset} (skills, composed, heldout). ``ev``: the evaluation params.
    ``results[(system, set)]`` is the harness's EvalResult; ``seconds[(system, set)]`` the
    time its generation took (for tokens/s).
    """

    tok: Any
    tests: dict[str, Any]
    ev: Any
    progress: bool = False
    results: dict[tuple[str, str], EvalResult] = field(default_factory=dict)
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    systems: dict[str, System] = field(default_factory=dict)

    def score(self, system: System, sets: tuple[str, ...] | None = None) -> dict[str, EvalResult]:
        self.systems[system.name] = system
        out = {}
        for set_name in sets or system.sets:
            if set_name not in self.tests:
                continue
            data = self.tests[set_name]
            kw = {}
            if system.adapter_names is not None:
                kw["adapter_names"] = system.adapter_names(data)
            t0 = time.perf_counter()
            res = evaluate(system.model, self.tok, data, settings=self.ev, progress=self.progress, **kw)
            self.seconds[(system.name, set_name)] = time.perf_counter() - t0
            self.results[(system.name, set_name)] = res
            out[set_name] = res
        return out

    def tokens_per_s(self, name: str) -> float:
        keys = [k for k in self.results if k[0] == name]
        toks = sum(int(self.results[k].examples["n_tokens"].sum()) for k in keys)
        secs = sum(self.seconds[k] for k in keys)
        return toks / secs if secs else float("nan")

    def per_skill(self) -> pd.DataFrame:
        """Long table: system, kind, skill, n, accuracy, ci_low, ci_high, ece (skills set)."""
        frames = []
        for (name, set_name), res in self.results.items():
            if set_name != "skills":
                continue
            per = res.per_skill()
            per.insert(0, "kind", self.systems[name].kind)
            per.insert(0, "system", name)
            frames.append(per)
        return pd.concat(frames, ignore_index=True)

    def leaderboard(self, expert_acc: dict[str, float], base: str = "base") -> pd.DataFrame:
        """One row per system: mean and normalised accuracy on the training skills (with CIs),
        composed and held-out accuracy (with CIs), and costs; tokens/s is relative to ``base``."""
        base_speed = self.tokens_per_s(base) if any(k[0] == base for k in self.results) else float("nan")
        rows = []
        for name, sys_ in self.systems.items():
            row: dict[str, Any] = {"system": name, "kind": sys_.kind}
            skills = self.results.get((name, "skills"))
            if skills is not None:
                ex = skills.examples
                row["mean_acc"], row["mean_lo"], row["mean_hi"] = macro_ci(ex, None, self.ev.n_boot)
                row["norm_acc"], row["norm_lo"], row["norm_hi"] = macro_ci(ex, expert_acc, self.ev.n_boot)
            for set_name in ("composed", "heldout"):
                res = self.results.get((name, set_name))
                if res is not None:
                    acc, lo, hi = res.accuracy_ci()
                    row[set_name], row[f"{set_name}_lo"], row[f"{set_name}_hi"] = acc, lo, hi
            row["extra_params"] = sys_.extra_params
            row["build_s"] = round(sys_.build_s, 3)
            row["tokens_per_s_rel"] = self.tokens_per_s(name) / base_speed if base_speed else float("nan")
            rows.append(row)
        return pd.DataFrame(rows)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


