"""Do the verdicts survive float rounding? The whole default study again with another torch
thread count, and its claims beside the committed run's.

    python -m bench.perturb [--threads 1] [--keep]

Bit-identical results across CPU models are not to be had (a fresh clone on an Intel CPU
pretrained a base with final loss 0.73169 against 0.73211 here). The perturbation this
machine can make is the number of torch threads in the stages that use the default (base
pretraining, evaluation, the task router): it changes the order of float reductions, so the
base's weights differ in their last bits and every later stage inherits the difference,
as on another CPU. (The adapters train on one thread whatever the machine, see
``lib.core.training.one_cpu_thread``.) In a scratch copy of the project (as the pipeline
benchmark makes it) ``dvc repro`` runs with ``OMP_NUM_THREADS`` set; then the claims of both
runs are computed from their metrics and compared. Writes ``bench/results/perturb.json`` and
``bench/results/perturb.md``; exit status 1 when a verdict differs.
"""
from __future__ import annotations

import argparse
import shutil
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


def markdown(rows: list[dict], threads: int, base_loss: tuple, wall_s: float) -> str:
    lines = [f"Claims of the committed run (this machine, default threads) against a full `dvc repro` with "
             f"`OMP_NUM_THREADS={threads}` ({wall_s / 60:.0f} min); base final pretraining loss "
             f"{base_loss[0]} vs {base_loss[1]}.", "",
             "| claim | verdict | with other threads | measured (committed run) | measured (perturbed run) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['claim']} | {r['verdict']} | {r['perturbed_verdict']}{'' if r['same'] else ' **(differs)**'} "
                     f"| {r['measured']} | {r['perturbed_measured']} |")
    same = sum(r["same"] for r in rows)
    lines += ["", f"{same} of {len(rows)} verdicts the same."]
    if base_loss[0] == base_loss[1] and all(r["measured"] == r["perturbed_measured"] for r in rows):
        # the same verdicts then say nothing about float rounding: the perturbation moved nothing
        lines += ["", "**Nothing changed**: the base and every measured value are bit-identical, so this "
                  "thread count is no perturbation on this machine and the check says nothing about "
                  "verdicts under float rounding."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.perturb", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the perturbed run (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch project")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from lib.core.io import read_json, write_json
    from lib.report.tables import load_metrics

    reference = load_metrics(common.REPO)
    scratch = Path(tempfile.mkdtemp(prefix="perturb-"))
    try:
        dest = make_copy(scratch / "project", None)
        env = {**_env(), "OMP_NUM_THREADS": str(args.threads)}
        t0 = time.perf_counter()
        import subprocess

        proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=dest, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(f"error: the perturbed dvc repro failed (kept in {dest})", file=sys.stderr)
            args.keep = True
            return 2
        perturbed = load_metrics(dest)
        from lib.core import config
        from lib.levels.curve import table

        cfg = config.load(["synthesize", "levels"], common.REPO / "params.yaml")
        levels = [table(root, cfg["levels"].fractions, cfg["synthesize"].corpus_skill_fraction, cfg["levels"].merges)
                  for root in (common.REPO, dest)]
        rows = compare(reference, perturbed, levels)
        loss = (read_json(common.REPO / "metrics" / "base.json").get("final_loss"),
                read_json(dest / "metrics" / "base.json").get("final_loss"))
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "perturb.json", {"threads": args.threads, "wall_s": wall, "base_final_loss": loss,
                                               "machine": common.machine(), "started": common.now(), "claims": rows,
                                               "perturbed_metrics": perturbed})
        text = markdown(rows, args.threads, loss, wall)
        (args.out / "perturb.md").write_text(text)
        sys.stdout.write(text)
        return 0 if all(r["same"] for r in rows) else 1
    finally:
        if args.keep:
            print(f"scratch project kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
