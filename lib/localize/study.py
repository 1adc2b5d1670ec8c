"""Stage 06: skill localization by grafting, at workbook scale (Panigrahi et al. 2023).

The study the notebook ``06_localize.ipynb`` runs, one function per step, built on the
mask and graft primitives of :mod:`lib.localize.grafting` (:func:`setup` loads what every step
needs; :mod:`lib.localize.tables` and :mod:`lib.localize.figures` show the results):

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
6. **Metrics** (:func:`metrics`): ``metrics/localize.json``, the numbers stage 08 judges the
   claims on (this stage measures, it does not judge).
"""
from __future__ import annotations

import itertools
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lib.core import data
from lib.core.pool import pool_map
from lib.localize import grafting as G
from lib.core.evaluation import EvalResult, evaluate
from lib.core.sft_data import make_batches, mean_loss
from lib.core.stats import bootstrap_ci, macro_ci, mantel_spearman, mean_ci

KINDS = ("graft", "magnitude", "random")
#: The columns of ``plots/localize_recovery.csv``.
RECOVERY_COLUMNS = ["source", "kind", "sparsity", "skill", "accuracy", "recovery"]
#: The multi-skill models of the graft merge, in the order they are built.
MERGE_KINDS = ("graft union", "magnitude union", "average of full updates")


class LocalizeError(RuntimeError):
    """A missing or mismatched input of stage 06; the message names it and the fix."""


# --------------------------------------------------------------------------- inputs


@dataclass
class Setup:
    """Everything the study's steps read, loaded once by :func:`setup`.

    ``skills``, ``experts``, ``evaluation``, ``localize``: the validated params sections;
    ``names``: the skills studied, ``families``: their families; ``model``, ``tok``: the base
    model and tokenizer; ``pre``: θ_pre over the considered parameters (``n_considered`` entries
    of the model's ``n_total``); ``tests``: the first ``eval_n`` test prompts per skill;
    ``train_ex``, ``val_ex``: the encoded training and validation rows per skill;
    ``deltas[source][skill]``: Δθ.
    """

    skills: object
    experts: object
    evaluation: object
    localize: object
    names: list
    families: dict
    model: object
    tok: object
    pre: dict
    n_considered: int
    n_total: int
    tests: dict
    train_ex: dict
    val_ex: dict
    deltas: dict


def setup(workdir: str | Path, *, skills: dict, experts: dict, evaluation: dict, localize: dict) -> Setup:
    """The notebook's setup: quiet output and the workbook's plot style, ``workdir`` as the working
    directory, the params sections validated, one CPU thread, the seed set, then the base
    model, θ_pre, the test sets, the encoded training and validation rows and every Δθ."""
    from lib.core import config, io, plotting, sft_data
    from lib.core.bench import seed_everything
    from lib.core.modeling import load_on_device
    from lib.core.training import one_cpu_thread
    from lib.localize.grafting import considered_names
    from lib.skills import get_skill

    io.quiet_notebook()
    os.chdir(workdir)
    cfg = config.from_notebook(skills=skills, experts=experts, evaluation=evaluation, localize=localize)
    S, EX, E, L = cfg["skills"], cfg["experts"], cfg["evaluation"], cfg["localize"]
    plotting.set_style()
    one_cpu_thread()   # CPU only: the tiny model's steps are overhead-bound, a second thread slows them
    seed_everything(L.seed)
    names = study_skills(S.train, L.skills)
    families = {s: get_skill(s).family for s in names}
    base, tok = load_on_device("models/base")
    pre = G.weights_of(base, considered_names(base, EX.target_modules))

    def examples(split):
        return {s: sft_data.encode(tok, ds["prompt"], ds["answer"], L.finetune.max_length)
                for s, ds in ((s, skill_split(".", s, split)) for s in names)}

    tests = {s: skill_split(".", s, "test", L.eval_n) for s in names}
    train_ex, val_ex = examples("train"), examples("validation")
    deltas = {src: load_deltas(".", base, src, names, pre, EX) for src in L.sources}
    return Setup(skills=S, experts=EX, evaluation=E, localize=L, names=names, families=families, model=base,
                 tok=tok, pre=pre, n_considered=G.numel(pre), n_total=sum(p.numel() for p in base.parameters()),
                 tests=tests, train_ex=train_ex, val_ex=val_ex, deltas=deltas)


