"""Routing between LoRA skill experts: a task-level learned router, a soft mixture, an output ensemble.

Issue 4 compares two ways of using several experts at once. Merging (``lib/merge/task_vectors.py``)
combines them in weight-update space once, for every input. The methods here decide **per
example** instead, and all of them run through the evaluation harness unchanged
(``lib.core.evaluation.evaluate``), so their numbers are comparable with the merges':

- :class:`TaskRouter`: a small classifier that reads the prompt and picks one expert, as
  in task-level mixture-of-experts routing ("Beyond Distillation: Task-level
  Mixture-of-Experts for Efficient Inference", Kudugunta et al. 2021: route a whole
  example by its task, not each token, so only one expert is needed per example). Its
  input is the mean-pooled hidden state of the *base* model over the prompt's tokens, so
  the representation does not depend on which experts exist. Plugs into
  ``evaluate(..., router=task_router.router(model, tok))`` (hard routing through peft's
  mixed-adapter batches).
- :class:`SoftMixture`: every expert's LoRA is active at once and each one's output is
  scaled per example by a weight (the router's top-k probabilities, or any fixed weights,
  LoraHub-like). For LoRA on a linear layer the layer output is
  ``W x + Σ_i w_i ΔW_i x``: a per-example *linear merge* of the experts' updates, applied
  at every layer (the soft mixture of LoRA outputs of e.g. MoLE, Wu et al. 2024, at task
  level rather than per token).
- :class:`LogitEnsemble`: output ensembling. Each expert runs as its own model and the
  next-token distribution is the *average of the experts' probabilities* (the classic
  predictive-distribution average of ensembles, e.g. Lakshminarayanan et al. 2017); greedy
  decoding continues from the ensemble's argmax. Costs one forward per expert per step.

What is whose: peft provides the multi-adapter LoRA forward (several active adapters are
summed), mixed-adapter batches (``adapter_names=``), ``disable_adapter``; transformers the
models, the KV cache and ``generate``. Written here because neither offers it: the
prompt-feature extraction and classifier, per-example weighting of each adapter's output
(forward hooks on ``lora_A``), and the multi-cache greedy loop of the ensemble.

peft behaviour worth knowing (0.21.2), handled here:

- ``PeftModel.disable_adapter()`` re-enables the adapters on exit through ``set_adapter``,
  which sets ``requires_grad=True`` on the active adapter's weights even if they were
  frozen before; ``base_model.set_adapter([...])`` likewise changes ``requires_grad``.
  Every function here snapshots and restores ``requires_grad``.
- ``model.base_model.set_adapter(list)`` activates several LoRAs (their outputs are summed)
  but leaves ``PeftModel.active_adapter`` (a plain attribute) as it was; only the tuner
  layers and ``model.base_model.active_adapter`` change. Both are restored after a call.
- A merged adapter (``merge_adapter``) runs only the base layer, so a hook on ``lora_A``
  would silently do nothing: :class:`SoftMixture` refuses merged models.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from lib.core.sft_data import eval_mode
from lib.core.stats import bootstrap_ci
from lib.core.evaluation import BASE_ADAPTER, _check_adapter_names, _device, _eos_ids, _is_peft, _left_pad

Tensor = torch.Tensor
WeightsFn = Callable[[Tensor, Tensor], Tensor]
"""``weights_fn(input_ids, attention_mask) -> Tensor[batch, n_experts]``: one weight per expert per row."""


# --------------------------------------------------------------------------- small helpers


def _position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding (``cumsum(mask) - 1``, pads at 0), as transformers'
    ``generate`` computes them, so a padded row gets the positions it has when run alone."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@contextlib.contextmanager
def _kept_requires_grad(model: nn.Module):
    """Restore every parameter's ``requires_grad`` on exit (peft's adapter switching changes it)."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in before:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


