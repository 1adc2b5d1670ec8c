"""The command line of the stages that are Python modules rather than notebooks (``levels``,
``level_score``, ``teacher_data``, ``finetune``): ``[skills...] [--params] [--profile] [--workdir]``.

One place, so every such stage refuses its inputs the same way: a params, data, model or
training error is one ``error:`` line on stderr and exit status 2 (DVC shows it as the stage's
failure), never a traceback that hides the message.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def main(argv: list[str] | None, doc: str, step: Callable[..., object], show: Callable[[object], object],
         errors: tuple[type[BaseException], ...] = (), skills: bool = False) -> int:
    """Parse ``argv``, run ``step(workdir, params, profile)`` (with ``skills=`` the positional
    skills, or None for every one, when ``skills``), print ``show`` of its result and return 0;
    on a refused input (:class:`lib.core.config.ParamsError`, :class:`lib.core.data.DataError`,
    :class:`lib.core.modeling.ModelLoadError`, :class:`lib.core.training.TrainingDiverged`, or one
    of ``errors``) print one error line and return 2."""
    from lib.core import config, data
    from lib.core.modeling import ModelLoadError
    from lib.core.training import TrainingDiverged

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if skills:
        ap.add_argument("skills", nargs="*", help="training skills (default: every one in skills.train)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--workdir", default=".", help="project root (where params.yaml, datasets/ and models/ are)")
    args = ap.parse_args(argv)
    extra = {"skills": args.skills or None} if skills else {}
    try:
        found = step(args.workdir, args.params, args.profile, **extra)
    except (config.ParamsError, data.DataError, ModelLoadError, TrainingDiverged, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(show(found))
    return 0