def main_source(sources: Sequence[str]) -> str:
    """The source overlap and calibration are reported for: full fine-tuning (the paper's
    setting) when studied."""
    return "full_ft" if "full_ft" in sources else sources[0]


def merge_source(sources: Sequence[str]) -> str:
    """The source the graft merge is reported for: the LoRA experts (the updates stage 04
    merges) when studied."""
    return "lora" if "lora" in sources else sources[0]


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """``frame`` to ``path`` as CSV without its index (the folder made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


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

    from lib.core.modeling import safetensors_problem

    path = root / "models" / "finetuned" / skill / "model.safetensors"
    if not path.exists():
        raise LocalizeError(f"{path}: no fine-tuned model for {skill!r}; run `dvc repro finetune` "
                            f"(python -m lib.localize.finetune {skill})")
    problem = safetensors_problem(path)
    if problem:
        raise LocalizeError(problem)
    saved = load_file(str(path))
    missing = [n for n in pre if n not in saved]
    if missing:
        raise LocalizeError(f"{path}: lacks considered weight(s) {missing[:3]}; it was trained with other "
                            f"experts.target_modules: rerun `dvc repro finetune`")
    device = next(iter(pre.values())).device
    return G.delta_of(pre, {n: saved[n].to(device) for n in pre})


def _lora_deltas(root: Path, base, skills: Sequence[str], pre: Mapping[str, torch.Tensor], experts=None) -> dict[str, dict]:
    from lib.experts.adapters import check_recipe
    from lib.merge.task_vectors import task_vectors

    dirs = {s: root / "models" / "experts" / s for s in skills}
    for s, d in dirs.items():
        if not (d / "adapter_config.json").exists():
            raise LocalizeError(f"{d}: no LoRA expert for {s!r}; run `dvc repro adapters`")
        if experts is not None:  # as stages 03-05: run by hand, a stale expert would be localized silently
            check_recipe(d, experts)
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
                pre: Mapping[str, torch.Tensor], experts=None) -> dict[str, dict[str, torch.Tensor]]:
    """{skill: Δθ} for ``source`` (``full_ft`` or ``lora``) over the names of ``pre``; with
    ``experts`` (the params section), a LoRA expert trained with other params is refused."""
    root = Path(root)
    if source == "full_ft":
        return {s: _full_ft_delta(root, s, pre) for s in skills}
    if source == "lora":
        return _lora_deltas(root, base, skills, pre, experts)
    raise LocalizeError(f"unknown source {source!r}; known: full_ft, lora")


def skill_split(root: str | Path, skill: str, split: str, n: int | None = None):
    ds = data.load(Path(root) / "datasets" / "skills" / skill, (split,))[split]
    return ds.select(range(min(n, len(ds)))) if n is not None else ds


def concentration(delta: Mapping[str, torch.Tensor], fractions: Sequence[float]) -> dict[float, float]:
    """Share of ‖Δθ‖² carried by the top ``f`` fraction of entries (by |Δθ|), per fraction."""
    sq = torch.sort(torch.cat([d.reshape(-1).float() ** 2 for d in delta.values()]), descending=True).values
    total = float(sq.sum())
    return {f: float(sq[:G.n_keep(f, sq.numel())].sum()) / total if total else float("nan") for f in fractions}


def concentration_table(deltas: Mapping[str, Mapping[str, dict]], fractions: Sequence[float]) -> pd.DataFrame:
    """One row per source and skill: :func:`concentration` of its Δθ in columns ``top <f>``."""
    return pd.DataFrame([{"source": src, "skill": s, **{f"top {f:g}": v for f, v in concentration(d, fractions).items()}}
                         for src, ds in deltas.items() for s, d in ds.items()])


# --------------------------------------------------------------------------- masks and recovery


def score(model, tok, test, pre, weights, E) -> EvalResult:
    """The harness on ``test`` with ``weights`` loaded into ``model``; ``pre`` is put back after."""
    G.load_weights(model, weights)
    try:
        return evaluate(model, tok, test, settings=E, progress=False)
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


def _recovery_job(job: dict) -> tuple[list[dict], dict, dict]:
    """One source and skill of :func:`recovery_study`: the fine-tuned reference, every mask,
    every graft scored; (rows, masks, results) keyed as there. One torch thread, so a job's
    numbers are the same in a worker process as in the caller's."""
    from lib.core.training import one_cpu_thread

    one_cpu_thread()
    model, tok, pre, delta, test, train_ex = (job[k] for k in ("model", "tok", "pre", "delta", "test", "train_ex"))
    src, skill, L, E = job["src"], job["skill"], job["L"], job["E"]
    device = next(model.parameters()).device
    rows, masks, results = [], {}, {}
    ft = score(model, tok, test, pre, G.graft(pre, delta, {n: torch.ones_like(d, dtype=torch.bool) for n, d in delta.items()}), E)
    results[(src, "finetuned", 1.0, skill)] = ft
    loss_ex = train_ex[:128]
    for (kind, sp), (mask, info) in make_masks(model, tok, pre, delta, train_ex, L, job["skill_index"]).items():
        weights = G.graft(pre, delta, mask)
        res = score(model, tok, test, pre, weights, E)
        masks[(src, kind, sp, skill)] = mask
        results[(src, kind, sp, skill)] = res
        rows.append({
            "source": src, "kind": kind, "sparsity": sp, "skill": skill, "accuracy": res.accuracy,
            "finetuned_accuracy": ft.accuracy, "recovery": res.accuracy / ft.accuracy if ft.accuracy > 0 else float("nan"),
            "ece": res.ece(), "finetuned_ece": ft.ece(),
            "train_loss": mean_loss(model, make_batches(loss_ex, 128, tok.pad_token_id, device), weights),
            "kept": sum(int(m.sum()) for m in mask.values()), **info,
        })
    return rows, masks, results


