"""Stage 06 training step: full fine-tuning of the base on each skill (the update grafting localizes).

    python -m lib.localize.finetune             -> models/finetuned/<skill>/ for every skill in skills.train
    python -m lib.localize.finetune <skill> ... -> only those

The skills train side by side in ``localize.workers`` spawned processes, one torch
thread each (so a model does not depend on the number of workers). A model already in
place that was made from the same inputs (its ``run_key.json``: params, data, base weights,
library versions) is kept, so the DVC stage, whose output persists between runs, retrains
only the skills whose inputs changed; a dropped skill's model is removed.

"Full" fine-tuning here means every weight of the **considered** parameters: the linear
weights of the transformer blocks named by ``experts.target_modules`` (by default q, k, v,
o, gate, up and down projections; 96% of the default scratch model's parameters). The
embeddings (tied with the LM head) and the RMS norms stay frozen, so the fine-tuned update
θ_ft − θ_pre lives exactly in the set the LoRA experts adapt, and grafting localizes the
full-FT update and the LoRA ΔW over the same parameters (a full mask then reproduces the
fine-tuned model exactly).

Training is trl's ``SFTTrainer`` (``lib.core.sft.LeanSFTTrainer``) without a peft config, with the experts' recipe (the same
SFT rows and completion-only loss, cosine schedule, early stopping on the logged training
loss) and the settings of ``localize.finetune``. The model is written with
``save_pretrained`` (safetensors) to ``<out>.partial`` and renamed at the end.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

from lib.cli import stage_command
from lib.core import config, data
from lib.core.training import (RUN_KEY, FiniteLossGuard, LossThresholdStop, check_finite, check_max_length,
                                count_parameters, finished_run, loss_history, one_cpu_thread,
                                publish_run, run_key, sft_rows, trainer_args)
from lib.localize.grafting import considered_names


def train_full(base_dir: Path, train, f, target_modules, out_dir: Path, progress: bool = True,
               resolved_params: dict | None = None) -> dict:
    """Fine-tune the considered weights of the base on ``train`` (prompt/answer rows); save under ``out_dir``."""
    from trl import SFTConfig

    from lib.core.modeling import load_on_device
    from lib.core.sft import LeanSFTTrainer

    key = run_key(base_dir, train, f, f.steps, f.seed, resolved_params)
    done = finished_run(out_dir, key, weights="model.safetensors")
    if done is not None:  # decided from files alone: the model is not loaded
        print(f"{out_dir}: already trained from the same inputs ({RUN_KEY}); kept", file=sys.stderr)
        return done
    model, tok = load_on_device(base_dir)
    tok.padding_side = "right"
    names = set(considered_names(model, target_modules))
    check_max_length(tok, train, f.max_length, "localize.finetune.max_length")
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    tmp = Path(str(out_dir) + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        args = SFTConfig(
            **trainer_args(tmp / "trainer", f.steps, f.lr, f.batch_size, f.seed, f.weight_decay, progress=progress),
            completion_only_loss=True, max_length=f.max_length, packing=False, gradient_checkpointing=False,
        )
        stop = LossThresholdStop(f.stop_loss, f.stop_window) if f.stop_loss else None
        trainer = LeanSFTTrainer(model=model, args=args, train_dataset=sft_rows(train), processing_class=tok,
                                 callbacks=[FiniteLossGuard(), *([stop] if stop else [])])
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        check_finite(trainer.model, str(out_dir))
        tok.padding_side = "left"
        tok.save_pretrained(str(tmp))
        hist = loss_history(trainer)
        info = {
            "steps": f.steps, "steps_run": trainer.state.global_step, "stopped_early": bool(stop and stop.stopped_at),
            "seed": f.seed, "seconds": round(seconds, 2), "trainable_params": count_parameters(trainer.model, True),
            "total_params": count_parameters(trainer.model), "considered": sorted(names),
            "final_loss": float(hist["loss"].iloc[-1]) if len(hist) else math.nan, "train_examples": len(train),
        }
        (tmp / RUN_KEY).write_text(json.dumps(key, indent=2, sort_keys=True))
        publish_run(tmp, out_dir, trainer.model, hist, info, resolved_params)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def run(skill: str, root: str | Path = ".", params: str = "params.yaml", profile: str | None = None,
        progress: bool = True) -> dict:
    one_cpu_thread()
    root = Path(root)
    cfg = config.load(["skills", "experts", "localize"], root / params, profile)
    skills, e, loc = cfg["skills"], cfg["experts"], cfg["localize"]
    if skill not in skills.train:
        raise config.ParamsError(f"{skill!r} is not a training skill; skills.train is {skills.train}")
    train = data.load(root / "datasets" / "skills" / skill, ("train",))["train"]
    resolved = {"localize.finetune": loc.finetune.model_dump(mode="json"),
                "experts.target_modules": list(e.target_modules), "skill": skill}
    return train_full(root / "models" / "base", train, loc.finetune, e.target_modules,
                      root / "models" / "finetuned" / skill, progress, resolved)


def _run_job(job: dict) -> dict:
    """A worker's entry point: :func:`run` without progress bars."""
    return run(job["skill"], job["root"], job["params"], job["profile"], progress=False)


def run_all(skills: list[str] | None = None, root: str | Path = ".", params: str = "params.yaml",
            profile: str | None = None, progress: bool = True) -> dict[str, dict]:
    """Fine-tune every skill in ``skills`` (default ``skills.train``, whose dropped skills'
    models are then removed) in ``localize.workers`` processes; each skill's info."""
    from lib.core.pool import pool_map, remove_stale

    root = Path(root)
    cfg = config.load(["skills", "localize"], root / params, profile)
    if "full_ft" not in cfg["localize"].sources:
        # Grafting only the LoRA experts' ΔW (a profile whose base is too large to fine-tune fully
        # on its machine): nothing to train; the folder stays, empty, as the stage's output.
        remove_stale(root / "models" / "finetuned", [])
        (root / "models" / "finetuned").mkdir(parents=True, exist_ok=True)
        return {}
    if skills is None:
        skills = list(cfg["skills"].train)
        remove_stale(root / "models" / "finetuned", skills)
    if cfg["localize"].workers <= 1:  # in this process, with progress bars
        return {s: run(s, root, params, profile, progress) for s in skills}
    jobs = [{"skill": s, "root": str(root.resolve()), "params": params, "profile": profile} for s in skills]
    return dict(zip(skills, pool_map(_run_job, jobs, cfg["localize"].workers)))


def main(argv: list[str] | None = None) -> int:
    return stage_command.main(
        argv, __doc__, lambda workdir, params, profile, skills: run_all(skills, root=workdir, params=params, profile=profile),
        lambda infos: "\n".join(f"{skill} {({k: v for k, v in info.items() if k != 'considered'})}"
                                for skill, info in infos.items()), skills=True)

if __name__ == "__main__":
    sys.exit(main())
