"""Counting-and-logic family: answers are a digit or a word computed from the input."""
from .base import DIGITS, LOWER, Skill, is_digits, random_string, register

VOWELS = set("aeiouAEIOU")
_DOC = "length uniform in [2, difficulty + 1]"

register(Skill(
    name="count", family="logic", description="number of vowels: count banana = 3",
    sample=lambda rng, d: random_string(rng, LOWER, d),
    apply=lambda x: str(sum(c in VOWELS for c in x)),
    accepts=lambda x: x.isascii() and x.isalnum(), difficulty_doc=_DOC,
))
register(Skill(
    name="parity", family="logic", description="is the number even or odd: parity 123 = odd",
    sample=lambda rng, d: random_string(rng, DIGITS, d),
    apply=lambda x: "even" if int(x[-1]) % 2 == 0 else "odd",
    accepts=is_digits, difficulty_doc=_DOC,
))
register(Skill(
    name="maxdigit", family="logic", description="largest digit: maxdigit 2719 = 9",
    sample=lambda rng, d: random_string(rng, DIGITS, d),
    apply=lambda x: max(x), accepts=is_digits, difficulty_doc=_DOC,
))
# Held out by default (params.yaml skills.heldout): no expert trains on it, so it
# tests zero-shot routing. It sits next to maxdigit on purpose.
register(Skill(
    name="mindigit", family="logic", description="smallest digit: mindigit 2719 = 1",
    sample=lambda rng, d: random_string(rng, DIGITS, d),
    apply=lambda x: min(x), accepts=is_digits, difficulty_doc=_DOC,
))
register(Skill(
    name="length", family="logic", description="number of characters: length hello = 5",
    sample=lambda rng, d: random_string(rng, LOWER, d),
    apply=lambda x: str(len(x)),
    accepts=lambda x: x.isascii() and x.isalnum(), difficulty_doc=_DOC,
))
