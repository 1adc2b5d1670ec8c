"""What `make repro` prints at the end: the headline table and the claims' verdicts.

    python -m lib.cli.summary [--workdir .]

Read from ``reports/tables/`` (written by stage 08), so it is a table a person can read
rather than ``dvc metrics show``'s one row of hundreds of columns; the full numbers stay in
``metrics/*.json`` (``dvc metrics show`` still lists them).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def summary(root: str | Path = ".") -> str:
    tables = Path(root) / "reports" / "tables"
    head, claims = tables / "headline.csv", tables / "claims.csv"
    missing = [str(p) for p in (head, claims) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: stage 08 (report) has not run")
    h = pd.read_csv(head, keep_default_na=False)
    c = pd.read_csv(claims, keep_default_na=False)
    counts = c.verdict.value_counts()
    with pd.option_context("display.max_colwidth", 70, "display.width", 200):
        return "\n".join([
            "Headline (reports/tables/headline.csv)", h.to_string(index=False), "",
            f"Claims (reports/tables/claims.csv): {counts.get('held', 0)} held, {counts.get('did not hold', 0)} did not "
            f"hold, {counts.get('inconclusive', 0)} inconclusive",
            c[["claim", "verdict"]].to_string(index=False), "",
            "Every number: metrics/*.json (dvc metrics show); the report: reports/html/index.html",
        ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=".")
    args = ap.parse_args(argv)
    try:
        print(summary(args.workdir))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
