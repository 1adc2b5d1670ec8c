"""Stage ``level_score@<fraction>``: score a level trained by stage ``levels`` (:mod:`lib.levels.train`).

    python -m lib.levels.score 0.35   -> metrics/levels/0.35.json

The base (accuracy and well-formed answers per skill), every expert on its own skill, the joint
LoRA at the total steps and ``levels.merges`` (λ chosen on validation from
``merge_route.lam_grid``), on the skills' test prompts, as stage 04 scores them (normalised
accuracy with 95% prompt-bootstrap intervals). A separate stage from the training so that a
merge parameter rescores a level without retraining it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lib.core import config, data, io
from lib.levels.common import cli, SECTIONS, level_dir, metrics_path, parse_fraction


def score(cfg: dict, out: Path, root: Path = Path(".")) -> dict:
    """The level's base, experts, joint LoRA and merges on the skills' test prompts."""
    from lib.experts.base import well_formed
    from lib.merge import stage as MS

    merge_cfg = {**cfg, "merge_route": cfg["merge_route"].model_copy(update={"merges": cfg["levels"].merges})}
    names = cfg["skills"].train
    dirs = {s: out / "experts" / s for s in names} | {"joint_total_steps": out / "joint" / "total_steps"}
    st = MS.load(merge_cfg, out / "base", dirs, root, test_sets=("skills",))
    expert_acc = MS.score_references(st)
    MS.score_merges(st)
    board = st.bench.leaderboard(expert_acc).set_index("system")
    per = st.bench.per_skill()
    base_acc = per[per.system == "base"].set_index("skill").accuracy
    wf = well_formed(st.bench.results[("base", "skills")].examples)
    systems = {name: {k: round(float(board.loc[name, k]), 4) for k in ("norm_acc", "norm_lo", "norm_hi", "mean_acc")}
               for name in ["joint_total_steps", *(f"merge:{m}" for m in cfg["levels"].merges)]}
    return {"base": {"accuracy": {s: float(base_acc[s]) for s in names}, "well_formed": {s: float(wf[s]) for s in names},
                     "max_accuracy": float(base_acc.max())},
            "expert_own": expert_acc, "systems": systems, "chosen_lambda": st.found["chosen_lambda"]}


def score_level(fraction: str, root: str | Path = ".", params: str = "params.yaml", profile: str | None = None) -> dict:
    """Score the trained level (:func:`score`) into metrics/levels/<fraction>.json."""
    root = Path(root)
    cfg = config.load(SECTIONS, root / params, profile)
    f = parse_fraction(fraction, cfg["levels"])
    out = level_dir(root, fraction)
    if not (out / "level_info.json").is_file():
        raise data.DataError(f"{out}: level not trained; run `dvc repro levels`")
    t0 = time.perf_counter()
    found = score(cfg, out, root)
    trained = json.loads((out / "level_info.json").read_text())
    found.update(fraction=f, base_final_loss=trained["base_final_loss"], steps_run=trained["steps_run"],
                 seconds={**trained["seconds"], "score": round(time.perf_counter() - t0, 1)})
    io.write_json(metrics_path(root, fraction), found)
    return found


def main(argv: list[str] | None = None) -> int:
    return cli(argv, __doc__, score_level, lambda found: {k: found[k] for k in ("fraction", "systems")})


if __name__ == "__main__":
    sys.exit(main())
