"""The evaluation harness every stage scores models with: generate, exact match, CIs, calibration.

One path for every model and method: a base model, one LoRA expert, a merged model, a
per-example mixture of experts (peft mixed-adapter batches) or a learned router all go
through :func:`evaluate`, so their numbers are comparable by construction.

What comes from libraries and what is written here:

- generation is ``model.generate`` (transformers; greedy, KV cache); mixed-adapter batches
  are peft's ``PeftModel.generate(..., adapter_names=[...])`` with ``"__base__"`` for "no
  adapter";
- written here, because neither library offers it: left-padding a tokenized batch with a
  pad id that may be missing from the tokenizer, the probability a model gave its own
  greedy answer up to and including EOS (``compute_transition_scores`` stacks the logits of
  every step over the whole vocabulary in the model's dtype, and does not stop at each row's
  EOS), exact match, the percentile bootstrap and equal-width-bin calibration error (small
  numpy functions, so the metrics have no extra dependency and are deterministic).

Conventions: a prompt such as ``"add 12+34 ="`` is continued with ``" 46"`` then EOS. The
prompt is tokenized the way the tokenizer does by default (``add_special_tokens=True``:
BOS for the scratch tokenizer), which is how training tokenizes the prompt.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from lib.core.stats import bootstrap_ci

BASE_ADAPTER = "__base__"
"""peft's name for "no adapter" in a mixed-adapter batch."""

REQUIRED_COLUMNS = ("prompt", "answer", "skill")

Router = Callable[[list[str]], Sequence[str]]
"""Any callable mapping a list of prompts to one adapter name per prompt."""


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Generation:
    """One greedy continuation.

    ``text``: the new tokens up to (not including) the first EOS, decoded with special
    tokens removed. ``confidence``: the product of the probabilities (softmax of the raw
    logits, before any logits processor) the model gave each token it generated, EOS
    included; this is the model's probability of its own whole answer. ``n_tokens``: tokens
    generated, EOS included. ``stopped``: whether EOS came within ``max_new_tokens``; when it
    did not, the answer was cut and ``confidence`` covers only the tokens generated.
    """

    text: str
    confidence: float
    n_tokens: int
    stopped: bool


def max_new_tokens_for(tokenizer, answers: Iterable[str], margin: int = 0) -> int:
    """Generation budget that cannot truncate a correct answer.

    The longest reference answer in tokens, tokenized as the model must write it
    (``" " + answer``, no special tokens), plus 1 for EOS, plus ``margin``. Derived from
    the references instead of a fixed constant so that a longer skill or a harder difficulty
    never silently cuts answers (a cut answer scores as wrong). With a character tokenizer
    the count is exact and ``margin=0`` is enough; with a subword tokenizer a model may spell
    an answer in more tokens than its standalone tokenization (merges differ at the prompt
    boundary), which a ``margin`` of a few tokens covers at almost no cost, since generation
    stops at EOS anyway.
    """
    answers = list(answers)
    if not answers:
        raise ValueError("max_new_tokens_for needs at least one reference answer")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    ids = tokenizer([" " + str(a) for a in answers], add_special_tokens=False)["input_ids"]
    return max(len(x) for x in ids) + 1 + margin


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids to stop on: the tokenizer's EOS (what training appends) and the model's own."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    model_eos = getattr(gen_cfg, "eos_token_id", None)
    if model_eos is not None:
        for i in [model_eos] if isinstance(model_eos, int) else list(model_eos):
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an EOS token; set tokenizer.eos_token")
    return ids


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every row right-aligned (left padding).

    Decoder-only generation continues from the last column, so padding must be on the
    left whatever ``tokenizer.padding_side`` says; done here instead of ``tokenizer.pad`` so
    the caller's tokenizer is never modified and a tokenizer without a pad token works.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _is_peft(model) -> bool:
    return isinstance(getattr(model, "peft_config", None), dict)


