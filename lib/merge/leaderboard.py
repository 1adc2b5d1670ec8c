"""Stage 04: one system that does every skill, built from the experts by merging or routing.

Every method becomes a *system*: something the evaluation harness can score (a plain model,
a peft model with adapter names per example, or a wrapper with its own ``generate``) plus
what it cost to build and to hold. :class:`Bench` scores every system on the same test
sets, keeps the per-example results, and turns them into one leaderboard with bootstrap
confidence intervals, so no method gets its own evaluation code.

Merges in weight-update space scale their sum by a global λ (task arithmetic's λ; the TIES
and DARE papers tune the same scale), chosen per method on the *validation* splits from
``merge_route.lam_grid``; the test splits are only used for the reported numbers.
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
            res = evaluate(system.model, self.tok, data, batch_size=self.ev.batch_size, n_boot=self.ev.n_boot,
                           n_bins=self.ev.ece_bins, progress=self.progress, **kw)
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


# --------------------------------------------------------------------------- λ selection


def validation_accuracy(model, tok, val, ev, **kw) -> float:
    """Macro accuracy (mean over skills) on the validation splits: what λ is chosen by.
    Called once per candidate, so it skips the intervals and calibration the report needs."""
    res = evaluate(model, tok, val, batch_size=ev.batch_size, progress=False, **kw)
    return float(res.examples.groupby("skill")["correct"].mean().mean())


def choose_lambda(build: Callable[[float], Any], lam_grid: list[float], score: Callable[[Any], float],
                  discard: Callable[[Any], None] | None = None) -> tuple[float, Any, pd.DataFrame, float]:
    """Build a candidate for every λ (timed), score each; return (best λ, its candidate, the
    curve λ / val_accuracy / build_s, seconds the best one took to build). Candidates that
    lose are passed to ``discard`` (e.g. to delete a peft adapter). Ties go to the smaller λ
    (the smaller edit of the base)."""
    curve, best = [], None
    for lam in sorted(lam_grid):
        candidate, secs = timed(lambda: build(lam))
        acc = score(candidate)
        curve.append({"lam": lam, "val_accuracy": acc, "build_s": secs})
        if best is None or acc > best[1]:
            if best is not None and discard is not None:
                discard(best[2])
            best = (lam, acc, candidate, secs)
        elif discard is not None:
            discard(candidate)
    return best[0], best[2], pd.DataFrame(curve), best[3]


def merge_on_validation(base, tok, tvs, method: str, p, val, ev) -> dict:
    """The ΔW merge ``method`` of every expert in ``tvs``, its summed update scaled by the λ
    from ``p.lam_grid`` with the best validation accuracy (``linear``, the plain average,
    has no λ). Returns the merged model, its ΔW, λ, the curve and the build seconds."""
    from lib.merge import task_vectors as M

    def build(lam):
        weights = None if method == "linear" else [lam] * len(tvs)
        merged = M.merge_task_vectors(tvs, method, weights=weights, seed=p.seed, **M.method_kwargs(method, p))
        return M.apply_merged(base, merged), merged

    grid = [1.0] if method == "linear" else p.lam_grid
    lam, (model, merged), curve, build_s = choose_lambda(build, grid, lambda c: validation_accuracy(c[0], tok, val, ev))
    return {"model": model, "merged": merged, "lam": lam, "curve": curve, "build_s": build_s}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


# --------------------------------------------------------------------------- reading the table


def beats_joint(per_skill: pd.DataFrame, joints: list[str], skills: list[str],
                kinds: tuple[str, ...] = ("merge", "peft_merge", "router")) -> pd.DataFrame:
    """Per system, joint baseline and skill: ``beats`` when the system's 95% interval lies
    wholly above the joint's, ``loses`` when wholly below, else ``tie`` (intervals overlap)."""
    ref = per_skill.set_index(["system", "skill"])
    rows = []
    for system in per_skill[per_skill.kind.isin(kinds)].system.unique():
        for joint in joints:
            for skill in skills:
                if (system, skill) not in ref.index or (joint, skill) not in ref.index:
                    continue
                a, j = ref.loc[(system, skill)], ref.loc[(joint, skill)]
                verdict = "beats" if a.ci_low > j.ci_high else "loses" if a.ci_high < j.ci_low else "tie"
                rows.append({"system": system, "joint": joint, "skill": skill, "verdict": verdict,
                             "accuracy": float(a.accuracy), "joint_accuracy": float(j.accuracy)})
    return pd.DataFrame(rows, columns=["system", "joint", "skill", "verdict", "accuracy", "joint_accuracy"])


