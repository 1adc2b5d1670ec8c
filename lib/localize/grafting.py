"""Grafting (Panigrahi et al., 2023, "Task-Specific Skill Localization in Fine-tuned Language
Models"): which few parameters of a fine-tuned update carry the skill.

Notation. θ_pre: the base weights; θ_ft: the fine-tuned weights (full fine-tuning, or the
base plus a LoRA expert's exact ΔW); Δθ = θ_ft − θ_pre over the **considered** parameters
(the linear weights of the transformer blocks, see :func:`considered_names`); a mask γ ∈ {0,1}
over those entries; the grafted model is θ_pre + γ ⊙ Δθ. Sparsity = fraction of the
considered entries kept: a mask at sparsity s keeps exactly ``n_keep(s, n)`` entries.

Three masks at the same sparsity:

* ``magnitude``: the top-k entries of |Δθ| (no optimisation);
* ``random``: k entries drawn uniformly without replacement from a seeded generator;
* ``graft``: the paper's optimised mask. γ is relaxed to σ(S) with one logit S per entry,
  initialised to +s₀ on the magnitude mask and −s₀ elsewhere; S minimises the skill's
  completion-only training loss of θ_pre + σ(S) ⊙ Δθ (plus an optional sparsity
  regulariser l1 · mean σ(S)); the final mask is the top-k of S (rounding at the
  target sparsity, so its size is exact). The step is plain gradient descent on S (as in the
  grafting code released with Localize-and-Stitch, He et al. 2024, which follows the paper),
  with the gradient rescaled to a largest entry of 1 (:func:`mask_step`).

Hand-written, because no library offers grafting: the masks, the relaxation (computed with
``torch.func.functional_call``, so the base model's weights are never copied per step), the
top-k with a stable tie rule (ties go to the lower flat index), Jaccard overlap and the
union graft. The loss is the mean token cross-entropy on the answer tokens and EOS, as trl's
completion-only loss computes it during fine-tuning.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence

import torch

from lib.core.sft_data import collate, completion_loss
from lib.core.training import check_target_modules

Tensor = torch.Tensor
Params = dict[str, Tensor]   # parameter name -> tensor
Mask = dict[str, Tensor]     # parameter name -> bool tensor of the parameter's shape


class GraftError(ValueError):
    """Inputs grafting cannot use (bad sparsity, mismatched names or shapes); the message says which."""


# --------------------------------------------------------------------------- masks


def considered_names(model, target_modules) -> list[str]:
    """Names of the considered parameters: ``<module>.weight`` of every ``nn.Linear`` inside the
    transformer blocks whose last name part is one of ``target_modules`` (never ``lm_head``)."""
    targets = set(check_target_modules(model, target_modules))
    return [f"{name}.weight" for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets and name != "lm_head"]


def n_keep(sparsity: float, n: int) -> int:
    """Entries a mask at ``sparsity`` keeps out of ``n``: ``round(sparsity · n)``, at least 1."""
    if not 0 < sparsity <= 1:
        raise GraftError(f"sparsity must be in (0, 1], got {sparsity}")
    return min(n, max(1, round(sparsity * n)))


def _flat(params: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in params.values()])


def _unflat(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, t in like.items():
        out[name] = flat[start:start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out


def numel(params: Mapping[str, Tensor]) -> int:
    return sum(t.numel() for t in params.values())


def topk_mask(scores: Mapping[str, Tensor], sparsity: float) -> Mask:
    """The ``n_keep(sparsity, n)`` entries with the largest score over all tensors together
    (one global ranking, as the paper's basepatch); ties go to the lower flat index."""
    flat = _flat(scores)
    n = flat.numel()
    k = n_keep(sparsity, n)
    if torch.isnan(flat).any():
        raise GraftError("scores contain NaN: a mask cannot rank them")
    # The k-th largest score by selection, not a full sort: a stable argsort of the 1.06e8
    # scores of a 135 M model took 14 s and 2 GB of int64 indices per mask. Everything above it
    # is kept, then the ties at it in flat order, which is the stable sort's tie rule.
    threshold = torch.kthvalue(flat, n - k + 1).values
    keep = flat > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        keep[torch.nonzero(flat == threshold).squeeze(1)[:missing]] = True
    return _unflat(keep, scores)


def magnitude_mask(delta: Mapping[str, Tensor], sparsity: float) -> Mask:
    """Top-k of |Δθ|: the paper's initialisation and the no-optimisation baseline."""
    return topk_mask({n: d.abs() for n, d in delta.items()}, sparsity)


def random_mask(like: Mapping[str, Tensor], sparsity: float, seed: int) -> Mask:
    """Exactly ``n_keep`` entries drawn uniformly without replacement (``torch.randperm`` on a
    generator seeded with ``seed``), so the same seed gives the same mask."""
    n = numel(like)
    k = n_keep(sparsity, n)
    gen = torch.Generator().manual_seed(int(seed))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=gen)[:k]] = True
    return _unflat(keep, like)


