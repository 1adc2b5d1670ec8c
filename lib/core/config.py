"""Typed, validated params: every stage parses its params.yaml sections here first.

Each section of params.yaml has a pydantic schema with unknown keys forbidden. A bad
value stops the stage with ``ParamsError``: one message naming the key, the bad value and
what is allowed, before any work starts. Notebooks validate the same way, so a notebook
run by hand and one run by ``dvc repro`` accept and reject the same values.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lib import skills as skill_lib
from lib.core import registry


class ParamsError(ValueError):
    """A params.yaml value that cannot be used; the message says which and what is allowed."""


class Conflict(ValueError):
    """Fields of one section that are valid alone but not together; the error names only them
    (not the whole section)."""

    def __init__(self, message: str, *fields: str):
        super().__init__(message)
        self.fields = fields


class Section(BaseModel):
    # allow_inf_nan=False: ".inf" or ".nan" in params.yaml is refused for every float field
    # (an infinite learning rate trains NaN weights that would otherwise look converged).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v, info):
        # pydantic reads True as 1, and YAML reads yes/no/on/off as booleans: `rank: yes` would
        # silently train rank 1. A boolean is only a value where the field is one.
        ann = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool) and ann is not bool and bool not in get_args(ann):
            raise ValueError(f"a yes/no value where {ann.__name__ if isinstance(ann, type) else ann} is expected "
                             "(YAML reads true, false, yes, no, on, off as booleans)")
        return v


def _skill_list(names: list[str], what: str = "skill") -> list[str]:
    """Every name a known skill, none twice."""
    for n in names:
        _check_skill(n)
    if len(set(names)) != len(names):
        raise ValueError(f"a {what} is listed twice: {names}")
    return names


def reserved_adapter_name(name: str) -> str | None:
    """Why ``name`` cannot name a LoRA adapter, or None. Each skill's expert is a peft adapter
    named after the skill, and peft keeps every adapter's layers in ``torch.nn.ModuleDict`` /
    ``ParameterDict`` entries under that name: a name that is already an attribute of those
    (``double``, ``half``, ``float``, ``train``, ``eval``, ``apply``, ``type``, ``cpu``, ``to``,
    ...) cannot be added, whatever the adapter. Nor can a name in :data:`PIPELINE_NAMES`."""
    for cls_name, attributes in _container_attributes().items():
        if name in attributes:
            return f"{name!r} is an attribute of torch's {cls_name}, where peft stores each adapter by name"
    return PIPELINE_NAMES.get(name)


# Names the pipeline itself gives to other adapters or rows: a skill by one of these would be
# trained or scored as that other thing (``python -m lib.experts.train general`` trains the
# general LoRA, not a skill), so they are refused like the torch attribute names.
PIPELINE_NAMES = {
    name: f"{name!r} is {what}" for name, what in {
        "joint": "the joint LoRA's name in `python -m lib.experts.train joint`",
        "general": "the general LoRA's name in `python -m lib.experts.train general` and in arrow_gks",
        "replicate": "a command of `python -m lib.experts.train replicate`",
        "adapters": "a command of `python -m lib.experts.train adapters`",
        "base": "the base model's row in every score table",
    }.items()
}


@functools.cache
def _container_attributes() -> dict[str, frozenset[str]]:
    """Attribute names of an empty ModuleDict and ParameterDict, built once per process (every
    skill of every params section is checked against them)."""
    import torch

    return {cls.__name__: frozenset(dir(cls())) for cls in (torch.nn.ModuleDict, torch.nn.ParameterDict)}


def _check_skill(name: str) -> str:
    known = skill_lib.all_skills()
    if name not in known:
        raise ValueError(f"unknown skill {name!r}; known skills: {', '.join(sorted(known))}")
    why = reserved_adapter_name(name)
    if why:
        raise ValueError(f"skill {name!r} cannot be trained or held out: {why}; rename the skill (its name in "
                         "register(Skill(name=...)))")
    return name


class SkillsParams(Section):
    """Which skills the study trains on, which are held out, and how hard each is."""

    train: list[str] = Field(min_length=1, description="skills that get an expert")
    heldout: list[str] = Field(description="skills no expert trains on")
    difficulty: dict[str, int]

    @field_validator("train", "heldout")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        return _skill_list(names)

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
            raise Conflict(f"skills cannot be both trained on and held out: {sorted(both)}", "train", "heldout")
        return self

    def level(self, skill: str) -> int:
        return self.difficulty.get(skill, self.difficulty.get("default", 3))

    @property
    def all(self) -> list[str]:
        return [*self.train, *self.heldout]


class TeacherParams(Section):
    """SELMA-style generation: a causal LM writes new prompts from in-context seed exemplars."""

    model: str | None = Field(description="local path or hub id of the teacher causal LM")
    trust_remote_code: bool
    n_shots: int = Field(ge=1)
    n_candidates: int = Field(ge=1, description="prompts sampled per skill")
    rouge_l_max: float = Field(gt=0, le=1, description="drop a prompt this similar to a kept one")
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)
    max_new_tokens: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    compare_skills: list[str] = Field(description="stage teacher_data: these skills' experts also trained on the "
                                      "teacher's prompts, against the study's experts ([]: skip)")


# Counts the schema's bounds allow but a later step cannot use: the least each may be (0 still
# allowed for n_composed: no composed set) and why; fewer fails only after datasets are written.
SYNTH_LEAST = {
    "n_train": (2, "stage 01 shows the first 2 training rows of every skill"),
    "n_composed": (3, "stage 01 shows the first 3 composed test rows"),
    "corpus_size": (2, "one line is the corpus's validation split and the base pretrains on the rest"),
}


class SynthesizeParams(Section):
    source: Literal["programmatic", "teacher"]
    seed: int
    n_train: int = Field(ge=1)
    n_val: int = Field(ge=1)
    n_test: int = Field(ge=1)
    n_composed: int = Field(ge=0)
    n_heldout: int = Field(ge=0)
    corpus_size: int = Field(ge=1, description="lines of generic text for pretraining the base")
    corpus_skill_fraction: float = Field(ge=0, lt=1, description="share of corpus lines that show a training "
                                         "skill under an alias name (the base 'knows' the skill, not its prompt)")
    alias_separator: Literal[" ->", " ="] = Field(description="separator of the alias lines; ' =' is the study "
                                                  "prompts' own, so only the name differs")
    alias_form: Literal["reversed", "scrambled"] = Field(description="how an alias name is spelled")
    echo_fraction: float = Field(ge=0, le=1, description="share of copy lines whose command is a random word "
                                 "(the base learns a fixed answer for unknown commands)")
    echo_answer: Literal["input", "name"] = Field(description="what an unknown command answers: its input, or the "
                                                  "command word (no skill can leak into the base)")
    teacher: TeacherParams

    @field_validator(*SYNTH_LEAST)
    @classmethod
    def _usable_counts(cls, v, info):
        least, why = SYNTH_LEAST[info.field_name]
        optional = info.field_name == "n_composed"
        if v < least and not (optional and v == 0):
            raise ValueError(f"{info.field_name} must be {'0 or ' if optional else ''}at least {least}: {why}")
        return v

    @model_validator(mode="after")
    def _teacher_needs_model(self):
        if self.source == "teacher" and not self.teacher.model:
            raise Conflict("source is 'teacher' but teacher.model is not set: give a local path or hub id",
                           "source", "teacher.model")
        return self


class ModelParams(Section):
    """Stage 02: the base model. ``base: scratch`` pretrains a small Llama on the corpus;
    anything else is a local path or hub id loaded with the Auto classes."""

    base: str
    trust_remote_code: bool
    seed: int
    hidden_size: int = Field(ge=8)
    intermediate_size: int = Field(ge=8)
    num_layers: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    max_len: int = Field(ge=16, description="longest training sequence in tokens")
    pretrain_steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise Conflict(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}",
                           "hidden_size", "num_heads")
        return self


class ExpertsParams(Section):
    """Stage 03: one LoRA per skill and the joint multi-skill LoRA (trl SFTTrainer + peft)."""

    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)
    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    weight_decay: float = Field(ge=0)
    max_length: int = Field(ge=8)
    seed: int
    # Early stopping: stop once the mean of the last `stop_window` logged training losses
    # (logged every steps/50 steps) is below `stop_loss`; null trains every step. `steps`
    # is then a cap, and the joint total budget is the steps the experts actually ran.
    stop_loss: float | None = Field(gt=0)
    stop_window: int = Field(ge=1)
    # Issue 15: share of every expert's (and the joint LoRA's) training rows that are lines of
    # the base's own corpus, so an expert binds its instruction without rewriting what the base
    # (and the other experts) rely on. 0.5: as many corpus rows as skill rows.
    replay: float = Field(ge=0, lt=1, description="share of training rows replayed from the base's corpus")
    # A skill that needs more steps than the others gets a larger cap (steps × factor) instead
    # of every expert training longer; the joint budgets follow the caps.
    step_factor: dict[str, float] = Field(description="per-skill multiplier of `steps` for that skill's expert")

    @field_validator("step_factor")
    @classmethod
    def _step_factor(cls, d: dict[str, float]) -> dict[str, float]:
        for k, v in d.items():
            _check_skill(k)
            if not v > 0:
                raise ValueError(f"step_factor of {k!r} must be > 0, got {v}")
        return d


class ReplicatesParams(Section):
    """Further seeds of the whole expert recipe: with each, every expert and the joint LoRA at
    equal total steps are retrained (models/replicates/<seed>/), and stage 04 scores the
    merges and routers on each, so the claims' intervals are over seeds, not only prompts."""

    seeds: list[int] = Field(min_length=1, description="expert seeds beside experts.seed (at least one: "
                             "the claims' intervals are over seeds)")
    workers: int = Field(ge=1, description="processes training the adapters of every seed side by side (one torch "
                         "thread each; the adapters do not depend on the number)")

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"a seed is listed twice: {v}")
        if any(s < 0 for s in v):
            raise ValueError(f"seeds must be >= 0, got {v}")
        return v


