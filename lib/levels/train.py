"""Stage ``level@<fraction>``: the study's training again on a base whose corpus holds the
training skills' alias lines ('esrever abc = cba') in another share of its lines (issue 15's
axis); stage ``level_score@<fraction>`` (:mod:`lib.levels.score`) scores it.

    python -m lib.levels.train 0.35   -> models/levels/0.35/{corpus, base, experts/<skill>, joint/total_steps}

Everything but ``synthesize.corpus_skill_fraction`` is the main study's: the same corpus knobs,
pretraining, skill datasets (datasets/skills: they do not depend on the corpus), expert recipe
and seed (``experts``, one seed per level) and joint LoRA at the total steps. The main study's
base is the level ``synthesize.corpus_skill_fraction``; :mod:`lib.levels.curve` puts the
levels together.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from lib.core import config, data, io
from lib.levels.common import cli, SECTIONS, level_dir, parse_fraction


def build_base(cfg: dict, f: float, out: Path, progress: bool = True) -> dict:
    """The level's corpus (out/corpus) and base (out/base), pretrained as stage 02's."""
    from lib.experts.base import prepare_base
    from lib.synth.datasets import corpus

    syn = cfg["synthesize"].model_copy(update={"corpus_skill_fraction": f})
    data.save(corpus(cfg["skills"], syn), out / "corpus")
    info, _ = prepare_base(cfg["model"], out / "corpus", out / "base", progress=progress)
    return info


def train(fraction: str, root: str | Path = ".", params: str = "params.yaml", profile: str | None = None,
          progress: bool = True) -> dict:
    """The level's corpus and base, then every expert and the joint LoRA (``levels.workers`` at a time)."""
    from lib.experts.train import train_set

    root = Path(root)
    cfg = config.load(SECTIONS, root / params, profile)
    f = parse_fraction(fraction, cfg["levels"])
    out = level_dir(root, fraction)
    t0 = time.perf_counter()
    base_info = build_base(cfg, f, out, progress)
    t1 = time.perf_counter()
    e = cfg["experts"]
    steps = train_set(root, cfg["skills"].train, e, e.seed, out / "base", out / "corpus", out,
                      cfg["levels"].workers, progress)
    info = {"fraction": f, "base_final_loss": base_info.get("final_loss"), "steps_run": steps,
            "seconds": {"base": round(t1 - t0, 1), "train": round(time.perf_counter() - t1, 1)}}
    io.write_json(out / "level_info.json", info)
    return info


def main(argv: list[str] | None = None) -> int:
    return cli(argv, __doc__, train, lambda found: found)


if __name__ == "__main__":
    sys.exit(main())