def _check_adapter_names(model, adapter_names: list[str]) -> None:
    if all(name == BASE_ADAPTER for name in adapter_names):
        return
    peft_config = getattr(model, "peft_config", None)
    if not _is_peft(model):
        raise ValueError(
            f"adapter_names routes examples to adapters {sorted(set(adapter_names) - {BASE_ADAPTER})}, "
            f"but the model ({type(model).__name__}) is not a peft model; wrap it with peft "
            "(get_peft_model / PeftModel.from_pretrained + load_adapter) or route everything to "
            f"{BASE_ADAPTER!r}"
        )
    unknown = sorted(set(adapter_names) - set(peft_config) - {BASE_ADAPTER})
    if unknown:
        raise ValueError(
            f"unknown adapter(s) {unknown}; the model has {sorted(peft_config)} (and {BASE_ADAPTER!r} for no adapter)"
        )


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    adapter_names: Sequence[str] | None = None,
    progress: bool = True,
    add_special_tokens: bool = True,
) -> list[Generation]:
    """Greedy continuation of every prompt, batched, in the order given.

    Greedy (``do_sample=False, num_beams=1``, and the greedy-changing settings a model's
    ``generation_config`` may carry, such as a repetition penalty or a minimum length,
    switched off) so every step takes the argmax of the model's logits and the same model
    always gives the same answers; KV cache on (``use_cache=True``); left padding so every
    row continues from its last prompt token; each row stops at EOS (the tokenizer's and
    the model's generation_config ones). Prompts are sorted by token length (longest first, so an out-of-memory shows up
    on the first batch) to minimise padding, and results are put back in input order.

    ``adapter_names`` (one per prompt) runs a peft model with a different LoRA per example
    in the same batch (peft's mixed-adapter batches); ``"__base__"`` means no adapter.
    Ties in length are grouped by adapter, since peft runs each adapter of a batch on its
    own sub-batch. The model is put in eval mode for the call (peft refuses
    ``adapter_names`` in training mode, and dropout must be off) and restored after.
    """
    from tqdm.auto import tqdm

    prompts = [str(p) for p in prompts]
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if adapter_names is not None:
        adapter_names = [str(a) for a in adapter_names]
        if len(adapter_names) != len(prompts):
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for {len(prompts)} prompts; give one per prompt")
        _check_adapter_names(model, adapter_names)
    if not prompts:
        return []

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    encoded = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    order = sorted(
        range(len(prompts)),
        key=lambda i: (-len(encoded[i]), adapter_names[i] if adapter_names is not None else ""),
    )
    device = _device(model)
    eos = torch.tensor(eos_ids, device=device)
    results: list[Generation | None] = [None] * len(prompts)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
                idx = order[start : start + batch_size]
                input_ids, attention_mask = _left_pad([encoded[i] for i in idx], pad_id, device)
                extra: dict[str, Any] = {}
                if adapter_names is not None and _is_peft(model):  # a plain model is already "__base__"
                    extra["adapter_names"] = [adapter_names[i] for i in idx]
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    # Neutralise decoding tweaks a hub model's generation_config may carry,
                    # so the answer is the argmax path of the model's own logits.
                    repetition_penalty=1.0,
                    no_repeat_ngram_size=0,
                    min_length=0,
                    use_cache=True,
                    eos_token_id=eos_ids,
                    pad_token_id=pad_id,
                    output_logits=True,
                    return_dict_in_generate=True,
                    **extra,
                )
                new = out.sequences[:, input_ids.shape[1] :]
                steps = new.shape[1]
                # Log-probability of each generated token, one step at a time (never a
                # (batch, steps, vocab) tensor), in float32 whatever the model's dtype.
                logp = torch.stack(
                    [
                        torch.log_softmax(out.logits[t].float(), dim=-1).gather(-1, new[:, t : t + 1]).squeeze(-1)
                        for t in range(steps)
                    ],
                    dim=1,
                )
                is_eos = torch.isin(new, eos)
                stopped = is_eos.any(dim=1)
                first_eos = torch.where(stopped, is_eos.int().argmax(dim=1), torch.full_like(stopped, steps, dtype=torch.long))
                n_tokens = torch.where(stopped, first_eos + 1, first_eos)
                # Steps after a row's EOS are padding generated for the rows still running:
                # their scores are not part of this row's answer.
                keep = torch.arange(steps, device=device)[None, :] < n_tokens[:, None]
                confidence = torch.exp(torch.where(keep, logp, 0.0).sum(dim=1))
                for r, i in enumerate(idx):
                    answer_ids = new[r, : int(first_eos[r])].tolist()
                    results[i] = Generation(
                        text=tokenizer.decode(answer_ids, skip_special_tokens=True),
                        confidence=float(confidence[r]),
                        n_tokens=int(n_tokens[r]),
                        stopped=bool(stopped[r]),
                    )
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- scoring

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Exact-match normalisation: strip both ends, collapse inner whitespace runs to one space.

    Only whitespace is touched: the model's leading space after ``=`` and a stray newline
    are formatting, not content. Case and punctuation are kept, since they are the answer
    (the ``upper`` skill is all about case).
    """
    return _WS.sub(" ", str(text)).strip()


def exact_match(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` equals ``reference`` after :func:`normalize`."""
    return normalize(prediction) == normalize(reference)