def _recovery_job_pickled(job: bytes) -> bytes:
    return pickle.dumps(_recovery_job(pickle.loads(job)))


def recovery_study(model, tok, pre, deltas_by_source: Mapping[str, Mapping[str, dict]], tests: Mapping[str, object],
                   train_examples: Mapping[str, list], L, E, progress: bool = True):
    """Every mask, every grafted model scored, one job per source and skill, in
    ``localize.workers`` processes (one torch thread each; the numbers do not depend on the
    number). Returns (table, masks, results):

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
    jobs = [{"model": model, "tok": tok, "pre": pre, "delta": deltas_by_source[src][s], "test": tests[s],
             "train_ex": train_examples[s], "src": src, "skill": s, "skill_index": skills.index(s), "L": L, "E": E}
            for src in deltas_by_source for s in skills]
    bar = tqdm(total=len(jobs), desc="localize", disable=not progress)
    # Jobs and results cross as plain pickles (bytes): multiprocessing's own pickler would move
    # the tensors into shared memory instead of copying them, and every worker would then write
    # its grafts into one shared model (measured: wrong accuracies, by race).
    workers = L.workers if next(model.parameters()).device.type == "cpu" else 1
    if workers > 1:
        done = [pickle.loads(b) for b in pool_map(_recovery_job_pickled, [pickle.dumps(j) for j in jobs], workers,
                                                   on_done=lambda _: bar.update(1))]
    else:
        # In this process, one job at a time on the caller's model: pickling every job up front
        # held a copy of the model, θ_pre and Δθ per job (1.4 GB each on a 135 M model).
        done = []
        for j in jobs:
            done.append(_recovery_job(j))
            bar.update(1)
    bar.close()
    rows, masks, results = [], {}, {}
    for r, m, res in done:
        rows += r
        masks.update(m)
        results.update(res)
    return pd.DataFrame(rows), masks, results


def recovery_summary(table: pd.DataFrame, n_boot: int, seed: int = 0) -> dict:
    """{source: {kind: {str(sparsity): CI over skills}}} of recovery."""
    out: dict = {}
    for (src, kind, sp), g in table.groupby(["source", "kind", "sparsity"], sort=True):
        out.setdefault(src, {}).setdefault(kind, {})[str(float(sp))] = mean_ci(g["recovery"].tolist(), n_boot, seed)
    return out


def finetuned_accuracy(table: pd.DataFrame) -> pd.DataFrame:
    """Each skill's fine-tuned accuracy (θ_pre + Δθ) per source: skills by sources."""
    return table.groupby(["source", "skill"]).finetuned_accuracy.first().unstack(0)


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


