"""Work in spawned processes, and the outputs a persisted DVC stage must prune.

Used by every stage that trains several models side by side (the adapters, the levels, the
full fine-tunings): each worker sets its own torch threads, so what it makes does not
depend on the number of workers.
"""
from __future__ import annotations

import shutil
from pathlib import Path


def pool_map(fn, items: list, workers: int = 1, on_done=None) -> list:
    """``[fn(x) for x in items]``, in ``workers`` spawned processes when more than one (each
    worker sets its own torch threads); results in the order of ``items``. ``on_done(result)``
    is called as each result arrives, in that order (a progress bar)."""
    if workers <= 1 or len(items) <= 1:
        results = map(fn, items)
        pool = None
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=mp.get_context("spawn"))
        results = pool.map(fn, items)
    try:
        out = []
        for r in results:
            out.append(r)
            if on_done is not None:
                on_done(r)
        return out
    finally:
        if pool is not None:
            pool.shutdown()


def remove_stale(folder: Path, keep: list[str]) -> None:
    """Delete the adapters under ``folder`` that are not in ``keep`` (and their partial runs):
    a stage whose outputs DVC keeps between runs must not leave a dropped skill's expert behind."""
    if folder.is_dir():
        for d in folder.iterdir():
            if d.is_dir() and d.name.removesuffix(".partial") not in keep:
                shutil.rmtree(d)
