"""Stage ``teacher_data``: SELMA's question on this testbed, does data a language model writes
for itself teach the skill as well as programmatic data?

    python -m lib.synth.teacher_study   -> models/teacher_data/{datasets/<skill>, <seed>/<skill>}
                                           metrics/teacher_data.json

For each skill of ``synthesize.teacher.compare_skills`` the teacher (``synthesize.teacher.model``,
e.g. SmolLM2-135M-Instruct from its packaged GGUF file) writes prompts in context from the
skill's seed exemplars in ``data/skills`` (:func:`lib.synth.teacher.generate_prompts`: parser
check, exact and ROUGE-L near-duplicate rejection; answers from the solver). Stage 01's rules
make the skill's splits from them (:func:`lib.synth.datasets.skill_splits`: the test split is
the study's own programmatic one, never a teacher prompt). Then, on every seed of the study,
an expert of the study's recipe (``experts``: rank, steps, replay, seed) trains on the teacher's
training split, and both it and the study's expert of that seed (trained on programmatic
prompts, stage ``adapters``) answer the same test prompts.

The comparison is paired by seed: per seed, the mean over the compared skills of
teacher-data accuracy minus programmatic-data accuracy; its Student-t 95% interval over seeds
is the claim's input (:func:`lib.report.claims.teacher_data`). With ``compare_skills: []``
(the default profile: its scratch base cannot write prompts) the stage records that it skipped.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from lib.cli import stage_command
from lib.core import config, data, io
from lib.experts.seeds import experts_dir, study_seeds

SECTIONS = ["skills", "synthesize", "experts", "replicates", "evaluation"]


def out_dir(root: Path) -> Path:
    return root / "models" / "teacher_data"


def metrics_path(root: Path) -> Path:
    return root / "metrics" / "teacher_data.json"


def generate(root: Path, cfg: dict, progress: bool = True) -> dict:
    """Every compared skill's teacher prompts, made into splits under models/teacher_data/datasets;
    returns each skill's generation report (counts, reasons, examples) with its split sizes."""
    from tqdm.auto import tqdm

    from lib.synth.datasets import load_cards, save, skill_splits
    from lib.synth.teacher import generate_prompts, load_teacher

    skills, syn = cfg["skills"], cfg["synthesize"]
    names = list(syn.teacher.compare_skills)
    cards = load_cards(root / "data", names)
    model, tok = load_teacher(syn.teacher)
    reports = {}
    for name in tqdm(names, desc="teacher generation", disable=not progress):
        exemplars = [ex["prompt"] for ex in cards[name]["exemplars"]]
        t0 = time.perf_counter()
        prompts, report = generate_prompts(name, exemplars, model, tok, syn.teacher, syn.seed)
        # One validation prompt, not synthesize.n_val: nothing here reads the validation split, and
        # every teacher prompt held back there would be one fewer to train on.
        ds = skill_splits(name, skills, syn.model_copy(update={"n_val": 1}), prompts)
        save(ds, out_dir(root) / "datasets" / name)
        report.pop("skill")
        reports[name] = {**report, "splits": {s: len(ds[s]) for s in ds}, "n_exemplars": len(exemplars),
                         "seconds": round(time.perf_counter() - t0, 1)}
    return reports


def train(root: Path, cfg: dict, progress: bool = True) -> dict[str, int | None]:
    """The teacher-data experts of every compared skill on every seed (the study's recipe and step
    caps), in ``replicates.workers`` processes; the steps each ran, by ``<seed>/<skill>``."""
    from lib.experts.train import expert_steps, run_jobs

    e = cfg["experts"]
    common = {"root": str(root), "experts": e.model_dump(mode="json"), "base": str(root / "models" / "base"),
              "corpus": str(root / "datasets" / "corpus")}
    jobs = [{**common, "name": s, "seed": seed, "steps": expert_steps(e, s), "skills": [s],
             "data": str(out_dir(root) / "datasets" / s), "out": str(out_dir(root) / str(seed) / s)}
            for seed in study_seeds(cfg) for s in cfg["synthesize"].teacher.compare_skills]
    infos = run_jobs(jobs, cfg["replicates"].workers, progress)
    return {f"{j['seed']}/{j['name']}": i.get("steps_run") for j, i in zip(jobs, infos)}


