"""Part 1, training overhead: our expert training path against a minimal hand-written loop.

Ours is ``lib.core.training.train_lora`` exactly as stage 03 runs it (trl ``SFTTrainer`` + peft
LoRA, loss on the answer tokens, cosine schedule, checkpoints at the interval the stage
derives from ``experts.steps``), on the default profile's base model, one skill's training
split, batch size, LoRA config and learning rate, for as many steps as the trained experts
ran on average, with early stopping off so both paths run the same number of steps. The hand loop is
plain PyTorch on the same model, data, batch and LoRA (peft's ``get_peft_model``):
tokenize prompt + answer + EOS, pad each batch to its longest row, AdamW, the same cosine
schedule with warm-up (transformers' helper), gradient clipping at 1.0 (the trainer's
default), nothing else. Both are timed from the start of training (optimizer creation) to
the last step, model loading excluded; tokens are the padded batch sizes (``input_ids``
elements, the trainer's ``num_input_tokens_seen``), counted the same way for both.

Model FLOPs utilisation: FLOPs of one training step (forward and backward) counted by
``torch.utils.flop_counter.FlopCounterMode`` on a real batch, per token, times the achieved
tokens/s, over the FLOP/s of a large fp32 matmul measured in the same process.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from . import common
from .stats import ratios, summarize, verdict

TARGET_RATIO = 0.85


def _encode(tok, rows, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: ``prompt + " " + answer + EOS``, loss on the answer and EOS."""
    out = []
    for prompt, answer in zip(rows["prompt"], rows["answer"]):
        p = tok(prompt)["input_ids"]
        ids = (p + tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:max_length]
        out.append((ids, ([-100] * len(p) + ids[len(p):])[: len(ids)]))
    return out


