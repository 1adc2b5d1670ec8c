"""Merge methods in weight-update space: one file per method, registered by name.

Each module registers one function ``method(deltas, weights=None, *, params...) -> ΔW`` that
combines the experts' updates of one module (a list of same-shape tensors). Its keyword
parameters are the params.yaml keys it reads (``density``, ``beta``, ...). A new method is
one new file here; ``lib.merge.task_vectors.merge_task_vectors`` runs it over every module.
"""
from lib.core.registry import Registry

MERGE_METHODS = Registry("merge method", package="lib.merge.methods")
