"""The difficulty space the teachers choose from (issue 18): ``add`` prompts on a grid of
(operand digits, carries), part of it unlearnable by construction.

A task is a point of the unit square: ``x`` picks the digits ``d = 1 + ⌊x · D⌋`` (both
operands have exactly ``d`` digits), ``y`` the carries ``c = min(d, ⌊y · (d + 1)⌋)`` (how many
of the ``d`` column additions carry). Every point is a valid cell, so the teachers work on a
plain box; a cell's area is ``1 / (D · (d + 1))``. The hardest cells (most digits, then most
carries) covering at most ``unlearnable_fraction`` of the square's area get answers that are a fixed pseudo-random number of the true answer's length keyed
on the prompt: no rule can be learnt there, only memorised, and held-out prompts are new. The
fraction is a parameter, as the unfeasible region is in Portelas et al.'s robustness study.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

from lib.skills import get_skill


def add_operands(rng: random.Random, digits: int, carries: int) -> tuple[int, int]:
    """Two ``digits``-digit numbers whose column addition carries exactly ``carries`` times:
    which columns carry is uniform among the choices, then each column's digit pair uniform
    among those that give it (leading digits non-zero; a one-digit operand may be 0)."""
    if not 0 <= carries <= digits:
        raise ValueError(f"carries must be in 0..{digits}, got {carries}")
    carry_out = set(rng.sample(range(digits), carries))
    a = b = 0
    cin = 0
    for i in range(digits):  # least significant column first
        lo = 1 if (i == digits - 1 and digits > 1) else 0
        pairs = [(x, y) for x in range(lo, 10) for y in range(lo, 10) if (x + y + cin >= 10) == (i in carry_out)]
        x, y = rng.choice(pairs)
        a += x * 10**i
        b += y * 10**i
        cin = int(i in carry_out)
    return a, b


def count_carries(a: int, b: int) -> int:
    """How many column additions of ``a + b`` carry."""
    n, cin = 0, 0
    while a or b:
        cin = int(a % 10 + b % 10 + cin >= 10)
        n += cin
        a, b = a // 10, b // 10
    return n


@dataclass
class AddSpace:
    """The (digits, carries) grid of ``add`` with ``max_digits`` D and an unlearnable share."""

    max_digits: int
    unlearnable_fraction: float = 0.0
    skill: str = "add"
    cells: list[tuple[int, int]] = field(init=False)
    unlearnable: set[tuple[int, int]] = field(init=False)

    def __post_init__(self):
        if self.max_digits < 1 or not 0 <= self.unlearnable_fraction < 1:
            raise ValueError(f"need max_digits >= 1 and 0 <= unlearnable_fraction < 1, got {self.max_digits}, {self.unlearnable_fraction}")
        self.cells = [(d, c) for d in range(1, self.max_digits + 1) for c in range(d + 1)]
        # Hardest first (most digits, then most carries) while their area stays within the fraction:
        # the fraction is of the task space the teachers sample, as in the paper's robustness study.
        self.unlearnable, covered = set(), 0.0
        for cell in sorted(self.cells, reverse=True):
            if covered + self.area(cell) > self.unlearnable_fraction + 1e-9:
                break
            self.unlearnable.add(cell)
            covered += self.area(cell)

    def area(self, cell: tuple[int, int]) -> float:
        """The share of the unit square that maps to ``cell``."""
        return 1.0 / (self.max_digits * (cell[0] + 1))

    @staticmethod
    def name(cell: tuple[int, int]) -> str:
        return f"{cell[0]}d{cell[1]}c"

    def cell(self, task) -> tuple[int, int]:
        x, y = (min(max(float(v), 0.0), 1.0) for v in task)
        d = min(self.max_digits, 1 + math.floor(x * self.max_digits))
        return d, min(d, math.floor(y * (d + 1)))

    def learnable(self, task) -> bool:
        return self.cell(task) not in self.unlearnable

    def answer(self, a: int, b: int, cell: tuple[int, int]) -> str:
        """The true sum, or in an unlearnable cell a number of its length fixed by a hash of the prompt."""
        true = str(a + b)
        if cell not in self.unlearnable:
            return true
        h = int(hashlib.sha256(f"{a}+{b}".encode()).hexdigest(), 16)
        k = len(true)
        lo = 10 ** (k - 1) if k > 1 else 0
        return str(lo + h % (10**k - lo))

    def examples(self, cell: tuple[int, int], n: int, rng: random.Random) -> list[dict]:
        """``n`` rows ``{prompt, answer, skill, cell}`` of one cell."""
        skill = get_skill(self.skill)
        rows = []
        for _ in range(n):
            a, b = add_operands(rng, *cell)
            rows.append({"prompt": skill.render(f"{a}+{b}"), "answer": self.answer(a, b, cell), "skill": self.skill,
                         "cell": self.name(cell)})
        return rows
