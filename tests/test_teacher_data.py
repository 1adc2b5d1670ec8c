"""Stage teacher_data (issue 17, SELMA's question): experts on teacher-written prompts against the
study's experts on programmatic ones. The summary on constructed numbers; the skipped and refused
paths; the whole stage on the smoke project with a tiny teacher trained to write `reverse` prompts."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import smoke_params, train_tiny_teacher

from lib.core import config, data
from lib.synth import teacher_study as TS


def test_the_summary_pairs_seeds_and_averages_skills():
    acc = {"teacher": {"0": {"a": 0.5, "b": 0.7}, "1": {"a": 0.6, "b": 0.8}, "2": {"a": 0.4, "b": 0.6}},
           "programmatic": {"0": {"a": 0.9, "b": 0.9}, "1": {"a": 0.8, "b": 0.8}, "2": {"a": 1.0, "b": 0.6}}}
    s = TS.summarise(acc, ["a", "b"])
    assert s["difference"]["per_seed"] == {"0": -0.3, "1": -0.1, "2": -0.3}
    assert s["difference"]["mean"] == pytest.approx(-0.7 / 3, abs=1e-4)
    assert s["difference"]["lo"] < s["difference"]["mean"] < s["difference"]["hi"]  # Student-t over 3 seeds
    assert s["difference"]["n"] == 3
    assert s["accuracy"]["teacher"]["mean"] == pytest.approx(0.6, abs=1e-4)
    assert s["per_skill"]["b"] == {"teacher": 0.7, "programmatic": pytest.approx(0.7667, abs=1e-4)}


def _params(root, **teacher):
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["synthesize"]["teacher"].update(teacher)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_no_compared_skills_records_a_skip(workdir):
    assert TS.run(workdir, progress=False) == {"skipped": "synthesize.teacher.compare_skills is empty"}
    assert json.loads((workdir / "metrics" / "teacher_data.json").read_text())["skipped"]


def test_bad_comparisons_are_refused_with_the_reason(workdir):
    _params(workdir, compare_skills=["rotate"], model="x")
    with pytest.raises(config.ParamsError, match=r"compare_skills \['rotate'\] not in skills.train"):
        TS.run(workdir, progress=False)
    _params(workdir, compare_skills=["inc"], model=None)
    with pytest.raises(config.ParamsError, match="teacher.model is not set"):
        TS.run(workdir, progress=False)
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["synthesize"].update(source="teacher", teacher={**raw["synthesize"]["teacher"], "model": "x"})
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(config.ParamsError, match="already train on teacher prompts"):
        TS.run(workdir, progress=False)


def test_the_stage_on_the_smoke_project(project, tmp_path, one_thread):
    """A tiny teacher writes `reverse` prompts; a teacher-data expert per seed trains on them (not
    on the test prompts) and is scored beside the study's expert of that seed."""
    root = tmp_path / "project"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns(".dvc", "reports"))
    train_tiny_teacher(tmp_path / "teacher", "reverse")
    _params(root, model=str(tmp_path / "teacher"), compare_skills=["reverse"], n_candidates=64, batch_size=32,
            max_new_tokens=16)
    found = TS.run(root, progress=False)
    seeds = [str(s) for s in [smoke_params(root)["experts"]["seed"], *smoke_params(root)["replicates"]["seeds"]]]
    gen = found["generation"]["reverse"]
    assert gen["generated"] == 64 and gen["kept"] > 0 and gen["splits"]["validation"] == 1
    assert set(found["per_seed"]["teacher"]) == set(found["per_seed"]["programmatic"]) == set(seeds)
    assert set(found["steps_run"]) == {f"{s}/reverse" for s in seeds}
    for s in seeds:
        d = found["per_seed"]["teacher"][s]["reverse"] - found["per_seed"]["programmatic"][s]["reverse"]
        assert found["difference"]["per_seed"][s] == pytest.approx(d, abs=1e-4)
        assert (root / "models" / "teacher_data" / s / "reverse" / "adapter_config.json").is_file()
    trained = data.load(root / "models" / "teacher_data" / "datasets" / "reverse", ("train", "test"))
    test = data.load(root / "datasets" / "skills" / "reverse", ("test",))["test"]
    assert list(trained["test"]["prompt"]) == list(test["prompt"])  # the same test prompts as the study's
    assert not set(trained["train"]["prompt"]) & set(test["prompt"])
    assert json.loads((root / "metrics" / "teacher_data.json").read_text())["difference"] == found["difference"]
