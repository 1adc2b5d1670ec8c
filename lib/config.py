"""Typed, validated params: every stage parses its params.yaml sections here first.

Each section of params.yaml has a pydantic schema with unknown keys forbidden. A bad
value stops the stage with ``ParamsError``: one message naming the key, the bad value and
what is allowed, before any work starts. Notebooks validate the same way, so a notebook
run by hand and one run by ``dvc repro`` accept and reject the same values.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import skills as skill_lib


class ParamsError(ValueError):
    """A params.yaml value that cannot be used; the message says which and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_skill(name: str) -> str:
    known = skill_lib.all_skills()
    if name not in known:
        raise ValueError(f"unknown skill {name!r}; known skills: {', '.join(sorted(known))}")
    return name


class SkillsParams(Section):
    """Which skills the study trains on, which are held out, and how hard each is."""

    train: list[str] = Field(min_length=1, description="skills that get an expert")
    heldout: list[str] = Field(default_factory=list, description="skills no expert trains on")
    difficulty: dict[str, int] = Field(default_factory=lambda: {"default": 3})

    @field_validator("train", "heldout")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for n in names:
            _check_skill(n)
        if len(set(names)) != len(names):
            raise ValueError(f"a skill is listed twice: {names}")
        return names

    @field_validator("difficulty")
    @classmethod
    def _difficulty(cls, d: dict[str, int]) -> dict[str, int]:
        for k, v in d.items():
            if k != "default":
                _check_skill(k)
            if v < 1:
                raise ValueError(f"difficulty of {k!r} must be >= 1, got {v}")
        return d

    @model_validator(mode="after")
    def _disjoint(self):
        both = set(self.train) & set(self.heldout)
        if both:
            raise ValueError(f"skills cannot be both trained on and held out: {sorted(both)}")
        return self

    def level(self, skill: str) -> int:
        return self.difficulty.get(skill, self.difficulty.get("default", 3))

    @property
    def all(self) -> list[str]:
        return [*self.train, *self.heldout]


class TeacherParams(Section):
    """SELMA-style generation: a causal LM writes new prompts from in-context seed exemplars."""

    model: str | None = Field(None, description="local path or hub id of the teacher causal LM")
    trust_remote_code: bool = False
    n_shots: int = Field(4, ge=1)
    n_candidates: int = Field(400, ge=1, description="prompts sampled per skill")
    rouge_l_max: float = Field(0.8, gt=0, le=1, description="drop a prompt this similar to a kept one")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(24, ge=1)
    batch_size: int = Field(16, ge=1)


class SynthesizeParams(Section):
    source: Literal["programmatic", "teacher"] = "programmatic"
    seed: int = 0
    n_train: int = Field(2000, ge=1)
    n_val: int = Field(100, ge=1)
    n_test: int = Field(200, ge=1)
    n_composed: int = Field(200, ge=0)
    n_heldout: int = Field(200, ge=0)
    corpus_size: int = Field(20000, ge=1, description="lines of generic text for pretraining the base")
    teacher: TeacherParams = TeacherParams()

    @model_validator(mode="after")
    def _teacher_needs_model(self):
        if self.source == "teacher" and not self.teacher.model:
            raise ValueError("source is 'teacher' but teacher.model is not set: give a local path or hub id")
        return self


class ModelParams(Section):
    """Stage 02: the base model. ``base: scratch`` pretrains a small Llama on the corpus;
    anything else is a local path or hub id loaded with the Auto classes."""

    base: str = "scratch"
    trust_remote_code: bool = False
    seed: int = 0
    hidden_size: int = Field(128, ge=8)
    intermediate_size: int = Field(512, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    max_len: int = Field(64, ge=16, description="longest training sequence in tokens")
    pretrain_steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        return self


class ExpertsParams(Section):
    """Stage 03: one LoRA per skill and the joint multi-skill LoRA (trl SFTTrainer + peft)."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    steps: int = Field(300, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(32, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(64, ge=8)
    seed: int = 0


class EvalParams(Section):
    """The evaluation harness used by every stage."""

    batch_size: int = Field(128, ge=1)
    n_boot: int = Field(1000, ge=100)
    ece_bins: int = Field(10, ge=2)


# Section name in params.yaml -> schema. Later stages add their sections here.
SCHEMAS: dict[str, type[Section]] = {
    "skills": SkillsParams,
    "synthesize": SynthesizeParams,
    "model": ModelParams,
    "experts": ExpertsParams,
    "evaluation": EvalParams,
}


def _describe(err: dict, schema: type[BaseModel], section: str) -> str:
    loc = ".".join(str(p) for p in (section, *err["loc"]))
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        parent = schema
        for part in err["loc"][:-1]:
            field = parent.model_fields.get(str(part))
            ann = getattr(field, "annotation", None)
            parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else parent
        allowed = ", ".join(parent.model_fields)
        return f"{loc}: unknown key (value {value!r}); allowed keys: {allowed}"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: bad value {value!r}: {msg}"


def validate_section(section: str, values: Any, source: str = "params.yaml"):
    """Parse one section into its schema; raise ParamsError with one clear message."""
    if section not in SCHEMAS:
        raise ParamsError(f"{source}: unknown section {section!r}; known sections: {', '.join(SCHEMAS)}")
    schema = SCHEMAS[section]
    if not isinstance(values, dict):
        raise ParamsError(f"{source}: section {section!r} must be a mapping, got {values!r}")
    try:
        return schema.model_validate(values)
    except ValidationError as e:
        lines = [_describe(err, schema, section) for err in e.errors()]
        raise ParamsError(f"{source}: " + "; ".join(lines)) from None


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def read_params(path: str | Path = "params.yaml", profile: str | Path | None = None) -> dict:
    """Raw params.yaml, optionally with a profile override file merged on top."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file")
    raw = yaml.safe_load(path.read_text()) or {}
    if profile:
        prof = Path(profile)
        if not prof.exists():
            prof = path.parent / "profiles" / f"{profile}.yaml"
        if not prof.exists():
            raise ParamsError(f"profile {profile!r} not found (looked for {profile} and {prof})")
        raw = deep_merge(raw, yaml.safe_load(prof.read_text()) or {})
    return raw


def load(sections: list[str], path: str | Path = "params.yaml", profile: str | Path | None = None) -> dict:
    """Validated sections of a params file: {section: schema instance}."""
    raw = read_params(path, profile)
    unknown = set(raw) - set(SCHEMAS)
    if unknown:
        raise ParamsError(f"{path}: unknown section(s) {sorted(unknown)}; known sections: {', '.join(SCHEMAS)}")
    missing = [s for s in sections if s not in raw]
    if missing:
        raise ParamsError(f"{path}: missing section(s) {missing}")
    return {s: validate_section(s, raw[s], str(path)) for s in sections}


def from_notebook(**sections: Any) -> dict:
    """Validate the dicts a notebook's parameters cell holds (same schemas as the runner)."""
    return {name: validate_section(name, values, "notebook parameters") for name, values in sections.items()}
