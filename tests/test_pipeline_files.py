"""The pipeline's files agree with each other: README, dvc.yaml, lib/core/stages.py, notebooks, params.yaml, CI."""
from __future__ import annotations

import ast
import os
import re
import shlex

import nbformat
import pytest
import yaml

from conftest import PARAMS, REPO
from lib.core import config
from lib.core.stages import STAGES

README = REPO / "README.md"
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# Written by the pipeline, so they need not exist in a fresh clone.
GENERATED = ("datasets/", "models/", "reports/", "metrics/", "plots/", "bench/results/", ".venv/")
PATH_SUFFIXES = (".py", ".yaml", ".yml", ".ipynb", ".md", ".toml", ".lock", ".json", ".sh", ".txt", ".cfg", ".dvc", ".csv", ".html")


def _readme() -> str:
    if not README.exists():
        pytest.fail(f"{README} is missing: the README is the project's entry point (setup, `make test`, `make repro`)")
    return README.read_text()


def _dvc_stages() -> dict[str, dict]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    # a foreach stage keeps its definition under `do:`
    return {name: s.get("do", s) for name, s in stages.items()}


def _entry(item) -> str:
    """A dvc.yaml list entry is either a string or a one-key mapping with options."""
    return item if isinstance(item, str) else next(iter(item))


