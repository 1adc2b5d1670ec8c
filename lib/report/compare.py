"""Two runs' verdicts side by side, claim by claim (e.g. the default profile and the smollm2 one).

    python -m lib.report.compare metrics/report.json results/smollm2/metrics/report.json \
        --names default smollm2          -> a markdown table on stdout

Each run's ``metrics/report.json`` (stage 08) holds ``claims: {key: verdict}``. A claim
*agrees* when both runs reached the same verdict, *flips* when one held and the other did not
hold, *differs* when one is inconclusive and the other is not, and is *not compared* when
either run did not measure it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from lib.report.claims import CLAIMS, HELD, NOT_HELD, NOT_MEASURED

ABSENT = "–"


def status(a: str | None, b: str | None) -> str:
    if a in (None, NOT_MEASURED) or b in (None, NOT_MEASURED):
        return "not compared"
    if a == b:
        return "agrees"
    if {a, b} == {HELD, NOT_HELD}:
        return "flips"
    return "differs"


def side_by_side(a: dict[str, str], b: dict[str, str], names: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """One row per claim of :data:`lib.report.claims.CLAIMS` (in that order; a claim a run's
    report lacks, from before the claim existed, is ABSENT there): the claim, each run's verdict
    and :func:`status`."""
    rows = [{"key": c.key, "claim": c.claim, names[0]: a.get(c.key, ABSENT), names[1]: b.get(c.key, ABSENT),
             "": status(a.get(c.key), b.get(c.key))} for c in CLAIMS]
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame) -> str:
    cols = [c for c in df.columns if c != "key"]
    head = "| " + " | ".join(c or "comparison" for c in cols) + " |"
    lines = [head, "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df[cols].itertuples(index=False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs=2, type=Path, help="two metrics/report.json files")
    ap.add_argument("--names", nargs=2, default=["a", "b"])
    args = ap.parse_args(argv)
    try:
        a, b = (json.loads(p.read_text())["claims"] for p in args.reports)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    df = side_by_side(a, b, tuple(args.names))
    print(markdown(df))
    counts = df[""].value_counts()
    print("\n" + ", ".join(f"{n} {k}" for k, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
