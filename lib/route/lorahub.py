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

What is hand-written: example encoding, the loss, the evaluation loop and the bookkeeping.
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

from lib.merge.task_vectors import MergeError, apply_merged, merge_task_vectors

Tensor = torch.Tensor
Batch = tuple[Tensor, Tensor, Tensor]  # input_ids, attention_mask, labels (-100 off the answer)


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


def encode_examples(tokenizer, examples) -> list[tuple[list[int], int]]:
    """``[(token ids of prompt + " " + answer + eos, prompt length)]``, tokenised as trl's SFTTrainer does.

    trl tokenises the prompt alone and ``prompt + completion`` (``completion = " " + answer``
    plus the eos token, :func:`lib.core.training.sft_rows`), and the completion starts where the
    two diverge; the loss covers the tokens from there on.
    """
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: the answers the experts learnt end with it")
    out = []
    for prompt, answer in _pairs(examples):
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + " " + answer + tokenizer.eos_token)["input_ids"]
        n = 0
        while n < min(len(prompt_ids), len(ids)) and prompt_ids[n] == ids[n]:
            n += 1
        if n >= len(ids):
            raise ValueError(f"example {prompt!r} -> {answer!r} has no answer tokens")
        out.append((list(ids), n))
    return out


def make_batches(encoded: Sequence[tuple[list[int], int]], batch_size: int, pad_id: int,
                 device: torch.device | str = "cpu") -> list[Batch]:
    """Right-padded batches (as in training) with labels = ids on the answer tokens, -100 elsewhere."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (ids, n_prompt) in enumerate(chunk):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            mask[r, :len(ids)] = 1
            labels[r, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
        batches.append((input_ids.to(device), mask.to(device), labels.to(device)))
    return batches


@torch.no_grad()
def answer_loss(model, batches: Sequence[Batch], params: Mapping[str, Tensor] | None = None) -> float:
    """Mean cross-entropy (nats per token) over every answer token of ``batches``.

    ``params`` replaces some of the model's parameters for this call only
    (``torch.func.functional_call``); the model is run in eval mode (no dropout).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for input_ids, mask, labels in batches:
            kwargs = {"input_ids": input_ids, "attention_mask": mask}
            if params:
                out = torch.func.functional_call(model, dict(params), args=(), kwargs=kwargs)
            else:
                out = model(**kwargs)
            logits = out.logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    finally:
        model.train(was_training)
    return total / count


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
    """``loss(w)``: :func:`answer_loss` of ``base + Σ_i w_i ΔW_i`` on ``examples`` (``w`` in ``tvs``' order).

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
        return answer_loss(base_model, batches, params)

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


__all__ = ["answer_loss", "compose", "encode_examples", "l1_penalty", "lorahub_search", "make_batches", "make_loss_fn"]
