"""params.yaml validation: every bad value stops with one message naming key, value and what is allowed."""
from __future__ import annotations


import pytest
import yaml

from conftest import PARAMS, PROFILES, REPO, set_dotted
from lib.core import config
from lib.cli import run_stage
from lib import skills as skill_lib
from lib.core.stages import get_stage

SECTIONS = list(get_stage("synthesize").sections)
KNOWN_SKILLS = sorted(skill_lib.all_skills())


def _base() -> dict:
    return yaml.safe_load(PARAMS.read_text())


_set = set_dotted


def _write(tmp_path, raw: dict):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# (id, how to break params.yaml, substrings the message must contain)
BAD = [
    ("typo key", lambda r: _set(r, "synthesize.n_trian", 5),
     ["synthesize.n_trian", "unknown key", "allowed keys", "n_train", "n_val", "corpus_size"]),
    ("nested typo", lambda r: _set(r, "synthesize.teacher.n_shot", 2),
     ["synthesize.teacher.n_shot", "unknown key", "n_shots", "rouge_l_max"]),
    ("skills typo", lambda r: _set(r, "skills.trian", ["add"]),
     ["skills.trian", "unknown key", "train", "heldout", "difficulty"]),
    ("wrong type", lambda r: _set(r, "synthesize.n_train", "many"),
     ["synthesize.n_train", "'many'", "integer"]),
    ("n_train 0", lambda r: _set(r, "synthesize.n_train", 0),
     ["synthesize.n_train", "bad value 0", "greater than or equal to 1"]),
    ("rouge above 1", lambda r: _set(r, "synthesize.teacher.rouge_l_max", 1.5),
     ["synthesize.teacher.rouge_l_max", "1.5", "less than or equal to 1"]),
    ("temperature 0", lambda r: _set(r, "synthesize.teacher.temperature", 0),
     ["synthesize.teacher.temperature", "bad value 0", "greater than 0"]),
    ("top_p 0", lambda r: _set(r, "synthesize.teacher.top_p", 0),
     ["synthesize.teacher.top_p", "bad value 0", "greater than 0"]),
    ("unknown train skill", lambda r: _set(r, "skills.train", ["add", "addd"]),
     ["skills.train", "unknown skill 'addd'", "known skills", *KNOWN_SKILLS]),
    ("unknown heldout skill", lambda r: _set(r, "skills.heldout", ["mindigt"]),
     ["skills.heldout", "unknown skill 'mindigt'", *KNOWN_SKILLS]),
    ("unknown difficulty skill", lambda r: _set(r, "skills.difficulty.rverse", 3),
     ["skills.difficulty", "unknown skill 'rverse'", "known skills", *KNOWN_SKILLS]),
    ("difficulty 0", lambda r: _set(r, "skills.difficulty.add", 0),
     ["skills.difficulty", "'add'", "must be >= 1", "got 0"]),
    ("default difficulty 0", lambda r: _set(r, "skills.difficulty.default", 0),
     ["skills.difficulty", "'default'", "must be >= 1"]),
    ("difficulty not int", lambda r: _set(r, "skills.difficulty.add", "hard"),
     ["skills.difficulty.add", "'hard'", "integer"]),
    ("empty train", lambda r: _set(r, "skills.train", []),
     ["skills.train", "bad value []", "at least 1 item"]),
    ("train listed twice", lambda r: _set(r, "skills.train", ["add", "add"]),
     ["skills.train", "listed twice"]),
    ("train and heldout", lambda r: _set(r, "skills.heldout", [r["skills"]["train"][0]]),
     ["skills", "both trained on and held out", repr(_base()["skills"]["train"][0])]),
    ("missing train", lambda r: {**r, "skills": {k: v for k, v in r["skills"].items() if k != "train"}},
     ["skills.train", "required key is missing"]),
    ("teacher without model", lambda r: _set(_set(r, "synthesize.source", "teacher"), "synthesize.teacher.model", None),
     ["synthesize", "source is 'teacher'", "teacher.model is not set"]),
    ("unknown source", lambda r: _set(r, "synthesize.source", "programatic"),
     ["synthesize.source", "'programatic'", "'programmatic'", "'teacher'"]),
    ("unknown section", lambda r: {**r, "synthesise": {"n_train": 5}},
     ["unknown section", "synthesise", "known sections", "skills", "synthesize"]),
    ("section not a mapping", lambda r: {**r, "synthesize": [1, 2]},
     ["section 'synthesize' must be a mapping"]),
]