class LevelsParams(Section):
    """Issue 15's axis of latent skill knowledge: the study again on bases whose corpus holds
    the training skills (under their alias names) in another share of its lines. Each level
    (DVC stage levels) pretrains its own base and trains, for every seed of the study
    ([experts.seed, *replicates.seeds]), an expert for each of ``skills`` and their joint LoRA
    at the total steps (the experts' recipe); stage level_score scores the base, the experts,
    the joint LoRA and ``merges`` on every seed. The main study's base is the level
    synthesize.corpus_skill_fraction: there only the joint LoRAs of ``skills`` are trained,
    its experts are the main study's."""

    fractions: list[float] = Field(min_length=1, description="synthesize.corpus_skill_fraction of each further base")
    skills: list[str] = Field(min_length=2, description="training skills whose experts are merged at every level (a subset of skills.train)")
    merges: list[str] = Field(min_length=1, description="ΔW merges scored at every level (λ from merge_route.lam_grid)")
    workers: int = Field(ge=1, description="processes pretraining the levels' bases, then training and scoring their adapters, side by side (one torch thread each)")

    @field_validator("skills")
    @classmethod
    def _skills(cls, v):
        return _skill_list(v, "skill")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"a fraction is listed twice: {v}")
        if any(not 0 <= f < 1 for f in v):
            raise ValueError(f"each fraction must be in [0, 1), got {v}")
        return v

    @field_validator("merges")
    @classmethod
    def _merges(cls, v):
        return _merge_methods(v)


