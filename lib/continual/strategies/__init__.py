"""Stage 05 strategies: one file per strategy, registered by name in ``STRATEGIES``.

Each module registers one function ``strategy(study, order_name, skills, seed)`` under the
name ``continual.strategies`` uses; it returns a :class:`lib.continual.runs.RunResult`.
``study`` is the per-process :class:`lib.continual.study.Study` (data, base model, caches,
evaluation); shared helpers are in ``_common.py``. Definitions of the measurements are in
``lib/continual/study.py``, the training recipe and the penalties in ``lib/continual/loop.py``.
A new strategy is one new file here.

* ``sequential_lora``: one LoRA (the experts' recipe), trained on task 1, continued on task 2, ...
* ``sequential_full``: the same with every weight of the base trainable (``continual.full_lr``).
* ``replay``: sequential LoRA; from task 2 on, ``replay.fraction`` of every batch is drawn
  from a buffer of ``replay.buffer`` training rows kept from each finished task.
* ``ewc`` / ``l2``: sequential LoRA with the EWC / L2-to-previous-weights penalty.
* ``olora``: a new LoRA per task, earlier ones frozen, orthogonality penalty on the A's.
* ``library_merge``: the stage-03 expert of every task seen so far (trained independently,
  never retrained here), merged in weight-update space with ``library.merge``; the merge's
  λ is chosen on the seen skills' validation prompts from ``library.lam_grid`` after every
  task (one λ in the grid = fixed).
* ``library_route``: the same experts behind lib/route/task_router.py's ``TaskRouter``, retrained
  after every task on ``library.router.n_train`` training prompts of each seen skill.
* ``multitask``: one LoRA trained from scratch after every task on all skills seen so far
  (their training sets concatenated and shuffled), for ``steps_per_task × tasks seen``
  steps (``multitask_budget: cumulative``, the steps a sequential run has taken by then) or
  ``steps_per_task`` (``per_task``).

Work shared, since the results are identical: every LoRA strategy's first task (same init,
same batches: replay and penalties only act from task 2 on), and multitask's first row,
is one training per seed and first skill; rows for the same set of seen skills are computed
once (multitask, library). Each run's ``wall_s`` still counts the shared work, as if it had
run alone.
"""
from lib.core.registry import Registry

STRATEGIES = Registry("continual strategy", package="lib.continual.strategies")
