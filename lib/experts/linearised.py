"""Linearised LoRA experts (issue 19): the model's first-order expansion in its adapted weights.

Ortiz-Jimenez et al. 2023 ("Task arithmetic in the tangent space") fine-tune the linearised
model ``f_lin(x; W0 + ΔW) = f(x; W0) + J_W f(x; W0) · ΔW`` and find its task vectors add with
less interference; Tang et al. 2023 (L-LoRA, "Parameter-efficient multi-task model fusion with
partial linearization") do it for LoRA. With LoRA's usual start (B = 0, A = A0 random) the
first-order expansion in the LoRA parameters is ``ΔW = s · B · A0``: A gets no gradient at B = 0,
so a linearised LoRA expert trains B with A fixed at its initial value, through the linearised
model. This file has

* :func:`linear_logits`: ``f(x; W0) + J_W f(x; W0) · ΔW`` with ``torch.func.jvp`` (one forward
  and one forward-mode pass, no second-order term);
* :class:`LinearisedLM`: the base linearised at its weights and moved along a ``{module: ΔW}``
  (an expert's, or a merge of several), with the ``generate`` the harness
  (:func:`lib.core.evaluation.generate`) calls: greedy, no KV cache;
* :func:`train_linearised`: one expert trained through :func:`linear_logits` (the expert
  recipe of ``experts``: rank, alpha, target modules, steps, lr, batch size, the early stop),
  saved as its ``{module: ΔW}``.

A linearised expert's ΔW lives in the same space as an ordinary expert's, so every merge of
:mod:`lib.merge.task_vectors` applies to it; what changes is how the merge is evaluated: in the
linearised model, where a sum of task vectors is a sum of their effects on the logits.
"""
from __future__ import annotations

import math
import time
from types import SimpleNamespace

import torch
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

Tensor = torch.Tensor


def adapted_weights(model, target_modules) -> dict[str, Tensor]:
    """``{module name: weight}`` of the linear layers named by ``target_modules`` (as LoRA adapts them)."""
    out = {n: m.weight for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in set(target_modules)}
    if not out:
        raise ValueError(f"no linear layer named {sorted(target_modules)} in this model")
    return out


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that skip left padding (as ``generate`` makes them): 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def linear_logits(model, delta: dict[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
                  w0: dict[str, Tensor] | None = None) -> Tensor:
    """``f(x; W0) + J_W f(x; W0) · ΔW``: the logits of ``model`` linearised at its own weights
    ``W0`` and moved along ``delta`` (``{module name: ΔW}``), exactly (no second-order term).
    ``w0``: :func:`adapted_weights` of ``model`` when the caller already has them (a training
    loop or a generation calls this once per step)."""
    names = list(delta)
    if w0 is None:
        w0 = adapted_weights(model, {n.split(".")[-1] for n in names})
    missing = [n for n in names if n not in w0]
    if missing:
        raise ValueError(f"modules {missing} are not adapted linear layers of this model")
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions(attention_mask)}

    def f(*ws):
        return functional_call(model, {f"{n}.weight": w for n, w in zip(names, ws)}, args=(), kwargs=kwargs).logits

    # The fused CPU/GPU attention kernels have no forward-mode derivative; the math kernel (the
    # same attention as plain tensor ops) has.
    with sdpa_kernel(SDPBackend.MATH):
        out, tangent = jvp(f, tuple(w0[n].detach() for n in names), tuple(delta[n].to(w0[n].dtype) for n in names))
    return out + tangent


class LinearisedLM(torch.nn.Module):
    """The base linearised at its weights and moved along ``delta`` ({module: ΔW}); ``generate``
    is greedy decoding without a KV cache (the linearised model has none), enough for the
    harness's short answers."""

    def __init__(self, base, delta: dict[str, Tensor]):
        super().__init__()
        self.base = base
        self.delta = {n: d.detach() for n, d in delta.items()}
        self.w0 = adapted_weights(base, {n.split(".")[-1] for n in self.delta})

    @property
    def generation_config(self):
        return self.base.generation_config

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return linear_logits(self.base, self.delta, input_ids, attention_mask, self.w0)

    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int, eos_token_id, pad_token_id: int,
                 **_ignored) -> SimpleNamespace:
        """``.sequences`` (prompt + new tokens, pad after a row's EOS) and ``.logits`` (one
        (batch, vocab) tensor per step), as transformers' ``generate`` returns them with
        ``output_logits=True, return_dict_in_generate=True``."""
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=input_ids.device)
        # The harness calls generate under inference mode, in which forward-mode AD is off.
        with torch.inference_mode(False), torch.no_grad():
            seq, mask = input_ids.clone(), attention_mask.clone()
            done = torch.zeros(len(seq), dtype=torch.bool, device=seq.device)
            steps = []
            for _ in range(max_new_tokens):
                logits = self(seq, mask)[:, -1]
                steps.append(logits)
                nxt = torch.where(done, torch.full_like(done, pad_token_id, dtype=seq.dtype), logits.argmax(-1))
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                done |= torch.isin(nxt, eos)
                if bool(done.all()):
                    break
        return SimpleNamespace(sequences=seq, logits=tuple(steps))


