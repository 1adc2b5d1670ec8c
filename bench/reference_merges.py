"""Our merges against the reference implementations, on the same small state dicts (issue 19).

    pip install --target /tmp/fusion-bench --no-deps fusion-bench==0.2.33 bidict==0.24.1 \\
        lightning-utilities==0.15.3 lightning==2.6.6 torchmetrics==1.9.0
    pip install --target /tmp/mergekit --no-deps mergekit==0.1.5
    python -m bench.reference_merges --fusion-bench /tmp/fusion-bench --mergekit /tmp/mergekit

Neither library is a project dependency (each pulls a stack we do not use): each is installed
into a scratch folder without its dependencies (FusionBench needs the four named for its
import chain; mergekit's imports are met by the project's environment) and put on
``sys.path`` here only. Either option may be left out.

* **FusionBench** (``iso_c``, ``tsv_m``, ``iso_cts``; KnOTS' alignment ``subspace_alignment``,
  which we follow with peft's TIES as ``knots_ties`` does): on full-rank inputs (random
  matrices of several shapes) ours must equal theirs within 1e-5 of the largest entry. On
  LoRA-like inputs (rank-2 updates, as the study's experts) the conventions differ on
  purpose: ours cut each SVD at its numerical rank (and Iso-CTS counts its common fraction
  on that rank), theirs keep null-space singular vectors, whose choice is arbitrary. There
  we report the difference and how far each result leaves the span of the experts' columns.
* **mergekit** (``ties``, ``della``, ``dare_ties``; its ``sparsify`` and ``get_mask`` with the
  few lines of ``GeneralizedTaskArithmeticMerge.merge_group`` that combine them, written
  out in :func:`_mergekit`): ``ties`` and ``della`` (same torch seed, so the same random
  draws) must be equal within 1e-5 at weight 1. ``dare_ties`` differs by convention, reported
  not asserted: mergekit rescales the kept entries to the L1 norm and sums the agreeing
  ones, DARE's paper (and peft, ours) rescale by ``1 / density`` and take their mean.

Writes ``bench/results/reference_merges.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
DENSITY, EPSILON, COMMON = 0.3, 0.15, 0.8
CASES = [("full", 3, (6, 6)), ("full", 4, (12, 10)), ("full", 3, (7, 11)), ("full", 8, (64, 48)),
         ("lora", 8, (64, 48)), ("lora", 4, (32, 32))]


def _inputs(kind: str, n_tasks: int, shape: tuple[int, int], seed: int, dtype=torch.float64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    if kind == "full":
        return [{"w": torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)} for _ in range(n_tasks)]
    return [{"w": (torch.randn(m, 2, generator=g, dtype=torch.float64) @ torch.randn(2, n, generator=g, dtype=torch.float64)
                   ).to(dtype)} for _ in range(n_tasks)]


def _outside_span(out: torch.Tensor, deltas: list[torch.Tensor]) -> float:
    """‖out − P out‖ / ‖out‖, P the projector on the span of the experts' columns."""
    from lib.merge.methods._spectral import svd_cut

    out, deltas = out.double(), [d.double() for d in deltas]
    q = svd_cut(torch.cat(deltas, dim=1))[0]
    return float((out - q @ (q.T @ out)).norm() / out.norm())


def _row(reference: str, name: str, kind: str, t: int, shape, a: torch.Tensor, b: torch.Tensor, deltas, expect_equal: bool) -> dict:
    rel = float((a.double() - b.double()).abs().max() / b.double().abs().max())
    return {"reference": reference, "method": name, "inputs": kind, "tasks": t, "shape": list(shape), "max_rel_diff": rel,
            "expect_equal": expect_equal, "within_tolerance": rel <= TOLERANCE,
            "ours_outside_span": _outside_span(a, deltas), "theirs_outside_span": _outside_span(b, deltas)}


def compare_fusion_bench(path: str) -> list[dict]:
    sys.path.insert(0, path)
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c as fb_iso_c, iso_cts as fb_iso_cts
    from fusion_bench.method.knots.knots_utils import subspace_alignment
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction as fb_tsvm
    from peft.utils import merge_utils as mu

    from lib.merge.methods.iso_c import iso_c
    from lib.merge.methods.iso_cts import iso_cts
    from lib.merge.methods.knots import knots_ties
    from lib.merge.methods.tsv_m import tsv_m

    def fb_knots(tvs):
        u, s, vhs = subspace_alignment([tv["w"] for tv in tvs])
        return u @ torch.diag(s) @ mu.ties(list(vhs), torch.ones(len(vhs), dtype=s.dtype), DENSITY, "total")

    methods = {"iso_c": (iso_c, lambda tvs: fb_iso_c(tvs, accelerator="cpu")["w"]),
               "tsv_m": (tsv_m, lambda tvs: fb_tsvm(tvs, accelerator="cpu")["w"]),
               "iso_cts": (lambda d: iso_cts(d, common_space_fraction=COMMON),
                           lambda tvs: fb_iso_cts(tvs, COMMON, accelerator="cpu")["w"]),
               "knots_ties": (lambda d: knots_ties(d, density=DENSITY), fb_knots)}
    rows = []
    for i, (kind, t, shape) in enumerate(CASES):
        tvs = _inputs(kind, t, shape, seed=i)
        deltas = [tv["w"] for tv in tvs]
        for name, (ours, theirs) in methods.items():
            rows.append(_row("FusionBench 0.2.33", name, kind, t, shape, ours(deltas), theirs(tvs), deltas, kind == "full"))
    return rows


