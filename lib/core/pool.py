"""Work in spawned processes, and the outputs a persisted DVC stage must prune.

Used by every stage that trains several models side by side (the adapters, the levels, the
full fine-tunings): each worker sets its own torch threads, so what it makes does not
depend on the number of workers.
"""
from __future__ import annotations

import shutil
from pathlib import Path


def pool_map(fn, items: list, workers: int = 1) -> list:
    """``[fn(x) for x in items]``, in ``workers`` spawned processes when more than one (each
    worker sets its own torch threads); results in the order of ``items``."""
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(fn, items))


def remove_stale(folder: Path, keep: list[str]) -> None:
    """Delete the adapters under ``folder`` that are not in ``keep`` (and their partial runs):
    a stage whose outputs DVC keeps between runs must not leave a dropped skill's expert behind."""
    if folder.is_dir():
        for d in folder.iterdir():
            if d.is_dir() and d.name.removesuffix(".partial") not in keep:
                shutil.rmtree(d)
