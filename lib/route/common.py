"""What the routers share: position ids under left padding, peft adapter switching that
leaves ``requires_grad`` alone, the LoRA layers of a model, expert-name checks, and the
wrapper that lets a router object stand in for a model in the evaluation harness."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lib.core.evaluation import _device, _is_peft

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


class _ModelWrapper(nn.Module):
    """What the harness's ``generate`` reads from a model, taken from the wrapped ``self.model``."""

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return _device(self.model)