def offdiag_jaccard_ci(matrix: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """Mean off-diagonal Jaccard with a 95% percentile-bootstrap interval over skill pairs."""
    values = [float(matrix.loc[a, b]) for a, b in itertools.combinations(list(matrix.index), 2)]
    mean, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(values)}


def random_overlap_ci(masks: Mapping[str, Mapping[str, torch.Tensor]], n_draws: int, seed: int) -> dict:
    """What the mean off-diagonal Jaccard would be if each skill's mask were a uniform random
    subset of the considered parameters with the same number of entries: mean and 95% range
    over ``n_draws`` draws. Two such subsets meet in a hypergeometric number of entries, so each
    draw is exact without building masks; the range is the chance level's own spread."""
    names = list(masks)
    sizes = {s: int(sum(int(m.sum()) for m in masks[s].values())) for s in names}
    total = int(sum(m.numel() for m in masks[names[0]].values()))
    rng = np.random.default_rng(seed)
    pairs = list(itertools.combinations(names, 2))
    draws = np.zeros(n_draws)
    for a, b in pairs:
        inter = rng.hypergeometric(sizes[a], total - sizes[a], sizes[b], size=n_draws)
        union = sizes[a] + sizes[b] - inter
        draws += np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    draws /= max(len(pairs), 1)
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return {"mean": float(draws.mean()), "lo": float(lo), "hi": float(hi), "n": n_draws}


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


