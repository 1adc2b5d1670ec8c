"""LoraHub: one weight per expert, found by gradient-free search on a few target examples.

Huang et al. 2023, "LoraHub: Efficient cross-task generalization via dynamic LoRA
composition" (arXiv:2307.13269). Given experts ``ΔW_1..ΔW_n`` and a handful of examples of a
new task, LoraHub searches weights ``w`` minimising

    objective(w) = CE(model(w); examples) + l1 · mean_i |w_i|

with nevergrad's ``NGOpt`` (the paper's choice and defaults: ``budget`` 40 evaluations,
``l1 = 0.05``, ``w_i ∈ [-1.5, 1.5]``, starting from ``w = 0``, i.e. the base model), and
returns nevergrad's recommendation. No gradients, no training: ``budget`` forward passes over
the examples.

Where this differs from the paper, and why
------------------------------------------
* Composition space. The paper composes the LoRA *factors*, ``A = Σ w_i A_i`` and
  ``B = Σ w_i B_i``, which adds cross terms ``B_i A_j`` and needs experts of one rank. Here
  the composition is in the exact weight-update space, ``model(w) = base + Σ_i w_i ΔW_i``
  (:func:`lib.merge.task_vectors.merge_task_vectors` with ``"task_arithmetic"``), so each weight scales
  exactly its expert's update, ranks may differ, and the result is comparable with the other
  ΔW-space merges of the notebook. :mod:`lib.merge.adapter_space` shows the factor-space cross
  terms.
* Loss. Mean cross-entropy over the *answer* tokens of all examples together (not a mean of
  per-batch means), with the examples tokenised the way the experts were trained
  (:func:`lib.core.training.sft_rows` and trl: ``prompt + " " + answer + eos``, loss on the
  completion only), so ``batch_size`` never changes the number.
* nevergrad 1.0.12's ``NGOpt`` picks its optimiser from the budget and the dimension; for the
  paper's sizes (a few to ~20 experts, budget 40) it is COBYLA, which is deterministic. The
  parametrisation's random state is seeded anyway, for the budgets where NGOpt picks a
  stochastic optimiser.

What is hand-written: the search bookkeeping (encoding and loss are lib/core/sft_data.py's).
Each candidate is scored with ``torch.func.functional_call`` and the weights ``W + ΔW(w)``
of the adapted modules only, so the model is never copied or modified (``budget`` calls).
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from lib.core.sft_data import encode, make_batches, mean_loss
from lib.merge.task_vectors import MergeError, apply_merged, merge_task_vectors

Tensor = torch.Tensor


# --------------------------------------------------------------------------- examples and loss


def _pairs(examples) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from a list of pairs, a list of dicts or a frame with prompt/answer columns."""
    if hasattr(examples, "columns"):
        missing = [c for c in ("prompt", "answer") if c not in examples.columns]
        if missing:
            raise ValueError(f"examples frame lacks column(s) {missing}; it has {list(examples.columns)}")
        pairs = list(zip(examples["prompt"], examples["answer"]))
    else:
        pairs = [(e["prompt"], e["answer"]) if isinstance(e, Mapping) else tuple(e) for e in examples]
    if not pairs:
        raise ValueError("no examples: LoraHub needs a few (prompt, answer) examples of the target task")
    if any(len(p) != 2 for p in pairs):
        raise ValueError("each example must be a (prompt, answer) pair")
    return [(str(p), str(a)) for p, a in pairs]


def encode_examples(tokenizer, examples) -> list[tuple[tuple[int, ...], int]]:
    """The (prompt, answer) examples tokenised as the experts were trained: trl's
    prompt/completion rows (:func:`lib.core.sft_data.encode`), loss on the answer only."""
    pairs = _pairs(examples)
    return encode(tokenizer, [p for p, _ in pairs], [a for _, a in pairs])


def _check_tvs(base_model, tvs) -> tuple[list[str], list[str]]:
    experts = list(tvs)
    if not experts:
        raise MergeError("LoraHub: no experts (empty task vectors)")
    modules = sorted({m for e in experts for m in tvs[e]})
    for m in modules:
        try:
            weight = base_model.get_submodule(m).weight
        except AttributeError:
            raise MergeError(f"LoraHub: the base model has no module {m!r} with a weight") from None
        for e in experts:
            if m in tvs[e] and tuple(tvs[e][m].shape) != tuple(weight.shape):
                raise MergeError(f"LoraHub: expert {e!r} ΔW for {m!r} has shape {tuple(tvs[e][m].shape)}, "
                                 f"the weight has {tuple(weight.shape)}")
    return experts, modules


