"""Why merges interfere: the geometry of the task vectors and their weight disentanglement.

* :func:`cosine_matrix`: cosine similarity of every pair of experts' task vectors, each
  flattened over all modules (task vectors that are close to orthogonal add with less
  interference; Ilharco et al. 2023 report near-zero cosines between fine-tuned tasks).
* :func:`disentanglement_error`: the weight-disentanglement error of Ortiz-Jimenez et al.
  2023 ("Task arithmetic in the tangent space", eq. 4) for a pair of tasks and a grid of
  coefficients: ``ξ(α1, α2) = Σ_{t∈{1,2}} E_{x∈D_t} [ f(x; θ0 + α1τ1 + α2τ2) ≠ f(x; θ0 + α_t τ_t) ]``,
  with ``f`` the greedy answer and the disagreement the paper's 0/1 distance for
  classification. Zero means adding the other task's vector does not change what the model
  does on this task's inputs: the two vectors are disentangled. Reported per task (not
  summed), so it reads as a rate in [0, 1].
* :func:`singular_task_interference`: the singular task interference of Gargiulo et al. 2025
  ("Task singular vectors", the measure TSV-M is built to reduce) for one module:
  ``‖(UᵀU − I) Σ (VᵀV − I)‖₁`` with ``U``, ``Σ``, ``V`` every task's singular vectors and
  values side by side (each task cut at its numerical rank, as in ``tsv_m``). Zero when the
  tasks' singular subspaces are orthogonal; also given relative to ``‖Σ‖₁``.
* :func:`retained`: how much of each expert's update a merge keeps, ``⟨M, τ_s⟩ / ‖τ_s‖²``
  over all modules (the merge at its chosen λ projected on the expert's task vector): 1 means
  the merge moves the weights along skill s as far as the expert did. Task arithmetic at λ
  with orthogonal task vectors keeps λ of each; trimming, dropping and spectral reshaping keep
  different shares of different skills, which is what the per-skill accuracies can be read
  against.

Hand-written: the formulas are a few lines on top of :mod:`lib.merge.task_vectors` and the
evaluation harness; no installable library computes them for LoRA task vectors.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lib.core.evaluation import evaluate
from lib.merge.task_vectors import apply_merged, merge_task_vectors


def _flat(tv: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tv[k].detach().float().reshape(-1) for k in sorted(tv)])


def cosine_matrix(tvs: Mapping[str, Mapping[str, torch.Tensor]]) -> pd.DataFrame:
    """Cosine similarity of the flattened task vectors (rows and columns: expert names)."""
    names = list(tvs)
    modules = {n: sorted(tvs[n]) for n in names}
    if any(modules[n] != modules[names[0]] for n in names):
        raise ValueError("task vectors must cover the same modules to be compared")
    flat = torch.stack([_flat(tvs[n]) for n in names])
    norms = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (flat / norms) @ (flat / norms).T
    return pd.DataFrame(cos.cpu().numpy().astype(np.float64), index=names, columns=names)


def singular_task_interference(deltas: Sequence[torch.Tensor]) -> dict[str, float]:
    """``{"sti": ‖(UᵀU − I) Σ (VᵀV − I)‖₁, "relative": sti / ‖Σ‖₁}`` over the experts' updates
    of one module (2-D tensors). Unchanged by the sign choices of the SVD (flipping a pair
    ``u_j, v_j`` only flips signs inside the product)."""
    from lib.merge.methods._spectral import svd_cut

    parts = [svd_cut(d) for d in deltas]
    u = torch.cat([p[0] for p in parts], dim=1)
    s = torch.cat([p[1] for p in parts])
    v = torch.cat([p[2] for p in parts], dim=0).T
    eye = torch.eye(len(s), dtype=u.dtype)
    sti = float(((u.T @ u - eye) @ torch.diag(s) @ (v.T @ v - eye)).abs().sum())
    total = float(s.abs().sum())
    return {"sti": sti, "relative": sti / total if total else 0.0}


def retained(merged_by: Mapping[str, Mapping[str, torch.Tensor]],
             tvs: Mapping[str, Mapping[str, torch.Tensor]]) -> pd.DataFrame:
    """method, skill, retained: ``Σ_m ⟨M_m, τ_s,m⟩ / Σ_m ‖τ_s,m‖²`` for every merge in ``merged_by``
    ({method: {module: ΔW}}) and every expert in ``tvs``; modules a merge lacks count as 0."""
    rows = []
    for method, merged in merged_by.items():
        for skill, tv in tvs.items():
            den = sum(float((t.double() ** 2).sum()) for t in tv.values())
            num = sum(float((merged[m].double() * t.double()).sum()) for m, t in tv.items() if m in merged)
            rows.append({"method": method, "skill": skill, "retained": num / den if den else float("nan")})
    return pd.DataFrame(rows, columns=["method", "skill", "retained"])


def sti_table(tvs: Mapping[str, Mapping[str, torch.Tensor]]) -> pd.DataFrame:
    """module, module_type (q_proj, down_proj, ...), sti, relative: :func:`singular_task_interference`
    of every expert's update of each module they all adapt."""
    names = list(tvs)
    modules = sorted(set.intersection(*(set(tvs[n]) for n in names))) if names else []
    rows = []
    for m in modules:
        r = singular_task_interference([tvs[n][m] for n in names])
        rows.append({"module": m, "module_type": m.split(".")[-1], **r})
    return pd.DataFrame(rows, columns=["module", "module_type", "sti", "relative"])


def _answers(model, tok, rows, settings) -> list[str]:
    res = evaluate(model, tok, rows, settings=settings, progress=False)
    return list(res.examples["prediction"])


def disentanglement_error(base, tok, tvs: Mapping[str, Mapping[str, torch.Tensor]], prompts: Mapping[str, object],
                          pairs: Sequence[tuple[str, str]], grid: Sequence[float], settings) -> pd.DataFrame:
    """Long table (task_a, task_b, alpha_a, alpha_b, task, error): for each pair and each
    (α_a, α_b) in ``grid`` × ``grid``, the share of ``prompts[task]`` on which the model with
    both scaled task vectors answers differently from the model with only that task's."""
    rows, alone = [], {}

    def answers_alone(task, alpha):
        if (task, alpha) not in alone:
            model = apply_merged(base, merge_task_vectors({task: tvs[task]}, "task_arithmetic", weights=[alpha]))
            alone[(task, alpha)] = _answers(model, tok, prompts[task], settings)
        return alone[(task, alpha)]

    for a, b in pairs:
        for alpha_a, alpha_b in itertools.product(grid, grid):
            both = apply_merged(base, merge_task_vectors({a: tvs[a], b: tvs[b]}, "task_arithmetic",
                                                         weights=[alpha_a, alpha_b]))
            for task, alpha in ((a, alpha_a), (b, alpha_b)):
                merged = _answers(both, tok, prompts[task], settings)
                ref = answers_alone(task, alpha)
                rows.append({"task_a": a, "task_b": b, "alpha_a": float(alpha_a), "alpha_b": float(alpha_b),
                             "task": task, "error": float(np.mean([m != r for m, r in zip(merged, ref)]))})
    return pd.DataFrame(rows)


def disentanglement_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean error per (α_a, α_b) over pairs and both tasks: the paper's heat map, averaged."""
    return table.groupby(["alpha_a", "alpha_b"]).error.mean().unstack("alpha_b")
