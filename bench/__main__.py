"""Run the benchmarks: ``python -m bench [part ...] [--quick]`` (``make bench`` runs them all).

Parts: training (our trainer vs a hand-written loop, MFU), eval (harness vs one-at-a-time
and no-cache decoding), merge (merge time/memory for N = 2..16 experts, exact vs peft),
pipeline (every stage's wall time and peak memory in a real ``dvc repro``, no-op repro,
rerun after one merge parameter). Each part writes ``<results>/<part>.json``; then the
table ``<results>/summary.md`` and the figures are rebuilt from every part's latest JSON.
A full run of every part also refreshes the table in README.md (``--readme`` forces it,
``--no-readme`` skips it). ``--quick`` is a short check on smaller inputs (the smoke
profile for the pipeline) and writes to ``bench/results/quick/`` unless ``--out`` is given.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import common, report

RESULTS = common.REPO / "bench" / "results"
ROOTED = ("training", "eval")  # parts that measure a project's own models, so --root can name another
README = common.REPO / "README.md"


def _run_part(part: str, quick: bool, keep: bool, root: Path | None = None):
    if part == "training":
        from .train_speed import run
    elif part == "eval":
        from .eval_speed import run
    elif part == "merge":
        from .merge_cost import run
    else:
        from .pipeline import run

        return run(quick=quick, keep=keep)
    # --root: the training and eval parts on another project's models (e.g. the smollm2 profile's)
    return run(quick=quick, root=root) if root is not None and part in ROOTED else run(quick=quick)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", metavar="part", help=f"any of {', '.join(report.PARTS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="short verification run on smaller inputs")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results, or bench/results/quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in this process (default: usable cores)")
    ap.add_argument("--keep", action="store_true", help="keep the pipeline's scratch project")
    ap.add_argument("--root", type=Path, default=None,
                    help=f"project whose models and params the {' and '.join(ROOTED)} parts measure (default: this "
                         "repository), e.g. a scratch project where the smollm2 profile ran")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rebuild summary.md and the figures from the JSONs in the results folder")
    readme = ap.add_mutually_exclusive_group()
    readme.add_argument("--readme", action="store_true", help="refresh the README table even for a partial or quick run")
    readme.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    args = ap.parse_args(argv)
    unknown = [p for p in args.parts if p not in report.PARTS]
    if unknown:
        print(f"error: unknown part(s) {unknown}; known parts: {', '.join(report.PARTS)}", file=sys.stderr)
        return 2
    parts = args.parts or list(report.PARTS)
    if args.root is not None and set(parts) - set(ROOTED):
        print(f"error: --root applies to the {' and '.join(ROOTED)} parts only; name them", file=sys.stderr)
        return 2
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    from lib.core.io import write_json

    for part in [] if args.report_only else parts:
        print(f"== bench {part}{' (quick)' if args.quick else ''}", file=sys.stderr, flush=True)
        meta = {"part": part, "quick": args.quick, "started": common.now(), "machine": common.machine(),
                **({"root": str(args.root)} if args.root is not None else {})}
        t0 = time.perf_counter()
        result = _run_part(part, args.quick, args.keep, args.root)
        meta.update(wall_s=time.perf_counter() - t0, load_avg_end=round(os.getloadavg()[0], 2))
        write_json(out / f"{part}.json", {"meta": meta, **result})
        print(f"   {part}: {meta['wall_s']:.0f} s -> {out / (part + '.json')}", file=sys.stderr, flush=True)
    made = report.write(out)
    print(f"== {made['summary']} ({', '.join(made['parts'])}); figures: {', '.join(p.name for p in made['figures'])}",
          file=sys.stderr)
    full_run = not args.quick and not args.report_only and set(parts) == set(report.PARTS)
    if (full_run or args.readme) and not args.no_readme:
        from .stats import replace_block

        text = README.read_text()
        try:
            README.write_text(replace_block(text, report.readme_block(report.load(out))))
            print(f"== README.md benchmark table refreshed from {out}", file=sys.stderr)
        except ValueError as e:
            print(f"warning: README.md not updated ({e})", file=sys.stderr)
    sys.stdout.write((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