def _readme_paths(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # commands in fenced blocks are not paths
    paths = []
    for token in re.findall(r"`([^`\s]+)`", text):
        if any(c in token for c in "<>*{}$") or "://" in token or token.startswith(("/", "~", "-")):
            continue
        looks_like_path = "/" in token or token.endswith(PATH_SUFFIXES) or token in {"Makefile", "LICENSE"}
        if not looks_like_path or "=" in token:
            continue
        if token.lstrip("./").startswith(GENERATED):
            continue
        paths.append(token)
    return paths


def test_readme_paths_exist():
    text = _readme()
    paths = _readme_paths(text)
    assert paths, "README.md names no files in backticks"
    outside = [p for p in paths if not (REPO / p).resolve().is_relative_to(REPO)]
    assert not outside, f"README.md names paths outside the repository (they break in a clone): {outside}"
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, (
        f"README.md names paths that do not exist in the repo: {missing} "
        "(write an example of a file to create as a placeholder such as `lib/skills/<name>.py`)"
    )


def test_readme_has_the_commands():
    text = _readme()
    for cmd in ("make test", "make repro"):
        assert re.search(rf"(^|[\s`$]){re.escape(cmd)}($|[\s`])", text, flags=re.M), f"README.md must show the command `{cmd}`"


def test_readme_path_filter():
    """The filter the README test relies on: real paths in, placeholders and outputs out."""
    sample = "`lib/core/config.py` `params.yaml` `datasets/skills/add` `data/skills/<name>.yaml` `lib.cli.run_stage` `synthesize.n_train=64` `reports/notebooks/*.html` `Makefile`"
    assert _readme_paths(sample) == ["lib/core/config.py", "params.yaml", "Makefile"]


# Training steps are plain commands (no notebook): one per skill or budget, run by foreach.
SINGLE_TRAINING_STEPS = {"adapters", "levels", "level_score", "finetune", "teacher_data"}  # one stage, not one per item (a pool inside runs them all)
# Training steps with their own module: stage 06's full fine-tuning (lib/localize/finetune.py),
# the levels of issue 15 (a level's base and adapters, and their scores) and issue 17's
# teacher-data experts (lib/synth/teacher_study.py).
MODULE_OF_STEP = {"finetune": "lib.localize.finetune", "levels": "lib.levels.train", "level_score": "lib.levels.score",
                  "teacher_data": "lib.synth.teacher_study"}
TRAINING_STEPS = {*SINGLE_TRAINING_STEPS, *MODULE_OF_STEP}


def _notebook_stages() -> dict:
    return {n: s for n, s in _dvc_stages().items() if n not in TRAINING_STEPS}


def test_training_steps_run_train_expert_and_never_a_notebook():
    raw = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in TRAINING_STEPS:
        if name in SINGLE_TRAINING_STEPS:
            do = raw[name]
        else:
            assert "foreach" in raw[name] or "matrix" in raw[name], f"{name}: one DVC stage per skill/budget"
            do = raw[name]["do"]
        assert shlex.split(do["cmd"])[:3] == ["python", "-m", MODULE_OF_STEP.get(name, "lib.experts.train")]
        assert [_entry(p) for p in do["params"]][0].split(".")[0] == "experts"
        for dep in do["deps"]:
            assert not dep.startswith("notebooks/"), f"{name} must not depend on a notebook"
            if "${" not in dep:
                assert (REPO / dep).exists() or dep.startswith(("models/", "datasets")), dep


def test_dvc_stages_match_lib_stages():
    dvc = _notebook_stages()
    assert set(dvc) == set(STAGES), f"dvc.yaml stages {sorted(dvc)} != lib.core.stages.STAGES {sorted(STAGES)}"
    for name, stage in dvc.items():
        params = [_entry(p) for p in stage.get("params", [])]
        assert params == list(STAGES[name].sections), (
            f"dvc.yaml stage {name!r} params {params} must be exactly the sections it reads: {list(STAGES[name].sections)}"
        )
        for section in params:
            assert section in config.SCHEMAS, f"{name}: params section {section!r} has no schema in lib/core/config.py"


def test_dvc_deps_and_notebooks_exist():
    for name, stage in _notebook_stages().items():
        cmd = shlex.split(stage["cmd"])
        assert cmd[:3] == ["python", "-m", "lib.cli.run_stage"], f"{name}: stages run through lib.cli.run_stage, got {stage['cmd']!r}"
        assert cmd[3] == name, f"dvc.yaml stage {name!r} runs stage {cmd[3]!r}"
        notebook = f"notebooks/{STAGES[name].notebook}"
        assert (REPO / notebook).is_file(), f"{name}: {notebook} does not exist"
        deps = [_entry(d) for d in stage.get("deps", [])]
        assert notebook in deps, f"{name}: its notebook {notebook} must be a dep"
        for dep in deps:
            if "${" in dep or dep.startswith(("datasets", "models")):  # outputs of earlier stages
                continue
            assert (REPO / dep).exists(), f"dvc.yaml stage {name!r} depends on {dep!r}, which does not exist"
        outs = [_entry(o) for key in ("outs", "metrics", "plots") for o in stage.get(key, [])]
        assert any(o.startswith("reports/notebooks/") for o in outs), f"{name}: the executed notebook is an output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
    assert "papermill" not in nb.metadata, f"{path.name} is an executed copy, not the source notebook"


def _parameters(path) -> dict:
    nb = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters', need exactly one"
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert tagged[0] == code[0], f"{path.name}: the 'parameters' cell must be the first code cell"
    tree = ast.parse(nb.cells[tagged[0]].source)
    values = {}
    for stmt in tree.body:
        assert isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name), (
            f"{path.name}: the parameters cell holds only `name = literal` lines, got {ast.unparse(stmt)!r}"
        )
        name = stmt.targets[0].id
        assert name not in values, f"{path.name}: parameter {name} is assigned twice"
        try:
            values[name] = ast.literal_eval(stmt.value)
        except ValueError:
            pytest.fail(f"{path.name}: parameter {name} is not a literal: {ast.unparse(stmt.value)}")
    return values


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_parameters_equal_params_yaml(path):
    values = _parameters(path)
    params = yaml.safe_load(PARAMS.read_text())
    assert "workdir" in values, f"{path.name}: lib.cli.run_stage passes `workdir`; the parameters cell must define it"
    for name, value in values.items():
        if name in params:
            assert value == params[name], f"{path.name}: default of `{name}` differs from params.yaml's section"
    for stage in STAGES.values():
        if stage.notebook == path.name:
            for section in stage.sections:
                assert section in values, f"{path.name}: stage {stage.name!r} reads {section!r}; add it to the parameters cell"
                config.validate_section(section, values[section], f"{path.name} parameters")


def test_stage_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    for stage in STAGES.values():
        assert stage.notebook in names, f"stage {stage.name!r}: notebooks/{stage.notebook} is missing"


def test_ci_runs_make_test():
    ci = REPO / ".ci" / "run"
    assert ci.is_file(), ".ci/run is missing"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    lines = [ln.split("#", 1)[0].strip() for ln in ci.read_text().splitlines()]
    assert "make test" in lines, ".ci/run must call `make test`"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test:", makefile, flags=re.M) and re.search(r"^repro:", makefile, flags=re.M)
