"""Merging LoRA experts "as peft does it": a checked wrapper around ``add_weighted_adapter``.

:mod:`lib.merge.task_vectors` merges in the exact **weight-update space** (``Σ w_i ΔW_i`` and friends,
with ``ΔW_i = s_i B_i A_i``). peft's ``PeftModel.add_weighted_adapter`` builds a new LoRA
adapter from existing ones, and most of its combination types work in the **adapter
(factor) space** instead: they combine the ``A`` matrices and the ``B`` matrices separately.
This module calls peft (nothing is re-implemented) and adds what the notebook needs to
compare the two spaces: input checks peft lacks, seeding, and :func:`distance_to_exact`.

What peft 0.21.2 does (``peft/tuners/lora/model.py``, ``add_weighted_adapter``)
-------------------------------------------------------------------------------
Let ``s_i`` be expert ``i``'s scaling (``lora_alpha / r``) and ``w_i`` its weight. The new
adapter always gets ``r = lora_alpha = new_rank`` (scaling 1) and the union of the experts'
target modules; the other config fields are copied from the first expert.

* ``linear`` (and the factor-space ``ties``, ``dare_linear``, ``dare_ties``,
  ``magnitude_prune``): with ``a_i = sign(w_i s_i)·sqrt(|w_i s_i|)`` and
  ``b_i = sqrt(|w_i s_i|)``, peft sets ``A = Σ_i a_i A_i`` and ``B = Σ_i b_i B_i`` (for the
  other four types the same weighted sums go through TIES / DARE / pruning, applied to the
  A's and to the B's separately). So ``B A = Σ_i Σ_j b_i a_j B_i A_j``: the diagonal terms
  give the exact ``Σ_i w_i ΔW_i``, and the **cross terms** ``B_i A_j`` (``i ≠ j``) are added
  on top. The result is *not* ``Σ w_i ΔW_i`` (peft's own docstring calls ``linear`` "a very
  rough approximation"). These types need every expert to have the **same rank** (peft
  raises otherwise); the new rank is that rank.
* ``cat``: stacks ``[w_1 s_1 A_1; w_2 s_2 A_2; ...]`` and ``[B_1, B_2, ...]``, so
  ``B A = Σ_i w_i ΔW_i`` **exactly**; ranks may differ; the new rank is ``Σ_i r_i``.
* ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``:
  combine the exact ``ΔW_i`` (``svd``: ``Σ_i w_i ΔW_i``; the others: the TIES / DARE /
  pruning formulas of :mod:`lib.merge.task_vectors` in ``ΔW`` space) and re-factor the result by a
  truncated SVD to ``svd_rank`` (default: the largest expert rank). Ranks may differ. With
  ``svd_rank >= rank(Σ w_i ΔW_i)`` (e.g. ``Σ_i r_i``) ``svd`` is exact.

Weights are used as given (never normalised), in every type.

Silent behaviours of peft this wrapper turns into errors or warnings
---------------------------------------------------------------------
* an ``adapter_name`` that already exists: peft returns without doing anything;
* a call that fails half-way (e.g. ``density=None`` for ``ties``, a name with a ``.``)
  leaves the new name registered in ``peft_config``, so a retry with the same name is then
  a silent no-op too (cleaned up here);
* one expert: peft switches to ``linear`` whatever type was asked (``density`` ignored);
* ``use_rslora`` experts: the new adapter inherits ``use_rslora`` with ``lora_alpha = r``,
  so its scaling is ``sqrt(r)``, not 1, and every type (even ``cat``) is off by that
  factor (refused here; :mod:`lib.merge.task_vectors` handles rsLoRA exactly);
* DoRA or other LoRA variants: the new adapter inherits the variant, but only ``A``/``B``
  are merged (refused here);
* the new adapter is not activated: call ``peft_model.set_adapter(name)`` to use it.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch

from lib.merge.methods._checks import SIGN_METHODS
from lib.merge.task_vectors import MergeError, relative_frobenius_distance, task_vectors

Tensor = torch.Tensor

PEFT_COMBINATIONS = (
    "linear", "cat", "svd",
    "ties", "ties_svd",
    "dare_linear", "dare_linear_svd",
    "dare_ties", "dare_ties_svd",
    "magnitude_prune", "magnitude_prune_svd",
)
"""Every ``combination_type`` peft 0.21.2's ``add_weighted_adapter`` accepts."""