def describe(board: pd.DataFrame, verdicts: pd.DataFrame, expert_acc: dict[str, float]) -> str:
    """Plain sentences computed from the leaderboard: the best system of each kind, and
    which systems beat each joint baseline on which skills."""
    lines = []
    for kind in ("merge", "peft_merge", "router"):
        sub = board[(board.kind == kind) & board.norm_acc.notna()]
        if len(sub):
            best = sub.loc[sub.norm_acc.idxmax()]
            lines.append(f"Best {kind}: {best.system}, normalised accuracy {best.norm_acc:.3f} "
                         f"[{best.norm_lo:.3f}, {best.norm_hi:.3f}], mean accuracy {best.mean_acc:.3f}.")
    for set_name in ("composed", "heldout"):
        if set_name in board and board[set_name].notna().any():
            best = board.loc[board[set_name].idxmax()]
            lines.append(f"Best on {set_name}: {best.system} ({best[set_name]:.3f} "
                         f"[{best[f'{set_name}_lo']:.3f}, {best[f'{set_name}_hi']:.3f}]).")
    for joint in verdicts.joint.unique() if len(verdicts) else []:
        v = verdicts[verdicts.joint == joint]
        wins = v[v.verdict == "beats"].groupby("system").skill.apply(list)
        if len(wins):
            parts = [f"{s} on {', '.join(sk)}" for s, sk in wins.items()]
            lines.append(f"Beat {joint} (CI-separated): " + "; ".join(parts) + ".")
        else:
            lines.append(f"No merge or router beats {joint} on any skill with separated intervals.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- peft's adapter space

# The exact weight-update merge each peft combination type approximates (DARE: the sum it
# equals in expectation; the SVD types: the method applied to ΔW, then truncated).
PEFT_EXACT = {"linear": "task_arithmetic", "cat": "task_arithmetic", "svd": "task_arithmetic",
              "ties": "ties", "ties_svd": "ties", "dare_linear": "task_arithmetic", "dare_linear_svd": "task_arithmetic",
              "dare_ties": "ties", "dare_ties_svd": "ties", "magnitude_prune": "magnitude_prune",
              "magnitude_prune_svd": "magnitude_prune"}


def peft_merge_on_validation(peft_model, tok, tvs, names: list[str], ctype: str, p, val, ev) -> dict:
    """Build peft's ``ctype`` merge of ``names`` for every weight in ``p.lam_grid``, keep the
    one with the best validation accuracy (the others are deleted), and measure its distance
    to the exact ΔW merge it approximates."""
    from lib.merge import adapter_space as AS, task_vectors as M

    opts = {"density": p.density if ctype in AS.DENSITY_COMBINATIONS else None,
            "svd_rank": p.svd_rank if ctype in AS.SVD_COMBINATIONS else None}
    grid = sorted(p.lam_grid)

    def build(lam):
        return AS.peft_merge(peft_model, names, ctype, weights=[lam] * len(names), new_name=f"peft_{ctype}_{grid.index(lam)}",
                             majority_sign_method=p.majority_sign_method, seed=p.seed, **opts)

    def score(name):
        return validation_accuracy(peft_model, tok, val, ev, adapter_names=[name] * len(val))

    lam, keep, curve, build_s = choose_lambda(build, grid, score, discard=peft_model.delete_adapter)
    exact_method = PEFT_EXACT[ctype]
    exact = M.merge_task_vectors(tvs, exact_method, weights=[lam] * len(names), seed=p.seed, **M.method_kwargs(exact_method, p))
    return {"type": ctype, "adapter": keep, "lam": lam, "build_s": build_s, "exact_counterpart": exact_method,
            "distance_to_exact": AS.distance_to_exact(peft_model, keep, exact),
            "val_curve": dict(zip(curve.lam.astype(float), curve.val_accuracy))}
