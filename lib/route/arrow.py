"""Arrow routing over a library of LoRA experts, optionally with GenKnowSub (peft's implementation).

Arrow (Ostapenko et al. 2024, "Towards modular LLMs by building and reusing a library of
LoRAs", arXiv:2405.11157) routes every token, in every adapted layer, to the experts whose
update is most aligned with that token's hidden state, with no training and no data: each
expert's *prototype* in a layer is the top right singular vector ``v_e`` of its
``ΔW_e = B_e A_e``; a token ``x`` scores ``|<x, v_e>|`` (sign-free, since ``v_e`` is defined
up to sign), the ``top_k`` scores go through a softmax with temperature ``T`` (the others get
weight 0), and the layer adds ``Σ_e c_e(x) · s_e B_e A_e x``.

GenKnowSub ("general knowledge subtraction", ACL 2025 short paper,
https://aclanthology.org/2025.acl-short.54/, the reference peft's ``ArrowConfig`` gives) first
subtracts "general knowledge" from every expert:
the mean of one or more *general* LoRAs (trained on generic text) is removed from each task
expert before Arrow builds its prototypes.

All of it is peft 0.21.2's ``create_arrow_model`` / ``ArrowConfig``
(``peft/tuners/lora/arrow.py``); written here: input checks with our expert names (peft renames
the experts ``task_0, task_1, ...`` and ``gks_0, ...`` in the order given and reports errors
with those names), and :func:`routing_weights`, which recomputes the routing coefficients,
because peft computes them inside the forward pass and discards them.

What peft does, and what to know before using it
------------------------------------------------
* ``base_model`` is modified in place (peft injects the LoRA layers into it): pass a copy.
* All experts (and general adapters) need one rank and one set of target modules, every
  target an ``nn.Linear``-like layer (peft checks after loading; checked here first).
* Prototypes: power iteration (15 steps) on ``A^T B^T B A``, from a random start; with
  ``rng_seed=None`` that start comes from torch's global RNG, so prototypes (hence outputs)
  may vary from run to run. :func:`build_arrow_model` passes a fixed seed by default.
  Scores use the raw hidden state (not a cosine, despite peft's docstring): the top-k choice
  is the same, but ``||x||`` sharpens the softmax like a lower temperature.
* Scaling: each expert's own ``s_e = lora_alpha / r`` is applied.
* Routing is per token, so generation with the KV cache and left-padded batches work, and a
  row's output does not depend on the rest of the batch (pad tokens are routed too, but
  masked by attention). ``merge_and_unload`` is impossible (refused by peft).
* One expert with ``top_k = 1``: its coefficient is ``softmax([score]) = 1``, so the Arrow
  model computes exactly that expert's LoRA (same outputs up to float rounding).
* GenKnowSub in peft subtracts the *factor* means, ``A_e ← A_e − mean_g A_g`` and
  ``B_e ← B_e − mean_g B_g``, so the new update is ``s_e (B_e − B̄)(A_e − Ā)``, not
  ``ΔW_e − mean_g ΔW_g`` (cross terms again, and it depends on the factorisation). It is done
  in place on the loaded task adapters, lazily, at the first forward pass.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

from lib.core.modeling import check_adapter_files

ROUTER = "arrow_router"
"""The adapter name peft gives the router (``create_arrow_model``)."""


def _adapter_config(name: str, path, kind: str) -> dict:
    path = Path(path)
    if not path.is_dir():
        # peft would read a missing local path such as "experts/mth" as a Hub repo id and try to download it
        raise FileNotFoundError(f"{kind} {name!r}: no adapter directory at {path}")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{kind} {name!r}: {path} has no adapter_config.json (not a saved peft adapter)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{kind} {name!r}: {cfg_file} is not valid JSON ({err})") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{kind} {name!r}: {path} holds a {cfg.get('peft_type')} adapter; Arrow needs LoRA")
    if cfg.get("use_dora"):
        raise ValueError(f"{kind} {name!r}: {path} is a DoRA adapter; Arrow routes plain LoRA experts")
    # The same gate as every stage: peft would unpickle an adapter_model.bin, and name a truncated
    # file only by safetensors' own error.
    check_adapter_files(path)
    return cfg


def _check_dirs(dirs, kind: str) -> dict[str, dict]:
    if not isinstance(dirs, Mapping) or not dirs:
        raise ValueError(f"{kind}s must be a non-empty dict {{name: adapter directory}}, got {dirs!r}")
    return {str(name): _adapter_config(name, path, kind) for name, path in dirs.items()}


def _check_compatible(configs: dict[str, dict]) -> None:
    """One rank and one set of target modules for everything Arrow loads (peft's own check, with our names)."""
    ranks = {n: max([c["r"], *(c.get("rank_pattern") or {}).values()]) for n, c in configs.items()}
    if len(set(ranks.values())) > 1:
        raise ValueError(f"Arrow needs adapters of one rank; got {ranks}")
    targets = {n: tuple(sorted(c["target_modules"])) if not isinstance(c["target_modules"], str)
               else c["target_modules"] for n, c in configs.items()}
    if len(set(targets.values())) > 1:
        raise ValueError(f"Arrow needs adapters with the same target modules; got {targets}")


def build_arrow_model(base_model, expert_dirs: Mapping[str, str | Path], top_k: int = 3, temperature: float = 1.0,
                      general_dirs: Mapping[str, str | Path] | None = None, rng_seed: int | None = 0):
    """An Arrow model over ``expert_dirs`` (peft's ``create_arrow_model``), with GenKnowSub if ``general_dirs``.

    ``expert_dirs`` / ``general_dirs``: ``{name: directory saved with save_pretrained}``.
    ``top_k`` experts per token (1 <= top_k <= number of experts), softmax ``temperature`` > 0,
    ``rng_seed`` for the prototypes' power iteration (``None``: torch's global RNG, not
    reproducible). **``base_model`` is modified in place** (peft wraps it): pass a copy.

    The returned ``PeftModel`` has the router active and is in eval mode; it generates like
    any model (``lib.core.evaluation.generate``). ``model.arrow_experts`` maps peft's names
    (``task_0``, ...) to ours, ``model.arrow_general`` likewise (``gks_0``, ...).
    """
    from peft import ArrowConfig, create_arrow_model

    experts = _check_dirs(expert_dirs, "expert")
    general = _check_dirs(general_dirs, "general adapter") if general_dirs is not None else {}
    clash = sorted(set(experts) & set(general))
    if clash:
        raise ValueError(f"{clash} named both as experts and as general adapters")
    _check_compatible({**experts, **general})
    if isinstance(top_k, bool) or int(top_k) != top_k or not 1 <= top_k <= len(experts):
        raise ValueError(f"top_k must be an integer between 1 and the number of experts ({len(experts)}), "
                         f"got {top_k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")

    cfg = ArrowConfig(top_k=int(top_k), router_temperature=float(temperature), use_gks=bool(general), rng_seed=rng_seed)
    model = create_arrow_model(
        base_model,
        task_specific_adapter_paths=[str(Path(expert_dirs[n])) for n in experts],
        arrow_config=cfg,
        general_adapter_paths=[str(Path(general_dirs[n])) for n in general] if general else None,
    )
    model.arrow_experts = {f"task_{i}": n for i, n in enumerate(experts)}
    model.arrow_general = {f"gks_{i}": n for i, n in enumerate(general)}
    return model.eval()


def _arrow_layers(model):
    from peft import PeftModel

    inner = model.base_model.model if isinstance(model, PeftModel) else model
    for name, module in inner.named_modules():
        arrow = getattr(module, "lora_arrow", None)
        if arrow is not None and ROUTER in arrow:
            yield name, module, arrow[ROUTER]


def _coefficients(arrow, x: torch.Tensor) -> torch.Tensor:
    """peft's ``ArrowLoraLinearLayer.forward`` routing step: top-k of ``|x · v_e|``, softmax / T."""
    tok = x.reshape(-1, x.shape[-1]).to(arrow.prototypes.dtype)
    sim = (tok @ arrow.prototypes.T).abs()
    top_v, idx = torch.topk(sim, arrow.top_k, dim=1)
    score = torch.full_like(sim, float("-inf")).scatter(1, idx, top_v)
    return torch.softmax(score / arrow.temperature, dim=1).reshape(*x.shape[:-1], -1)


@torch.no_grad()
def routing_weights(model, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{module: coefficients (batch, seq, n_experts)}`` of one forward pass, columns in
    ``model.arrow_experts`` order. peft does not expose them, so each Arrow layer's input is
    captured with a forward hook and the routing step is recomputed with the layer's own
    prototypes, ``top_k`` and temperature (:func:`_coefficients`)."""
    out: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name, arrow):
        def fn(module, args, output):
            out[name] = _coefficients(arrow, args[0]).float().cpu()
        return fn

    try:
        for name, module, arrow in _arrow_layers(model):
            hooks.append(module.register_forward_hook(hook(name, arrow)))
        if not hooks:
            raise ValueError("not an Arrow model: no layer holds an arrow_router (build it with build_arrow_model)")
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in hooks:
            h.remove()
    return out


def routing_table(model, tokenizer, prompt: str) -> pd.DataFrame:
    """One row per (token, Arrow layer) of ``prompt``: the token, the layer, the expert with
    the largest coefficient (our name) and every expert's coefficient (one column each)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    names = [getattr(model, "arrow_experts", {}).get(f"task_{i}", f"task_{i}")
             for i in range(len(model.peft_config[ROUTER].arrow_config.task_adapter_names))]
    tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
    rows = []
    for module, coeff in routing_weights(model, ids).items():
        for pos, c in enumerate(coeff[0]):
            rows.append({"position": pos, "token": tokens[pos], "module": module,
                         "expert": names[int(c.argmax())], **{n: float(v) for n, v in zip(names, c)}})
    return pd.DataFrame(rows)


__all__ = ["ROUTER", "build_arrow_model", "routing_table", "routing_weights"]
