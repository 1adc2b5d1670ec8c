"""Stage 05 training core: one task at a time, with replay and the EWC / L2 / O-LoRA penalties.

Why a minimal hand loop and not trl's SFTTrainer (which stage 03 uses): a continual run is
many short trainings of *one* model (4 tasks × 6 strategies × orders × seeds, ~100 steps
each), continued from where the last task left off, with a penalty added to the loss,
replay rows mixed into each batch and an evaluation every few steps. Measured on this
project's 2-core CPU with the default base (one torch thread, 100 LoRA steps): SFTTrainer
spent 0.64 s building the trainer and 4.0 s training, this loop 3.0 s with no set-up; over
the ~100 task trainings of the default study that is about a minute of the stage's 4-minute
budget. The loop keeps SFTTrainer's recipe exactly where it matters:

* rows are tokenized as trl does for prompt/completion data: ``prompt`` with the
  tokenizer's special tokens, ``prompt + " " + answer + eos`` for the whole sequence, the
  completion starting where the two token lists diverge; the loss is on completion tokens
  only (labels ``-100`` elsewhere), averaged over the batch's completion tokens (the
  model's own loss, what trl's ``completion_only_loss`` computes); sequences are cut at
  ``experts.max_length`` tokens;
* AdamW (torch's, betas 0.9/0.999, eps 1e-8) at ``experts.lr`` with weight decay on
  matrices only, a cosine schedule with 5% linear warm-up (transformers'
  ``get_cosine_schedule_with_warmup``), gradients clipped to norm 1 (Trainer's default),
  a fresh optimizer and schedule per task (as one SFTTrainer run per task would have);
* LoRA from peft (``get_peft_model`` with the ``experts`` section's rank, alpha, dropout and
  target modules).

Penalty conventions (tested in ``tests/test_continual.py`` on small tensors):

* EWC (Kirkpatrick et al. 2017): ``(λ/2) Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²`` summed over every
  earlier task k, with θ*_k the trainable weights at the end of task k and F_k the diagonal
  *empirical* Fisher there: the mean over ``fisher_n`` training examples of task k of the
  squared gradient of that example's loss (the mean negative log-likelihood of its answer
  tokens, the training loss), one example per backward pass (``fisher_batch = 1``; larger
  batches give the cheaper mean of squared *batch* gradients that e.g. Avalanche uses).
* L2 towards the previous weights: ``(λ/2) Σ_i (θ_i − θ*_i)²``, θ* the trainable weights at
  the end of the previous task (EWC with F = 1 and only the latest anchor).
* O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
  Learning"): a new LoRA per task; earlier tasks' LoRAs are frozen (here merged into the
  weights, which gives the same outputs as keeping them active) and their A matrices kept;
  the penalty is ``λ Σ_modules Σ_{earlier k} ||A_t A_kᵀ||_F²`` (peft's ``lora_A`` weight is
  ``r × d_in``, so ``A_t A_kᵀ`` is the paper's ``A_kᵀ A_t`` with A as ``d_in × r``), plus
  the paper's optional ``λ₂ ||θ_t||²`` on the new LoRA (``olora.l2``, 0 by default).
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lib.core.sft_data import Encoded, collate
from lib.core.training import TrainingDiverged


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (SHA-512 inside ``random.Random``: stable across processes)."""
    return random.Random(":".join(map(str, parts))).randrange(2**31)


# --------------------------------------------------------------------------- data


class MixedBatches:
    """Batches of ``batch_size`` rows: ``k = round(fraction · batch_size)`` drawn uniformly
    (with replacement) from ``pool`` (earlier tasks' rows, for replay), the other
    ``batch_size − k`` from ``current`` in shuffled epochs. With no pool (or fraction 0)
    every row is a current one and the draws are those of plain shuffled epochs, so the
    first task of every sequential strategy sees the same batches."""

    def __init__(self, current: Sequence[Encoded], batch_size: int, seed: int,
                 pool: Sequence[Encoded] | None = None, fraction: float = 0.0):
        if not current:
            raise ValueError("no training rows for this task")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
        self.current, self.pool = list(current), list(pool or [])
        self.batch_size = int(batch_size)
        self.k = round(fraction * self.batch_size) if self.pool else 0
        self.gen = torch.Generator().manual_seed(seed)
        self.pool_gen = torch.Generator().manual_seed(stable_seed(seed, "replay"))
        self._perm: list[int] = []

    def _next_current(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if not self._perm:
                self._perm = torch.randperm(len(self.current), generator=self.gen).tolist()
            take = min(n - len(out), len(self._perm))
            out += self._perm[:take]
            self._perm = self._perm[take:]
        return out

    def next_sources(self) -> list[tuple[str, int]]:
        """The next batch as ``("current" | "replay", index)`` pairs (what :meth:`__next__` returns rows of)."""
        cur = [("current", i) for i in self._next_current(self.batch_size - self.k)]
        rep = [("replay", int(i)) for i in torch.randint(0, len(self.pool), (self.k,), generator=self.pool_gen)] if self.k else []
        return cur + rep

    def __iter__(self) -> Iterator[list[Encoded]]:
        return self

    def __next__(self) -> list[Encoded]:
        return [self.current[i] if src == "current" else self.pool[i] for src, i in self.next_sources()]


def replay_buffer(rows: Sequence[Encoded], size: int | None, seed: int) -> list[Encoded]:
    """The ``size`` rows of a finished task kept for replay (a seeded random subset; all if None)."""
    rows = list(rows)
    if size is None or size >= len(rows):
        return rows
    idx = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:size].tolist()
    return [rows[i] for i in idx]


