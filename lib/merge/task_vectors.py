"""Merging LoRA experts in weight-update space: exact task vectors, merge methods, refactoring.

Two spaces are easy to confuse (issue 4). This module works in the **weight-update space**:
every expert's exact update ``ΔW_i = scaling_i · B_i @ A_i`` per target module (the matrix
peft adds to the base weight on ``merge_and_unload``) is combined entry-wise, and the result
is added to the base weights, or re-factored to a LoRA of a chosen rank by truncated SVD.
peft's ``add_weighted_adapter`` works in the *adapter space* instead (for its non-SVD
types it combines the A and B factors separately, which adds cross terms); the notebook
compares the two with :func:`relative_frobenius_distance`.

What is peft's and what is hand-written
---------------------------------------
* ``ΔW`` comes from peft's own ``LoraLayer.get_delta_weight(adapter)`` (so it is exactly what
  peft applies, including ``rslora`` scaling and ``fan_in_fan_out`` layouts).
* The tensor formulas call ``peft.utils.merge_utils``: ``task_arithmetic`` (linear,
  task_arithmetic), ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` and, for
  breadcrumbs' final sum, ``task_arithmetic`` again.
* Hand-written, because peft lacks them: the Model Breadcrumbs mask, input checks
  (empty list, shapes, weights, density range), the ``density = 0`` guard for DARE (peft
  divides by the density: ``0 / 0 = NaN``), seeding of DARE's random drop, the loop over
  modules, applying a merge to a copy of the base model, SVD re-factoring, and the distance.

Conventions
-----------
* Trimming (TIES, magnitude pruning, breadcrumbs) is per tensor, i.e. per module and per
  expert, as in peft and mergekit; the TIES paper trims the whole flattened task vector.
* ``density`` is the fraction of entries kept, in [0, 1]; ``k = floor(density · numel)``
  (peft's ``int(density * numel)``).
* ``weights`` default to 1 for every expert. ``linear`` normalises them to sum to 1; every
  other method uses them as given (peft's semantics), so pass weights summing to 1 to
  average rather than add.
* Deltas are float32 on the device of the adapter weights; merges return the promoted dtype.

The methods themselves are one file each in ``lib/merge/methods/``, registered by name.
"""
from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lib.core.config import GLOBAL_TRIM_METHODS
from lib.core.modeling import check_adapter_files
from lib.merge.methods import MERGE_METHODS
from lib.merge.methods._checks import MergeError, _check_density

Tensor = torch.Tensor
TaskVectors = dict[str, dict[str, Tensor]]  # adapter name -> module name -> ΔW


# --------------------------------------------------------------------------------------
# Exact task vectors
# --------------------------------------------------------------------------------------