EQUAL_RANK_COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Factor-space types: need experts of one rank (peft's ``_check_add_weighted_adapter``)."""

SVD_COMBINATIONS = tuple(c for c in PEFT_COMBINATIONS if c.endswith("svd"))
DENSITY_COMBINATIONS = tuple(c for c in PEFT_COMBINATIONS if c.split("_svd")[0] in
                             ("ties", "dare_linear", "dare_ties", "magnitude_prune"))
SIGN_COMBINATIONS = tuple(c for c in PEFT_COMBINATIONS if "ties" in c)
RANDOM_COMBINATIONS = tuple(c for c in PEFT_COMBINATIONS if c.startswith("dare"))


def _rank(cfg) -> int:
    """The rank peft allocates for an expert (``r``, or the largest ``rank_pattern`` entry)."""
    return max(cfg.r, *cfg.rank_pattern.values()) if cfg.rank_pattern else cfg.r


def _check_experts(peft_model, experts: Sequence[str]) -> list[str]:
    from peft import LoraConfig

    experts = [str(e) for e in experts]
    if not experts:
        raise MergeError("peft_merge: no experts to merge; give at least one adapter name")
    if len(set(experts)) != len(experts):
        raise MergeError(f"peft_merge: an expert is listed twice in {experts}")
    held = list(peft_model.peft_config)
    missing = [e for e in experts if e not in held]
    if missing:
        raise MergeError(f"peft_merge: adapter(s) {missing} not in this model; it holds: {', '.join(held)}")
    for e in experts:
        cfg = peft_model.peft_config[e]
        if not isinstance(cfg, LoraConfig):
            raise MergeError(f"peft_merge: adapter {e!r} is a {type(cfg).__name__}, not a LoRA")
        if cfg.use_rslora:
            raise MergeError(f"peft_merge: adapter {e!r} uses rsLoRA; peft's merged adapter would inherit use_rslora "
                             "with lora_alpha = r, i.e. scaling sqrt(r) instead of 1 (a wrong ΔW); merge it exactly "
                             "with lib.merge.task_vectors instead")
        if cfg.use_dora or getattr(cfg, "arrow_config", None) is not None:
            raise MergeError(f"peft_merge: adapter {e!r} is a LoRA variant (DoRA / Arrow); "
                             "add_weighted_adapter merges only its A and B factors")
    return experts


def _check_options(combination_type, experts, ranks, density, majority_sign_method, svd_rank) -> None:
    if combination_type not in PEFT_COMBINATIONS:
        raise MergeError(f"peft_merge: unknown combination_type {combination_type!r}; "
                         f"known: {', '.join(PEFT_COMBINATIONS)}")
    if combination_type in DENSITY_COMBINATIONS:
        if density is None or math.isnan(float(density)) or not 0.0 <= float(density) <= 1.0:
            raise MergeError(f"peft_merge: {combination_type} needs density, the fraction of entries kept, "
                             f"in [0, 1]; got {density!r}")
    elif density is not None:
        raise MergeError(f"peft_merge: {combination_type} does not use density (got {density}); "
                         f"only {', '.join(DENSITY_COMBINATIONS)} do")
    if majority_sign_method not in SIGN_METHODS:
        raise MergeError(f"peft_merge: majority_sign_method must be one of {SIGN_METHODS}, "
                         f"got {majority_sign_method!r}")
    if combination_type in SVD_COMBINATIONS:
        if svd_rank is not None and (isinstance(svd_rank, bool) or int(svd_rank) != svd_rank or svd_rank < 1):
            raise MergeError(f"peft_merge: svd_rank must be a positive integer, got {svd_rank!r}")
    elif svd_rank is not None:
        raise MergeError(f"peft_merge: {combination_type} does not use svd_rank; only {', '.join(SVD_COMBINATIONS)} do")
    if combination_type in EQUAL_RANK_COMBINATIONS and len(experts) > 1 and len(set(ranks.values())) > 1:
        raise MergeError(f"peft_merge: {combination_type} combines A and B factors, so peft needs experts of one "
                         f"rank; got ranks {ranks}. Use cat or an svd type (or lib.merge.task_vectors) for mixed ranks")


def _weights(weights, experts: list[str]) -> list[float]:
    if weights is None:
        return [1.0] * len(experts)
    if isinstance(weights, Mapping):
        if set(weights) != set(experts):
            raise MergeError(f"peft_merge: weights must name exactly the experts {experts}; got {sorted(weights)}")
        weights = [weights[e] for e in experts]
    weights = [float(w) for w in weights]
    if len(weights) != len(experts):
        raise MergeError(f"peft_merge: {len(weights)} weights for {len(experts)} experts")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"peft_merge: weights must be finite, got {weights}")
    return weights


def _discard(peft_model, name: str) -> None:
    """Remove a half-made adapter so its name does not linger (peft would then skip it silently)."""
    if name not in peft_model.peft_config:
        return
    try:
        peft_model.delete_adapter(name)
    except Exception:  # noqa: BLE001 - half-injected: at least free the name
        peft_model.peft_config.pop(name, None)


