"""Issue 15's levels axis: params, the per-level table and its verdicts, the stage's argument."""
from __future__ import annotations

import json

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


def test_the_stage_argument_must_be_a_listed_level():
    levels = config.make(config.LevelsParams, fractions=[0.0, 0.35])
    assert LR.parse_fraction("0.35", levels) == 0.35
    with pytest.raises(config.ParamsError, match=r"not in levels.fractions \[0.0, 0.35\]"):
        LR.parse_fraction("0.5", levels)
    with pytest.raises(config.ParamsError, match="not a number"):
        LR.parse_fraction("half", levels)


def level_metrics(merge: tuple[float, float, float], joint: tuple[float, float, float], base_max=0.0, expert_min=0.95,
                  ties=None):
    systems = {"joint_total_steps": joint, "merge:task_arithmetic": merge, "merge:ties": ties or (0.1, 0.05, 0.15)}
    return {"base": {"accuracy": {"a": base_max, "b": 0.0}, "well_formed": {"a": 1.0, "b": 0.5}, "max_accuracy": base_max},
            "expert_own": {"a": 1.0, "b": expert_min},
            "systems": {k: {"norm_acc": v[0], "norm_lo": v[1], "norm_hi": v[2], "mean_acc": v[0]} for k, v in systems.items()}}


def write_project(tmp_path, levels: dict, main: dict):
    (tmp_path / "metrics" / "levels").mkdir(parents=True)
    for f, m in levels.items():
        (tmp_path / "metrics" / "levels" / f"{f}.json").write_text(json.dumps(m))
    mr = {"systems": {k: {**v, "kind": "merge"} for k, v in main["systems"].items()}, "expert_own": main["expert_own"]}
    (tmp_path / "metrics" / "merge_route.json").write_text(json.dumps(mr))
    (tmp_path / "metrics" / "base.json").write_text(json.dumps({"accuracy": main["base"]["accuracy"],
                                                               "well_formed": main["base"]["well_formed"]}))


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
    with pytest.raises(MissingMetric, match=r"metrics/levels/0.35.json: missing"):
        LV.table(tmp_path, [0.0, 0.35], 0.7, MERGES)
    with pytest.raises(MissingMetric, match=r"no system 'merge:dare_ties'"):
        LV.table(tmp_path, [0.0], 0.7, ["task_arithmetic", "dare_ties"])
