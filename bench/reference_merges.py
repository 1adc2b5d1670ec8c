"""Our spectral merges against FusionBench's code, on the same small state dicts (issue 19).

    pip install --target /tmp/fusion-bench --no-deps fusion-bench==0.2.33 bidict==0.24.1 \\
        lightning-utilities==0.15.3 lightning==2.6.6 torchmetrics==1.9.0
    python -m bench.reference_merges --fusion-bench /tmp/fusion-bench

FusionBench is not a project dependency (it pulls a training stack we do not use): it is
installed into a scratch folder, without its dependencies except the four its import chain
needs, and put on ``sys.path`` here only. Two kinds of inputs:

* **full rank** (random matrices of several shapes, ``min(m, n)`` divisible by the number of
  tasks or not): our ``iso_c`` and ``tsv_m`` must equal FusionBench's ``iso_c`` and
  ``compute_and_sum_svd_mem_reduction`` within 1e-5 (relative to the largest entry);
* **LoRA-like** (rank-2 updates, as the study's experts): where the conventions differ on
  purpose. Ours cut each SVD at its numerical rank; FusionBench's keep null-space singular
  vectors, whose choice is arbitrary. Reported: the relative difference, and how far each
  result leaves the span of the experts' column spaces (ours: 0).

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


def _inputs(kind: str, n_tasks: int, shape: tuple[int, int], seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    if kind == "full":
        return [{"w": torch.randn(m, n, generator=g, dtype=torch.float64)} for _ in range(n_tasks)]
    return [{"w": torch.randn(m, 2, generator=g, dtype=torch.float64) @ torch.randn(2, n, generator=g, dtype=torch.float64)}
            for _ in range(n_tasks)]


def _outside_span(out: torch.Tensor, deltas: list[torch.Tensor]) -> float:
    """‖out − P out‖ / ‖out‖, P the projector on the span of the experts' columns."""
    from lib.merge.methods._spectral import svd_cut

    q = svd_cut(torch.cat(deltas, dim=1))[0]
    return float((out - q @ (q.T @ out)).norm() / out.norm())


def compare(fb_path: str) -> list[dict]:
    sys.path.insert(0, fb_path)
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c as fb_iso_c
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction as fb_tsvm

    from lib.merge.methods.iso_c import iso_c
    from lib.merge.methods.tsv_m import tsv_m

    ours = {"iso_c": iso_c, "tsv_m": tsv_m}
    theirs = {"iso_c": lambda tvs: fb_iso_c(tvs, accelerator="cpu")["w"],
              "tsv_m": lambda tvs: fb_tsvm(tvs, accelerator="cpu")["w"]}
    rows = []
    cases = [("full", 3, (6, 6)), ("full", 4, (12, 10)), ("full", 3, (7, 11)), ("full", 8, (64, 48)),
             ("lora", 8, (64, 48)), ("lora", 4, (32, 32))]
    for i, (kind, t, shape) in enumerate(cases):
        tvs = _inputs(kind, t, shape, seed=i)
        deltas = [tv["w"] for tv in tvs]
        for name in ("iso_c", "tsv_m"):
            a, b = ours[name](deltas), theirs[name](tvs)
            rel = float((a - b).abs().max() / b.abs().max())
            rows.append({"method": name, "inputs": kind, "tasks": t, "shape": list(shape), "max_rel_diff": rel,
                         "within_tolerance": rel <= TOLERANCE, "ours_outside_span": _outside_span(a, deltas),
                         "theirs_outside_span": _outside_span(b, deltas)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fusion-bench", required=True, help="folder where fusion_bench is importable (pip --target)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reference_merges.json"))
    args = ap.parse_args(argv)
    try:
        rows = compare(args.fusion_bench)
    except ImportError as e:
        print(f"error: cannot import FusionBench from {args.fusion_bench} ({e}); install it as the docstring says",
              file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| method | inputs | tasks | shape | max relative difference | ours / theirs outside the experts' span |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['inputs']} | {r['tasks']} | {r['shape'][0]}×{r['shape'][1]} | {r['max_rel_diff']:.1e}"
              f"{'' if r['inputs'] == 'lora' else (' (ok)' if r['within_tolerance'] else ' (OVER 1e-5)')} | "
              f"{r['ours_outside_span']:.1e} / {r['theirs_outside_span']:.1e} |")
    full = [r for r in rows if r["inputs"] == "full"]
    print(f"full-rank cases within {TOLERANCE:g}: {sum(r['within_tolerance'] for r in full)} of {len(full)}")
    return 0 if all(r["within_tolerance"] for r in full) else 1


if __name__ == "__main__":
    sys.exit(main())
