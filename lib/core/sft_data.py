"""The one supervised data path outside trl's trainer: encode, collate, completion-only loss.

Experts and joint LoRAs train with trl's ``SFTTrainer`` (``lib/core/training.py``). The
loops that need their own step — continual learning (``lib/continual/loop.py``), grafting
masks (``lib/localize/grafting.py``) and LoraHub's loss (``lib/route/lorahub.py``) — use
these functions, which tokenise exactly as trl does for prompt/completion rows: the
completion is ``" " + answer + eos``, the prompt part is the common prefix of the tokenised
prompt and the tokenised prompt + completion, and the loss covers the completion tokens
only. So every stage trains and measures on the same tokens the experts learnt.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

Encoded = tuple[tuple[int, ...], int]
"""One row: (token ids of prompt + completion + eos, number of prompt tokens)."""

Batch = dict[str, Tensor]
"""Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding)."""


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode(tok, prompts: Sequence[str], answers: Sequence[str], max_length: int | None = None) -> list[Encoded]:
    """trl's prompt/completion tokenisation of each (prompt, answer), truncated to
    ``max_length`` tokens (None: no truncation). A row with no answer token left is an
    error naming it (a prompt that fills ``max_length`` would teach nothing)."""
    prompts, answers = [str(p) for p in prompts], [str(a) for a in answers]
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if tok.eos_token is None:
        raise ValueError("the tokenizer has no eos_token: the answers the experts learnt end with it")
    p_ids = tok(prompts)["input_ids"]
    full = tok([p + " " + a + tok.eos_token for p, a in zip(prompts, answers)])["input_ids"]
    rows = []
    for i, (p, f) in enumerate(zip(p_ids, full)):
        ids, n_prompt = f if max_length is None else f[:max_length], _common_prefix(p, f)
        if max_length is not None:
            n_prompt = min(n_prompt, max_length)
        if n_prompt >= len(ids):
            raise ValueError(f"row {i} ({prompts[i]!r} -> {answers[i]!r}) has no answer tokens within "
                             f"max_length {max_length}; raise max_length")
        rows.append((tuple(ids), n_prompt))
    return rows


def collate(rows: Sequence[Encoded], pad_id: int, device=None) -> Batch:
    """Right-padded batch; labels are the ids on the completion and -100 elsewhere."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (seq, n_prompt) in enumerate(rows):
        t = torch.tensor(seq, dtype=torch.long)
        ids[r, : len(seq)] = t
        mask[r, : len(seq)] = 1
        labels[r, n_prompt : len(seq)] = t[n_prompt:]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def make_batches(rows: Sequence[Encoded], batch_size: int, pad_id: int, device=None) -> list[Batch]:
    """``rows`` in order, cut into collated batches of ``batch_size`` (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [collate(rows[s:s + batch_size], pad_id, device) for s in range(0, len(rows), batch_size)]


def _logits(model, batch: Mapping[str, Tensor], weights: Mapping[str, Tensor] | None) -> Tensor:
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if weights:
        # Parameters replaced by name for this call only: no copy of the model is made.
        out = torch.func.functional_call(model, dict(weights), args=(), kwargs=kwargs, strict=False)
    else:
        out = model(**kwargs)
    return out.logits[:, :-1].float()


def completion_loss(model, batch: Mapping[str, Tensor], weights: Mapping[str, Tensor] | None = None,
                    reduction: str = "mean") -> Tensor:
    """Cross-entropy of the next-token predictions on the completion tokens (``"mean"`` per
    token, or ``"sum"``); ``weights`` replaces parameters by name for this call only."""
    logits = _logits(model, batch, weights)
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction=reduction)


@torch.no_grad()
def mean_loss(model, batches: Sequence[Mapping[str, Tensor]], weights: Mapping[str, Tensor] | None = None) -> float:
    """Mean cross-entropy (nats per token) over every completion token of ``batches``, the
    model in eval mode (no dropout) for the call."""
    total, count = 0.0, 0
    with eval_mode(model):
        for b in batches:
            total += float(completion_loss(model, b, weights, reduction="sum"))
            count += int((b["labels"][:, 1:] != -100).sum())
    return total / max(count, 1)


@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` for the block, then its previous mode back."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
