"""Arithmetic family: operands are decimal numbers; difficulty = max digits per operand."""
import re

from .base import Skill, random_number, register

_DOC = "each operand has 1..difficulty digits"


def _binary(op: str):
    pattern = re.compile(rf"(0|[1-9][0-9]*){re.escape(op)}(0|[1-9][0-9]*)")

    def operands(x: str) -> tuple[int, int] | None:
        m = pattern.fullmatch(x)
        return (int(m.group(1)), int(m.group(2))) if m else None

    return operands


_add = _binary("+")
_sub = _binary("-")
_mul = _binary("*")


def _sample_sub(rng, d):
    a, b = random_number(rng, d), random_number(rng, d)
    return f"{max(a, b)}-{min(a, b)}"


register(Skill(
    name="add", family="arithmetic", description="sum of two numbers: add 12+34 = 46",
    sample=lambda rng, d: f"{random_number(rng, d)}+{random_number(rng, d)}",
    apply=lambda x: str(sum(_add(x))),
    accepts=lambda x: _add(x) is not None, difficulty_doc=_DOC,
))

register(Skill(
    name="sub", family="arithmetic", description="difference, never negative: sub 52-17 = 35",
    sample=_sample_sub,
    apply=lambda x: str(_sub(x)[0] - _sub(x)[1]),
    accepts=lambda x: (ab := _sub(x)) is not None and ab[0] >= ab[1], difficulty_doc=_DOC,
))

register(Skill(
    name="mul", family="arithmetic", description="number times one digit: mul 23*4 = 92",
    sample=lambda rng, d: f"{random_number(rng, d)}*{rng.randint(0, 9)}",
    apply=lambda x: str(_mul(x)[0] * _mul(x)[1]),
    accepts=lambda x: (ab := _mul(x)) is not None and ab[1] <= 9, difficulty_doc=_DOC + " (the multiplier always one)",
))


_num = re.compile(r"0|[1-9][0-9]*")
register(Skill(
    name="inc", family="arithmetic", description="add one: inc 349 = 350",
    sample=lambda rng, d: str(random_number(rng, d)),
    apply=lambda x: str(int(x) + 1),
    accepts=lambda x: _num.fullmatch(x) is not None, difficulty_doc="the number has 1..difficulty digits",
))
register(Skill(
    name="dec", family="arithmetic", description="subtract one: dec 350 = 349",
    sample=lambda rng, d: str(max(1, random_number(rng, d))),
    apply=lambda x: str(int(x) - 1),
    accepts=lambda x: _num.fullmatch(x) is not None and x != "0", difficulty_doc="the number has 1..difficulty digits",
))