def mask_fraction(mask: Mapping[str, Tensor]) -> float:
    return float(sum(int(m.sum()) for m in mask.values())) / numel(mask)


def jaccard(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """|a ∩ b| / |a ∪ b| over all entries (0 when both are empty)."""
    if set(a) != set(b):
        raise GraftError(f"masks over different parameters: {sorted(set(a) ^ set(b))[:3]}")
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 0.0


# --------------------------------------------------------------------------- grafted weights


def graft(pre: Mapping[str, Tensor], delta: Mapping[str, Tensor], mask: Mapping[str, Tensor]) -> Params:
    """θ_pre + γ ⊙ Δθ for every considered tensor (γ binary or relaxed), computed in float32
    and returned in θ_pre's dtype (so it loads into a bf16 model as it is)."""
    if not set(delta) <= set(pre) or set(mask) != set(delta):
        raise GraftError("graft needs Δθ and γ over the same names, all present in θ_pre")
    return {n: (pre[n].float() + mask[n].to(device=delta[n].device, dtype=torch.float32) * delta[n].float()).to(pre[n].dtype)
            for n in delta}


def union_graft(pre: Mapping[str, Tensor], deltas: Sequence[Mapping[str, Tensor]],
                masks: Sequence[Mapping[str, Tensor]]) -> Params:
    """Several skills' grafts as one model: θ_pre + Σ_s γ_s ⊙ Δθ_s / max(1, Σ_s γ_s).

    Where regions do not overlap this is each skill's own graft; an entry claimed by c > 1
    skills gets the mean of their updates (the overlap rule of Localize-and-Stitch, He et al.
    2024), so overlapping updates are never added up."""
    if len(deltas) != len(masks) or not deltas:
        raise GraftError(f"union_graft needs one mask per Δθ, got {len(deltas)} Δθ and {len(masks)} masks")
    out = {}
    for n in deltas[0]:
        dev = deltas[0][n].device
        count = sum(m[n].to(device=dev, dtype=torch.float32) for m in masks)
        total = sum(m[n].to(device=dev, dtype=torch.float32) * d[n].float() for m, d in zip(masks, deltas))
        out[n] = (pre[n].float() + total / count.clamp(min=1)).to(pre[n].dtype)
    return out


@torch.no_grad()
def load_weights(model, weights: Mapping[str, Tensor]) -> None:
    """Copy ``weights`` into ``model``'s parameters of the same names, in place."""
    params = dict(model.named_parameters())
    for n, w in weights.items():
        if n not in params:
            raise GraftError(f"the model has no parameter {n!r}")
        params[n].copy_(w)


def weights_of(model, names: Sequence[str]) -> Params:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise GraftError(f"the model has no parameter(s) {missing[:3]}")
    return {n: params[n].detach().clone() for n in names}


def delta_of(pre: Mapping[str, Tensor], ft: Mapping[str, Tensor]) -> Params:
    """Δθ = θ_ft − θ_pre in float32."""
    bad = [n for n in pre if n not in ft or ft[n].shape != pre[n].shape]
    if bad:
        raise GraftError(f"fine-tuned and base models differ in parameter(s) {bad[:3]}")
    return {n: (ft[n].float() - pre[n].float()) for n in pre}


# --------------------------------------------------------------------------- data and loss


def batches(examples: Sequence, batch_size: int, pad_id: int, seed: int, device=None) -> Iterator[dict[str, Tensor]]:
    """Endless shuffled batches (reshuffled every epoch from ``random.Random(seed)``)."""
    rng = random.Random(seed)
    idx = list(range(len(examples)))
    while True:
        rng.shuffle(idx)
        for s in range(0, len(idx) - batch_size + 1 if len(idx) >= batch_size else 1, batch_size):
            yield collate([examples[i] for i in idx[s:s + batch_size]], pad_id, device)


# --------------------------------------------------------------------------- the optimised mask


def init_logits(delta: Mapping[str, Tensor], sparsity: float, s0: float) -> Params:
    """S = +s₀ on the magnitude mask at ``sparsity``, −s₀ elsewhere."""
    base = magnitude_mask(delta, sparsity)
    return {n: torch.where(m, torch.tensor(float(s0)), torch.tensor(-float(s0))) for n, m in base.items()}


def relaxed(pre: Mapping[str, Tensor], delta: Mapping[str, Tensor], logits: Mapping[str, Tensor]) -> Params:
    """θ_pre + σ(S) ⊙ Δθ (differentiable in S), in θ_pre's dtype."""
    return {n: (pre[n] + torch.sigmoid(logits[n]) * delta[n]).to(pre[n].dtype) for n in delta}


@torch.no_grad()
def mask_step(logits: Mapping[str, Tensor], lr: float) -> float:
    """One step of the mask optimiser, in place: S ← S − lr · g / max|g|, with g = ∂objective/∂S
    (already in ``.grad``) and the max over every entry of every tensor. Plain gradient descent,
    as the paper's code, with the gradient rescaled so ``lr`` is the largest move of one logit:
    ∂L/∂S = ∂L/∂θ ⊙ Δθ ⊙ σ'(S) is tiny and its scale depends on the model, so a fixed learning
    rate would not carry over between models. Returns max|g| (0: no step taken)."""
    top = max(float(s.grad.abs().max()) for s in logits.values())
    if top > 0:
        for s in logits.values():
            s.sub_(s.grad, alpha=lr / top)
    return top


def optimise_mask(model, pre: Mapping[str, Tensor], delta: Mapping[str, Tensor], batch_iter: Iterator[dict],
                  sparsity: float, steps: int, lr: float, s0: float = 3.0, l1: float = 0.0,
                  progress: bool = False) -> tuple[Mask, list[float]]:
    """The grafting mask at ``sparsity``: S from :func:`init_logits`, ``steps`` steps of
    :func:`mask_step` on the completion loss of θ_pre + σ(S) ⊙ Δθ (+ ``l1`` · mean σ(S)) over
    batches from ``batch_iter``, then the top-k of S. Returns (binary mask, relaxed training
    loss per step). ``steps = 0`` gives the magnitude mask. The model's own parameters are
    never changed (``functional_call``) and get no gradient."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pre = {n: t.to(device) for n, t in pre.items()}
    delta = {n: t.to(device) for n, t in delta.items()}
    logits = {n: t.to(device).clone().requires_grad_(True) for n, t in init_logits(delta, sparsity, s0).items()}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    losses = []
    try:
        for _ in tqdm(range(steps), desc=f"mask @{sparsity:g}", disable=not progress, leave=False):
            loss = completion_loss(model, next(batch_iter), relaxed(pre, delta, logits))
            objective = loss
            if l1:
                objective = loss + l1 * torch.cat([torch.sigmoid(s).reshape(-1) for s in logits.values()]).mean()
            for s in logits.values():
                s.grad = None
            objective.backward()
            mask_step(logits, lr)
            losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    mask = topk_mask({n: s.detach().cpu() for n, s in logits.items()}, sparsity)
    return mask, losses


def sigmoid_grad_formula(dl_dtheta: Tensor, delta: Tensor, logits: Tensor) -> Tensor:
    """∂L/∂S for θ = θ_pre + σ(S) ⊙ Δθ by the chain rule: ∂L/∂θ ⊙ Δθ ⊙ σ(S)(1 − σ(S))
    (the update the paper's code applies); used by the tests to check the autograd path."""
    s = torch.sigmoid(logits)
    return dl_dtheta * delta * s * (1 - s)

