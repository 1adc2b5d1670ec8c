"""Run one stage notebook with papermill, its params validated first.

    python -m lib.cli.run_stage synthesize [--params params.yaml] [--profile smoke] [--workdir .]

The notebook receives each params section it reads as one dict parameter plus
``workdir`` (where inputs and outputs live), and validates them through the same schemas.
The executed copy goes to ``reports/notebooks/``. A failing cell makes this command fail:
with one line (the message and where the executed notebook is) when the cell raised one of
the project's own errors about its inputs (:data:`INPUT_ERRORS`: bad params, a missing or
corrupt dataset, model, adapter or metrics file), which say what to do; with the cell's whole
traceback for anything else, which is a bug to read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.core import config
from lib.core.stages import get_stage

REPO = Path(__file__).resolve().parents[2]

# The project's exceptions about a stage's inputs; their messages name the key or file and the fix.
INPUT_ERRORS = frozenset({"ParamsError", "DataError", "ModelLoadError", "AdapterError", "TrainingDiverged",
                          "LocalizeError", "MissingInput", "MissingMetric", "GraftError", "MergeError", "UnknownName"})


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
        if type(e).__name__ != "PapermillExecutionError":
            raise
        notebook = Path(args.workdir) / "reports" / "notebooks" / get_stage(args.stage).notebook
        if e.ename in INPUT_ERRORS:
            message = " ".join(str(e.evalue).split())  # one line, whatever the message's own line breaks
            print(f"error: {message} (stage {args.stage!r}; executed notebook: {notebook})", file=sys.stderr)
            return 2
        print(f"error: stage {args.stage!r} failed in a notebook cell:\n{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