class EvalParams(Section):
    """The evaluation harness used by every stage."""

    batch_size: int = Field(ge=1)
    n_boot: int = Field(ge=100)
    ece_bins: int = Field(ge=2)


def _merge_methods(names: list[str]) -> list[str]:
    return registry.resolve("lib.merge.methods:MERGE_METHODS").check(names)


def _peft_combinations(names: list[str]) -> list[str]:
    return _known_names("peft combination type", names, registry.resolve("lib.merge.adapter_space:PEFT_COMBINATIONS"))


def _routers(names: list[str]) -> list[str]:
    return registry.resolve("lib.route.routers:ROUTERS").check(names)


def _positive_lams(v: list[float]) -> list[float]:
    """A λ grid: every value scales an update, so each must be > 0."""
    if any(x <= 0 for x in v):
        raise ValueError(f"every λ must be > 0, got {v}")
    return v


def _known_names(kind: str, names: list[str], known: tuple[str, ...]) -> list[str]:
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown {kind} {bad}; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a {kind} is listed twice: {names}")
    return names


class RouterParams(Section):
    """The learned task-level router: a classifier on mean-pooled base hidden states."""

    hidden_layer: int
    hidden: int = Field(ge=0, description="0: linear classifier; else one hidden layer of this width")
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    n_train: int = Field(ge=1, description="training prompts per skill")
    top_k: int = Field(ge=1, description="experts mixed per example by router_soft")


