"""Training: the scratch base model (transformers Trainer) and LoRA experts (trl SFTTrainer + peft).

Nothing here is a hand-written training loop: the field's trainers do the work, this
module only chooses their settings so that the same params give the same numbers on CPU
and GPU (bf16 on CUDA, fp32 on CPU).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from datasets import Dataset
from transformers import TrainerCallback

from lib.core.modeling import load_on_device, pick_device


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_scratch_model(tokenizer, m) -> "torch.nn.Module":
    """A small Llama-architecture causal LM sized by the ``model`` params section."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(m.seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
        max_position_embeddings=m.max_len, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def trainer_args(out_dir: Path, steps: int, lr: float, batch_size: int, seed: int, weight_decay: float = 0.0,
                 warmup: float = 0.05, progress: bool = True) -> dict:
    device, dtype = pick_device()
    return dict(
        output_dir=str(out_dir), max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size,
        weight_decay=weight_decay, lr_scheduler_type="cosine", warmup_steps=max(1, int(warmup * steps)),
        logging_steps=max(1, steps // 50), save_strategy="no", report_to=[], seed=seed, data_seed=seed,
        bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu", dataloader_num_workers=0,
        disable_tqdm=not progress, include_num_input_tokens_seen=True,
    )


class LossThresholdStop(TrainerCallback):
    """Stop training once the mean of the last ``window`` logged losses is below ``threshold``.

    The rule reads only the training loss the trainer already logs, so it costs nothing
    and gives the same stopping step on every run with the same seed.
    """

    def __init__(self, threshold: float, window: int):
        self.threshold, self.window = threshold, window
        self.losses: list[float] = []
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # A run resumed from a checkpoint starts with the losses logged before it (the
        # trainer restores log_history first), so the window is the uninterrupted run's.
        self.losses = [float(h["loss"]) for h in state.log_history if "loss" in h]
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            recent = self.losses[-self.window:]
            if len(recent) == self.window and sum(recent) / self.window < self.threshold:
                control.should_training_stop = True
                self.stopped_at = state.global_step
        return control


class TrainingDiverged(RuntimeError):
    """The loss or a trained weight became NaN or infinite: the run is refused, never saved."""


class FiniteLossGuard(TrainerCallback):
    """Stop with :class:`TrainingDiverged` as soon as a logged loss is NaN or infinite, so a
    diverged run cannot look like convergence (a NaN loss never passes the early-stop rule,
    but a run could still finish and be saved)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(f"the training loss became {loss} at step {state.global_step} (learning rate "
                                   f"{args.learning_rate}): training diverged; lower the learning rate")
        return control


def check_finite(model, what: str) -> None:
    """Every trainable weight of ``model`` finite, else :class:`TrainingDiverged` naming how many are not."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(f"{what}: {len(bad)} trained weight tensors hold NaN or inf after training "
                               f"(e.g. {bad[0]}): training diverged; lower the learning rate")


def check_target_modules(model, targets, key: str = "experts.target_modules") -> list[str]:
    """Each name in ``targets`` must be the last name part of at least one linear layer of
    ``model`` (as peft matches them); a name that matches nothing is a ParamsError listing the
    model's linear layer names (peft itself only fails when *no* name matches, so a typo in
    one of several names would silently train fewer modules)."""
    from lib.core.config import ParamsError

    linear = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    unknown = [t for t in targets if t not in linear]
    if unknown:
        raise ParamsError(f"{key}: {unknown} {'is' if len(unknown) == 1 else 'are'} not a linear layer of the model; "
                          f"its linear layers are {sorted(linear)}")
    return list(targets)


def check_max_length(tok, rows: Dataset, max_length: int, key: str = "experts.max_length") -> None:
    """Every training example (prompt, " " + answer and EOS) fits in ``max_length`` tokens, else
    a ParamsError naming the longest one: trl drops or cuts longer rows, which would train on
    cut answers or on nothing at all."""
    from lib.core.config import ParamsError

    if "prompt" not in rows.column_names:
        return
    texts = [p + " " + a for p, a in zip(rows["prompt"], rows["answer"])]
    if not texts:
        return
    lengths = [len(ids) + 1 for ids in tok(texts, add_special_tokens=True)["input_ids"]]  # one batched call
    i = max(range(len(lengths)), key=lengths.__getitem__)
    longest, text = lengths[i], texts[i]
    if longest > max_length:
        raise ParamsError(f"{key} {max_length} is shorter than the longest training example ({longest} tokens with "
                          f"EOS: {text!r}); raise it to at least {longest}")


