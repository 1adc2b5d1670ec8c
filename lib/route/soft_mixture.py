"""Every expert's LoRA active at once, each one's output scaled per example (the soft
mixture of LoRA outputs, at task level)."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from lib.core.evaluation import BASE_ADAPTER, _check_adapter_names, _is_peft
from lib.route.task_router import TaskRouter
from lib.route.common import Tensor, WeightsFn, _ModelWrapper, _check_names, _kept_requires_grad, _lora_layers


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