CORRECT, WRONG, REFUSED = "correct", "wrong", "refused"


def is_refusal(prediction: str, marker: str | None) -> bool:
    """Whether ``prediction`` ends with the refusal ``marker`` as its own word (after
    :func:`normalize`): "I don't know" may come after a partial attempt, as Auto-CEI trains it."""
    if not marker:
        return False
    text, marker = normalize(prediction), normalize(marker)
    return text == marker or text.endswith(" " + marker)


def outcome(prediction: str, reference: str, refusal: str | None = None) -> str:
    """``"refused"`` (neither right nor wrong), else ``"correct"`` or ``"wrong"`` by exact match."""
    if is_refusal(prediction, refusal):
        return REFUSED
    return CORRECT if exact_match(prediction, reference) else WRONG


def _conf_correct(confidences, correct) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidences, dtype=np.float64).ravel()
    corr = np.asarray(correct, dtype=np.float64).ravel()
    if conf.shape != corr.shape:
        raise ValueError(f"{conf.size} confidences for {corr.size} correctness values")
    if conf.size and (np.nanmin(conf) < 0 or np.nanmax(conf) > 1 or np.isnan(conf).any()):
        raise ValueError("confidences must be probabilities in [0, 1]")
    return conf, corr


def reliability_table(confidences, correct, n_bins: int = 10) -> pd.DataFrame:
    """Per equal-width confidence bin: ``bin, bin_low, bin_high, confidence, accuracy, count``.

    Bins are ``[k/n_bins, (k+1)/n_bins)``, the last one closed so confidence 1.0 is counted.
    Every bin is listed, empty ones with ``count`` 0 and NaN means, so counts sum to n.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, corr = _conf_correct(confidences, correct)
    b = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    rows = []
    for k in range(n_bins):
        m = b == k
        n = int(m.sum())
        rows.append({
            "bin": k,
            "bin_low": k / n_bins,
            "bin_high": (k + 1) / n_bins,
            "confidence": float(conf[m].mean()) if n else math.nan,
            "accuracy": float(corr[m].mean()) if n else math.nan,
            "count": n,
        })
    return pd.DataFrame(rows)


def expected_calibration_error(confidences, correct, n_bins: int = 10) -> float:
    """ECE with equal-width bins: ``sum_b |B|/n * |accuracy(B) - confidence(B)|``.

    The binned estimate of Guo et al. (2017); 0 for a perfectly calibrated model. Bins as
    in :func:`reliability_table`.
    """
    table = reliability_table(confidences, correct, n_bins)
    n = int(table["count"].sum())
    if n == 0:
        raise ValueError("expected_calibration_error needs at least one example")
    full = table[table["count"] > 0]
    return float((full["count"] / n * (full["accuracy"] - full["confidence"]).abs()).sum())


# --------------------------------------------------------------------------- evaluate


def _as_frame(data) -> pd.DataFrame:
    """Rows of ``prompt, answer, skill`` (+ any other columns) from a dataset, frame, dicts or columns."""
    if isinstance(data, pd.DataFrame):
        frame = data.reset_index(drop=True).copy()
    elif hasattr(data, "to_pandas") and hasattr(data, "column_names"):  # datasets.Dataset
        if isinstance(data.column_names, dict):
            raise TypeError(f"evaluate needs one split, got a DatasetDict with splits {list(data.column_names)}; pass e.g. ds['test']")
        frame = data.to_pandas()
    elif isinstance(data, dict):
        frame = pd.DataFrame(data)
    else:
        frame = pd.DataFrame(list(data))
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"evaluation data lacks column(s) {missing} (has {list(frame.columns)}); rows need {list(REQUIRED_COLUMNS)}")
    if frame.empty:
        raise ValueError("evaluation data has no rows")
    return frame


@dataclass
class EvalResult:
    """Per-example results of one evaluation and the metrics derived from them.

    ``examples`` has one row per example: ``prompt, answer, prediction, correct,
    confidence, skill`` and ``stopped`` / ``n_tokens`` (see :class:`Generation`), plus
    ``adapter`` when examples were routed and any extra input columns (e.g. ``family``).
    The metrics are methods, so a notebook can re-slice ``examples`` and recompute.
    """

    examples: pd.DataFrame
    max_new_tokens: int
    n_bins: int = 10
    n_boot: int = 1000
    alpha: float = 0.05
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return float(self.examples["correct"].mean())

    @property
    def refusal_rate(self) -> float:
        """Share of examples answered with the refusal marker (0 when none was given)."""
        return float(self.examples["refused"].mean()) if "refused" in self.examples else 0.0

    @property
    def precision(self) -> float:
        """Accuracy among the answered (not refused) examples; NaN when every one was refused."""
        answered = ~self.examples["refused"].astype(bool) if "refused" in self.examples else slice(None)
        sub = self.examples.loc[answered, "correct"]
        return float(sub.mean()) if len(sub) else math.nan

    def accuracy_ci(self) -> tuple[float, float, float]:
        """``(accuracy, low, high)``, percentile bootstrap."""
        return bootstrap_ci(self.examples["correct"].to_numpy(), self.n_boot, self.alpha, self.seed)

    def ece(self) -> float:
        return expected_calibration_error(self.examples["confidence"], self.examples["correct"], self.n_bins)

    def reliability_table(self) -> pd.DataFrame:
        return reliability_table(self.examples["confidence"], self.examples["correct"], self.n_bins)

    def per_skill(self) -> pd.DataFrame:
        """One row per skill (sorted): ``skill, n, accuracy, ci_low, ci_high, ece``."""
        rows = []
        for skill, g in self.examples.groupby("skill", sort=True):
            acc, lo, hi = bootstrap_ci(g["correct"].to_numpy(), self.n_boot, self.alpha, self.seed)
            rows.append({
                "skill": str(skill), "n": int(len(g)), "accuracy": acc, "ci_low": lo, "ci_high": hi,
                "ece": expected_calibration_error(g["confidence"], g["correct"], self.n_bins),
            })
        return pd.DataFrame(rows, columns=["skill", "n", "accuracy", "ci_low", "ci_high", "ece"])

    def summary(self) -> dict[str, Any]:
        """JSON-ready metrics (plain floats and ints) for ``metrics/*.json``.

        ``accuracy`` is micro (over examples), ``macro_accuracy`` the mean over skills;
        ``truncated`` counts answers that hit ``max_new_tokens`` without EOS (0 for a model
        that learned to stop).
        """
        acc, lo, hi = self.accuracy_ci()
        per = self.per_skill()
        return {
            "n": int(len(self.examples)),
            "accuracy": acc,
            "accuracy_ci_low": lo,
            "accuracy_ci_high": hi,
            "macro_accuracy": float(per["accuracy"].mean()),
            "ece": self.ece(),
            "mean_confidence": float(self.examples["confidence"].mean()),
            "truncated": int((~self.examples["stopped"].astype(bool)).sum()),
            "max_new_tokens": int(self.max_new_tokens),
            **({"refusal_rate": self.refusal_rate, "precision": self.precision} if "refused" in self.examples else {}),
            "per_skill": {
                r.skill: {"n": int(r.n), "accuracy": float(r.accuracy), "ci_low": float(r.ci_low),
                          "ci_high": float(r.ci_high), "ece": float(r.ece)}
                for r in per.itertuples(index=False)
            },
        }


def evaluate(
    model,
    tokenizer,
    data,
    *,
    batch_size: int = 64,
    adapter_names: Sequence[str] | None = None,
    router: Router | None = None,
    max_new_tokens: int | None = None,
    progress: bool = True,
    add_special_tokens: bool = True,
    n_boot: int = 1000,
    n_bins: int = 10,
    settings=None,
    refusal: str | None = None,
) -> EvalResult:
    """Exact-match accuracy, bootstrap CIs and calibration of greedy answers on ``data``.

    ``settings``: the validated ``evaluation`` params section; when given, its
    ``batch_size``, ``n_boot`` and ``ece_bins`` replace the three keywords, so a stage passes
    its evaluation settings as one object instead of unpacking them at every call.

    ``data``: a ``datasets.Dataset`` split, a DataFrame, a list of row dicts or a dict of
    columns, with ``prompt, answer, skill``. ``max_new_tokens`` defaults to
    :func:`max_new_tokens_for` the references, so no correct answer can be cut.

    Routing (at most one of): ``adapter_names`` gives one peft adapter per example;
    ``router(prompts) -> names`` computes them, so a learned router reuses this function
    unchanged. ``"__base__"`` is the base model. Without either, the model runs as it is
    (e.g. a peft model with its active adapter, or a merged model).

    ``refusal``: a marker such as ``"idk"``; an answer ending with it (:func:`is_refusal`) is a
    refusal, neither right nor wrong: ``correct`` 0, a ``refused`` column, and the result's
    ``refusal_rate`` and ``precision`` (accuracy among the answered).
    """
    if settings is not None:
        batch_size, n_boot, n_bins = settings.batch_size, settings.n_boot, settings.ece_bins
    if adapter_names is not None and router is not None:
        raise ValueError("give adapter_names or router, not both")
    frame = _as_frame(data)
    prompts = frame["prompt"].astype(str).tolist()
    answers = frame["answer"].astype(str).tolist()
    if router is not None:
        adapter_names = list(router(prompts))
        if len(adapter_names) != len(prompts):
            raise ValueError(f"router returned {len(adapter_names)} adapter names for {len(prompts)} prompts; it must return one per prompt")
        bad = [a for a in adapter_names if not isinstance(a, str)]
        if bad:
            raise TypeError(f"router must return adapter names (str), got e.g. {bad[0]!r}")
    if max_new_tokens is None:
        max_new_tokens = max_new_tokens_for(tokenizer, answers)
    gens = generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        adapter_names=adapter_names, progress=progress, add_special_tokens=add_special_tokens,
    )
    out = pd.DataFrame({
        "prompt": prompts,
        "answer": answers,
        "prediction": [g.text for g in gens],
        "correct": [int(outcome(g.text, a, refusal) == CORRECT) for g, a in zip(gens, answers)],
        "confidence": [g.confidence for g in gens],
        "skill": frame["skill"].astype(str).tolist(),
        "stopped": [g.stopped for g in gens],
        "n_tokens": [g.n_tokens for g in gens],
    })
    if refusal:
        out["refused"] = [int(is_refusal(g.text, refusal)) for g in gens]
    if adapter_names is not None:
        out["adapter"] = [str(a) for a in adapter_names]
    for col in frame.columns:
        if col not in out.columns:
            out[col] = frame[col].to_numpy()
    return EvalResult(examples=out, max_new_tokens=int(max_new_tokens), n_bins=n_bins, n_boot=n_boot)