def interference_behaviour(path: str | Path, skills: Sequence[str]) -> pd.DataFrame:
    """Expert i's accuracy on skill j from stage 03 (``plots/interference.csv``).

    A missing file is an error naming it (it is a declared input of stage 06), not "not
    measured": a deleted input must never quietly shrink the study."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; stage 03 writes it (dvc repro experts)")
    t = pd.read_csv(path)
    t = t[t.model.isin(skills) & t.skill.isin(skills)]
    return t.pivot(index="model", columns="skill", values="accuracy").reindex(index=list(skills), columns=list(skills))


@dataclass
class Overlap:
    """The overlap study at ``sparsity`` (:func:`overlap_study`).

    ``matrices[source]``: the Jaccard matrix of the skills' graft masks; ``pairs``: one row per
    source and skill pair (:func:`pairs_table`, the rows of ``plots/localize_overlap.csv``);
    ``behaviour[source]``: the loss-transfer matrix; ``interference``: stage 03's expert
    accuracy matrix or None; ``family[source]``: (mean off-diagonal, same-family, cross-family)
    Jaccard; ``corr[source][behaviour]``: :func:`lib.core.stats.mantel_spearman` of the
    Jaccard against ``loss_transfer`` (and ``expert_accuracy``); ``chance``: the expected
    Jaccard of two random masks; ``jaccard_ci[source]`` / ``random_ci[source]``: the mean
    off-diagonal Jaccard with its interval over skill pairs, and the same for random masks of
    the same sizes (:func:`random_overlap_ci`); ``main_source``: the source the metrics report.
    """

    sparsity: float
    matrices: dict
    pairs: pd.DataFrame
    behaviour: dict
    interference: pd.DataFrame | None
    family: dict
    corr: dict
    chance: float
    main_source: str
    jaccard_ci: dict = field(default_factory=dict)
    random_ci: dict = field(default_factory=dict)


def overlap_from(masks: Mapping[tuple, Mapping[str, torch.Tensor]], behaviour: Mapping[str, pd.DataFrame],
                 interference: pd.DataFrame | None, names: Sequence[str], families: Mapping[str, str],
                 sources: Sequence[str], sparsity: float, n_boot: int, n_perm: int, seed: int) -> Overlap:
    """The overlap of the graft masks ``masks[(source, 'graft', sparsity, skill)]`` and its
    relation to skill families and to behaviour (loss transfer per source, and stage 03's
    expert accuracy when given)."""
    matrices, pairs = {}, []
    for src in sources:
        matrices[src] = overlap_matrix({s: masks[(src, "graft", sparsity, s)] for s in names})
        b = {"loss_transfer": behaviour[src]}
        if interference is not None:
            b["expert_accuracy"] = interference
        pairs.append(pairs_table(matrices[src], families, b).assign(source=src))
    family = {src: family_overlap(matrices[src], families) for src in sources}
    corr = {src: {k: mantel_spearman(matrices[src], B, n_boot, n_perm, seed)
                  for k, B in (("loss_transfer", behaviour[src]),
                               *((("expert_accuracy", interference),) if interference is not None else ()))}
            for src in sources}
    return Overlap(sparsity=sparsity, matrices=matrices, pairs=pd.concat(pairs, ignore_index=True),
                   behaviour=dict(behaviour), interference=interference, family=family, corr=corr,
                   chance=random_jaccard(sparsity), main_source=main_source(sources),
                   jaccard_ci={src: offdiag_jaccard_ci(matrices[src], n_boot, seed) for src in sources},
                   random_ci={src: random_overlap_ci({s: masks[(src, "graft", sparsity, s)] for s in names}, n_boot, seed)
                              for src in sources})


def overlap_study(st: Setup, masks: Mapping[tuple, Mapping[str, torch.Tensor]],
                  interference_path: str | Path = "plots/interference.csv") -> Overlap:
    """:func:`overlap_from` at ``localize.focus_sparsity``, with the loss transfer of each
    source's updates on the validation rows and stage 03's expert accuracy (if present)."""
    L, E = st.localize, st.evaluation
    behaviour = {src: transfer_matrix(st.model, st.tok, st.pre, st.deltas[src], st.val_ex) for src in L.sources}
    interference = interference_behaviour(interference_path, st.names)
    return overlap_from(masks, behaviour, interference, st.names, st.families, L.sources, L.focus_sparsity,
                        E.n_boot, L.n_perm, L.seed)


# --------------------------------------------------------------------------- calibration and graft merge


def calibration(table: pd.DataFrame, sources: Sequence[str], sparsity: float, n_boot: int,
                seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """(per-skill table, summary) of calibration: ECE of each fine-tuned model and of its graft at
    ``sparsity``. The table has ``source, skill, finetuned_accuracy, grafted_accuracy,
    finetuned_ece, grafted_ece``; the summary per source the mean ECE over skills of each
    (:func:`lib.core.stats.mean_ci`) and ``relative_reduction`` = 1 − grafted / fine-tuned."""
    cal = table[(table.kind == "graft") & (table.sparsity == sparsity)][
        ["source", "skill", "finetuned_accuracy", "accuracy", "finetuned_ece", "ece"]]
    cal = cal.rename(columns={"accuracy": "grafted_accuracy", "ece": "grafted_ece"})
    out = {}
    for src in sources:
        c = cal[cal.source == src]
        e_ft, e_gr = mean_ci(c.finetuned_ece.tolist(), n_boot, seed), mean_ci(c.grafted_ece.tolist(), n_boot, seed)
        out[src] = {"sparsity": sparsity, "ece_finetuned": e_ft, "ece_grafted": e_gr,
                    "relative_reduction": 1 - e_gr["mean"] / e_ft["mean"] if e_ft["mean"] else float("nan")}
    return cal, out


def graft_merge(st: Setup, masks: Mapping[tuple, Mapping[str, torch.Tensor]],
                results: Mapping[tuple, EvalResult]) -> tuple[pd.DataFrame, dict]:
    """One model for every skill per source and kind of :data:`MERGE_KINDS`
    (:func:`lib.localize.grafting.union_graft` of the graft masks, of the magnitude masks, and of
    full masks = the plain average of the updates), scored on every skill's test prompts.

    Returns (table, intervals): the table has one row per system (``system, normalised accuracy,
    lo, hi, mean accuracy``), best first; ``intervals[(source, kind)]`` is the normalised accuracy
    (accuracy / that source's fine-tuned accuracy per skill, mean over skills) with its
    :func:`lib.core.stats.macro_ci` interval and ``n`` skills."""
    from datasets import concatenate_datasets

    L, E, names = st.localize, st.evaluation, st.names
    fs = L.focus_sparsity
    all_tests = concatenate_datasets([st.tests[s] for s in names])
    rows, out = [], {}
    for src in L.sources:
        ref = {s: results[(src, "finetuned", 1.0, s)].accuracy for s in names}
        full = {n: torch.ones_like(d, dtype=torch.bool) for n, d in st.deltas[src][names[0]].items()}
        for kind, ms in ((MERGE_KINDS[0], [masks[(src, "graft", fs, s)] for s in names]),
                         (MERGE_KINDS[1], [masks[(src, "magnitude", fs, s)] for s in names]),
                         (MERGE_KINDS[2], [full] * len(names))):
            w = G.union_graft(st.pre, [st.deltas[src][s] for s in names], ms)
            res = score(st.model, st.tok, all_tests, st.pre, w, E)
            norm, lo, hi = macro_ci(res.examples, ref, E.n_boot, seed=L.seed)
            out[(src, kind)] = {"mean": norm, "lo": lo, "hi": hi, "n": len(names)}
            rows.append({"system": f"{src}: {kind}", "normalised accuracy": norm, "lo": lo, "hi": hi,
                         "mean accuracy": res.accuracy})
    return pd.DataFrame(rows).sort_values("normalised accuracy", ascending=False), out


# --------------------------------------------------------------------------- metrics


def metrics(L, n_considered: int, names: Sequence[str], ft_acc: pd.DataFrame, recovery: dict, ov: Overlap,
            calib: Mapping[str, dict], merge_res: Mapping[tuple, dict]) -> dict:
    """``metrics/localize.json``: the sparsities, the number of considered parameters, each
    source's fine-tuned accuracy per skill, recovery (:func:`recovery_summary`), the overlap
    summary and its correlation with behaviour (loss transfer) for the main source with every
    source under ``by_source``, calibration likewise, and the graft merge of
    :func:`merge_source` with every system under ``by_source``. ``L``: the localize section."""
    main, merge_src = ov.main_source, merge_source(L.sources)
    fam, c = ov.family, ov.corr[main]["loss_transfer"]
    return {
        "sparsities": list(L.sparsities),
        "considered_params": n_considered,
        "finetuned_accuracy": {src: {s: float(ft_acc.loc[s, src]) for s in names} for src in L.sources},
        "recovery": recovery,
        "overlap": {"sparsity": L.focus_sparsity, "source": main, "mean_offdiag_jaccard": fam[main][0],
                    "same_family_jaccard": fam[main][1], "cross_family_jaccard": fam[main][2],
                    "random_expectation": ov.chance, "jaccard": ov.jaccard_ci[main], "random_jaccard": ov.random_ci[main],
                    "corr_with_behaviour": {**{k: c[k] for k in ("r", "lo", "hi", "method", "p_permutation", "n_pairs")},
                                            "behaviour": "loss transfer (symmetrised)"},
                    "by_source": {src: {"mean_offdiag_jaccard": fam[src][0], "same_family_jaccard": fam[src][1],
                                        "cross_family_jaccard": fam[src][2], "jaccard": ov.jaccard_ci[src],
                                        "random_jaccard": ov.random_ci[src],
                                        "corr_with_behaviour": {k: {kk: v[kk] for kk in ("r", "lo", "hi", "p_permutation")}
                                                                for k, v in ov.corr[src].items()}}
                                  for src in L.sources}},
        "calibration": {**calib[main], "source": main, "by_source": dict(calib)},
        "graft_merge": {"mean_normalised": merge_res[(merge_src, MERGE_KINDS[0])], "source": merge_src,
                        "by_source": {f"{src}: {kind}": v for (src, kind), v in merge_res.items()}},
    }