def _batch(examples, idx, pad_id: int, device):
    import torch

    width = max(len(examples[i][0]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for r, i in enumerate(idx):
        x, y = examples[i]
        ids[r, : len(x)] = torch.tensor(x)
        labels[r, : len(y)] = torch.tensor(y)
        mask[r, : len(x)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def _peft_model(base_dir: Path, e):
    from peft import LoraConfig, get_peft_model

    from lib.core.modeling import load_on_device

    model, tok = load_on_device(base_dir)
    cfg = LoraConfig(r=e.rank, lora_alpha=e.alpha, lora_dropout=e.dropout, target_modules=list(e.target_modules),
                     task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, cfg), tok


def hand_loop(base_dir: Path, rows, e, steps: int, seed: int) -> dict:
    """The minimal PyTorch loop; returns tokens, seconds and the last loss."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(seed)
    model, tok = _peft_model(base_dir, e)
    model.train()
    device = next(model.parameters()).device
    examples = _encode(tok, rows, e.max_length)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=e.lr, weight_decay=e.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, max(1, int(0.05 * steps)), steps)
    order: list[int] = []
    tokens = 0
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        if len(order) < e.batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        idx, order = order[: e.batch_size], order[e.batch_size:]
        ids, mask, labels = _batch(examples, idx, tok.pad_token_id, device)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += ids.numel()
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "final_loss": loss.item(),
            "dataset_tokens": sum(len(x) for x, _ in examples)}


def ours(base_dir: Path, rows, e, steps: int, seed: int, scratch: Path, save_steps: int | None = None) -> dict:
    """``lib.core.training.train_lora`` as stage 03 calls it; the trainer is caught to read its token count.
    ``save_steps`` above ``steps`` turns its periodic checkpoints off (a diagnostic variant)."""
    import contextlib
    import io

    import trl

    from lib.core.training import train_lora

    caught = []
    real_train = trl.SFTTrainer.train

    def spy(self, *a, **k):
        caught.append(self)
        return real_train(self, *a, **k)

    out = scratch / f"ours-{time.monotonic_ns()}"
    trl.SFTTrainer.train = spy
    try:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints its logs when tqdm is off
            info = train_lora(base_dir, rows, e, steps, seed, out, progress=False, save_steps=save_steps)
        end_to_end = time.perf_counter() - t0
    finally:
        trl.SFTTrainer.train = real_train
        shutil.rmtree(out, ignore_errors=True)
    trainer = caught[-1]
    tokens = int(trainer.state.num_input_tokens_seen)
    ds_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    return {"tokens": tokens, "seconds": info["seconds"], "tokens_per_s": tokens / info["seconds"],
            "end_to_end_s": end_to_end, "final_loss": info["final_loss"], "steps_run": info["steps_run"],
            "dataset_tokens": ds_tokens}


def flops_per_token(base_dir: Path, rows, e) -> float:
    """Forward + backward FLOPs of one LoRA training step per (padded) token, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model, tok = _peft_model(base_dir, e)
    model.train()
    examples = _encode(tok, rows, e.max_length)
    ids, mask, labels = _batch(examples, list(range(min(e.batch_size, len(examples)))), tok.pad_token_id,
                               next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return counter.get_total_flops() / ids.numel()


def matmul_peak(n: int, repeats: int) -> dict:
    """FLOP/s of an ``n × n`` fp32 matmul (best of ``repeats``, after a warm-up)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    flops = 2 * n ** 3
    return {"n": n, "flops_per_s": flops / min(times), "median_flops_per_s": flops / sorted(times)[len(times) // 2]}


def run(quick: bool = False, root: Path = common.REPO, skill: str | None = None) -> dict:
    from tqdm.auto import tqdm

    from lib.core.training import default_save_steps

    p = common.params(root)
    skill = skill or p["skills"].train[0]
    cap = p["experts"].steps
    # As many steps as a stage-03 expert runs (the mean over the trained experts: early stopping),
    # checkpointing at the stage's own interval, derived from the step cap.
    ran = [json.loads(f.read_text()).get("steps_run") for f in (root / "models" / "experts").glob("*/train_info.json")]
    ran = [r for r in ran if r]
    steps, repeats = (40, 2) if quick else (round(sum(ran) / len(ran)) if ran else cap // 2, 3)
    save_steps = default_save_steps(cap) if not quick else 10
    e = p["experts"].model_copy(update={"stop_loss": None})
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        base_dir, base_what = common.base_model_dir(root, scratch)
        rows, data_what = common.skill_train_set(root, skill)
        # Warm-up (imports, first-call allocations), not recorded.
        ours(base_dir, rows, e, 3, e.seed, scratch)
        hand_loop(base_dir, rows, e, 3, e.seed)
        paths = {
            "ours": lambda: ours(base_dir, rows, e, steps, e.seed, scratch, save_steps=save_steps),
            "hand": lambda: hand_loop(base_dir, rows, e, steps, e.seed),
            "ours_no_checkpoints": lambda: ours(base_dir, rows, e, steps, e.seed, scratch, save_steps=10 * steps),
        }
        runs = {k: [] for k in paths}
        for r in tqdm(range(repeats), desc="training overhead"):
            # Rotate which path goes first, so drift in machine load hits every path alike.
            names = list(paths)[r % len(paths):] + list(paths)[: r % len(paths)]
            for name in names:
                runs[name].append(paths[name]())
        fpt = flops_per_token(base_dir, rows, e)
        peak = matmul_peak(512 if quick else 1024, 5 if quick else 20)
        from lib.core.training import count_parameters
        from lib.core.modeling import load_causal_lm

        n_params = count_parameters(load_causal_lm(base_dir)[0])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    tps = {k: [x["tokens_per_s"] for x in v] for k, v in runs.items()}
    ratio = summarize(ratios(tps["ours"], tps["hand"]))
    ratio_no_ckpt = summarize(ratios(tps["ours_no_checkpoints"], tps["hand"]))
    mfu = {k: summarize([fpt * t / peak["flops_per_s"] for t in v]) for k, v in tps.items()}
    return {
        "what": "tokens/s of lib.core.training.train_lora (trl SFTTrainer + peft) against a hand-written PyTorch loop",
        "base": base_what, "base_parameters": n_params, "data": data_what, "skill": skill,
        "steps": steps, "repeats": repeats, "batch_size": e.batch_size, "lora_rank": e.rank,
        "target_modules": list(e.target_modules),
        "tokens_per_s": {k: summarize(v) for k, v in tps.items()},
        "ratio_ours_over_hand": ratio,
        "target": verdict(ratio["median"], TARGET_RATIO),
        "ratio_ours_without_checkpoints_over_hand": ratio_no_ckpt,
        "save_steps": save_steps, "step_cap": cap, "experts_mean_steps_run": (sum(ran) / len(ran)) if ran else None,
        "end_to_end_s_ours": summarize([x["end_to_end_s"] for x in runs["ours"]]),
        "train_loop_s": {k: summarize([x["seconds"] for x in v]) for k, v in runs.items()},
        "final_loss": {k: summarize([x["final_loss"] for x in v]) for k, v in runs.items()},
        "dataset_tokens": {k: v[0]["dataset_tokens"] for k, v in runs.items()},
        "flops_per_token": fpt, "matmul_peak": peak,
        "achieved_flops_per_s": {k: summarize([fpt * t for t in v]) for k, v in tps.items()},
        "mfu": mfu,
        "finite": all(math.isfinite(x["final_loss"]) for v in runs.values() for x in v),
    }
