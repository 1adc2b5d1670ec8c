"""Routing between LoRA skill experts, one module per router, and the registry stage 04 picks them from.

Issue 4 compares two ways of using several experts at once. Merging (``lib/merge/task_vectors.py``)
combines them in weight-update space once, for every input. The methods here decide **per
example** instead, and all of them run through the evaluation harness unchanged
(``lib.core.evaluation.evaluate``), so their numbers are comparable with the merges':

- :class:`~lib.route.task_router.TaskRouter` (``task_router.py``): a small classifier that reads the prompt and picks one expert, as
  in task-level mixture-of-experts routing ("Beyond Distillation: Task-level
  Mixture-of-Experts for Efficient Inference", Kudugunta et al. 2021: route a whole
  example by its task, not each token, so only one expert is needed per example). Its
  input is the mean-pooled hidden state of the *base* model over the prompt's tokens, so
  the representation does not depend on which experts exist. Plugs into
  ``evaluate(..., router=task_router.router(model, tok))`` (hard routing through peft's
  mixed-adapter batches).
- :class:`~lib.route.soft_mixture.SoftMixture` (``soft_mixture.py``): every expert's LoRA is active at once and each one's output is
  scaled per example by a weight (the router's top-k probabilities, or any fixed weights,
  LoraHub-like). For LoRA on a linear layer the layer output is
  ``W x + Σ_i w_i ΔW_i x``: a per-example *linear merge* of the experts' updates, applied
  at every layer (the soft mixture of LoRA outputs of e.g. MoLE, Wu et al. 2024, at task
  level rather than per token).
- :class:`~lib.route.ensemble.LogitEnsemble` (``ensemble.py``): output ensembling. Each expert runs as its own model and the
  next-token distribution is the *average of the experts' probabilities* (the classic
  predictive-distribution average of ensembles, e.g. Lakshminarayanan et al. 2017); greedy
  decoding continues from the ensemble's argmax. Costs one forward per expert per step.

What is whose: peft provides the multi-adapter LoRA forward (several active adapters are
summed), mixed-adapter batches (``adapter_names=``), ``disable_adapter``; transformers the
models, the KV cache and ``generate``. Written here because neither offers it: the
prompt-feature extraction and classifier, per-example weighting of each adapter's output
(forward hooks on ``lora_A``), and the multi-cache greedy loop of the ensemble.

peft behaviour worth knowing (0.21.2), handled here:

- ``PeftModel.disable_adapter()`` re-enables the adapters on exit through ``set_adapter``,
  which sets ``requires_grad=True`` on the active adapter's weights even if they were
  frozen before; ``base_model.set_adapter([...])`` likewise changes ``requires_grad``.
  Every function here snapshots and restores ``requires_grad``.
- ``model.base_model.set_adapter(list)`` activates several LoRAs (their outputs are summed)
  but leaves ``PeftModel.active_adapter`` (a plain attribute) as it was; only the tuner
  layers and ``model.base_model.active_adapter`` change. Both are restored after a call.
- A merged adapter (``merge_adapter``) runs only the base layer, so a hook on ``lora_A``
  would silently do nothing: :class:`SoftMixture` refuses merged models.

Arrow (``arrow.py``) and LoraHub (``lorahub.py``) are the zero-shot and few-shot routers;
``routers/`` registers, one file per router, how stage 04 builds each system it scores
(the names ``merge_route.routers`` in params.yaml lists). ``common.py`` holds what they share.
"""