def make_loss_fn(base_model, tokenizer, tvs: Mapping[str, Mapping[str, Tensor]], examples,
                 batch_size: int = 16) -> Callable[[Sequence[float]], float]:
    """``loss(w)``: :func:`lib.core.sft_data.mean_loss` of ``base + Σ_i w_i ΔW_i`` on ``examples`` (``w`` in ``tvs``' order).

    The composed weights are passed to ``functional_call``; ``base_model`` is never modified.
    """
    experts, modules = _check_tvs(base_model, tvs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(base_model.parameters()).device
    batches = make_batches(encode_examples(tokenizer, examples), batch_size, pad_id, device)
    weights = {m: base_model.get_submodule(m).weight for m in modules}

    def loss(w: Sequence[float]) -> float:
        w = [float(x) for x in w]
        if len(w) != len(experts):
            raise ValueError(f"{len(w)} weights for {len(experts)} experts {experts}")
        merged = merge_task_vectors(tvs, "task_arithmetic", weights=w)
        params = {f"{m}.weight": (weights[m].float() + merged[m].to(weights[m].device)).to(weights[m].dtype)
                  for m in modules}
        return mean_loss(base_model, batches, params)

    return loss


def l1_penalty(weights: Sequence[float], l1: float) -> float:
    """The paper's regulariser: ``l1 · mean_i |w_i|``."""
    return float(l1) * sum(abs(float(x)) for x in weights) / len(weights)


def compose(base_model, tvs: Mapping[str, Mapping[str, Tensor]], weights: Mapping[str, float] | Sequence[float]):
    """A copy of ``base_model`` with ``W + Σ_i w_i ΔW_i`` (e.g. LoraHub's result ``weights``)."""
    return apply_merged(base_model, merge_task_vectors(tvs, "task_arithmetic", weights=weights))


# --------------------------------------------------------------------------- the search


def _check_search(budget, l1, bounds) -> tuple[float, float]:
    if isinstance(budget, bool) or int(budget) != budget or budget < 1:
        raise ValueError(f"budget (loss evaluations) must be a positive integer, got {budget!r}")
    if not math.isfinite(float(l1)) or l1 < 0:
        raise ValueError(f"l1 must be a finite number >= 0, got {l1!r}")
    lo, hi = (float(b) for b in bounds)
    if not (lo <= 0.0 <= hi and lo < hi):
        raise ValueError(f"bounds must satisfy lower <= 0 <= upper (the search starts at w = 0), got {bounds!r}")
    return lo, hi


def lorahub_search(base_model, tokenizer, tvs: Mapping[str, Mapping[str, Tensor]], examples, *, budget: int = 40,
                   l1: float = 0.05, bounds: tuple[float, float] = (-1.5, 1.5), seed: int = 0,
                   batch_size: int = 16) -> dict:
    """LoraHub's weight search (Huang et al. 2023) in ΔW space; see the module docstring.

    ``tvs``: :func:`lib.merge.task_vectors.task_vectors` of the experts; ``examples``: (prompt, answer)
    pairs, dicts or a frame with ``prompt`` / ``answer`` columns. Returns a dict:

    * ``weights``: ``{expert: w}``, nevergrad's recommendation (what the paper uses);
    * ``loss`` / ``objective``: its answer-token cross-entropy, and that plus the L1 term;
    * ``start_loss``: the loss at ``w = 0`` (the base model);
    * ``history``: one row per evaluation, ``{step, weights, loss, objective}``, in order;
    * ``optimizer``: the optimiser NGOpt chose; ``seconds``: wall time.

    Deterministic for a given ``seed`` (and inputs). ``base_model`` is not modified.
    """
    import nevergrad as ng

    lo, hi = _check_search(budget, l1, bounds)
    experts = list(tvs)
    loss_fn = make_loss_fn(base_model, tokenizer, tvs, examples, batch_size=batch_size)
    t0 = time.perf_counter()
    history: list[dict] = []
    seen: dict[tuple[float, ...], float] = {}

    def objective(w: np.ndarray) -> float:
        w = [float(x) for x in w]
        loss = loss_fn(w)
        seen[tuple(w)] = loss
        value = loss + l1_penalty(w, l1)
        history.append({"step": len(history), "weights": dict(zip(experts, w)), "loss": loss, "objective": value})
        return value

    n = len(experts)
    param = ng.p.Array(init=np.zeros(n), lower=np.full(n, lo), upper=np.full(n, hi))
    param.random_state = np.random.RandomState(int(seed))
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=int(budget), num_workers=1)
    with warnings.catch_warnings():
        # scipy's COBYLA (chosen by NGOpt) complains about nevergrad's stopping radius; harmless.
        warnings.filterwarnings("ignore", message=r"COBYLA: Invalid RHOEND")
        recommendation = optimizer.minimize(objective)
    best = [float(x) for x in recommendation.value]
    loss = seen[tuple(best)] if tuple(best) in seen else loss_fn(best)
    start = seen.get((0.0,) * n)
    return {
        "weights": dict(zip(experts, best)),
        "loss": loss,
        "objective": loss + l1_penalty(best, l1),
        "start_loss": start if start is not None else loss_fn([0.0] * n),
        "history": history,
        "optimizer": str(getattr(getattr(optimizer, "optim", None), "name", "NGOpt")),
        "seconds": time.perf_counter() - t0,
    }


__all__ = ["compose", "encode_examples", "l1_penalty", "lorahub_search", "make_loss_fn"]
