"""Strategy ``library_merge``: the stage-03 experts of the tasks seen so far, merged in weight-update space."""
from __future__ import annotations

import time

import numpy as np

from lib.continual.strategies import STRATEGIES
from lib.continual.strategies._common import result


@STRATEGIES.register("library_merge", paper='Li et al. 2024, "SELMA: Learning and Merging Skill-Specific '
                     'Text-to-Image Experts with Auto-Generated Data" (one expert per skill, merged; the merge '
                     "is continual.library.merge's method)", url="https://arxiv.org/abs/2403.06952")
def library_merge(study, order, skills, seed):
    """The stage-03 expert of every task seen so far (trained independently, never retrained
    here), merged with ``library.merge``; its λ is chosen on the seen skills' validation
    prompts from ``library.lam_grid`` after every task (one λ in the grid = fixed). Not
    random unless the merge method is (then the run's seed is the merge's)."""
    from lib.merge import task_vectors as M
    from lib.merge.leaderboard import choose_lambda
    from lib.merge.methods import MERGE_METHODS

    lib, p = study.library(), study.c.library
    rows, wall, lams = [], 0.0, []
    for i in range(1, len(skills) + 1):
        seen = skills[:i]
        key = ("merge", frozenset(seen), seed if MERGE_METHODS.get(p.merge).random else None)
        if key not in lib["rows"]:
            tvs = {t: lib["tvs"][t] for t in seen}
            val = study.val[study.val.skill.isin(seen)]

            def build(lam):
                weights = None if p.merge == "linear" else [lam] * len(seen)
                merged = M.merge_task_vectors(tvs, p.merge, weights=weights, seed=seed, **M.method_kwargs(p.merge, p))
                return M.apply_merged(study.base, merged)

            def score(model):
                return float(np.mean(list(study.accuracies(model, val).values())))

            t0 = time.perf_counter()
            grid = [1.0] if p.merge == "linear" else p.lam_grid
            lam, model, _, _ = choose_lambda(build, grid, score)
            lib["rows"][key] = {"row": study.accuracies(model, study.test), "seconds": time.perf_counter() - t0, "lam": lam}
        hit = lib["rows"][key]
        rows.append(hit["row"])
        lams.append(hit["lam"])
        wall += hit["seconds"] + lib["train_s"][skills[i - 1]]
    trainable = max(lib["params"][t] for t in skills)
    held = study.base_params + sum(lib["params"][t] for t in skills)
    return result(study, "library_merge", order, skills, seed, rows, [], trainable, held, wall, lam=lams,
                  expert_steps=[lib["steps"][t] for t in skills])
