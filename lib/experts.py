"""Stage 03 aggregation: load the trained adapters side by side and score them.

All adapters are loaded into one peft model (``load_adapter``), so evaluating expert i
on skill j is one harness call with ``adapter_names`` set, and nothing is retrained.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .evaluation import BASE_ADAPTER, evaluate
from .modeling import load_on_device


class AdapterError(RuntimeError):
    """An adapter directory that is missing or does not fit the base model."""


def adapter_dirs(root: str | Path, skills: list[str]) -> dict[str, Path]:
    """Adapter name -> directory: each expert by skill name, the joint runs as joint_<budget>."""
    root = Path(root) / "models"
    dirs = {s: root / "experts" / s for s in skills}
    for budget_dir in sorted((root / "joint").glob("*")):
        if budget_dir.is_dir() and not budget_dir.name.endswith(".partial"):
            dirs[f"joint_{budget_dir.name}"] = budget_dir
    return dirs


def load_with_adapters(base_dir: str | Path, dirs: dict[str, Path]):
    """(peft model holding every adapter, tokenizer); a missing or mismatched adapter is a clear error."""
    from peft import PeftModel

    base, tok = load_on_device(base_dir)
    model = None
    for name, path in dirs.items():
        if not (path / "adapter_config.json").exists():
            raise AdapterError(f"{path}: no adapter here (adapter_config.json missing); run its stage 03 step")
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
            else:
                model.load_adapter(str(path), adapter_name=name)
        except Exception as e:
            raise AdapterError(f"{path}: cannot load adapter {name!r} onto {base_dir} ({type(e).__name__}: {e})") from None
    if model is None:
        raise AdapterError("no adapters to load")
    return model.eval(), tok


def score_matrix(model, tok, tests, names: list[str], ev, progress: bool = True) -> pd.DataFrame:
    """Long table (model, skill, n, accuracy, ci_low, ci_high, ece) for every adapter name on ``tests``."""
    rows = []
    for name in names:
        res = evaluate(model, tok, tests, batch_size=ev.batch_size, adapter_names=[name] * len(tests), progress=progress,
                       n_boot=ev.n_boot, n_bins=ev.ece_bins)
        per = res.per_skill()
        per.insert(0, "model", "base" if name == BASE_ADAPTER else name)
        rows.append(per)
    return pd.concat(rows, ignore_index=True)


def training_curves(dirs: dict[str, Path]) -> pd.DataFrame:
    frames = []
    for name, path in dirs.items():
        curve = pd.read_csv(path / "train_loss.csv")
        curve.insert(0, "model", name)
        frames.append(curve)
    return pd.concat(frames, ignore_index=True)


def training_info(dirs: dict[str, Path]) -> pd.DataFrame:
    return pd.DataFrame([{"model": n, **json.loads((p / "train_info.json").read_text())} for n, p in dirs.items()])
