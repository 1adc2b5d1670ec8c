"""The task-level router (Kudugunta et al. 2021): prompt → one expert, learned from (prompt,
skill) pairs; and how its routes are read (confusion matrix, family mass)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.core.sft_data import eval_mode
from lib.core.stats import bootstrap_ci
from lib.core.evaluation import _device, _eos_ids, _left_pad
from lib.route.common import Tensor, _base_only, _check_names, _position_ids


# --------------------------------------------------------------------------- task router


class TaskRouter:
    """Task-level router: prompt → one expert, learned from (prompt, skill) pairs.

    Kudugunta et al. (2021) route every token of an example by its task, so serving needs
    only that task's expert. Here the task is not given at test time; it is predicted
    from the prompt by a small classifier over the base model's own representation:
    the mean over the prompt's real tokens of ``hidden_states[hidden_layer]``
    (``output_hidden_states=True``, adapters disabled, so every expert sees one router).

    The classifier is linear (``hidden=0``) or one ReLU hidden layer of ``hidden`` units,
    on features standardised with the training mean and standard deviation, trained
    full-batch with AdamW and cross-entropy for ``epochs`` steps. Initialisation is drawn
    under ``torch.random.fork_rng`` seeded with ``seed``, so the same data and seed give
    the same router, and the caller's RNG is untouched. It lives on the CPU in float32.

    ``names`` are the classes: adapter names of the peft model (``"__base__"`` allowed,
    meaning no adapter), in the column order of :meth:`predict_proba`.
    """

    def __init__(self, names: Sequence[str], hidden_layer: int = -1, hidden: int = 0, epochs: int = 200,
                 lr: float = 1e-2, weight_decay: float = 1e-3, seed: int = 0, batch_size: int = 256):
        self.names = _check_names(names)
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0 = linear classifier), got {hidden}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
        self.hidden_layer = int(hidden_layer)
        self.hidden = int(hidden)
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.classifier: nn.Module | None = None
        self.mean: Tensor | None = None
        self.std: Tensor | None = None

    # ---- features

    def features_from_ids(self, model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[batch, d]`` float32 CPU features of an already left-padded batch.

        Mean of ``hidden_states[hidden_layer]`` over the positions where ``attention_mask``
        is 1, computed by the base model with positions that skip the padding, so a
        prompt's features do not depend on how much padding its batch needed (up to float
        rounding). Used inside :class:`SoftMixture`'s ``generate``, where only ids exist.
        """
        mask = attention_mask.to(input_ids.device)
        with torch.inference_mode(), eval_mode(model), _base_only(model):
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=_position_ids(mask),
                        output_hidden_states=True, use_cache=False, return_dict=True)
        hidden = out.hidden_states[self.hidden_layer].float()
        keep = mask.bool().unsqueeze(-1)
        # where(), not a product: a fully masked pad row may hold NaN in some attention kernels.
        summed = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(1)
        counts = keep.sum(1).clamp(min=1).to(hidden.dtype)
        return (summed / counts).cpu()

    def features(self, model, tok, prompts: Sequence[str]) -> Tensor:
        """``[n, d]`` features of ``prompts``, in order, tokenized as the harness does
        (``add_special_tokens=True``, left padding with the harness's ``_left_pad``),
        in batches of ``batch_size`` sorted by length (less padding)."""
        prompts = [str(p) for p in prompts]
        if not prompts:
            raise ValueError("no prompts to compute features of")
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else _eos_ids(model, tok)[0]
        encoded = tok(prompts, add_special_tokens=True)["input_ids"]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        device = _device(model)
        chunks, rows = [], []
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask = _left_pad([encoded[i] for i in idx], pad_id, device)
            chunks.append(self.features_from_ids(model, ids, mask))
            rows.extend(idx)
        feats = torch.cat(chunks)
        out = torch.empty_like(feats)
        out[torch.tensor(rows)] = feats
        return out

    # ---- training

    def _labels(self, labels: Sequence[str]) -> Tensor:
        labels = [str(x) for x in labels]
        unknown = sorted(set(labels) - set(self.names))
        if unknown:
            raise ValueError(f"unknown label(s) {unknown}: the router's classes are {self.names}; "
                             "add them to names or fix the labels")
        index = {n: i for i, n in enumerate(self.names)}
        return torch.tensor([index[x] for x in labels], dtype=torch.long)

    def _build(self, d: int) -> nn.Module:
        k = len(self.names)
        if self.hidden == 0:
            return nn.Linear(d, k)
        return nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, k))

    def fit_features(self, feats: Tensor, labels: Sequence[str]) -> dict[str, Any]:
        """Train on precomputed features (e.g. to sweep classifier settings without
        re-running the model). Returns ``train_accuracy, final_loss, seconds, n_examples,
        n_parameters``."""
        feats = torch.as_tensor(feats, dtype=torch.float32).cpu()
        y = self._labels(labels)
        if feats.dim() != 2 or feats.shape[0] != len(y):
            raise ValueError(f"{tuple(feats.shape)} features for {len(y)} labels; need one [d] row per label")
        if len(y) == 0:
            raise ValueError("no training examples")
        start = time.perf_counter()
        # Gradients even when called under inference_mode / no_grad (features may be inference tensors).
        with torch.inference_mode(False), torch.enable_grad():
            feats = feats.clone()
            self.mean = feats.mean(0)
            self.std = feats.std(0, unbiased=False).clamp(min=1e-6)
            x = (feats - self.mean) / self.std
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                clf = self._build(x.shape[1])
            opt = torch.optim.AdamW(clf.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            clf.train()
            for _ in range(self.epochs):
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(clf(x), y)
                loss.backward()
                opt.step()
        clf.eval()
        self.classifier = clf
        with torch.no_grad():
            logits = clf(x)
            final_loss = float(nn.functional.cross_entropy(logits, y))
            accuracy = float((logits.argmax(-1) == y).float().mean())
        return {"train_accuracy": accuracy, "final_loss": final_loss, "seconds": time.perf_counter() - start,
                "n_examples": int(len(y)), "n_parameters": self.n_parameters}

    def fit(self, model, tok, prompts: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
        """Train on ``prompts`` labelled with adapter names (e.g. each example's skill's
        expert). Labels are checked before the model runs; an unknown one is a ValueError.
        ``seconds`` includes feature extraction."""
        prompts, labels = list(prompts), list(labels)
        if len(prompts) != len(labels):
            raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels; give one label per prompt")
        self._labels(labels)
        start = time.perf_counter()
        stats = self.fit_features(self.features(model, tok, prompts), labels)
        stats["seconds"] = time.perf_counter() - start
        return stats

    # ---- prediction

    @property
    def n_parameters(self) -> int:
        """Learned classifier parameters: the extra memory the router costs next to the experts
        (plus ``2·d`` standardisation constants, not counted). 0 before :meth:`fit`."""
        return 0 if self.classifier is None else sum(p.numel() for p in self.classifier.parameters())

    def logits_from_features(self, feats: Tensor) -> Tensor:
        """``[n, len(names)]`` classifier logits (float32, CPU)."""
        if self.classifier is None or self.mean is None or self.std is None:
            raise RuntimeError("this TaskRouter is not trained yet: call fit(...) first")
        x = (torch.as_tensor(feats, dtype=torch.float32).cpu() - self.mean) / self.std
        with torch.no_grad():
            return self.classifier(x)

    def proba_from_features(self, feats: Tensor) -> Tensor:
        return torch.softmax(self.logits_from_features(feats), dim=-1)

    def predict_proba(self, model, tok, prompts: Sequence[str]) -> np.ndarray:
        """``[n, len(names)]`` class probabilities (rows sum to 1), columns in ``names`` order."""
        return self.proba_from_features(self.features(model, tok, prompts)).numpy()

    def predict(self, model, tok, prompts: Sequence[str]) -> list[str]:
        """Top-1 adapter name per prompt."""
        return [self.names[i] for i in self.predict_proba(model, tok, prompts).argmax(axis=1)]

    def router(self, model, tok) -> Callable[[list[str]], list[str]]:
        """``router(prompts) -> adapter names`` for ``evaluate(model, tok, data, router=...)``."""
        if self.classifier is None:
            raise RuntimeError("this TaskRouter is not trained yet: call fit(...) first")

        def route(prompts: list[str]) -> list[str]:
            return self.predict(model, tok, prompts)

        return route


def confusion_matrix(true: Sequence[str], predicted: Sequence[str], names: Sequence[str]) -> pd.DataFrame:
    """Counts with rows = true class, columns = predicted class, both in ``names`` order
    (``pandas.crosstab``; index named ``true``, columns ``predicted``). A label outside
    ``names`` is a ValueError."""
    names = _check_names(names)
    true, predicted = [str(x) for x in true], [str(x) for x in predicted]
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true labels but {len(predicted)} predictions")
    unknown = sorted((set(true) | set(predicted)) - set(names))
    if unknown:
        raise ValueError(f"label(s) {unknown} not in names {names}")
    cats = pd.CategoricalDtype(names)
    table = pd.crosstab(pd.Series(true, dtype=cats, name="true"), pd.Series(predicted, dtype=cats, name="predicted"),
                        dropna=False)
    return table.reindex(index=names, columns=names, fill_value=0).astype(np.int64)


def family_mass(proba: np.ndarray, true: Sequence[str], names: Sequence[str], family: dict[str, str],
                n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Do the router's *wrong-skill* probabilities stay in the prompt's skill family?

    For each prompt of true skill t with router probabilities p over ``names``, the share of
    the probability given to other skills that lands on skills of t's family:
    ``s = Σ_{o≠t, family(o)=family(t)} p_o / Σ_{o≠t} p_o``. Returns the mean share over prompts
    with a 95% percentile-bootstrap interval over prompts, and ``chance``: the share expected
    if the wrong-skill probability were spread evenly, the mean of
    ``#(same-family others) / (len(names) - 1)``. A router whose representation groups skills
    by family puts more than ``chance`` there, even when its top-1 answer is right.
    """
    names = _check_names(names)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != (len(true), len(names)):
        raise ValueError(f"proba has shape {proba.shape}, expected ({len(true)}, {len(names)})")
    index = {n: i for i, n in enumerate(names)}
    shares, chances = [], []
    for row, t in zip(proba, true):
        others = [o for o in names if o != t]
        same = [index[o] for o in others if family[o] == family[t]]
        wrong = row.sum() - row[index[t]]
        chances.append(len(same) / len(others))
        shares.append(row[same].sum() / wrong if wrong > 0 else chances[-1])
    mean, lo, hi = bootstrap_ci(shares, n_boot=n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(shares), "chance": float(np.mean(chances))}
