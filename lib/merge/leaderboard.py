"""Stage 04: one system that does every skill, built from the experts by merging or routing.

The scoring harness (:class:`lib.core.bench.Bench`) scores every system the same way;
this module chooses each merge's λ and reads the finished leaderboard.

Merges in weight-update space scale their sum by a global λ (task arithmetic's λ; the TIES
and DARE papers tune the same scale), chosen per method on the *validation* splits from
``merge_route.lam_grid``; the test splits are only used for the reported numbers.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from lib.core.bench import timed
from lib.core.evaluation import evaluate


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