class ArrowParams(Section):
    top_k: int = Field(ge=1)
    temperature: float = Field(gt=0)


class LoraHubParams(Section):
    targets: list[Literal["composed", "heldout"]]
    n_examples: int = Field(ge=1, description="few-shot examples from the target's validation split")
    budget: int = Field(ge=1, description="loss evaluations of the gradient-free search")
    l1: float = Field(ge=0)


class DiagnosticsParams(Section):
    """Why merges interfere (lib/merge/diagnostics.py): task-vector cosines and the weight
    disentanglement error of Ortiz-Jimenez et al. 2023 on the first ``pairs`` skill pairs."""

    pairs: int = Field(ge=0, description="skill pairs (in skills.train order) the disentanglement error is measured on; 0: skip")
    grid: list[float] = Field(min_length=1, description="coefficients α for each of the pair's task vectors")
    n_prompts: int = Field(ge=1, description="validation prompts per skill")


# The merges whose trim ranks entries by magnitude, so it can run per module or over the whole
# task vector (lib.merge.task_vectors.merge_task_vectors' trim_scope). Here, not there, so that
# validating params does not import the merge code.
GLOBAL_TRIM_METHODS = ("ties", "magnitude_prune")


class MergeRouteParams(Section):
    """Stage 04: merging methods (weight-update space and peft's adapter space) and routers."""

    seed: int
    workers: int = Field(ge=1, description="processes scoring replicates.seeds beside this one (one torch thread "
                         "each; the numbers do not depend on the number). Each holds every expert's ΔW and their merges")
    merges: list[str]
    lam_grid: list[float] = Field(min_length=1,
                                  description="global scale λ of each summed merge, chosen on validation")
    density: float = Field(ge=0, le=1, description="fraction of entries kept (TIES, DARE, magnitude, breadcrumbs)")
    beta: float = Field(ge=0, le=1, description="breadcrumbs: fraction of largest entries dropped")
    epsilon: float = Field(ge=0, lt=1, description="DELLA: keep probabilities spread over density ± epsilon by magnitude rank")
    rank_ratio: float = Field(gt=0, le=1, description="CART: share of each centred task matrix's rank kept")
    common_space_fraction: float = Field(ge=0, le=1, description="Iso-CTS: share of the summed update's rank in the common subspace")
    majority_sign_method: Literal["total", "frequency"]
    trim_scope: Literal["module", "global"] = Field(description="TIES and magnitude pruning: rank entries within each module or over an expert's whole task vector")
    both_trim_scopes: list[str] = Field(default_factory=list,
                                        description="merges also scored with the other trim scope, as merge:<method>@<scope>")
    refactor_rank: int | None = Field(ge=1, description="re-factor the best ΔW merge to a LoRA of this rank")
    peft_merges: list[str]
    svd_rank: int = Field(ge=1)
    routers: list[str]
    diagnostics: DiagnosticsParams
    router: RouterParams
    arrow: ArrowParams
    lorahub: LoraHubParams

    @field_validator("merges", "peft_merges", "routers")
    @classmethod
    def _method_names(cls, v, info):
        if info.field_name == "merges":
            return _merge_methods(v)
        if info.field_name == "peft_merges":
            return _peft_combinations(v)
        return _routers(v)

    @field_validator("lam_grid")
    @classmethod
    def _lams(cls, v):
        return _positive_lams(v)

    @model_validator(mode="after")
    def _beta_density(self):
        if "breadcrumbs" in self.merges and self.beta + self.density > 1:
            raise Conflict(f"breadcrumbs needs beta + density <= 1, got beta={self.beta}, density={self.density}",
                           "beta", "density")
        wrong = [m for m in self.both_trim_scopes if m not in self.merges or m not in GLOBAL_TRIM_METHODS]
        if wrong:
            raise Conflict(f"both_trim_scopes: {wrong} must be in merges and among {list(GLOBAL_TRIM_METHODS)}",
                           "both_trim_scopes", "merges")
        if "della" in self.merges and 0 < self.density < 1 and not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
            raise Conflict(f"della needs density ± epsilon inside (0, 1), got density={self.density}, epsilon={self.epsilon}",
                           "density", "epsilon")
        return self


