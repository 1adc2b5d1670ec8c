"""Datasets on disk: load (checked), save (atomic), verify answers, and the evaluation sets.

Every stage reads what stage 01 (``lib/synth/datasets.py``) wrote through these functions,
so a missing, incomplete or corrupted dataset is one clear error naming the path.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import datasets as hf_datasets
from datasets import Dataset, DatasetDict, load_from_disk

from lib import skills as skill_lib
from lib.core.io import read_json, write_json

# Datasets loaded from disk would otherwise write cache-*.arrow files next to their data
# on every .map(), which changes a DVC-tracked output after its stage has finished.
hf_datasets.disable_caching()

SPLITS = ("train", "validation", "test")
COLUMNS = ("prompt", "answer", "skill", "family")


class DataError(RuntimeError):
    """A dataset on disk that is missing, incomplete or wrong; the message names the path."""


def save(ds: DatasetDict, path: Path) -> None:
    """Write atomically: a half-written directory is never left under the final name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load(path: str | Path, splits: tuple[str, ...] = (), verify_answers: bool = False) -> DatasetDict:
    """Load a dataset written by stage 01; clear error naming the path if it is missing or incomplete.

    ``verify_answers``: also check every stored answer of ``splits`` (all splits when none
    are named) against the skills' solvers (:func:`verify`), so a corrupted file is an error
    naming the file and row instead of silently wrong scores."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: dataset not found; run stage 01 (dvc repro synthesize)")
    try:
        ds = load_from_disk(str(path), keep_in_memory=True)
    except Exception as e:  # datasets raises several types for a damaged directory
        raise DataError(f"{path}: not a readable dataset ({type(e).__name__}: {e})") from None
    missing = [s for s in splits if s not in ds]
    if missing:
        raise DataError(f"{path}: split(s) {missing} missing (found {list(ds)}); rerun stage 01")
    if verify_answers:
        verify(DatasetDict({s: ds[s] for s in (splits or list(ds))}), path)
    return ds


def verify(ds: DatasetDict, path: str | Path) -> None:
    """Check every stored answer against the solvers; a wrong one is an error naming the file."""
    for split in ds:
        if "prompt" not in ds[split].column_names:
            continue
        for i, (p, a) in enumerate(zip(ds[split]["prompt"], ds[split]["answer"])):
            want = skill_lib.solve_any(p)
            if a != want:
                raise DataError(f"{path} [{split} row {i}]: answer {a!r} to {p!r} is wrong, the solver says {want!r}")


MANIFEST = "manifest.json"


def write_manifest(root: str | Path, composed: bool) -> None:
    write_json(Path(root) / MANIFEST, {"composed": composed})


def manifest(root: str | Path) -> dict:
    """What stage 01 wrote under ``root`` (``{"composed": bool}``); empty for datasets written
    by hand (tests) or before the manifest existed."""
    path = Path(root) / MANIFEST
    return read_json(path) if path.exists() else {}


def test_sets(root: str | Path, skills: SkillsParams, split: str = "test") -> dict[str, Dataset]:
    """The evaluation sets every stage scores on: all training skills' test splits together,
    the composed set and the held-out skills (the last two absent when not synthesized).
    Every reference answer is checked against the solvers first (``verify_answers``).

    Whether the composed set was synthesized is read from stage 01's ``manifest.json``, so a
    deleted ``datasets/composed`` is an error naming it rather than a study without it."""
    from datasets import concatenate_datasets

    root = Path(root) / "datasets"
    out = {"skills": concatenate_datasets([load(root / "skills" / s, (split,), verify_answers=True)[split]
                                           for s in skills.train])}
    if (root / "composed").exists() or manifest(root).get("composed"):
        out["composed"] = load(root / "composed", (split,), verify_answers=True)[split]
    held = [load(root / "heldout" / s, (split,), verify_answers=True)[split] for s in skills.heldout]
    if held:
        out["heldout"] = concatenate_datasets(held)
    return out
