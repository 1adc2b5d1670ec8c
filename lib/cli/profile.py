"""Apply a profile: merge ``profiles/<name>.yaml`` into params.yaml so DVC tracks it.

    python -m lib.cli.profile smoke      # or gpu; `git checkout params.yaml` goes back

DVC reads its params from params.yaml only, so a profile is applied by rewriting that
file (comments are lost; the merged values are validated first), and the notebooks'
parameters cells beside it are rewritten to match (``lib.cli.sync_notebooks``). `dvc exp run -S` does
the same for single keys.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from lib.core import config


def apply(profile: str, params: str | Path = "params.yaml") -> dict:
    merged = config.read_params(params, profile)
    where = f"{params} + profile {profile}"
    config.check_across_sections({section: config.validate_section(section, values, where)
                                  for section, values in merged.items()}, where)
    Path(params).write_text(f"# params.yaml with profile {profile!r} applied (python -m lib.cli.profile)\n"
                            + yaml.safe_dump(merged, sort_keys=False))
    # The notebooks' parameters cells follow, so a notebook run by hand in JupyterLab reads the
    # profile's values (which levels exist, how many skills) as `dvc repro` does.
    notebooks = Path(params).resolve().parent / "notebooks"
    if notebooks.is_dir():
        from lib.cli.sync_notebooks import sync

        sync(Path(params), notebooks.parent)
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        apply(args.profile, args.params)
    except config.ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"applied profile {args.profile!r} to {args.params}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
