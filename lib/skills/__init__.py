"""The skill library: a registry of small skills, looked up by the names in params.yaml.

Adding a skill is one file in this package that calls ``register(Skill(...))``; the
registry (``base.SKILLS``) imports every module here on its first lookup, so no other code
changes (see README, "Adding a skill").
"""
from . import compose
from .base import MalformedPrompt, Skill, all_skills, get_skill, register


def skill_of(prompt: str) -> str:
    """Name of the skill a plain prompt asks for (its first word)."""
    return prompt.split(" ", 1)[0]


def solve_any(prompt: str) -> str:
    """Exact answer of any plain or composed prompt; MalformedPrompt if none fits."""
    head = skill_of(prompt)
    if compose.SEPARATOR in head:
        return compose.solve(prompt)
    try:
        skill = get_skill(head)
    except KeyError as e:
        raise MalformedPrompt(f"{prompt!r}: {e.args[0]}") from None
    return skill.solve(prompt)


__all__ = ["MalformedPrompt", "Skill", "all_skills", "compose", "get_skill", "register", "skill_of", "solve_any"]