def loss_history(trainer) -> pd.DataFrame:
    rows = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    return pd.DataFrame(rows)


def pretrain_base(model, tokenizer, corpus: Dataset, m, out_dir: Path, progress: bool = True):
    """Causal-LM pretraining on the stage-01 corpus; returns (trainer, seconds)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    def tok(batch):
        return tokenizer([t + tokenizer.eos_token for t in batch["text"]], truncation=True, max_length=m.max_len)

    train = corpus.map(tok, batched=True, remove_columns=corpus.column_names)
    args = TrainingArguments(**trainer_args(out_dir / "trainer", m.pretrain_steps, m.lr, m.batch_size, m.seed, progress=progress))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    # Right padding for training (labels of padded positions are -100 either way).
    tokenizer.padding_side = "right"
    # A diverged base (NaN weights) would make every later number meaningless, with exit 0.
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=[FiniteLossGuard()])
    t0 = time.perf_counter()
    try:
        trainer.train()
    finally:
        tokenizer.padding_side = "left"
    check_finite(trainer.model, "the base model (model.lr)")
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    return trainer, time.perf_counter() - t0


def sft_rows(ds: Dataset) -> Dataset:
    """prompt/completion pairs: trl then puts the loss on the completion (answer) tokens only."""
    return ds.map(lambda r: {"prompt": r["prompt"], "completion": " " + r["answer"]},
                  remove_columns=[c for c in ds.column_names if c not in ("prompt",)])


# ------------------------------------------------------------------ checkpoints and resuming

CHECKPOINTS_PER_RUN = 10
"""A resumable checkpoint about every tenth of the step cap (see :func:`default_save_steps`)."""

RESUME_KEY = "resume.json"
RUN_KEY = "run_key.json"
"""A finished adapter keeps the key it was made with, so a rerun from the same inputs keeps it."""


def default_save_steps(steps: int) -> int:
    """Checkpoint interval: a multiple of the logging interval (``steps // 50``), about a tenth
    of ``steps``. Being a multiple of the logging interval matters: the trainer averages the
    loss over the steps since the last log, and that running sum is not in a checkpoint, so
    a resume from a step between two logs would log (and early-stop on) a different loss."""
    log_every = max(1, steps // 50)
    return log_every * max(1, math.ceil(steps / CHECKPOINTS_PER_RUN / log_every))


def _file_digest(path: Path, whole_below: int = 256 << 20) -> str:
    """sha256 of a file (of its size, first and last MiB when it is larger than ``whole_below``)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= whole_below:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), 2)
            h.update(f.read(1 << 20))
    return h.hexdigest()


def run_key(base_dir: Path, train: Dataset, e, steps: int, seed: int, resolved_params: dict | None,
            save_steps: int | None = None) -> dict:
    """Everything that decides a training run's result: a checkpoint is resumed, or a finished run
    kept, only under an equal key."""
    import peft
    import transformers
    import trl

    device, dtype = pick_device()
    base = Path(base_dir)
    files = sorted(p for p in base.iterdir() if p.is_file()) if base.is_dir() else []
    rows = json.dumps(train.to_dict(), sort_keys=True, ensure_ascii=False).encode()
    return {
        "params": resolved_params or {}, "experts": e.model_dump(mode="json"), "steps": steps, "seed": seed,
        "save_steps": int(save_steps or default_save_steps(steps)), "data_sha256": hashlib.sha256(rows).hexdigest(),
        "base": {p.name: _file_digest(p) for p in files}, "device": device.type, "dtype": str(dtype),
        "versions": {m.__name__: m.__version__ for m in (torch, transformers, trl, peft)},
    }