def score(root: Path, cfg: dict, progress: bool = True) -> dict:
    """Accuracy on each compared skill's test prompts per seed: ``{"teacher": {seed: {skill: acc}},
    "programmatic": ...}``. Per seed the base is loaded once and every adapter attached to it."""
    from peft import PeftModel

    from lib.core.evaluation import evaluate
    from lib.core.modeling import load_on_device

    e, names = cfg["experts"], list(cfg["synthesize"].teacher.compare_skills)
    found: dict[str, dict] = {"teacher": {}, "programmatic": {}}
    tests = {s: data.load(root / "datasets" / "skills" / s, ("test",))["test"] for s in names}
    for seed in study_seeds(cfg):
        paths = {(kind, s): path for s in names for kind, path in
                 (("teacher", out_dir(root) / str(seed) / s), ("programmatic", experts_dir(root, seed, e.seed) / s))}
        base, tok = load_on_device(root / "models" / "base")
        model = None
        for (kind, skill), path in paths.items():
            name = f"{kind}_{skill}"
            if model is None:
                model = PeftModel.from_pretrained(base, str(path), adapter_name=name).eval()
            else:
                model.load_adapter(str(path), adapter_name=name)
            model.set_adapter(name)
            res = evaluate(model, tok, tests[skill], settings=cfg["evaluation"], progress=progress)
            found[kind].setdefault(str(seed), {})[skill] = round(float(res.accuracy), 4)
    return found


def summarise(acc: dict, skills: list[str]) -> dict:
    """Per seed the mean over skills of each kind and their difference (teacher − programmatic);
    Student-t 95% intervals over seeds, and each skill's mean over seeds."""
    from lib.core.stats import t_interval

    seeds = list(acc["teacher"])
    mean = {k: {s: sum(acc[k][s][x] for x in skills) / len(skills) for s in seeds} for k in acc}
    diff = {s: mean["teacher"][s] - mean["programmatic"][s] for s in seeds}
    r4 = lambda d: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}  # noqa: E731
    return {
        "accuracy": {k: r4(t_interval(list(mean[k].values()))) for k in acc},
        "difference": {**r4(t_interval(list(diff.values()))), "per_seed": {s: round(v, 4) for s, v in diff.items()}},
        "per_skill": {x: {k: round(sum(acc[k][s][x] for s in seeds) / len(seeds), 4) for k in acc} for x in skills},
        "per_seed": acc,
    }


def run(root: str | Path = ".", params: str = "params.yaml", profile: str | None = None, progress: bool = True) -> dict:
    root = Path(root)
    cfg = config.load(SECTIONS, root / params, profile)
    syn = cfg["synthesize"]
    if not syn.teacher.compare_skills:
        shutil.rmtree(out_dir(root), ignore_errors=True)
        out_dir(root).mkdir(parents=True)
        found = {"skipped": "synthesize.teacher.compare_skills is empty"}
        io.write_json(metrics_path(root), found)
        return found
    if syn.source == "teacher":
        raise config.ParamsError("synthesize.source is 'teacher': the study's experts already train on teacher "
                                 "prompts, so stage teacher_data has no programmatic experts to compare with; "
                                 "use source: programmatic (or compare_skills: [])")
    t0 = time.perf_counter()
    reports = generate(root, cfg, progress)
    t1 = time.perf_counter()
    steps = train(root, cfg, progress)
    t2 = time.perf_counter()
    acc = score(root, cfg, progress)
    found = {"teacher": syn.teacher.model, "skills": list(syn.teacher.compare_skills), "generation": reports,
             **summarise(acc, list(syn.teacher.compare_skills)), "steps_run": steps,
             "seconds": {"generate": round(t1 - t0, 1), "train": round(t2 - t1, 1),
                         "score": round(time.perf_counter() - t2, 1)}}
    io.write_json(metrics_path(root), found)
    return found


def main(argv: list[str] | None = None) -> int:
    from lib.experts.gguf import GGUFError

    return stage_command.main(argv, __doc__, run, lambda found: {k: found[k] for k in ("skipped", "accuracy", "difference")
                                                                if k in found}, errors=(GGUFError,))

if __name__ == "__main__":
    sys.exit(main())