def _mergekit(deltas: list[torch.Tensor], method: str, seed: int) -> torch.Tensor:
    """mergekit 0.1.5's merge of ``deltas`` at weight 1: its ``sparsify`` (magnitude for ties,
    della_magprune for della, random for dare_ties; the L1 rescale where the method has
    ``rescale``), its ``get_mask`` sign consensus, then ``merge_group``'s sum, normalised by
    the agreeing weights where the method has ``normalize``."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    how = {"ties": (SparsificationMethod.magnitude, False, True), "della": (SparsificationMethod.della_magprune, True, True),
           "dare_ties": (SparsificationMethod.random, True, False)}
    sparsification, rescale, normalize = how[method]
    torch.manual_seed(seed)
    kw = {"epsilon": EPSILON} if method == "della" else {}
    stacked = torch.stack([sparsify(d, density=DENSITY, method=sparsification,
                                    rescale_norm=RescaleNorm.l1 if rescale else None, **kw) for d in deltas])
    weights = torch.ones(len(deltas), dtype=stacked.dtype).reshape(-1, 1, 1)
    stacked = stacked * weights
    mask = get_mask(stacked, method="sum", mask_dtype=stacked.dtype)
    mixed, divisor = (stacked * mask).sum(dim=0), (weights * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    return mixed / divisor if normalize else mixed


def compare_mergekit(path: str) -> list[dict]:
    sys.path.insert(0, path)
    import mergekit.sparsify  # noqa: F401  (fail early, as an ImportError naming mergekit)

    from lib.merge.methods import MERGE_METHODS

    params = {"ties": {"density": DENSITY}, "della": {"density": DENSITY, "epsilon": EPSILON}, "dare_ties": {"density": DENSITY}}
    rows = []
    for i, (kind, t, shape) in enumerate(CASES):
        deltas = [tv["w"] for tv in _inputs(kind, t, shape, seed=i, dtype=torch.float32)]
        for name, kw in params.items():
            torch.manual_seed(100 + i)
            ours = MERGE_METHODS[name](deltas, **kw)
            rows.append(_row("mergekit 0.1.5", name, kind, t, shape, ours, _mergekit(deltas, name, 100 + i), deltas,
                             name != "dare_ties"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fusion-bench", help="folder where fusion_bench is importable (pip --target)")
    ap.add_argument("--mergekit", help="folder where mergekit is importable (pip --target)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reference_merges.json"))
    args = ap.parse_args(argv)
    if not (args.fusion_bench or args.mergekit):
        ap.error("give --fusion-bench DIR and/or --mergekit DIR (see the install lines above)")
    rows = []
    for name, folder, compare in (("FusionBench", args.fusion_bench, compare_fusion_bench),
                                  ("mergekit", args.mergekit, compare_mergekit)):
        if folder:
            try:
                rows += compare(folder)
            except ImportError as e:
                print(f"error: cannot import {name} from {folder} ({e}); install it as the docstring says", file=sys.stderr)
                return 2
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| reference | method | inputs | tasks | shape | max relative difference | ours / theirs outside the experts' span |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        flag = (" (ok)" if r["within_tolerance"] else " (OVER 1e-5)") if r["expect_equal"] else " (convention)"
        print(f"| {r['reference']} | {r['method']} | {r['inputs']} | {r['tasks']} | {r['shape'][0]}×{r['shape'][1]} | "
              f"{r['max_rel_diff']:.1e}{flag} | {r['ours_outside_span']:.1e} / {r['theirs_outside_span']:.1e} |")
    expected = [r for r in rows if r["expect_equal"]]
    print(f"cases expected equal within {TOLERANCE:g}: {sum(r['within_tolerance'] for r in expected)} of {len(expected)}")
    return 0 if all(r["within_tolerance"] for r in expected) else 1


if __name__ == "__main__":
    sys.exit(main())
