"""Do the verdicts survive float rounding? The whole default study again on perturbed bases,
and its claims beside the committed run's.

    python -m bench.perturb [--noise 1e-6] [--threads N] [--keep]

Bit-identical results across CPU models are not to be had (a fresh clone on an Intel CPU
pretrained a base with final loss 0.73169 against 0.73211 here). The perturbation this
machine can make is the number of torch threads in the stages that use the default (base
pretraining, evaluation, the task router): it changes the order of float reductions, so the
base's weights differ in their last bits and every later stage inherits the difference,
as on another CPU. (The adapters train on one thread whatever the machine, see
``lib.core.training.one_cpu_thread``.) Measured on 2026-12-03: on this machine one thread
gave a bit-identical study, so the thread count is no perturbation here. ``--noise`` (the
default, 1e-6) is one: every pretrained base (stage 02's and each level's) has each weight
multiplied by (1 + 1e-6·ε) before it is saved (``lib.experts.base.perturb_weights``), a few
float32 ulps, as another CPU's rounding would leave it. In a scratch copy of the project (as the pipeline
benchmark makes it) ``dvc repro`` runs with the perturbation set; then the claims of both
runs are computed from their metrics and compared. Writes ``bench/results/perturb.json`` and
``bench/results/perturb.md``; exit status 1 when a verdict differs.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common
from .pipeline import _env, make_copy

RESULTS = common.REPO / "bench" / "results"


def compare(reference: dict, perturbed: dict, levels=None) -> list[dict]:
    """One row per claim: both verdicts, both measured sentences, and whether they agree; with
    ``levels`` (both runs' :func:`lib.levels.curve.table`), one more row per level for its
    verdict of "experts + merging beat joint training"."""
    from lib.report.claims import evaluate_claims

    ref = {r["key"]: r for r in evaluate_claims(reference)}
    per = {r["key"]: r for r in evaluate_claims(perturbed)}
    rows = [{"claim": k, "verdict": ref[k]["verdict"], "perturbed_verdict": per[k]["verdict"],
             "same": ref[k]["verdict"] == per[k]["verdict"], "measured": ref[k]["measured"],
             "perturbed_measured": per[k]["measured"]} for k in ref]
    if levels is not None:
        def said(r):
            return f"best merge ({r.best_merge.split(':', 1)[1]}) {r[r.best_merge]:.3f} vs joint {r['joint_total_steps']:.3f}"

        a, b = (t.set_index("fraction") for t in levels)
        for f in a.index:
            ra, rb = a.loc[f], b.loc[f]
            rows.append({"claim": f"level {f:g}: merging beats joint", "verdict": ra.merge_beats_joint,
                         "perturbed_verdict": rb.merge_beats_joint, "same": ra.merge_beats_joint == rb.merge_beats_joint,
                         "measured": said(ra), "perturbed_measured": said(rb)})
    return rows


def describe(threads: int | None, noise: float) -> str:
    parts = ([f"`OMP_NUM_THREADS={threads}`"] if threads else []) + \
            ([f"every base weight multiplied by (1 + {noise:g}·ε), ε ~ N(0, 1)"] if noise else [])
    return "a full `dvc repro` with " + (" and ".join(parts) or "nothing changed")


def markdown(rows: list[dict], what: str, base_loss: tuple, wall_s: float | None) -> str:
    took = f" ({wall_s / 60:.0f} min)" if wall_s else ""
    lines = [f"Claims of the committed run against {what}{took}; base final pretraining loss "
             f"{base_loss[0]} vs {base_loss[1]}.", "",
             "| claim | verdict | perturbed | measured (committed run) | measured (perturbed run) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['verdict']} | {r['perturbed_verdict']}{'' if r['same'] else ' **(differs)**'} "
                     f"| {r['measured']} | {r['perturbed_measured']} |")
    same = sum(r["same"] for r in rows)
    lines += ["", f"{same} of {len(rows)} verdicts the same."]
    if base_loss[0] == base_loss[1] and all(r["measured"] == r["perturbed_measured"] for r in rows):
        # the same verdicts then say nothing about float rounding: the perturbation moved nothing
        lines += ["", "**Nothing changed**: the base and every measured value are bit-identical, so this "
                  "was no perturbation on this machine and the check says nothing about "
                  "verdicts under float rounding."]
    return "\n".join(lines) + "\n"


def report_against(dest: Path, out: Path, what: str, threads: int | None, noise: float, wall: float | None) -> int:
    """Compare the claims (and level verdicts) of the project in ``dest`` with the committed
    run's; write perturb.json/.md under ``out``; 0 when every verdict agrees, else 1."""
    from lib.core import config
    from lib.core.io import read_json, write_json
    from lib.levels.curve import table
    from lib.report.tables import load_metrics

    reference, perturbed = load_metrics(common.REPO), load_metrics(dest)
    cfg = config.load(["synthesize", "levels"], common.REPO / "params.yaml")
    levels = [table(root, cfg["levels"].fractions, cfg["synthesize"].corpus_skill_fraction, cfg["levels"].merges)
              for root in (common.REPO, dest)]
    rows = compare(reference, perturbed, levels)
    loss = (read_json(common.REPO / "metrics" / "base.json").get("final_loss"),
            read_json(dest / "metrics" / "base.json").get("final_loss"))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "perturb.json", {"what": what, "threads": threads, "noise": noise, "wall_s": wall,
                                      "base_final_loss": loss, "machine": common.machine(), "started": common.now(),
                                      "claims": rows, "perturbed_metrics": perturbed})
    text = markdown(rows, what, loss, wall)
    (out / "perturb.md").write_text(text)
    sys.stdout.write(text)
    return 0 if all(r["same"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.perturb", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noise", type=float, default=1e-6,
                    help="relative noise on every pretrained base weight (default 1e-6; 0: none)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the perturbed run (default: unchanged)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch project")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--compare", type=Path, default=None, metavar="PROJECT",
                    help="run nothing: compare the claims of a finished project (another machine's run, or a "
                         "kept bench scratch project) with the committed run's")
    args = ap.parse_args(argv)
    if args.compare:
        return report_against(args.compare, args.out, what=f"the run in {args.compare}", threads=None, noise=0.0,
                              wall=None)
    scratch = Path(tempfile.mkdtemp(prefix="perturb-"))
    try:
        dest = make_copy(scratch / "project", None)
        from lib.experts.base import PERTURB_ENV

        env = {**_env(), **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}),
               **({PERTURB_ENV: repr(args.noise)} if args.noise else {})}
        t0 = time.perf_counter()
        proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=dest, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(f"error: the perturbed dvc repro failed (kept in {dest})", file=sys.stderr)
            args.keep = True
            return 2
        return report_against(dest, args.out, what=describe(args.threads, args.noise), threads=args.threads,
                              noise=args.noise, wall=wall)
    finally:
        if args.keep:
            print(f"scratch project kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
