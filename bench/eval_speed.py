"""Part 2, evaluation speed: our batched KV-cache harness against two slower ways to decode.

* ``harness``: ``lib.core.evaluation.generate`` as every stage calls it (prompts sorted by
  length, left-padded batches of ``evaluation.batch_size``, greedy, KV cache, EOS stop);
* ``one_at_a_time``: ``model.generate`` on one prompt at a time (KV cache on, same greedy
  settings and EOS ids), the way a naive evaluation loop calls it;
* ``batched_no_cache``: the harness's batches, but ``use_cache=False``, so every new token
  recomputes attention over the whole sequence.

All three run on the default profile's test sets (every training skill's test split, the
composed set and the held-out skill; ``--quick``: every 10th prompt) with one model: the
joint LoRA trained on every skill (``models/joint/total_steps``) merged into the base, so
answers have realistic lengths. Answers must be identical across the paths; the
mismatches are counted.
"""
from __future__ import annotations

import time
from pathlib import Path

from . import common
from .stats import ratios, summarize, verdict

TARGET_SPEEDUP = 10.0


def load_model(root: Path):
    """(model, tokenizer, what) for the benchmark: joint LoRA merged into the base if present."""
    from lib.core.modeling import load_on_device

    base = root / "models" / "base"
    if not (base / "config.json").exists():
        raise FileNotFoundError(f"{base}: missing; the eval benchmark needs the default profile's base "
                                "(dvc repro base, or make repro)")
    model, tok = load_on_device(base)
    for name in ("joint/total_steps", "joint/same_steps"):
        adapter = root / "models" / name
        if (adapter / "adapter_config.json").exists():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            return model.eval(), tok, f"models/base + models/{name} (merged)"
    return model.eval(), tok, "models/base (no joint adapter found)"


def _eos_pad(model, tok):
    from lib.core.evaluation import _eos_ids

    eos = _eos_ids(model, tok)
    return eos, tok.pad_token_id if tok.pad_token_id is not None else eos[0]


def _decode(tok, new_ids, eos: list[int]) -> str:
    cut = next((i for i, t in enumerate(new_ids) if t in eos), len(new_ids))
    return tok.decode(new_ids[:cut], skip_special_tokens=True)


def one_at_a_time(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    import torch

    eos, pad = _eos_pad(model, tok)
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]], device=model.device)
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                                 min_length=0, use_cache=True, eos_token_id=eos, pad_token_id=pad)
            out.append(_decode(tok, seq[0, ids.shape[1]:].tolist(), eos))
    return out


def batched_no_cache(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    import torch

    from lib.core.evaluation import _left_pad

    eos, pad = _eos_pad(model, tok)
    enc = tok(prompts)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    out: list[str | None] = [None] * len(prompts)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            ids, mask = _left_pad([enc[i] for i in idx], pad, model.device)
            seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
                                 use_cache=False, eos_token_id=eos, pad_token_id=pad)
            for r, i in enumerate(idx):
                out[i] = _decode(tok, seq[r, ids.shape[1]:].tolist(), eos)
    return out  # type: ignore[return-value]


def harness(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    from lib.core.evaluation import generate

    return [g.text for g in generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     progress=False)]


def run(quick: bool = False, root: Path = common.REPO) -> dict:
    from datasets import concatenate_datasets
    from tqdm.auto import tqdm

    from lib.core import data
    from lib.core.evaluation import max_new_tokens_for

    p = common.params(root)
    sets = data.test_sets(root, p["skills"])
    every = 10 if quick else 1
    rows = concatenate_datasets([ds.select_columns(["prompt", "answer"]) for ds in sets.values()])
    rows = rows.select(range(0, len(rows), every))
    prompts, answers = list(rows["prompt"]), list(rows["answer"])
    model, tok, what = load_model(root)
    max_new = max_new_tokens_for(tok, answers)
    bs = p["evaluation"].batch_size
    paths = {
        "harness": lambda: harness(model, tok, prompts, max_new, bs),
        "one_at_a_time": lambda: one_at_a_time(model, tok, prompts, max_new),
        "batched_no_cache": lambda: batched_no_cache(model, tok, prompts, max_new, bs),
    }
    repeats = 2 if quick else 3
    harness(model, tok, prompts[:bs], max_new, bs)  # warm-up, not recorded
    seconds: dict[str, list[float]] = {k: [] for k in paths}
    answers_by: dict[str, list[str]] = {}
    for r in tqdm(range(repeats), desc="evaluation speed"):
        names = list(paths)
        names = names[r % len(names):] + names[: r % len(names)]  # rotate the order each repeat
        for name in names:
            t0 = time.perf_counter()
            got = paths[name]()
            seconds[name].append(time.perf_counter() - t0)
            answers_by.setdefault(name, got)
    ref = answers_by["harness"]
    mismatches = {k: sum(a != b for a, b in zip(v, ref)) for k, v in answers_by.items() if k != "harness"}
    correct = sum(a.strip() == b for a, b in zip(ref, answers))
    speedup = {k: summarize(ratios(seconds[k], seconds["harness"])) for k in paths if k != "harness"}
    return {
        "what": "seconds to answer the default test sets: batched KV-cache harness vs one-at-a-time generate vs "
                "batched without the KV cache",
        "model": what, "n_prompts": len(prompts), "subsample_every": every, "sets": {k: len(v) for k, v in sets.items()},
        "batch_size": bs, "max_new_tokens": max_new, "repeats": repeats,
        "seconds": {k: summarize(v) for k, v in seconds.items()},
        "prompts_per_s": {k: summarize([len(prompts) / s for s in v]) for k, v in seconds.items()},
        "speedup_over": speedup,
        "target": verdict(speedup["one_at_a_time"]["median"], TARGET_SPEEDUP),
        "mismatched_answers": mismatches, "identical_answers": all(v == 0 for v in mismatches.values()),
        "harness_exact_match": correct / len(prompts),
    }
