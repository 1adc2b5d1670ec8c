"""The Skill contract and the registry every stage looks skills up in (the project's one
registry mechanism, :class:`lib.core.registry.Registry`).

A skill turns an input string into an exact answer. Prompts have one fixed shape,
``"<name> <input> ="``, and the model is trained to continue with ``" <answer>"``
followed by EOS. Keeping one shape for every skill is what lets a task-level router
and the composed prompts (``"<a>+<b> <input> ="``) work without per-skill code.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from lib.core.registry import Registry

PROMPT_SUFFIX = " ="


class MalformedPrompt(ValueError):
    """A prompt that no skill (or not this skill) can answer."""


@dataclass(frozen=True)
class Skill:
    """One skill: everything a stage needs to make, check and answer its prompts.

    ``sample`` draws a valid input for a difficulty (documented per skill), ``apply``
    computes the exact answer, ``accepts`` says whether a string is a valid input
    (used by the parser and by composition, which feeds one skill's answer into
    another).
    """

    name: str
    family: str
    description: str
    sample: Callable[[random.Random, int], str]
    apply: Callable[[str], str]
    accepts: Callable[[str], bool]
    difficulty_doc: str = ""

    def render(self, x: str) -> str:
        if not self.accepts(x):
            raise MalformedPrompt(f"{x!r} is not a valid input for skill {self.name!r}")
        return f"{self.name} {x}{PROMPT_SUFFIX}"

    def generate(self, rng: random.Random, difficulty: int) -> str:
        """``(rng, difficulty) -> prompt``."""
        if difficulty < 1:
            raise ValueError(f"difficulty must be >= 1 for skill {self.name!r}, got {difficulty}")
        return self.render(self.sample(rng, difficulty))

    def parse(self, prompt: str) -> str:
        """Return the input inside ``prompt``; raise MalformedPrompt otherwise."""
        m = re.fullmatch(rf"{re.escape(self.name)} (\S+){re.escape(PROMPT_SUFFIX)}", prompt)
        if m is None or not self.accepts(m.group(1)):
            raise MalformedPrompt(f"not a {self.name!r} prompt: {prompt!r}")
        return m.group(1)

    def solve(self, prompt: str) -> str:
        return self.apply(self.parse(prompt))


# Skill names are the first word of a prompt and join composed names with ">", so no "_".
SKILLS = Registry("skill", package="lib.skills", name_pattern=re.compile(r"[a-z][a-z0-9]*"),
                  name_rule="lowercase letters and digits (starting with a letter)")


def register(skill: Skill) -> Skill:
    """Add ``skill`` to the registry under its name (each skill module calls this on import)."""
    SKILLS.add(skill.name, skill)
    return skill


def get_skill(name: str) -> Skill:
    """The skill named ``name``; an unknown name is a KeyError listing the known ones."""
    return SKILLS[name]


def all_skills() -> dict[str, Skill]:
    return {name: SKILLS[name] for name in SKILLS.names()}


# Input domains shared by several skills.
LOWER = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"


def is_word(x: str) -> bool:
    """Letters and digits, any case: the domain of the string transforms."""
    return bool(re.fullmatch(r"[A-Za-z0-9]+", x))


def is_digits(x: str) -> bool:
    return bool(re.fullmatch(r"[0-9]+", x))


def random_string(rng: random.Random, alphabet: str, difficulty: int, min_len: int = 2) -> str:
    """A string whose length is uniform in [min_len, min_len + difficulty - 1]."""
    n = rng.randint(min_len, min_len + difficulty - 1)
    return "".join(rng.choice(alphabet) for _ in range(n))


def random_number(rng: random.Random, difficulty: int) -> int:
    """A number with 1..difficulty digits (digit count uniform, then value uniform)."""
    digits = rng.randint(1, difficulty)
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)