# --------------------------------------------------------------------------- penalties


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in params.items()}


def ewc_penalty(params: dict[str, torch.Tensor], anchors: Sequence[tuple[dict, dict]], lam: float) -> torch.Tensor:
    """``(λ/2) Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²`` over anchors ``[(F_k, θ*_k), ...]`` (dicts by parameter name)."""
    total = torch.zeros((), device=next(iter(params.values())).device)
    for fisher, star in anchors:
        for n, p in params.items():
            if n in fisher:
                total = total + (fisher[n].to(p.device) * (p.float() - star[n].to(p.device)) ** 2).sum()
    return 0.5 * lam * total


def l2_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """``(λ/2) Σ_i (θ_i − θ*_i)²``."""
    total = torch.zeros((), device=next(iter(params.values())).device)
    for n, p in params.items():
        if n in anchor:
            total = total + ((p.float() - anchor[n].to(p.device)) ** 2).sum()
    return 0.5 * lam * total


def olora_penalty(new_a: dict[str, torch.Tensor], old_a: Sequence[dict[str, torch.Tensor]], lam: float) -> torch.Tensor:
    """``λ Σ_k Σ_m ||A_new[m] A_k[m]ᵀ||_F²``: zero when every row of the new A is orthogonal
    to every row of the earlier tasks' A (per module m)."""
    total = torch.zeros((), device=next(iter(new_a.values())).device)
    for old in old_a:
        for m, a in new_a.items():
            if m in old:
                total = total + ((a.float() @ old[m].to(a.device).T) ** 2).sum()
    return lam * total


def lora_a(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    """``{module name: lora_A weight (r × d_in)}`` of one adapter (live parameters)."""
    out = {}
    for name, module in model.named_modules():
        a = getattr(module, "lora_A", None)
        if isinstance(a, nn.ModuleDict) and adapter in a:
            out[name] = a[adapter].weight
    return out


def fisher_diagonal(model: nn.Module, rows: Sequence[Encoded], pad_id: int, batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the trainable parameters: the mean over batches of
    ``rows`` of the squared gradient of the batch's loss (with ``batch_size = 1``: of each
    example's answer negative log-likelihood, the textbook definition). Float32, detached.
    The model is left in the mode it was in, gradients zeroed."""
    params = trainable(model)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it will be used
    n_batches = 0
    try:
        for start in range(0, len(rows), batch_size):
            model.zero_grad(set_to_none=True)
            loss = model(**collate(rows[start : start + batch_size], pad_id, device)).loss
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().float() ** 2
            n_batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: f / max(1, n_batches) for n, f in fisher.items()}


# --------------------------------------------------------------------------- models


def add_lora(model: nn.Module, e, seed: int):
    """``get_peft_model`` with the experts' LoRA recipe, its init drawn from ``seed``."""
    from peft import LoraConfig, get_peft_model

    from lib.core.training import check_target_modules

    # peft fails only when no name matches: a typo in one of several would train fewer modules
    cfg = LoraConfig(r=e.rank, lora_alpha=e.alpha, lora_dropout=e.dropout,
                     target_modules=check_target_modules(model, e.target_modules), task_type="CAUSAL_LM", bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


def full_finetune(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count(tensors) -> int:
    """Number of entries in a tensor, or in every tensor of a (nested) dict/list of them."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel()
    if isinstance(tensors, dict):
        return sum(count(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(count(v) for v in tensors)
    return 0


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainLog:
    steps: int
    seconds: float  # training only (evaluation callbacks excluded)
    final_loss: float


def train_task(model: nn.Module, batches: Iterator[list[Encoded]], steps: int, lr: float, pad_id: int, *,
               weight_decay: float = 0.0, penalty: Callable[[], torch.Tensor] | None = None,
               every: int = 0, on_eval: Callable[[int], None] | None = None, max_grad_norm: float = 1.0,
               progress=None) -> TrainLog:
    """``steps`` optimizer steps on ``model``'s trainable parameters (see the module docstring
    for the recipe); ``penalty()`` is added to every step's loss; ``on_eval(step)`` is called
    after steps ``every, 2·every, ...`` and after the last one (its time is not counted)."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(0.05 * steps)), steps)
    device = next(model.parameters()).device
    model.train()
    seconds, loss_value = 0.0, math.nan
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        loss = model(**collate(next(batches), pad_id, device)).loss
        if penalty is not None:
            loss = loss + penalty()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):  # NaN weights would score as forgetting, with exit 0
            raise TrainingDiverged(f"continual training: the loss became {loss_value} at step {step} (learning rate "
                                   f"{lr}): training diverged; lower the learning rate or the penalty's weight")
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
        if on_eval is not None and ((every and step % every == 0) or step == steps):
            on_eval(step)
            model.train()
    model.eval()
    return TrainLog(steps, seconds, loss_value)
