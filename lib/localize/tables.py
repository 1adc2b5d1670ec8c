"""Stage 06's tables and sentences: the study's results (:mod:`lib.localize.study`) as the
notebook ``06_localize.ipynb`` shows them. Formatting only; every number comes from the study,
and no claim is judged here (that is :mod:`lib.report.claims`)."""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from lib.localize import grafting as G
from lib.localize.study import Overlap, Setup


def fmt_ci(ci: Mapping[str, float]) -> str:
    """``mean [lo, hi]`` with two decimals."""
    return f"{ci['mean']:.2f} [{ci['lo']:.2f}, {ci['hi']:.2f}]"


def setup_summary(st: Setup) -> str:
    """The skills and sources studied, how many parameters are considered and how many entries
    each sparsity keeps."""
    L, n = st.localize, st.n_considered
    return (f"{len(st.names)} skills ({', '.join(st.names)}), sources {', '.join(L.sources)}. Considered parameters: "
            f"{n:,} of the model's {st.n_total:,} ({n / st.n_total:.1%}); sparsities "
            f"{', '.join(f'{s:g}' for s in L.sparsities)} keep "
            f"{', '.join(f'{G.n_keep(s, n):,}' for s in L.sparsities)} entries.")


def recovery_table(recovery: Mapping[str, Mapping[str, Mapping[str, dict]]]) -> pd.DataFrame:
    """Recovery (:func:`lib.localize.study.recovery_summary`) as ``mean [lo, hi]``: one row per
    sparsity, one column per (source, mask kind)."""
    return pd.DataFrame({(src, kind): {f"{float(sp):g}": fmt_ci(ci) for sp, ci in by_sp.items()}
                         for src, by_kind in recovery.items() for kind, by_sp in by_kind.items()})


def recovery_sentences(recovery: Mapping[str, Mapping[str, Mapping[str, dict]]], ft_acc: pd.DataFrame) -> str:
    """Markdown: each source's graft recovery at every sparsity and its mean fine-tuned accuracy."""
    lines = []
    for src in recovery:
        parts = ", ".join(f"{float(sp):g}: {fmt_ci(ci)}" for sp, ci in recovery[src]["graft"].items())
        lines.append(f"* **{src}**: graft recovery at sparsity {parts} (fine-tuned accuracy {ft_acc[src].mean():.3f} on average).")
    return "Measured recovery (mean over skills [95% interval]):\n\n" + "\n".join(lines)


def graft_recovery_per_skill(table: pd.DataFrame) -> pd.DataFrame:
    """The graft's recovery per source and skill (rows) and sparsity (columns)."""
    return table[table.kind == "graft"].pivot_table(index=["source", "skill"], columns="sparsity", values="recovery")


def train_loss_by_kind(table: pd.DataFrame) -> pd.DataFrame:
    """Mean training loss of the rounded grafted models per source and sparsity (rows) and mask kind (columns)."""
    return table.pivot_table(index=["source", "sparsity"], columns="kind", values="train_loss")


def overlap_summary(ov: Overlap) -> pd.DataFrame:
    """Per source (columns): mean off-diagonal, same-family and cross-family Jaccard, the random
    masks' expectation, and Spearman's ρ with each behaviour as ``ρ [lo, hi], p = …``."""
    ci = lambda c: f"{c['mean']:.4f} [{c['lo']:.4f}, {c['hi']:.4f}]" if c else ""  # noqa: E731
    return pd.DataFrame({src: {"mean off-diagonal": fam[0], "same family": fam[1], "cross family": fam[2],
                               "mean off-diagonal [95% CI over pairs]": ci(ov.jaccard_ci.get(src)),
                               "random masks of the same sizes [95% range]": ci(ov.random_ci.get(src)),
                               "random masks (expected)": ov.chance,
                               **{f"ρ with {k}": f"{c['r']:.2f} [{c['lo']:.2f}, {c['hi']:.2f}], p = {c['p_permutation']:.3f}"
                                  for k, c in ov.corr[src].items()}}
                         for src, fam in ov.family.items()})


def overlap_notes(ov: Overlap) -> str:
    """Markdown: per source the most-overlapping pair (Jaccard, multiple of chance, family, rank
    by loss transfer); and, with stage 03's expert accuracy, how rarely it is nonzero off the
    diagonal."""
    pairs, notes = ov.pairs, []
    for src in ov.matrices:
        q = pairs[pairs.source == src].reset_index(drop=True)
        top = q.loc[q.jaccard.idxmax()]
        rank = int((q.loss_transfer > top.loss_transfer).sum()) + 1
        notes.append(f"* {src}: the most-overlapping pair is {top.skill_a}–{top.skill_b} (Jaccard {top.jaccard:.3f}, "
                     f"{top.jaccard / ov.chance:.1f}× chance, {'same' if top.same_family else 'different'} family), "
                     f"rank {rank} of {len(q)} pairs by loss transfer ({top.loss_transfer:.2f}).")
    if ov.interference is not None:
        q = pairs[pairs.source == ov.main_source]
        notes.append(f"* Expert accuracy off the diagonal is nonzero for {int((q.expert_accuracy > 0).sum())} of {len(q)} pairs "
                     f"(largest {q.expert_accuracy.max():.3f}): the experts are so specialised that accuracy-based similarity "
                     "is mostly ties at 0, so the loss transfer is the behavioural similarity `metrics/localize.json` reports.")
    return "\n".join(notes)
