"""Stage 06: skill localization by grafting, at workbook scale (Panigrahi et al. 2023).

The study the notebook ``06_localize.ipynb`` runs, one function per step, built on the
mask and graft primitives of :mod:`lib.localize.grafting`:

1. **Updates** (:func:`load_deltas`): per skill and source, Δθ over the considered
   parameters (the blocks' linear weights named by ``experts.target_modules``):
   ``full_ft`` = θ_ft − θ_pre of the model :mod:`lib.localize.finetune` trained (``models/finetuned``);
   ``lora`` = the stage-03 expert's exact merged update ΔW = scaling · B A
   (:func:`lib.merge.task_vectors.task_vectors`, peft's own ``get_delta_weight``).
2. **Masks and recovery** (:func:`recovery_study`): per source, skill and sparsity, the
   graft, magnitude and random masks, each grafted model scored by the shared harness on the
   first ``eval_n`` test prompts of its skill. **Recovery** of a skill = grafted accuracy /
   fine-tuned accuracy (θ_pre + Δθ, the same source) on the same prompts; the reported
   recovery at a sparsity is the **mean over skills** of that ratio (skills whose fine-tuned
   accuracy is 0 left out), with a 95% percentile bootstrap over skills (:func:`lib.core.stats.mean_ci`).
3. **Overlap** (:func:`overlap_table`): Jaccard |γ_i ∩ γ_j| / |γ_i ∪ γ_j| of two skills' graft
   masks at ``focus_sparsity``, against skill families and against a behavioural similarity
   (:func:`transfer_matrix`): how much of skill j's loss reduction skill i's update achieves,
   symmetrised; or expert i's accuracy on skill j from stage 03 (``plots/interference.csv``).
   :func:`lib.core.stats.mantel_spearman` gives Spearman's ρ over skill pairs, a 95% bootstrap interval over
   pairs and a Mantel permutation p-value (skill labels permuted).
4. **Calibration**: ECE (``lib.core.evaluation``) of each fine-tuned model and of its graft at
   ``focus_sparsity``, mean over skills.
5. **Graft merge** (:func:`lib.localize.grafting.union_graft`): θ_pre + Σ_s γ_s ⊙ Δθ_s with overlaps
   averaged, one model for every skill, scored like stage 04's merges (normalised accuracy =
   accuracy / the source's fine-tuned accuracy per skill, mean over skills, interval from
   :func:`lib.core.stats.macro_ci`).
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.core import data
from lib.localize import grafting as G
from lib.core.evaluation import EvalResult, evaluate
from lib.core.sft_data import make_batches, mean_loss
from lib.core.stats import mean_ci

KINDS = ("graft", "magnitude", "random")


class LocalizeError(RuntimeError):
    """A missing or mismatched input of stage 06; the message names it and the fix."""


# --------------------------------------------------------------------------- inputs


def study_skills(train: Sequence[str], chosen: Sequence[str] | None) -> list[str]:
    """``localize.skills`` (default: every training skill); each must be a training skill."""
    if chosen is None:
        return list(train)
    bad = [s for s in chosen if s not in train]
    if bad:
        raise LocalizeError(f"localize.skills {bad} are not training skills; skills.train is {list(train)}")
    return list(chosen)


def _full_ft_delta(root: Path, skill: str, pre: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = root / "models" / "finetuned" / skill / "model.safetensors"
    if not path.exists():
        raise LocalizeError(f"{path}: no fine-tuned model for {skill!r}; run `dvc repro finetune@{skill}` "
                            f"(python -m lib.localize.finetune {skill})")
    saved = load_file(str(path))
    missing = [n for n in pre if n not in saved]
    if missing:
        raise LocalizeError(f"{path}: lacks considered weight(s) {missing[:3]}; it was trained with other "
                            f"experts.target_modules: rerun `dvc repro finetune@{skill}`")
    device = next(iter(pre.values())).device
    return G.delta_of(pre, {n: saved[n].to(device) for n in pre})


def _lora_deltas(root: Path, base, skills: Sequence[str], pre: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    from lib.merge.task_vectors import task_vectors

    dirs = {s: root / "models" / "experts" / s for s in skills}
    for s, d in dirs.items():
        if not (d / "adapter_config.json").exists():
            raise LocalizeError(f"{d}: no LoRA expert for {s!r}; run `dvc repro expert@{s}`")
    tvs = task_vectors(base, dirs)
    out = {}
    for s, tv in tvs.items():
        extra = sorted(f"{m}.weight" for m in tv if f"{m}.weight" not in pre)
        if extra:
            raise LocalizeError(f"expert {s!r} adapts {extra[:3]}, outside the considered parameters "
                                "(experts.target_modules changed since it was trained?)")
        out[s] = {n: tv[n.removesuffix(".weight")].float() if n.removesuffix(".weight") in tv
                  else torch.zeros_like(pre[n], dtype=torch.float32) for n in pre}
    return out


def load_deltas(root: str | Path, base, source: str, skills: Sequence[str],
                pre: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{skill: Δθ} for ``source`` (``full_ft`` or ``lora``) over the names of ``pre``."""
    root = Path(root)
    if source == "full_ft":
        return {s: _full_ft_delta(root, s, pre) for s in skills}
    if source == "lora":
        return _lora_deltas(root, base, skills, pre)
    raise LocalizeError(f"unknown source {source!r}; known: full_ft, lora")