@contextlib.contextmanager
def _base_only(model: nn.Module):
    """The base model: a peft model with its adapters disabled (``disable_adapter``); a plain
    model as it is. ``requires_grad`` and the active adapter are left as they were."""
    if _is_peft(model) and hasattr(model, "disable_adapter"):
        with _kept_requires_grad(model), model.disable_adapter():
            yield
    else:
        yield


def _lora_layers(model) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _check_names(names: Sequence[str]) -> list[str]:
    names = [str(n) for n in names]
    if not names:
        raise ValueError("give at least one expert (adapter) name")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"expert names must be unique; repeated: {dupes}")
    return names


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


# --------------------------------------------------------------------------- soft mixture


class _ModelWrapper(nn.Module):
    """What the harness's ``generate`` reads from a model, taken from the wrapped ``self.model``."""

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return _device(self.model)


class SoftMixture(_ModelWrapper):
    """All experts' LoRAs active at once, each one's output scaled per example.

    Weights come from ``weights_fn(input_ids, attention_mask) -> [batch, len(names)]`` when
    given (used as is: no top-k, no renormalisation; fixed weights give a LoraHub-like
    combination), else from ``router`` (a trained :class:`TaskRouter`, base-model features of
    the prompt at the start of ``generate``): its ``top_k`` most probable experts are kept
    and weighted by ``softmax(logit / temperature)`` over the kept ones only, which equals
    the renormalised probabilities ``p_i^(1/T) / Σ_kept p_j^(1/T)`` (with ``T=1``, the
    kept probabilities divided by their sum); the other experts get weight 0. ``top_k=1``
    is hard routing.

    Mechanism: ``model.base_model.set_adapter([...every LoRA expert...])`` makes peft sum the
    experts' ``ΔW_i x`` in every LoRA layer; a forward hook on each ``lora_A[expert]``
    multiplies that expert's low-rank activations by its weight (shape ``[batch, 1, ...]``),
    so the layer computes ``W x + Σ_i w_i ΔW_i x``. Weights are fixed for the whole
    generation (the batch size is constant in greedy decoding; a mismatch is an error).
    ``"__base__"`` may be one of the names: its weight scales no LoRA, i.e. it keeps the
    base layer's share. Hooks are removed and the previously active adapter and every
    ``requires_grad`` are restored in a ``finally``.

    Only plain LoRA on linear layers (no DoRA or other variants, no embedding LoRA, nothing
    merged), where weighting ``lora_A``'s output is exactly weighting the update.
    Usable as the ``model`` of the harness's ``generate``/``evaluate``.
    """

    def __init__(self, model, router: TaskRouter | None = None, *, top_k: int = 2, temperature: float = 1.0,
                 names: Sequence[str] | None = None, weights_fn: WeightsFn | None = None):
        super().__init__()
        if not _is_peft(model):
            raise ValueError(f"SoftMixture needs a peft model holding the experts, got {type(model).__name__}")
        if router is None and weights_fn is None:
            raise ValueError("give a trained TaskRouter (router=) or fixed weights (weights_fn=)")
        if names is None:
            if router is None:
                raise ValueError("weights_fn needs names=: the expert of each weight column")
            names = router.names
        elif router is not None and list(names) != router.names:
            raise ValueError(f"names {list(names)} differ from the router's classes {router.names}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model = model
        # Mirror the wrapped model's mode: a new Module starts in training mode, and the
        # harness restores the wrapper's mode after a call, which would put the model in it.
        self.training = model.training
        self.router = router
        self.names = _check_names(names)
        self.top_k = min(int(top_k), len(self.names))
        self.temperature = float(temperature)
        self.weights_fn = weights_fn
        _check_adapter_names(model, self.names)
        self.experts = [n for n in self.names if n != BASE_ADAPTER]
        if not self.experts:
            raise ValueError("SoftMixture needs at least one LoRA expert besides '__base__'")
        self._hooked = self._check_layers()

    def _check_layers(self) -> dict[str, list[nn.Module]]:
        """Every expert's ``lora_A`` modules, after refusing what a hook on them cannot weight."""
        from peft import LoraConfig

        hooked: dict[str, list[nn.Module]] = {e: [] for e in self.experts}
        for e in self.experts:
            cfg = self.model.peft_config[e]
            if not isinstance(cfg, LoraConfig):
                raise ValueError(f"adapter {e!r} is a {type(cfg).__name__}, not a LoRA")
            if getattr(cfg, "modules_to_save", None):
                raise ValueError(f"adapter {e!r} trains modules_to_save={cfg.modules_to_save}: not a LoRA update, cannot be weighted")
        for layer in _lora_layers(self.model):
            for e in self.experts:
                if e in getattr(layer, "lora_embedding_A", {}):
                    raise ValueError(f"adapter {e!r} has an embedding LoRA ({type(layer).__name__}); only linear LoRA layers are supported")
                if e in getattr(layer, "lora_variant", {}):
                    raise ValueError(f"adapter {e!r} is a LoRA variant (e.g. DoRA) at {type(layer).__name__}: its output is not linear in the update")
                if e in layer.lora_A:
                    hooked[e].append(layer.lora_A[e])
        empty = [e for e, mods in hooked.items() if not mods]
        if empty:
            raise ValueError(f"adapter(s) {empty} have no LoRA layer in this model")
        return hooked

    # ---- weights

    def mixture_weights(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``[batch, len(names)]`` float32 weights on the model's device (see the class doc)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.weights_fn is not None:
            w = torch.as_tensor(self.weights_fn(input_ids, attention_mask), dtype=torch.float32)
        else:
            logits = self.router.logits_from_features(self.router.features_from_ids(self.model, input_ids, attention_mask))
            kept = logits.topk(self.top_k, dim=-1)
            w = torch.zeros_like(logits).scatter(-1, kept.indices, torch.softmax(kept.values / self.temperature, dim=-1))
        if tuple(w.shape) != (input_ids.shape[0], len(self.names)):
            raise ValueError(f"mixture weights have shape {tuple(w.shape)}; need [batch={input_ids.shape[0]}, experts={len(self.names)}]")
        return w.to(input_ids.device)

    @contextlib.contextmanager
    def mixing(self, weights: Tensor):
        """Every expert active, each ``lora_A[expert]`` output times its column of ``weights``."""
        base = self.model.base_model
        previous = base.active_adapter
        previous = list(previous) if isinstance(previous, list) else previous
        handles = []

        def scale_by(column: Tensor):
            def hook(module, inputs, output):
                if output.shape[0] != column.shape[0]:
                    raise RuntimeError(f"SoftMixture: a LoRA layer saw batch {output.shape[0]}, the weights are for "
                                       f"batch {column.shape[0]} (beam search or sequence expansion is not supported)")
                return output * column.view(-1, *([1] * (output.dim() - 1))).to(output.dtype)
            return hook

        with _kept_requires_grad(self.model):
            try:
                if any(layer.merged for layer in _lora_layers(self.model)):
                    raise RuntimeError("SoftMixture: the model has merged adapter weights; unmerge_adapter() first")
                base.set_adapter(self.experts)
                for e in self.experts:
                    column = weights[:, self.names.index(e)]
                    handles += [m.register_forward_hook(scale_by(column)) for m in self._hooked[e]]
                yield
            finally:
                for h in handles:
                    h.remove()
                base.set_adapter(previous)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
        """The wrapped model's forward under the mixture (weights from the whole input)."""
        with self.mixing(self.mixture_weights(input_ids, attention_mask)):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
        """peft's ``generate`` under the mixture; weights from the prompt, fixed for every step."""
        with self.mixing(self.mixture_weights(input_ids, attention_mask)):
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


# --------------------------------------------------------------------------- output ensemble


class LogitEnsemble(_ModelWrapper):
    """Greedy decoding from the average of the experts' next-token probabilities.

    Each expert is one adapter of the peft model (``"__base__"`` = the base model), run on
    the whole batch with peft's ``adapter_names=[expert] * batch`` (no adapter switching,
    so nothing about the wrapped model changes) and its own KV cache. At every step
    ``p = mean_i softmax(logits_i)``, the next token is ``argmax p``, and ``log p`` is
    returned as that step's logits, so the harness's confidence is the ensemble's
    probability of its own answer. Left padding gets the positions ``cumsum(mask) - 1``
    that transformers' ``generate`` uses; rows that produced an EOS emit ``pad_token_id``;
    decoding stops when every row has stopped or after ``max_new_tokens``.

    Hand-written because ``generate`` runs one model. Greedy only: sampling, beams,
    repetition penalties and the like are refused rather than silently ignored.
    """

    def __init__(self, model, names: Sequence[str]):
        super().__init__()
        self.names = _check_names(names)
        _check_adapter_names(model, self.names)
        self.model = model
        self.training = model.training  # mirror the model's mode (see SoftMixture)

    def _expert_step(self, name: str, ids: Tensor, mask: Tensor, pos: Tensor, cache) -> tuple[Tensor, Any]:
        extra: dict[str, Any] = {}
        if _is_peft(self.model):
            extra["adapter_names"] = [name] * ids.shape[0]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, return_dict=True, **extra)
        return out.logits[:, -1].float(), out.past_key_values

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 do_sample: bool = False, num_beams: int = 1, repetition_penalty: float | None = None,
                 no_repeat_ngram_size: int | None = None, min_length: int | None = None, **ignored):
        """``GenerateDecoderOnlyOutput(sequences=prompt + new tokens, logits=(log p per step, ...))``.

        ``ignored`` takes the harness's flags that need no action here (``use_cache``,
        ``output_logits``, ``return_dict_in_generate``...).
        """
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        if do_sample or num_beams != 1 or repetition_penalty not in (None, 1.0) \
                or no_repeat_ngram_size not in (None, 0) or min_length not in (None, 0):
            raise ValueError("LogitEnsemble decodes greedily only (do_sample=False, num_beams=1, no repetition "
                             "penalty, no_repeat_ngram_size=0, min_length=0)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if eos_token_id is None:
            eos_token_id = getattr(self.generation_config, "eos_token_id", None)
        eos_list = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        if pad_token_id is None:
            if not eos_list:
                raise ValueError("LogitEnsemble.generate needs pad_token_id or an eos_token_id to pad finished rows")
            pad_token_id = eos_list[0]
        device = input_ids.device
        eos = torch.tensor(eos_list, dtype=torch.long, device=device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        pos = _position_ids(mask)
        ids = input_ids
        caches: list[Any] = [None] * len(self.names)
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
        new_tokens, step_logits = [], []
        with torch.inference_mode(), eval_mode(self.model):
            for _ in range(max_new_tokens):
                probs = None
                for e, name in enumerate(self.names):
                    logits, caches[e] = self._expert_step(name, ids, mask, pos, caches[e])
                    p = torch.softmax(logits, dim=-1)
                    probs = p if probs is None else probs + p
                logp = (probs / len(self.names)).log()
                nxt = torch.where(unfinished, logp.argmax(-1), torch.full_like(unfinished, pad_token_id, dtype=torch.long))
                new_tokens.append(nxt)
                step_logits.append(logp)
                unfinished = unfinished & ~torch.isin(nxt, eos)
                if not unfinished.any():
                    break
                ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = mask.sum(-1, keepdim=True) - 1
        sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
        return GenerateDecoderOnlyOutput(sequences=sequences, logits=tuple(step_logits))


__all__ = ["LogitEnsemble", "SoftMixture", "TaskRouter", "WeightsFn", "confusion_matrix"]