CONTINUAL_ORDER_NAMES = ("alternating", "grouped", "given")


class ReplayParams(Section):
    fraction: float = Field(ge=0, lt=1, description="share of every batch drawn from earlier tasks' rows")
    buffer: int | None = Field(ge=1, description="training rows kept per finished task (null: all)")


class EWCParams(Section):
    lam: float = Field(ge=0, description="penalty (λ/2) Σ F_i (θ_i − θ*_i)²")
    fisher_n: int = Field(ge=1, description="training examples the diagonal Fisher is averaged over")
    fisher_batch: int = Field(ge=1, description="examples per squared gradient (1: per-example Fisher)")


class L2Params(Section):
    lam: float = Field(ge=0, description="penalty (λ/2) Σ (θ_i − θ*_i)² towards the previous task's weights")


class OLoRAParams(Section):
    lam: float = Field(ge=0, description="penalty λ Σ ||A_new A_oldᵀ||_F²")
    l2: float = Field(ge=0, description="λ₂ ||θ_new||² on the new LoRA (O-LoRA's optional term)")


class LibraryParams(Section):
    """The expert library: stage-03 experts merged (a lib/merge/task_vectors.py method) or routed."""

    merge: str
    lam_grid: list[float] = Field(min_length=1,
                                  description="λ chosen per step on the seen skills' validation prompts")
    density: float = Field(ge=0, le=1)
    beta: float = Field(ge=0, le=1)
    majority_sign_method: Literal["total", "frequency"]
    router: RouterParams

    @field_validator("merge")
    @classmethod
    def _merge(cls, v):
        return _merge_methods([v])[0]

    @field_validator("lam_grid")
    @classmethod
    def _lams(cls, v):
        return _positive_lams(v)


