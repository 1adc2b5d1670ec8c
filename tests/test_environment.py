"""One pinned environment, three spellings: pyproject.toml, environment.yml, requirements.lock."""
from __future__ import annotations

import importlib.metadata
import re
import sys
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO

PYTHON = "3.11"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lines: list[str], source: str) -> dict[str, str]:
    """{normalised name: version} from ``name==version`` lines; anything else is an error."""
    pins: dict[str, str] = {}
    for line in lines:
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{source}: {line!r} is not an exact pin"
        assert not req.extras or source == "pyproject.toml", f"{source}: {line!r}"
        name = _norm(req.name)
        assert name not in pins, f"{source}: {req.name} is pinned twice"
        pins[name] = specs[0].version
    return pins


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pyproject_pins() -> dict[str, str]:
    project = _pyproject()["project"]
    return _pins(project["dependencies"] + project["optional-dependencies"]["test"], "pyproject.toml")


def _environment() -> tuple[list, list[str]]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    deps = env["dependencies"]
    conda = [d for d in deps if isinstance(d, str)]
    pip_blocks = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_blocks) == 1, "environment.yml needs exactly one `pip:` list"
    return conda, pip_blocks[0]


def _lock() -> dict[str, str]:
    lines = [ln.split("#", 1)[0].strip() for ln in (REPO / "requirements.lock").read_text().splitlines()]
    return _pins([ln for ln in lines if ln], "requirements.lock")


def test_environment_yml_pins_equal_pyproject():
    _, pip = _environment()
    options = [ln for ln in pip if ln.startswith("-")]
    for opt in options:
        assert opt in ("-e .", "-c requirements.lock"), f"environment.yml: unexpected pip option {opt!r}"
    env_pins = _pins([ln for ln in pip if not ln.startswith("-")], "environment.yml")
    py_pins = _pyproject_pins()
    assert env_pins == py_pins, (
        f"environment.yml and pyproject.toml disagree: only in environment.yml {sorted(env_pins.items() - py_pins.items())}, "
        f"only in pyproject.toml {sorted(py_pins.items() - env_pins.items())}"
    )


def test_python_version_is_the_same_everywhere():
    conda, _ = _environment()
    pythons = [d for d in conda if re.match(r"python\b", d)]
    assert pythons == [f"python={PYTHON}"], f"environment.yml pins {pythons}, want python={PYTHON}"
    assert _pyproject()["project"]["requires-python"] == f"=={PYTHON}.*"
    assert "pip" in conda
    assert f"{sys.version_info.major}.{sys.version_info.minor}" == PYTHON, "the tests run on the pinned Python"


def test_pyproject_pins_agree_with_lock():
    lock = _lock()
    py = _pyproject_pins()
    missing = sorted(set(py) - set(lock))
    assert not missing, f"requirements.lock lacks {missing}"
    differ = {n: (v, lock[n]) for n, v in py.items() if lock[n] != v}
    assert not differ, f"pyproject.toml and requirements.lock disagree (pyproject, lock): {differ}"


def test_pin_parser_rejects_loose_specs():
    with pytest.raises(AssertionError, match="not an exact pin"):
        _pins(["torch>=2"], "x")
    with pytest.raises(AssertionError, match="pinned twice"):
        _pins(["PyYAML==6.0.3", "pyyaml==6.0.3"], "x")
    assert _pins(["rouge_score==0.1.2"], "x") == _pins(["rouge-score==0.1.2"], "x") == {"rouge-score": "0.1.2"}


def test_installed_versions_match_pins():
    """The environment the tests run in is the pinned one (local tags such as +cpu aside)."""
    wrong = {}
    for name, version in _pyproject_pins().items():
        installed = importlib.metadata.version(name)
        if Version(installed).public != Version(version).public:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from the pins (pin, installed): {wrong}; run `make setup`"