def last_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-<step>`` under ``trainer_dir``, else None. The trainer
    writes ``trainer_state.json`` last, so a checkpoint cut short by a kill lacks a readable one."""
    found = []
    for d in Path(trainer_dir).glob("checkpoint-*"):
        try:
            step = int(d.name.split("-", 1)[1])
            state = json.loads((d / "trainer_state.json").read_text())
        except (ValueError, OSError, json.JSONDecodeError):
            continue
        if state.get("global_step") == step and (d / "adapter_model.safetensors").is_file():
            found.append((step, d))
    return max(found)[1] if found else None


def _resumable(tmp: Path, key: dict) -> tuple[Path | None, str]:
    """(checkpoint to resume from or None, why not)."""
    if not tmp.exists():
        return None, "no earlier partial run"
    try:
        saved = json.loads((tmp / RESUME_KEY).read_text())
    except (OSError, json.JSONDecodeError):
        return None, f"{tmp / RESUME_KEY} missing or unreadable"
    if saved != key:
        diff = sorted(k for k in set(saved) | set(key) if saved.get(k) != key.get(k))
        return None, f"it was made with other inputs ({', '.join(diff)} differ)"
    ckpt = last_checkpoint(tmp / "trainer")
    return (ckpt, "") if ckpt else (None, "it holds no complete checkpoint")


def finished_run(out_dir: Path, key: dict, weights: str = "adapter_model.*") -> dict | None:
    """``out_dir``'s ``train_info.json`` when it holds a finished run (its ``weights`` files: an
    adapter by default) made from inputs equal to ``key`` (its :data:`RUN_KEY`), else None."""
    try:
        if json.loads((out_dir / RUN_KEY).read_text()) != key:
            return None
        info = json.loads((out_dir / "train_info.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if any(out_dir.glob(weights)) else None


def publish_run(tmp: Path, out_dir: Path, model, hist: pd.DataFrame, info: dict, resolved_params: dict | None) -> None:
    """Write a finished run's files into ``tmp`` (``<out_dir>.partial``), then rename it to
    ``out_dir``: the weights (safetensors), the loss curve, ``train_info.json`` and the params
    that produced them, so that ``out_dir`` only ever exists complete."""
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    model.save_pretrained(str(tmp))
    hist.to_csv(tmp / "train_loss.csv", index=False)
    (tmp / "train_info.json").write_text(json.dumps(info, indent=2))
    (tmp / "params.json").write_text(json.dumps(resolved_params or {}, indent=2, sort_keys=True))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _say(msg: str) -> None:
    print(f"train_lora: {msg}", file=sys.stderr, flush=True)


def one_cpu_thread() -> None:
    """On the CPU, one torch thread: the default model's steps are overhead-bound, and on the
    2-core machine a second thread made them slower (2-4x when another job shares the cores).
    It also fixes the reduction order, so a LoRA's weights do not depend on the machine's core
    count (they still may on its CPU model and library build)."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(1)