def _batches(tok, rows, batch_size: int, seed: int, max_length: int):
    """Endless shuffled batches of (input_ids, attention_mask, labels): prompt + " " + answer +
    EOS, right-padded, the loss on the answer and EOS only (as the ordinary experts' trl runs)."""
    texts = [(str(p), f"{p} {a}{tok.eos_token}") for p, a in zip(rows["prompt"], rows["answer"])]
    enc = []
    for prompt, full in texts:
        ids = tok(full)["input_ids"][:max_length]
        n_prompt = len(tok(prompt)["input_ids"])
        enc.append((ids, [-100] * n_prompt + ids[n_prompt:]))
    g = torch.Generator().manual_seed(seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    while True:
        order = torch.randperm(len(enc), generator=g).tolist()
        for start in range(0, len(order) - batch_size + 1, batch_size):
            part = [enc[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids, _ in part)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in part])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in part])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in part])
            yield ids, mask, labels


def train_linearised(model, tok, rows, e, steps: int, seed: int, progress: bool = False) -> tuple[dict[str, Tensor], dict]:
    """One linearised LoRA expert (see the module docstring) on ``rows`` (prompt/answer) with the
    recipe ``e`` (``experts``): B (out × rank) trained through :func:`linear_logits` with AdamW,
    cosine schedule with 5% warmup as the trainer's, A0 (rank × in) drawn as peft draws it
    (Kaiming-uniform, a = √5) from ``seed`` and fixed; the early stop of ``e.stop_loss`` on the
    mean of the last ``e.stop_window`` logged losses (one log every ``steps // 50`` steps).
    Returns ``({module: ΔW = s·B·A0}, info)``."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    for p in model.parameters():
        p.requires_grad_(False)
    w0 = adapted_weights(model, e.target_modules)
    g = torch.Generator().manual_seed(seed)
    a0, b = {}, {}
    for n, w in w0.items():
        a = torch.empty(e.rank, w.shape[1], dtype=w.dtype)
        bound = 1.0 / math.sqrt(w.shape[1])  # kaiming_uniform_(a=√5) on a (rank × in) matrix
        a0[n] = a.uniform_(-bound, bound, generator=g).to(w.device)
        b[n] = torch.zeros(w.shape[0], e.rank, dtype=w.dtype, device=w.device, requires_grad=True)
    scale = e.alpha / e.rank
    opt = torch.optim.AdamW(list(b.values()), lr=e.lr, weight_decay=e.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(0.05 * steps)), steps)
    log_every, logged, window = max(1, steps // 50), [], []
    batches = _batches(tok, rows, e.batch_size, seed, e.max_length)
    t0, step = time.perf_counter(), 0
    for step in tqdm(range(1, steps + 1), desc="linearised expert", disable=not progress, leave=False):
        ids, mask, labels = (x.to(model.device) for x in next(batches))
        logits = linear_logits(model, {n: scale * b[n] @ a0[n] for n in w0}, ids, mask, w0)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            from lib.core.training import TrainingDiverged
            raise TrainingDiverged(f"linearised expert: loss {float(loss)} at step {step}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if step % log_every == 0:
            logged.append({"step": step, "loss": sum(window) / len(window)})
            window = []
            recent = [x["loss"] for x in logged[-e.stop_window:]]
            if e.stop_loss and len(recent) == e.stop_window and sum(recent) / e.stop_window < e.stop_loss:
                break
    delta = {n: (scale * b[n] @ a0[n]).detach() for n in w0}
    info = {"steps": steps, "steps_run": step, "seed": seed, "seconds": round(time.perf_counter() - t0, 2),
            "final_loss": logged[-1]["loss"] if logged else math.nan, "losses": logged}
    return delta, info