def peft_merge(peft_model, experts: Sequence[str], combination_type: str, weights=None, new_name: str | None = None,
               density: float | None = None, majority_sign_method: str = "total", svd_rank: int | None = None,
               seed: int | None = None) -> str:
    """Add a merged adapter to ``peft_model`` with peft's ``add_weighted_adapter``; return its name.

    ``experts``: adapter names the model holds; ``weights``: a list in that order or a dict by
    name (default 1 each, used as given: peft never normalises). ``combination_type``: one of
    :data:`PEFT_COMBINATIONS`; what each computes, and why the factor-space types are not
    ``Σ w_i ΔW_i``, is in this module's docstring. ``density`` is required by the TIES /
    DARE / pruning types and refused by the others; ``svd_rank`` only by the ``*_svd`` types
    (default: the largest expert rank; ``Σ r_i`` makes ``svd`` exact). ``seed`` seeds torch's
    RNG, inside ``torch.random.fork_rng`` (the caller's RNG state is left as it was), for the
    ``dare*`` types, whose random drop otherwise draws from the global RNG.

    ``new_name`` defaults to ``"<type>_<expert>_<expert>..."``; an existing name is an error
    (peft would silently do nothing). The new adapter is *not* activated. One expert gives a
    warning: peft then uses ``linear`` (``w·ΔW``, exact) whatever type was asked.
    """
    experts = _check_experts(peft_model, experts)
    ranks = {e: _rank(peft_model.peft_config[e]) for e in experts}
    _check_options(combination_type, experts, ranks, density, majority_sign_method, svd_rank)
    w = _weights(weights, experts)
    name = new_name if new_name is not None else f"{combination_type}_" + "_".join(experts)
    if not name or "." in name or hasattr(torch.nn.ModuleDict(), name):
        raise MergeError(f"peft_merge: adapter name {name!r} cannot be a key of peft's torch ModuleDicts: it must be "
                         "non-empty, contain no '.' and not be a torch.nn.Module attribute (half, float, train...)")
    # peft 0.21.2, peft/tuners/lora/model.py line 854: `if adapter_name in list(self.peft_config.keys()): return`
    # -- an existing name is a silent no-op, so the caller would go on with the old adapter.
    if name in peft_model.peft_config:
        raise MergeError(f"peft_merge: an adapter named {name!r} already exists; pick another new_name "
                         "or peft_model.delete_adapter it first")
    if len(experts) == 1 and combination_type != "linear":
        warnings.warn(f"peft_merge: one expert; peft ignores combination_type={combination_type!r} and uses linear "
                      "(w·ΔW, exact)", stacklevel=2)
    kwargs = dict(adapters=experts, weights=w, adapter_name=name, combination_type=combination_type,
                  svd_rank=None if svd_rank is None else int(svd_rank), density=density,
                  majority_sign_method=majority_sign_method)
    try:
        if seed is not None and combination_type in RANDOM_COMBINATIONS:
            devices = sorted({p.device.index for p in peft_model.parameters() if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(seed))
                peft_model.add_weighted_adapter(**kwargs)
        else:
            peft_model.add_weighted_adapter(**kwargs)
    except BaseException:
        _discard(peft_model, name)
        raise
    if name not in peft_model.peft_config:
        raise MergeError(f"peft_merge: peft did not create adapter {name!r}")
    return name


def _padded(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Both dicts over the union of their modules, a missing module counting as a zero update."""
    keys = sorted(set(a) | set(b))
    ref = {k: (a[k] if k in a else b[k]) for k in keys}
    return ({k: a[k] if k in a else torch.zeros_like(ref[k]) for k in keys},
            {k: b[k] if k in b else torch.zeros_like(ref[k]) for k in keys})


def distance_to_exact(peft_model, merged_name: str, exact: Mapping[str, Tensor]) -> float:
    """``||ΔW_peft - ΔW_exact||_F / ||ΔW_exact||_F`` over all modules together.

    ``ΔW_peft`` is the merged adapter's exact update (:func:`lib.merge.task_vectors.task_vectors`, i.e.
    peft's ``get_delta_weight``); ``exact`` is a ``{module: ΔW}`` merge from
    :func:`lib.merge.task_vectors.merge_task_vectors`. A module only one side has counts as a zero update
    on the other, so a merge that misses a module is penalised rather than ignored.
    """
    got = task_vectors(peft_model, [merged_name])[merged_name]
    exact = {k: v.to(torch.float32) for k, v in exact.items()}
    got, exact = _padded(got, exact)
    return relative_frobenius_distance(got, exact)


__all__ = [
    "DENSITY_COMBINATIONS", "EQUAL_RANK_COMBINATIONS", "PEFT_COMBINATIONS", "RANDOM_COMBINATIONS",
    "SIGN_COMBINATIONS", "SVD_COMBINATIONS", "distance_to_exact", "peft_merge",
]
