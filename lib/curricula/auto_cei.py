"""Auto-CEI (Zhao et al., ICLR 2025, arXiv 2410.07627): expert iteration that rewards saying
"I don't know" only after trying, with a curriculum on where "after trying" starts.

* :func:`reward`: +1 for a correct answer, −1 for a wrong one, and for a refusal after ``d``
  reasoning steps ``2 / (1 + exp(−c2 · (d − c1))) − 1``: near −1 for an early refusal, 0 at
  ``d = c1``, near +1 for a refusal after a long attempt.
* :func:`resample`: the authors' selection of the sampled answers to fine-tune on
  (``src/rl/ei_generation.py``): every sample, plus as many more drawn with replacement in
  proportion to ``exp(reward / temperature)``, then every one with reward above −1 kept
  (correct answers and refusals; wrong answers never).
* :func:`objective`: ``(1 − λ) · precision + λ · (1 − refusal rate)``, λ = 0.2 in the paper.
* :class:`C1HillClimb`: the curriculum. The authors' loop (``src/rl/curriculum.py``) starts c1 at
  the mean length of the refusals plus one step (step ``min(0.2 · std, 0.5)`` of the answers'
  lengths, ``c2 = −ln 0.1 / std / 4``), runs expert iteration at c1, moves c1 by one step in
  the direction that raised the objective, and stops when the best c1's next neighbour was
  already scored lower. Here the same moves and stopping rule over a callable.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

CORRECT, WRONG, REFUSED = "correct", "wrong", "refused"


def idk_reward(d: float, c1: float, c2: float) -> float:
    """``2 / (1 + exp(−c2 · (d − c1))) − 1``: the reward of "I don't know" after ``d`` steps."""
    z = -c2 * (d - c1)
    if z > 700:  # exp overflow: the limit
        return -1.0
    return 2.0 / (1.0 + math.exp(z)) - 1.0


def reward(outcome: str, d: float, c1: float, c2: float) -> float:
    """+1 correct, −1 wrong, :func:`idk_reward` for a refusal after ``d`` steps."""
    if outcome == CORRECT:
        return 1.0
    if outcome == WRONG:
        return -1.0
    if outcome == REFUSED:
        return idk_reward(d, c1, c2)
    raise ValueError(f"outcome must be {CORRECT!r}, {WRONG!r} or {REFUSED!r}, got {outcome!r}")


def resample(rewards: Sequence[float], temperature: float, rng: np.random.Generator) -> list[int]:
    """Indices of one prompt's samples to fine-tune on: all of them plus ``len(rewards)`` draws
    ∝ ``exp(reward / temperature)``, keeping those with reward > −1 (so never a wrong answer)."""
    r = np.asarray(rewards, dtype=float)
    if not len(r):
        return []
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    w = np.exp((r - r.max()) / temperature)
    drawn = rng.choice(len(r), size=len(r), replace=True, p=w / w.sum()).tolist()
    return [i for i in drawn + list(range(len(r))) if r[i] > -1]


def objective(precision: float, refusal_rate: float, lam: float = 0.2) -> float:
    """``(1 − λ) · precision + λ · (1 − refusal rate)``: what the c1 curriculum maximises."""
    return (1 - lam) * precision + lam * (1 - refusal_rate)


def initial_c1_c2(refusal_lengths: Sequence[float], answer_lengths: Sequence[float]) -> tuple[float, float, float]:
    """The authors' start: (c1, step, c2) = (mean refusal length + step, min(0.2 · std, 0.5),
    −ln 0.1 / std / 4), std over every answer's length (a std of 0 counts as 1)."""
    lengths = np.asarray(answer_lengths, dtype=float)
    std = float(lengths.std()) or 1.0
    step = min(0.2 * std, 0.5)
    mean_refusal = float(np.mean(refusal_lengths)) if len(refusal_lengths) else float(lengths.mean())
    return mean_refusal + step, step, -math.log(0.1) / std / 4


class C1HillClimb:
    """Hill-climbing of c1 on ``score(c1) -> objective`` (one round of expert iteration per call).
    Moves by ``step`` in the direction that last improved the best score, turns back once it
    does not, and stops when both neighbours of the best c1 scored lower (or after ``max_rounds``)."""

    def __init__(self, score: Callable[[float], float], c1: float, step: float, max_rounds: int = 8):
        if step <= 0:
            raise ValueError(f"step must be > 0, got {step}")
        self.score, self.step, self.max_rounds = score, float(step), int(max_rounds)
        self.scores: dict[float, float] = {}
        self.best = float(c1)

    def _key(self, c1: float) -> float:
        return round(c1, 9)  # c1 ± step ∓ step must find the same entry

    def run(self) -> float:
        self.scores[self._key(self.best)] = self.score(self.best)
        direction = 1
        for _ in range(self.max_rounds - 1):
            nxt = self.best + direction * self.step
            if self._key(nxt) in self.scores:
                other = self.best - direction * self.step
                if self._key(other) in self.scores:
                    break  # both neighbours known and lower: a local maximum
                direction, nxt = -direction, other
            s = self.scores[self._key(nxt)] = self.score(nxt)
            if s > self.scores[self._key(self.best)]:
                self.best = nxt
            else:
                direction = -direction
        return self.best