def train_lora(base_dir: Path, train: Dataset, e, steps: int, seed: int, out_dir: Path, progress: bool = True,
               resolved_params: dict | None = None, save_steps: int | None = None) -> dict:
    """Train one LoRA adapter with trl's SFTTrainer; save it with save_pretrained under ``out_dir``.

    ``train`` has prompt/answer rows (loss on the answer only) or, for the general adapter
    GenKnowSub subtracts, a ``text`` column (plain language modelling on every token).
    Written to ``out_dir.partial`` first and renamed at the end, so a killed run never
    leaves a directory that looks like a finished adapter.

    Checkpoints (adapter, optimizer, scheduler, RNG and trainer state; every ``save_steps``,
    default :func:`default_save_steps`) go to ``out_dir.partial/trainer``. A run that finds a
    partial run made with the same inputs (:func:`run_key`: params, data, base weights,
    device, library versions) resumes from its last checkpoint with the trainer's
    ``resume_from_checkpoint``, which restores the data order and RNG states, so the result
    equals an uninterrupted run's; any other partial run is deleted and training starts
    clean (both said on stderr). The trainer reads optimizer/scheduler/RNG states with
    ``torch.load(weights_only=True)`` (tensors and plain containers only, no arbitrary pickle);
    weights are safetensors.
    """
    from accelerate import PartialState
    from peft import LoraConfig
    from trl import SFTConfig

    from lib.core.sft import LeanSFTTrainer

    model, tok = load_on_device(base_dir)
    check_target_modules(model, e.target_modules)
    check_max_length(tok, train, e.max_length)
    tok.padding_side = "right"
    plain_text = "text" in train.column_names and "prompt" not in train.column_names
    lora = LoraConfig(r=e.rank, lora_alpha=e.alpha, lora_dropout=e.dropout, target_modules=list(e.target_modules),
                      task_type="CAUSAL_LM", bias="none")
    tmp = Path(str(out_dir) + ".partial")
    key = run_key(base_dir, train, e, steps, seed, resolved_params, save_steps)
    done = finished_run(out_dir, key)
    if done is not None:
        _say(f"{out_dir}: already trained from the same inputs ({RUN_KEY}); kept")
        return done
    # Under `accelerate launch` with several processes every process runs this function; the
    # trainer shards the batches and saves checkpoints from the right process itself, and the
    # files written here are written by the main process alone, between barriers. Every
    # process decides about resuming from the same files before any of them changes.
    # (cpu=True as the trainer's use_cpu does on a CPU: accelerate then reads torchrun's
    # environment as a multi-process CPU run; without it every process would think it is the main one.)
    state = PartialState(cpu=pick_device()[0].type == "cpu")
    checkpoint, why_not = _resumable(tmp, key)
    state.wait_for_everyone()
    if state.is_main_process:
        if checkpoint is None:
            if tmp.exists():
                _say(f"{tmp}: not resuming, {why_not}; starting clean")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / RESUME_KEY).write_text(json.dumps(key, indent=2, sort_keys=True))
        else:
            _say(f"resuming from {checkpoint}")
    state.wait_for_everyone()
    try:
        kwargs = trainer_args(tmp / "trainer", steps, e.lr, e.batch_size, seed, e.weight_decay, progress=progress)
        kwargs.update(save_strategy="steps", save_steps=key["save_steps"], save_total_limit=1)
        args = SFTConfig(
            **kwargs,
            completion_only_loss=not plain_text, max_length=e.max_length, packing=False,
            # trl turns activation checkpointing on by default; at this size recomputing the
            # forward in the backward pass costs more than the memory it saves.
            gradient_checkpointing=False,
        )
        stop = LossThresholdStop(e.stop_loss, e.stop_window) if e.stop_loss else None
        rows = train if plain_text else sft_rows(train)
        trainer = LeanSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=lora,
                                 callbacks=[FiniteLossGuard(), *([stop] if stop else [])])
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        seconds = time.perf_counter() - t0
        check_finite(trainer.model, str(out_dir))
        hist = loss_history(trainer)
        info = {
            "steps": steps, "steps_run": trainer.state.global_step, "stopped_early": bool(stop and stop.stopped_at),
            "seed": seed, "seconds": round(seconds, 2),
            "trainable_params": count_parameters(trainer.model, trainable_only=True),
            "final_loss": float(hist["loss"].iloc[-1]) if len(hist) else math.nan,
            "processes": state.num_processes,
            "examples_seen": trainer.state.global_step * e.batch_size * state.num_processes, "train_examples": len(train),
            "resumed_from_step": int(checkpoint.name.split("-", 1)[1]) if checkpoint else None,
        }
        if state.is_main_process:
            (tmp / RESUME_KEY).rename(tmp / RUN_KEY)
            publish_run(tmp, out_dir, trainer.model, hist, info, resolved_params)
        state.wait_for_everyone()
    except BaseException:
        # Keep a partial run that has a checkpoint to resume from (it holds no adapter files,
        # and DVC and git ignore *.partial); drop anything else.
        if not state.is_main_process:
            raise
        kept = last_checkpoint(tmp / "trainer")
        if kept is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _say(f"stopped; {tmp} keeps checkpoint {kept.name} for a resume")
        raise
    return info