def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model  # the transformers model; names match the base model's
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def task_vectors(model, adapters: Sequence[str] | Mapping[str, str | Path] | None = None) -> TaskVectors:
    """Exact per-module updates ``{adapter: {module_name: ΔW}}`` with ``ΔW = scaling · B @ A``.

    Two ways to call it:

    * ``task_vectors(peft_model, ["math", "logic"])`` (or ``None`` for every LoRA adapter the
      model holds);
    * ``task_vectors(base_model, {"math": dir1, "logic": dir2})``: each adapter directory is
      loaded with ``PeftModel.from_pretrained`` onto a deep copy, so ``base_model`` is untouched.

    ``ΔW`` is peft's ``layer.get_delta_weight(adapter)``, in the weight's own layout (so it
    can be added to ``module.weight``), detached and cast to float32. Module names are those
    of the base (transformers) model, e.g. ``model.layers.0.self_attn.q_proj``, so the result
    feeds :func:`apply_merged` directly. Experts may have different ranks and alphas; their
    ``ΔW`` for one module always have the module's weight shape.

    Refused with ``ValueError``: non-LoRA adapters, LoRA variants (DoRA and others, whose
    merged update is not ``scaling · B @ A``), ``lora_bias`` and ``modules_to_save`` (parts
    of the update that are not a ``ΔW`` of a target weight).
    """
    from peft import LoraConfig, PeftModel

    if not isinstance(model, PeftModel):
        if not isinstance(adapters, Mapping) or not adapters:
            raise MergeError("task_vectors(base_model, ...) needs a non-empty dict {adapter name: adapter directory}; "
                             "or pass a PeftModel that already holds the adapters")
        peft_model = None
        for name, path in adapters.items():
            if not (Path(path) / "adapter_config.json").exists():
                raise MergeError(f"{path}: no adapter here (adapter_config.json missing) for expert {name!r}")
            check_adapter_files(path)  # safetensors only, and readable: the same gate as every stage
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(path), adapter_name=name)
            else:
                peft_model.load_adapter(str(path), adapter_name=name)
        return task_vectors(peft_model, list(adapters))

    known = list(model.peft_config)
    names = known if adapters is None else list(adapters)
    missing = [n for n in names if n not in model.peft_config]
    if missing:
        raise KeyError(f"adapter(s) {missing} not in this model; it holds: {', '.join(known)}")
    layers = list(_lora_layers(model))
    out: TaskVectors = {}
    for adapter in names:
        cfg = model.peft_config[adapter]
        if not isinstance(cfg, LoraConfig):
            raise MergeError(f"adapter {adapter!r} is a {type(cfg).__name__}, not a LoRA: no B @ A update to merge")
        if getattr(cfg, "modules_to_save", None):
            raise MergeError(f"adapter {adapter!r} also trains modules_to_save={cfg.modules_to_save}: "
                             "those full-weight copies are not LoRA updates and are not handled here")
        deltas = {}
        for mod_name, layer in layers:
            if adapter not in layer.scaling:
                continue
            if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
                raise MergeError(f"adapter {adapter!r} at {mod_name} is a LoRA variant (e.g. DoRA): "
                                 "its merged update is not scaling · B @ A")
            if getattr(layer, "lora_bias", {}).get(adapter, False):
                raise MergeError(f"adapter {adapter!r} at {mod_name} trains a LoRA bias; only weight updates are merged")
            with torch.no_grad():
                deltas[mod_name] = layer.get_delta_weight(adapter).detach().to(torch.float32)
        if not deltas:
            raise MergeError(f"adapter {adapter!r} has no LoRA layer in this model")
        out[adapter] = deltas
    return out


def method_kwargs(method: str, section) -> dict:
    """The values of a params section (``merge_route``, ``continual.library``) for the keyword
    parameters ``method`` takes, by name (``density``, ``beta``, ``majority_sign_method``), and
    ``trim_scope`` for the methods it applies to (:data:`GLOBAL_TRIM_METHODS`) when the section has it."""
    fields = getattr(type(section), "model_fields", {})
    out = {k: getattr(section, k) for k in MERGE_METHODS.get(method).params if k in fields}
    if method in GLOBAL_TRIM_METHODS and "trim_scope" in fields:
        out["trim_scope"] = section.trim_scope
    return out


# GLOBAL_TRIM_METHODS (defined in lib.core.config, which validates params with it): the methods that keep
# each expert's top ``density`` entries by magnitude: for them the
# ranking can run within each module (``trim_scope: module``, peft's and mergekit's per-tensor
# ``prune``) or over the expert's whole task vector (``global``, the TIES paper's "top-k% of the
# task vector"). DARE's drop is per entry (no ranking, so no scope); breadcrumbs and DELLA rank
# within a module or a row, as their references do.


def trim_globally(tvs: Mapping[str, Mapping[str, Tensor]], density: float) -> dict[str, dict[str, Tensor]]:
    """Each expert's task vector kept to its top ``int(density · n)`` entries by magnitude over
    all its modules together (``n`` entries in all; peft's count and ``topk``), the rest zeroed."""
    out = {}
    for e, mods in tvs.items():
        names = sorted(mods)
        flat = torch.cat([mods[m].reshape(-1) for m in names])
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        keep[torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices] = True
        kept, at = {}, 0
        for m in names:
            n = mods[m].numel()
            kept[m] = torch.where(keep[at:at + n].reshape(mods[m].shape), mods[m], torch.zeros_like(mods[m]))
            at += n
        out[e] = kept
    return out