@pytest.mark.parametrize("mutate,needles", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_params_message(tmp_path, mutate, needles):
    path = _write(tmp_path, mutate(_base()))
    with pytest.raises(config.ParamsError) as e:
        config.load(SECTIONS, path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


@pytest.mark.parametrize(
    "section,values,needles",
    [
        ("synthesize", {"n_trian": 5}, ["synthesize.n_trian", "unknown key", "n_train"]),
        ("synthesize", {"teacher": {"n_shot": 1}}, ["synthesize.teacher.n_shot", "n_shots"]),
        ("synthesize", {"n_test": -3}, ["synthesize.n_test", "-3"]),
        ("skills", {"train": ["nope"]}, ["skills.train", "'nope'", *KNOWN_SKILLS]),
        ("sklils", {}, ["unknown section 'sklils'", "known sections", "skills", "synthesize"]),
        ("merge_route", {"merges": ["ties", "tie"]}, ["merge_route.merges", "unknown merge method ['tie']", "task_arithmetic", "breadcrumbs"]),
        ("merge_route", {"peft_merges": ["svd", "svd"]}, ["merge_route.peft_merges", "listed twice"]),
        ("merge_route", {"peft_merges": ["concat"]}, ["unknown peft combination type ['concat']", "cat", "ties_svd"]),
        ("merge_route", {"routers": ["arow"]}, ["merge_route.routers", "unknown router ['arow']", "arrow", "lorahub", "ensemble"]),
        ("merge_route", {"density": 1.5}, ["merge_route.density", "1.5", "less than or equal to 1"]),
        ("merge_route", {"density": 0.5, "beta": 0.6}, ["breadcrumbs needs beta + density <= 1"]),
        ("merge_route", {"both_trim_scopes": ["dare_ties"]}, ["both_trim_scopes", "['dare_ties'] must be in merges", "'ties'"]),
        ("merge_route", {"merges": ["task_arithmetic"], "both_trim_scopes": ["ties"]}, ["both_trim_scopes", "['ties'] must be in merges"]),
        ("merge_route", {"density": 0.1}, ["della needs density ± epsilon inside (0, 1)"]),
        ("merge_route", {"lam_grid": [0.5, -1]}, ["merge_route.lam_grid", "every λ must be > 0"]),
        ("merge_route", {"lam_grid": []}, ["merge_route.lam_grid", "at least 1 item"]),
        ("merge_route", {"router": {"top_k": 0}}, ["merge_route.router.top_k", "greater than or equal to 1"]),
        ("merge_route", {"lorahub": {"targets": ["compsed"]}}, ["merge_route.lorahub.targets.0", "'compsed'", "'composed'", "'heldout'"]),
        ("merge_route", {"arrow": {"topk": 2}}, ["merge_route.arrow.topk", "unknown key", "top_k", "temperature"]),
        ("experts", {"stop_loss": 0}, ["experts.stop_loss", "greater than 0"]),
    ],
)
def test_validate_section_messages(section, values, needles):
    # The schemas have no defaults: the bad values go into params.yaml's own section.
    with pytest.raises(config.ParamsError) as e:
        config.validate_section(section, config.deep_merge(_base().get(section, {}), values), source="my.yaml")
    msg = str(e.value)
    assert msg.startswith("my.yaml: ")
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_several_errors_reported_together():
    with pytest.raises(config.ParamsError) as e:
        config.validate_section("synthesize", {**_base()["synthesize"], "n_train": 0, "n_tset": 1})
    assert "synthesize.n_train" in str(e.value) and "synthesize.n_tset" in str(e.value)


def test_notebook_parameters_validate_the_same_way():
    with pytest.raises(config.ParamsError, match=r"notebook parameters: synthesize\.n_trian: unknown key"):
        config.from_notebook(synthesize={**_base()["synthesize"], "n_trian": 5})
    raw = _base()
    cfg = config.from_notebook(skills=raw["skills"], synthesize=raw["synthesize"])
    assert cfg["synthesize"].n_train == raw["synthesize"]["n_train"]


def test_repo_params_validate():
    raw = _base()
    assert set(raw) <= set(config.SCHEMAS)
    cfg = config.load(SECTIONS, PARAMS)
    S, P = cfg["skills"], cfg["synthesize"]
    assert S.train == raw["skills"]["train"]
    assert S.heldout == raw["skills"]["heldout"]
    assert P.n_train == raw["synthesize"]["n_train"]
    # params.yaml spells out every key of the section, so the file documents the study completely
    assert P.model_dump(mode="json") == raw["synthesize"], "params.yaml synthesize: must list every key explicitly"
    for name in S.all:
        assert S.level(name) == raw["skills"]["difficulty"].get(name, raw["skills"]["difficulty"]["default"])


def test_smoke_profile_merges(workdir):
    base = yaml.safe_load((workdir / "params.yaml").read_text())
    smoke = yaml.safe_load((workdir / "profiles" / "smoke.yaml").read_text())
    merged = config.read_params(workdir / "params.yaml", profile="smoke")
    assert merged == config.deep_merge(base, smoke)
    for section, values in smoke.items():
        for key, value in values.items():
            if not isinstance(value, dict):
                assert merged[section][key] == value
    # keys the profile does not mention keep params.yaml's values (deep merge, not replace)
    assert merged["synthesize"]["teacher"] == base["synthesize"]["teacher"]
    assert merged["synthesize"]["seed"] == base["synthesize"]["seed"]
    assert merged["skills"]["difficulty"] == base["skills"]["difficulty"]
    cfg = config.load(SECTIONS, workdir / "params.yaml", profile="smoke")
    assert cfg["synthesize"].n_train == smoke["synthesize"]["n_train"] < base["synthesize"]["n_train"]
    # a profile given by path works too
    assert config.read_params(workdir / "params.yaml", profile=str(PROFILES / "smoke.yaml")) == merged


def test_unknown_profile_is_clear(workdir):
    with pytest.raises(config.ParamsError) as e:
        config.read_params(workdir / "params.yaml", profile="nope")
    assert "profile 'nope' not found" in str(e.value)
    assert str(workdir / "profiles" / "nope.yaml") in str(e.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(config.ParamsError, match="no such params file"):
        config.load(SECTIONS, tmp_path / "absent.yaml")


def test_missing_section(tmp_path):
    raw = _base()
    del raw["synthesize"]
    path = _write(tmp_path, raw)
    with pytest.raises(config.ParamsError, match=r"missing section\(s\) \['synthesize'\]"):
        config.load(SECTIONS, path)


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}
    over = {"a": {"c": {"d": 3}}, "e": [2]}
    assert config.deep_merge(base, over) == {"a": {"b": 1, "c": {"d": 3}}, "e": [2]}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}


def test_run_stage_bad_params_stops_before_notebook(workdir, capsys):
    raw = _set(_base(), "synthesize.n_trian", 5)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    rc = run_stage.main(["synthesize", "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ")
    assert "synthesize.n_trian" in err and "unknown key" in err and "n_train" in err
    assert not (workdir / "reports").exists()
    assert not (workdir / "datasets").exists()
    assert not (workdir / "metrics").exists()


def test_run_stage_unknown_profile_exit_code(workdir, capsys):
    rc = run_stage.main(["synthesize", "--workdir", str(workdir), "--profile", "nope"])
    assert rc == 2
    assert "profile 'nope' not found" in capsys.readouterr().err
    assert not (workdir / "reports").exists()


@pytest.mark.parametrize("profile", sorted(p.stem for p in PROFILES.glob("*.yaml")))
def test_every_shipped_profile_validates_and_applies(workdir, profile):
    """A profile is applied by rewriting params.yaml (python -m lib.cli.profile): every shipped
    one must pass the same validation, and only change the keys it names."""
    from lib.cli.profile import apply

    before = yaml.safe_load((workdir / "params.yaml").read_text())
    override = yaml.safe_load((PROFILES / f"{profile}.yaml").read_text())
    merged = apply(profile, workdir / "params.yaml")
    assert yaml.safe_load((workdir / "params.yaml").read_text()) == merged == config.deep_merge(before, override)
    cfg = config.load(list(merged), workdir / "params.yaml")
    assert set(cfg) == set(merged)


def test_applying_a_profile_rewrites_the_notebooks_parameters_cells(workdir):
    """After `python -m lib.cli.profile smoke`, a notebook run by hand in JupyterLab reads the
    profile's values, as `dvc repro` does (the report reads which levels exist from them)."""
    import shutil

    import nbformat

    from lib.cli.profile import apply

    shutil.copytree(REPO / "notebooks", workdir / "notebooks")
    apply("smoke", workdir / "params.yaml")
    nb = nbformat.read(workdir / "notebooks" / "08_report.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    smoke = yaml.safe_load((PROFILES / "smoke.yaml").read_text())
    assert f"'fractions': {smoke['levels']['fractions']!r}" in cell.source
    repo_nb = nbformat.read(REPO / "notebooks" / "08_report.ipynb", as_version=4)  # the repo's own copy untouched
    assert "'fractions': [0.0, 0.35]" in next(c for c in repo_nb.cells if "parameters" in c.metadata.get("tags", [])).source