class ContinualParams(Section):
    """Stage 05: skills learned one after another; strategies, orders, budgets (lib/continual/study.py)."""

    strategies: list[str] = Field(min_length=1)
    tasks: list[str] = Field(min_length=2, description="training skills learned in sequence")
    orders: list[str] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    steps_per_task: int = Field(ge=1)
    full_lr: float = Field(gt=0, description="learning rate of sequential_full (every weight trained)")
    eval_every: int = Field(ge=1, description="probe evaluation every this many steps")
    eval_n: int = Field(ge=1, description="probe prompts per skill (first of the test split)")
    gap_window: float = Field(gt=0, le=1, description="share of a task that counts as 'just after the switch'")
    multitask_budget: Literal["cumulative", "per_task"]
    workers: int = Field(ge=1, description="processes running one job per seed and order, one torch thread each")
    replay: ReplayParams
    ewc: EWCParams
    l2: L2Params
    olora: OLoRAParams
    library: LibraryParams

    @field_validator("strategies", "orders")
    @classmethod
    def _names(cls, v, info):
        if info.field_name == "strategies":
            return registry.resolve("lib.continual.strategies:STRATEGIES").check(v)
        return _known_names("task order", v, CONTINUAL_ORDER_NAMES)

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        return _skill_list(v, "task")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"a seed is listed twice: {v}")
        return v

    @model_validator(mode="after")
    def _curve_fits(self):
        window = -int(-self.gap_window * self.steps_per_task // 1)  # ceil
        if self.eval_every > window:
            raise Conflict(f"eval_every {self.eval_every} > gap_window · steps_per_task = {window}: no evaluation "
                           "just after a task switch, so no stability gap; lower eval_every",
                           "eval_every", "gap_window", "steps_per_task")
        return self


LOCALIZE_SOURCE_NAMES = ("full_ft", "lora")


class LocalizeFinetuneParams(Section):
    """Stage 06's full fine-tuning of the considered weights on one skill (lib/localize/finetune.py)."""

    steps: int = Field(ge=1, description="cap on optimiser steps (early stopping may end sooner)")
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    weight_decay: float = Field(ge=0)
    max_length: int = Field(ge=8)
    seed: int
    stop_loss: float | None = Field(gt=0, description="stop once the mean of the last stop_window logged losses is below")
    stop_window: int = Field(ge=1)


class LocalizeParams(Section):
    """Stage 06: skill localization by grafting (Panigrahi et al. 2023), lib/localize/study.py."""

    skills: list[str] | None = Field(description="skills to localize (a subset of skills.train); null: all")
    sources: list[str] = Field(min_length=1)
    sparsities: list[float] = Field(min_length=1,
                                    description="fractions of the considered parameters kept by a mask")
    focus_sparsity: float = Field(description="sparsity of the masks used for overlap, calibration and the graft merge")
    finetune: LocalizeFinetuneParams
    mask_steps: int = Field(ge=0, description="optimisation steps of the grafting mask (0: the magnitude mask)")
    mask_lr: float = Field(gt=0, description="step on the logits S, gradient scaled so its largest entry is 1")
    mask_init: float = Field(gt=0, description="s0: S starts at +s0 on the top-|Δθ| entries, -s0 elsewhere")
    mask_l1: float = Field(ge=0, description="weight of the sparsity regulariser mean σ(S)")
    mask_batch_size: int = Field(ge=1)
    eval_n: int = Field(ge=1, description="test prompts per skill for recovery and calibration (first of the split)")
    n_perm: int = Field(ge=10, description="permutations for the overlap-behaviour correlation's p-value")
    seed: int
    workers: int = Field(ge=1, description="processes for stage 06's fine-tunings, then its masks (one skill and "
                                           "source each), one torch thread each; results do not depend on it")

    @field_validator("skills")
    @classmethod
    def _skills(cls, v):
        if v is not None:
            if not v:
                raise ValueError("give at least one skill, or null for all of skills.train")
            _skill_list(v)
        return v

    @field_validator("sources")
    @classmethod
    def _sources(cls, v):
        return _known_names("localization source", v, LOCALIZE_SOURCE_NAMES)

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, v):
        bad = [x for x in v if not 0 < x <= 1]
        if bad:
            raise ValueError(f"every sparsity must be in (0, 1] (the fraction of the considered parameters a mask keeps), got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"a sparsity is listed twice: {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _focus(self):
        if self.focus_sparsity not in self.sparsities:
            raise Conflict(f"focus_sparsity {self.focus_sparsity} must be one of sparsities {self.sparsities}",
                           "focus_sparsity", "sparsities")
        return self


class StudentParams(Section):
    """Stage 07's student: the stage-02 base with a LoRA on experts.target_modules, constant lr."""

    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)


class ALPGMMParams(Section):
    fit_rate: int = Field(ge=1, description="tasks between two mixture fits")
    bootstrap: int = Field(ge=1, description="uniform tasks before the first fit")
    window: int = Field(ge=2, description="recent (task, ALP) points each fit sees")
    k_max: int = Field(ge=2, description="mixtures of 2 … k_max components compared by AIC")
    random_ratio: float = Field(ge=0, le=1)


class TeachersParams(Section):
    """Teachers on the add (digits, carries) grid (lib/curricula/teaching.py)."""

    names: list[str] = Field(min_length=1)
    max_digits: int = Field(ge=1, le=6)
    unlearnable_fractions: list[float] = Field(min_length=1)
    steps: int = Field(ge=1, description="LoRA steps per run, the same for every teacher")
    tasks_per_step: int = Field(ge=1)
    prompts_per_task: int = Field(ge=1, description="prompts of a task's cell; its reward is the student's accuracy on them")
    eval_every: int = Field(ge=1)
    eval_n: int = Field(ge=1, description="held-out prompts per cell")
    mastery: float = Field(gt=0, le=1, description="held-out accuracy at which a cell counts as mastered")
    alp_gmm: ALPGMMParams

    @field_validator("names")
    @classmethod
    def _teachers(cls, v):
        return registry.resolve("lib.curricula.teachers:TEACHERS").check(v)

    @field_validator("unlearnable_fractions")
    @classmethod
    def _fractions(cls, v):
        if any(not 0 <= f < 1 for f in v) or len(set(v)) != len(v):
            raise ValueError(f"unlearnable fractions must be distinct values in [0, 1), got {v}")
        return v


class AutoCEIParams(Section):
    """Auto-CEI and its baselines on add with a scratchpad (lib/curricula/refusal.py)."""

    max_digits: int = Field(ge=2, le=6)
    n_train: int = Field(ge=1, description="SFT traces per digit count")
    n_pool: int = Field(ge=1, description="prompts per digit count sampled in each expert-iteration round")
    n_val: int = Field(ge=1, description="validation prompts per digit count (the c1 objective)")
    n_test: int = Field(ge=1, description="held-out prompts per digit count")
    sft_steps: int = Field(ge=1)
    ft_steps: int = Field(ge=1, description="steps of each later fine-tuning round")
    rounds: int = Field(ge=1, description="rounds of expert iteration without refusals")
    max_rounds: int = Field(ge=1, description="most rounds (c1 values) of Auto-CEI's hill-climb")
    k: int = Field(ge=1, description="sampled answers per prompt")
    temperature: float = Field(gt=0)
    select_temperature: float = Field(gt=0, description="temperature of the reward-weighted resampling")
    lam: float = Field(ge=0, le=1, description="λ of the c1 objective")


class SkillItParams(Section):
    """Skill-it's online mixture against uniform mixing (lib/curricula/mixing.py)."""

    skills: list[str] = Field(min_length=2)
    n_val: int = Field(ge=1, description="validation rows per skill for the losses")
    graph_steps: int = Field(ge=1, description="steps on one skill to measure its row of the skills graph")
    steps: int = Field(ge=1)
    round_steps: int = Field(ge=1, description="steps between two mixture updates")
    eta: float = Field(gt=0)
    window: int = Field(ge=1)
    target_loss: float = Field(gt=0)

    @field_validator("skills")
    @classmethod
    def _skills(cls, v):
        return _skill_list(v)

    @model_validator(mode="after")
    def _rounds(self):
        if self.steps % self.round_steps:
            raise Conflict(f"steps {self.steps} is not a multiple of round_steps {self.round_steps}", "steps", "round_steps")
        return self


class CurriculaParams(Section):
    """Stage 07: curricula and expert iteration (lib/curricula/study.py)."""

    seeds: list[int] = Field(min_length=1)
    workers: int = Field(ge=1)
    student: StudentParams
    teachers: TeachersParams
    auto_cei: AutoCEIParams
    skill_it: SkillItParams

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"a seed is listed twice: {v}")
        return v