def merge_task_vectors(tvs: Mapping[str, Mapping[str, Tensor]], method: str,
                       weights: Sequence[float] | Mapping[str, float] | None = None,
                       seed: int | None = None, trim_scope: str = "module", **params) -> dict[str, Tensor]:
    """Merge experts module by module: ``{module: method([ΔW_expert...], weights, **params)}``.

    ``trim_scope="global"`` (only for :data:`GLOBAL_TRIM_METHODS`) trims each expert's whole
    task vector first (:func:`trim_globally`) and then runs the method at density 1: its other
    steps (sign election, disjoint mean, sum) are entry by entry, so the result is the
    method with a global trim.

    ``tvs`` is :func:`task_vectors`' output (expert order is the dict's order); ``weights`` a
    list in that order or a dict by expert name. A module one expert does not adapt counts
    as a zero update for that expert. ``params`` are checked against the method's keyword
    parameters (unknown or missing ones are an error naming the allowed ones). For the
    random methods, ``seed`` seeds torch's RNG once for the whole merge (modules visited in
    sorted order), inside ``torch.random.fork_rng`` so the caller's RNG state is unchanged.
    """
    entry = MERGE_METHODS.get(method)
    fn, allowed = entry.obj, entry.params
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise MergeError(f"{method}: unknown parameter(s) {unknown}; it takes: {sorted(allowed) or 'none'}")
    required = [k for k, v in allowed.items() if v is inspect.Parameter.empty and k not in params]
    if required:
        raise MergeError(f"{method}: missing parameter(s) {required}")
    experts = list(tvs)
    if not experts:
        raise MergeError(f"{method}: no experts to merge")
    if isinstance(weights, Mapping):
        missing = [e for e in experts if e not in weights]
        extra = [k for k in weights if k not in tvs]
        if missing or extra:
            raise MergeError(f"{method}: weights must name exactly the experts {experts}; "
                             f"missing {missing}, unknown {extra}")
        weights = [weights[e] for e in experts]
    if trim_scope not in ("module", "global"):
        raise MergeError(f"{method}: trim_scope must be 'module' or 'global', got {trim_scope!r}")
    if trim_scope == "global":
        if method not in GLOBAL_TRIM_METHODS:
            raise MergeError(f"{method}: trim_scope 'global' applies to {list(GLOBAL_TRIM_METHODS)} only")
        tvs, params = trim_globally(tvs, _check_density(params["density"], method)), {**params, "density": 1.0}
    modules = sorted({m for e in experts for m in tvs[e]})
    devices = sorted({t.device.index for e in experts for t in tvs[e].values() if t.device.type == "cuda"})

    def run() -> dict[str, Tensor]:
        out = {}
        for m in modules:
            ref = next(tvs[e][m] for e in experts if m in tvs[e])
            deltas = [tvs[e][m] if m in tvs[e] else torch.zeros_like(ref) for e in experts]
            try:
                out[m] = fn(deltas, weights, **params)
            except MergeError as err:
                raise MergeError(f"module {m}: {err}") from None
        return out

    if seed is None or not entry.random:
        return run()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return run()


# --------------------------------------------------------------------------------------
# Using a merge: add it to a copy of the base, or re-factor it to a LoRA
# --------------------------------------------------------------------------------------

def apply_merged(base_model, merged: Mapping[str, Tensor], scale: float = 1.0):
    """A deep copy of ``base_model`` with ``W ← W + scale · ΔW`` for every ``{module_name: ΔW}``.

    Module names are the base model's (as :func:`task_vectors` returns them). The original
    model is not modified. An unknown module or a shape mismatch is an error naming it.
    Caveat: if a merged module's weight is tied to another (e.g. ``lm_head`` and the input
    embeddings), both change, exactly as they would with peft's ``merge_and_unload``.
    """
    model = copy.deepcopy(base_model)
    for name, delta in merged.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise MergeError(f"apply_merged: the base model has no module {name!r}") from None
        weight = getattr(module, "weight", None)
        if weight is None:
            raise MergeError(f"apply_merged: module {name!r} has no weight")
        if tuple(weight.shape) != tuple(delta.shape):
            raise MergeError(f"apply_merged: ΔW for {name!r} has shape {tuple(delta.shape)}, "
                             f"its weight has shape {tuple(weight.shape)}")
        with torch.no_grad():
            weight.add_(delta.to(device=weight.device, dtype=torch.float32).mul(scale).to(weight.dtype))
    return model


