"""lib.cli.stage_command: the shared command line of the module stages (levels, level_score,
teacher_data, finetune)."""
from __future__ import annotations

import pytest

from lib.cli import stage_command
from lib.core import config


def test_runs_the_step_with_the_arguments_and_prints_what_show_makes(capsys):
    seen = []

    def step(workdir, params, profile):
        seen.append((workdir, params, profile))
        return {"done": 3}

    assert stage_command.main(["--workdir", "w", "--params", "p.yaml", "--profile", "x"], "doc", step,
                              lambda found: found["done"] * 2) == 0
    assert seen == [("w", "p.yaml", "x")] and capsys.readouterr().out.strip() == "6"


def test_positional_skills_reach_the_step_and_none_means_every_skill(capsys):
    got = []
    step = lambda workdir, params, profile, skills: got.append(skills) or {}  # noqa: E731
    assert stage_command.main(["inc", "sort"], "doc", step, str, skills=True) == 0
    assert stage_command.main([], "doc", step, str, skills=True) == 0
    assert got == [["inc", "sort"], None]


@pytest.mark.parametrize("error", [config.ParamsError("experts.rank: bad"), KeyError("extra")])
def test_a_refused_input_is_one_error_line_and_status_2(error, capsys):
    def step(workdir, params, profile):
        raise error

    if isinstance(error, config.ParamsError):
        assert stage_command.main([], "doc", step, str) == 2
        assert capsys.readouterr().err.strip().splitlines() == ["error: experts.rank: bad"]
    else:  # not a refused input unless the stage names it: a bug surfaces as a traceback
        with pytest.raises(KeyError):
            stage_command.main([], "doc", step, str)
        assert stage_command.main([], "doc", step, str, errors=(KeyError,)) == 2


@pytest.mark.parametrize("module", ["lib.levels.train", "lib.levels.score", "lib.synth.teacher_study"])
def test_the_module_stages_name_a_missing_params_file_in_one_line(module, tmp_path, capsys):
    import importlib

    assert importlib.import_module(module).main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "params.yaml" in err[0], err
