"""Small file helpers: atomic JSON writes so a killed stage never leaves a complete-looking file."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _json_safe(obj: Any) -> Any:
    """NaN and infinities become null: JSON has no NaN, and DVC refuses files that contain it."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically; non-finite floats are written as null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(_json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def quiet_notebook() -> None:
    """Keep executed notebooks readable: no per-batch progress bars or known library
    deprecation chatter in the report (the terminal keeps its progress bars)."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"IProgress not found.*")