def skill_split(root: str | Path, skill: str, split: str, n: int | None = None):
    ds = data.load(Path(root) / "datasets" / "skills" / skill, (split,))[split]
    return ds.select(range(min(n, len(ds)))) if n is not None else ds


def concentration(delta: Mapping[str, torch.Tensor], fractions: Sequence[float]) -> dict[float, float]:
    """Share of ‖Δθ‖² carried by the top ``f`` fraction of entries (by |Δθ|), per fraction."""
    sq = torch.sort(torch.cat([d.reshape(-1).float() ** 2 for d in delta.values()]), descending=True).values
    total = float(sq.sum())
    return {f: float(sq[:G.n_keep(f, sq.numel())].sum()) / total if total else float("nan") for f in fractions}


# --------------------------------------------------------------------------- masks and recovery


def score(model, tok, test, pre, weights, E) -> EvalResult:
    """The harness on ``test`` with ``weights`` loaded into ``model``; ``pre`` is put back after."""
    G.load_weights(model, weights)
    try:
        return evaluate(model, tok, test, batch_size=E.batch_size, n_boot=E.n_boot, n_bins=E.ece_bins, progress=False)
    finally:
        G.load_weights(model, pre)


def make_masks(model, tok, pre, delta, train_examples, L, skill_index: int, progress: bool = False) -> dict:
    """{(kind, sparsity): (mask, info)} for one skill and source, every sparsity of ``L``."""
    out = {}
    device = next(model.parameters()).device
    for sp in L.sparsities:
        batches = G.batches(train_examples, L.mask_batch_size, tok.pad_token_id, L.seed, device)
        graft, losses = G.optimise_mask(model, pre, delta, batches, sp, L.mask_steps, L.mask_lr, L.mask_init, L.mask_l1)
        out[("graft", sp)] = (graft, {"relaxed_loss_first": losses[0] if losses else None,
                                      "relaxed_loss_last": losses[-1] if losses else None})
        out[("magnitude", sp)] = (G.magnitude_mask(delta, sp), {})
        # One seed per (skill, sparsity), reproducible from localize.seed.
        out[("random", sp)] = (G.random_mask(delta, sp, L.seed * 100_003 + skill_index * 1_009 + L.sparsities.index(sp)), {})
    return out


def recovery_study(model, tok, pre, deltas_by_source: Mapping[str, Mapping[str, dict]], tests: Mapping[str, object],
                   train_examples: Mapping[str, list], L, E, progress: bool = True):
    """Every mask, every grafted model scored. Returns (table, masks, results):

    * ``table``: one row per source, kind, sparsity, skill with ``accuracy``, ``finetuned_accuracy``,
      ``recovery`` (= accuracy / finetuned_accuracy, NaN when the latter is 0), ``ece``,
      ``train_loss`` (the rounded graft's completion loss on the first 128 training prompts),
      ``kept`` (entries in the mask);
    * ``masks[(source, kind, sparsity, skill)]``: the binary masks;
    * ``results[(source, kind, sparsity, skill)]``: the harness results, with kind ``finetuned``
      (sparsity 1.0) for θ_pre + Δθ.
    """
    from tqdm.auto import tqdm

    skills = list(tests)
    device = next(model.parameters()).device
    rows, masks, results = [], {}, {}
    jobs = [(src, s) for src in deltas_by_source for s in skills]
    for src, skill in tqdm(jobs, desc="localize", disable=not progress):
        delta = deltas_by_source[src][skill]
        ft = score(model, tok, tests[skill], pre, G.graft(pre, delta, {n: torch.ones_like(d, dtype=torch.bool) for n, d in delta.items()}), E)
        results[(src, "finetuned", 1.0, skill)] = ft
        loss_ex = train_examples[skill][:128]
        made = make_masks(model, tok, pre, delta, train_examples[skill], L, skills.index(skill))
        for (kind, sp), (mask, info) in made.items():
            weights = G.graft(pre, delta, mask)
            res = score(model, tok, tests[skill], pre, weights, E)
            masks[(src, kind, sp, skill)] = mask
            results[(src, kind, sp, skill)] = res
            rows.append({
                "source": src, "kind": kind, "sparsity": sp, "skill": skill, "accuracy": res.accuracy,
                "finetuned_accuracy": ft.accuracy, "recovery": res.accuracy / ft.accuracy if ft.accuracy > 0 else float("nan"),
                "ece": res.ece(), "finetuned_ece": ft.ece(),
                "train_loss": mean_loss(model, make_batches(loss_ex, 128, tok.pad_token_id, device), weights),
                "kept": sum(int(m.sum()) for m in mask.values()), **info,
            })
    return pd.DataFrame(rows), masks, results


