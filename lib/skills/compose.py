"""Skill-Mix style composition (k = 2): apply skill A, then skill B to A's answer.

A composed prompt reads ``"<a>><b> <input> ="`` and its answer is
``B.apply(A.apply(input))``. Only pairs where A's answers are valid inputs for B are
eligible; eligibility is measured by sampling because the skills' domains are
predicates, not types.
"""
from __future__ import annotations

import random
import re

from .base import PROMPT_SUFFIX, MalformedPrompt, Skill, get_skill

SEPARATOR = ">"


def compatible(a: Skill, b: Skill, difficulty: int, trials: int = 200, min_rate: float = 0.9) -> bool:
    """True when B accepts A's answer for at least ``min_rate`` of sampled inputs and B
    does real work on them: it changes A's answer at least half the time and does not
    map everything to one value (``upper`` of a number or ``count`` of digits would make
    a composed prompt that is secretly a single skill)."""
    rng = random.Random(f"compat:{a.name}:{b.name}:{difficulty}")
    mids = [a.apply(a.sample(rng, difficulty)) for _ in range(trials)]
    ok = [m for m in mids if b.accepts(m)]
    if len(ok) < min_rate * trials:
        return False
    outs = [b.apply(m) for m in ok]
    changed = sum(o != m for o, m in zip(outs, ok))
    return changed >= 0.5 * len(ok) and len(set(outs)) >= 2


def eligible_pairs(names: list[str], difficulty: dict[str, int]) -> list[tuple[str, str]]:
    pairs = []
    for a in names:
        for b in names:
            if a != b and compatible(get_skill(a), get_skill(b), difficulty[a]):
                pairs.append((a, b))
    return pairs


def render(a: Skill, b: Skill, x: str) -> str:
    if not a.accepts(x) or not b.accepts(a.apply(x)):
        raise MalformedPrompt(f"{x!r} cannot go through {a.name} then {b.name}")
    return f"{a.name}{SEPARATOR}{b.name} {x}{PROMPT_SUFFIX}"


def generate(rng: random.Random, a: Skill, b: Skill, difficulty: int, max_tries: int = 1000) -> str:
    for _ in range(max_tries):
        x = a.sample(rng, difficulty)
        if b.accepts(a.apply(x)):
            return render(a, b, x)
    raise RuntimeError(f"could not draw an input for {a.name}{SEPARATOR}{b.name} in {max_tries} tries")


def parse(prompt: str) -> tuple[Skill, Skill, str]:
    m = re.fullmatch(rf"([a-z0-9]+){re.escape(SEPARATOR)}([a-z0-9]+) (\S+){re.escape(PROMPT_SUFFIX)}", prompt)
    if m is None:
        raise MalformedPrompt(f"not a composed prompt: {prompt!r}")
    try:
        a, b = get_skill(m.group(1)), get_skill(m.group(2))
    except KeyError as e:
        raise MalformedPrompt(f"{prompt!r}: {e.args[0]}") from None
    x = m.group(3)
    if not a.accepts(x) or not b.accepts(a.apply(x)):
        raise MalformedPrompt(f"{prompt!r}: input does not fit {a.name} then {b.name}")
    return a, b, x


def solve(prompt: str) -> str:
    a, b, x = parse(prompt)
    return b.apply(a.apply(x))