def refactor_to_lora(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``B @ A`` the best rank-``rank`` approximation of ``delta`` in Frobenius
    norm (Eckart–Young), by truncated SVD (``torch.linalg.svd``). The singular values are
    split evenly: ``B = U_r √S_r`` (out × r), ``A = √S_r V_rᵀ`` (r × in). ``rank`` above
    ``min(out, in)`` is capped there. The error is ``sqrt(Σ_{j>r} σ_j²)``. Hand-written."""
    if delta.dim() != 2:
        raise MergeError(f"refactor_to_lora: needs a 2-D ΔW, got shape {tuple(delta.shape)}")
    if int(rank) < 1:
        raise MergeError(f"refactor_to_lora: rank must be >= 1, got {rank}")
    r = min(int(rank), *delta.shape)
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def merged_lora_model(base_model, merged: Mapping[str, Tensor], rank: int, adapter_name: str = "merged"):
    """A peft model (on a deep copy of ``base_model``) whose one LoRA adapter of rank ``rank``
    holds :func:`refactor_to_lora` of each merged ΔW (``lora_alpha = rank``, so scaling is 1).
    Ready for ``save_pretrained``. Only ``nn.Linear`` targets (no ``fan_in_fan_out`` layouts)."""
    from peft import LoraConfig, get_peft_model

    rank = int(rank)
    if rank < 1:
        raise MergeError(f"merged_lora_model: rank must be >= 1, got {rank}")
    for name in merged:
        try:
            mod = base_model.get_submodule(name)
        except AttributeError:
            raise MergeError(f"merged_lora_model: the base model has no module {name!r}") from None
        if not isinstance(mod, torch.nn.Linear):
            raise MergeError(f"merged_lora_model: {name!r} is a {type(mod).__name__}; only nn.Linear targets are supported")
    cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(merged), bias="none")
    model = get_peft_model(copy.deepcopy(base_model), cfg, adapter_name=adapter_name)
    inner = model.base_model.model
    with torch.no_grad():
        for name, delta in merged.items():
            layer = inner.get_submodule(name)
            b, a = refactor_to_lora(delta, rank)
            wa, wb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            wa.zero_()
            wb.zero_()
            wa[: a.shape[0]] = a.to(wa)
            wb[:, : b.shape[1]] = b.to(wb)
    return model


def relative_frobenius_distance(a: Tensor | Mapping[str, Tensor], b: Tensor | Mapping[str, Tensor]) -> float:
    """``||a - b||_F / ||b||_F`` (0 when identical). For dicts of per-module tensors, the norms
    are over all modules together (keys must match). ``b = 0``: 0 if ``a`` is 0 too, else inf."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            raise MergeError("relative_frobenius_distance: give two tensors or two dicts of tensors, not one of each")
        if set(a) != set(b):
            raise MergeError("relative_frobenius_distance: the dicts must cover the same modules; "
                             f"only in one of them: {sorted(set(a) ^ set(b))}")
        pairs = [(a[k], b[k]) for k in a]
    else:
        pairs = [(a, b)]
    num = den = 0.0
    for x, y in pairs:
        if tuple(x.shape) != tuple(y.shape):
            raise MergeError(f"relative_frobenius_distance: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
        x64, y64 = x.detach().to(torch.float64), y.detach().to(torch.float64).to(x.device)
        num += float(((x64 - y64) ** 2).sum())
        den += float((y64 ** 2).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num) / math.sqrt(den)