def recovery_summary(table: pd.DataFrame, n_boot: int, seed: int = 0) -> dict:
    """{source: {kind: {str(sparsity): CI over skills}}} of recovery."""
    out: dict = {}
    for (src, kind, sp), g in table.groupby(["source", "kind", "sparsity"], sort=True):
        out.setdefault(src, {}).setdefault(kind, {})[str(float(sp))] = mean_ci(g["recovery"].tolist(), n_boot, seed)
    return out


# --------------------------------------------------------------------------- overlap and behaviour


def overlap_matrix(masks: Mapping[str, Mapping[str, torch.Tensor]]) -> pd.DataFrame:
    """Jaccard of every pair of skills' masks (diagonal 1)."""
    names = list(masks)
    m = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    for a, b in itertools.combinations(names, 2):
        m.loc[a, b] = m.loc[b, a] = G.jaccard(masks[a], masks[b])
    return m


def random_jaccard(sparsity: float) -> float:
    """Expected Jaccard of two independent uniform masks at ``sparsity``: s² / (2s − s²)."""
    return sparsity ** 2 / (2 * sparsity - sparsity ** 2)


@torch.no_grad()
def transfer_matrix(model, tok, pre, deltas: Mapping[str, dict], examples: Mapping[str, list]) -> pd.DataFrame:
    """T[i, j] = (L_pre(j) − L_i(j)) / (L_pre(j) − L_j(j)): the share of skill j's loss reduction
    (completion loss on ``examples[j]``) that skill i's full update Δθ_i achieves; T[j, j] = 1.
    Rows: the update, columns: the skill asked."""
    skills = list(deltas)
    device = next(model.parameters()).device
    batches = {j: make_batches(examples[j], 128, tok.pad_token_id, device) for j in skills}
    base = {j: mean_loss(model, batches[j]) for j in skills}
    own = {}
    losses = pd.DataFrame(index=skills, columns=skills, dtype=float)
    for i in skills:
        w = G.graft(pre, deltas[i], {n: torch.ones_like(d, dtype=torch.bool) for n, d in deltas[i].items()})
        for j in skills:
            losses.loc[i, j] = mean_loss(model, batches[j], w)
        own[i] = losses.loc[i, i]
    out = pd.DataFrame(index=skills, columns=skills, dtype=float)
    for i in skills:
        for j in skills:
            gain = base[j] - own[j]
            out.loc[i, j] = (base[j] - losses.loc[i, j]) / gain if gain > 0 else float("nan")
    return out


def pairs_table(jaccard: pd.DataFrame, families: Mapping[str, str], behaviours: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per unordered skill pair: jaccard, same_family and each behavioural similarity,
    symmetrised as (B[i, j] + B[j, i]) / 2."""
    rows = []
    for a, b in itertools.combinations(list(jaccard.index), 2):
        row = {"skill_a": a, "skill_b": b, "jaccard": float(jaccard.loc[a, b]),
               "same_family": families[a] == families[b]}
        for name, B in behaviours.items():
            row[name] = float((B.loc[a, b] + B.loc[b, a]) / 2) if a in B.index and b in B.index else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def family_overlap(jaccard: pd.DataFrame, families: Mapping[str, str]) -> tuple[float, float, float]:
    """(mean off-diagonal, same-family mean, cross-family mean) Jaccard."""
    same, cross = [], []
    for a, b in itertools.combinations(list(jaccard.index), 2):
        (same if families[a] == families[b] else cross).append(float(jaccard.loc[a, b]))
    allv = same + cross
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return mean(allv), mean(same), mean(cross)


def interference_behaviour(path: str | Path, skills: Sequence[str]) -> pd.DataFrame | None:
    """Expert i's accuracy on skill j from stage 03 (``plots/interference.csv``); None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    t = pd.read_csv(path)
    t = t[t.model.isin(skills) & t.skill.isin(skills)]
    return t.pivot(index="model", columns="skill", values="accuracy").reindex(index=list(skills), columns=list(skills))
