"""Run one stage notebook with papermill, its params validated first.

    python -m lib.cli.run_stage synthesize [--params params.yaml] [--profile smoke] [--workdir .]

The notebook receives each params section it reads as one dict parameter plus
``workdir`` (where inputs and outputs live), and validates them through the same schemas.
The executed copy goes to ``reports/notebooks/``. A failing cell makes this command fail
with that cell's error printed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.core import config
from lib.core.stages import get_stage

REPO = Path(__file__).resolve().parents[2]


def run(stage_name: str, params: str | Path = "params.yaml", profile: str | None = None,
        workdir: str | Path = ".", extra: dict | None = None, progress: bool = True) -> Path:
    import papermill as pm

    stage = get_stage(stage_name)
    workdir = Path(workdir).resolve()
    params_path = Path(params) if Path(params).is_absolute() else workdir / params
    validated = config.load(list(stage.sections), params_path, profile)  # fail before any work
    parameters = {name: section.model_dump(mode="json") for name, section in validated.items()}
    parameters["workdir"] = str(workdir)
    parameters.update(extra or {})
    out = workdir / "reports" / "notebooks" / stage.notebook
    out.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(
        str(REPO / "notebooks" / stage.notebook), str(out), parameters=parameters,
        kernel_name="python3", cwd=str(workdir), progress_bar=progress,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None, help="override file merged over params (profiles/NAME.yaml)")
    ap.add_argument("--workdir", default=".")
    args = ap.parse_args(argv)
    try:
        get_stage(args.stage)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    try:
        run(args.stage, args.params, args.profile, args.workdir)
    except config.ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ == "PapermillExecutionError":
            print(f"error: stage {args.stage!r} failed in a notebook cell:\n{e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