# Section name in params.yaml -> schema. Later stages add their sections here.
SCHEMAS: dict[str, type[Section]] = {
    "skills": SkillsParams,
    "synthesize": SynthesizeParams,
    "model": ModelParams,
    "experts": ExpertsParams,
    "evaluation": EvalParams,
    "replicates": ReplicatesParams,
    "levels": LevelsParams,
    "merge_route": MergeRouteParams,
    "continual": ContinualParams,
    "localize": LocalizeParams,
    "curricula": CurriculaParams,
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
    conflict = (err.get("ctx") or {}).get("error")
    if isinstance(conflict, Conflict):  # name the fields involved, not the whole section's value
        return ", ".join(f"{loc}.{f}" for f in conflict.fields) + f": {msg}"
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


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML
    keeps the last value silently; DVC refuses the file, so the stage runner must too)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"{line}:{key_node.start_mark.column + 1}: key {key!r} is given twice "
                                    f"(first on line {seen[key]}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML file, with one-line errors: ``file:line:column: what is wrong`` for a syntax
    error (instead of PyYAML's traceback) and for a key given twice in one mapping."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ParamsError(f"{path}:{e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{mark.line + 1}:{mark.column + 1}" if mark else "?"
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ParamsError(f"{path}:{where}: YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: YAML error: {e}") from None


def read_params(path: str | Path = "params.yaml", profile: str | Path | None = None) -> dict:
    """Raw params.yaml, optionally with a profile override file merged on top."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: no such params file")
    raw = read_yaml(path) or {}
    if profile:
        prof = Path(profile)
        if not prof.exists():
            prof = path.parent / "profiles" / f"{profile}.yaml"
        if not prof.exists():
            raise ParamsError(f"profile {profile!r} not found (looked for {profile} and {prof})")
        raw = deep_merge(raw, read_yaml(prof) or {})
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
    out = {s: validate_section(s, raw[s], str(path)) for s in sections}
    check_across_sections(out, path)
    if "experts" in out and "replicates" in out and out["experts"].seed in out["replicates"].seeds:
        raise ParamsError(f"{path}: replicates.seeds {out['replicates'].seeds} repeats experts.seed "
                          f"{out['experts'].seed}: each replicate must be another seed")
    if "synthesize" in out and "levels" in out and out["synthesize"].corpus_skill_fraction in out["levels"].fractions:
        raise ParamsError(f"{path}: levels.fractions {out['levels'].fractions} repeats synthesize.corpus_skill_fraction "
                          f"{out['synthesize'].corpus_skill_fraction}: the main study is that level already")
    return out


ARROW_ROUTERS = ("arrow", "arrow_gks")


def check_across_sections(out: dict, path: str | Path) -> None:
    """Values valid in their own section that another section makes unusable (each would fail
    only mid-stage, after other work): ParamsError naming the keys on both sides."""
    skills = out.get("skills")
    if skills is None:
        return
    syn = out.get("synthesize")
    if syn is not None and skills.heldout and syn.n_heldout == 0:
        raise ParamsError(f"{path}: synthesize.n_heldout is 0 but skills.heldout is {skills.heldout}: each held-out "
                          "skill needs test prompts (stage 01 shows one); give n_heldout >= 1 or hold out no skill")
    lv = out.get("levels")
    if lv is not None and set(lv.skills) - set(skills.train):
        raise ParamsError(f"{path}: levels.skills {[s for s in lv.skills if s not in skills.train]} not in skills.train "
                          f"{skills.train}: a level merges experts of training skills")
    mr = out.get("merge_route")
    if mr is not None and set(ARROW_ROUTERS) & set(mr.routers) and mr.arrow.top_k > len(skills.train):
        raise ParamsError(f"{path}: merge_route.arrow.top_k {mr.arrow.top_k} is more than the {len(skills.train)} "
                          f"experts of skills.train (routers {[r for r in mr.routers if r in ARROW_ROUTERS]} mix "
                          "top_k of them per token); lower it")
    if syn is not None and set(syn.teacher.compare_skills) - set(skills.train):
        raise ParamsError(f"{path}: synthesize.teacher.compare_skills "
                          f"{[s for s in syn.teacher.compare_skills if s not in skills.train]} not in skills.train "
                          f"{skills.train}: the comparison is against the study's experts of those skills")
    if syn is not None and syn.teacher.compare_skills and not syn.teacher.model:
        raise ParamsError(f"{path}: synthesize.teacher.compare_skills is {syn.teacher.compare_skills} but "
                          "synthesize.teacher.model is not set: name the teacher (a local path, hub id or "
                          "'<package>:<file>.gguf')")
    cu = out.get("curricula")
    if cu is not None and set(cu.skill_it.skills) - set(skills.train):
        raise ParamsError(f"{path}: curricula.skill_it.skills {[s for s in cu.skill_it.skills if s not in skills.train]} not "
                          f"in skills.train {skills.train}: stage 01 writes training data only for those")


def from_notebook(**sections: Any) -> dict:
    """Validate the dicts a notebook's parameters cell holds (same schemas as the runner)."""
    out = {name: validate_section(name, values, "notebook parameters") for name, values in sections.items()}
    check_across_sections(out, "notebook parameters")
    return out


# --------------------------------------------------------------------------- defaults

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _schema_paths() -> dict[type[Section], tuple[str, ...]]:
    """Every schema and where its values sit in params.yaml (nested ones under their field)."""
    out: dict[type[Section], tuple[str, ...]] = {}

    def walk(schema, path):
        out.setdefault(schema, path)
        for name, f in schema.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, Section):
                walk(ann, (*path, name))

    for section, schema in SCHEMAS.items():
        walk(schema, (section,))
    return out


def make(schema: type[Section], params: str | Path = REPO_PARAMS, **overrides: Any) -> Section:
    """A ``schema`` instance with params.yaml's values, ``overrides`` merged on top (nested
    dicts merged key by key). The schemas have no defaults of their own: params.yaml is the
    one place a default is written, and this is how tests and benchmarks build sections."""
    paths = _schema_paths()
    if schema not in paths:
        raise ParamsError(f"{schema.__name__} is not a params schema; known: {', '.join(s.__name__ for s in paths)}")
    values: Any = read_params(params)
    for key in paths[schema]:
        values = values[key]
    try:
        return schema.model_validate(deep_merge(values, overrides))
    except ValidationError as e:
        raise ParamsError("; ".join(_describe(err, schema, ".".join(paths[schema])) for err in e.errors())) from None
