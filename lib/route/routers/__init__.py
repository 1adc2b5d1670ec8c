"""The routers stage 04 scores: one file per router, registered by the name params.yaml uses.

Each registers a generator ``build(stage)`` that yields the :class:`lib.core.bench.System`
objects to score, built from the stage's shared state (:class:`lib.merge.stage.MergeRoute`:
the peft model holding every expert, a clean base, the task vectors, the validation and
test sets, the ``merge_route`` params). Systems are yielded one at a time so each is scored
before the next is built, as a reader would do it by hand. A new router is one new file
here plus its name in ``merge_route.routers``.
"""
from lib.core.registry import Registry

ROUTERS = Registry("router", package="lib.route.routers")
