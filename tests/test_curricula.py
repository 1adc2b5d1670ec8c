"""Issue 18's building blocks on constructed cases: the teachers (ALP-GMM finds the learnable
region of a toy student), Auto-CEI's reward, selection and c1 hill-climb, Skill-it's mixture."""
from __future__ import annotations

import math

import numpy as np
import pytest

from lib.curricula import auto_cei as AC, skill_it as SI
from lib.curricula.teachers import TEACHERS
from lib.curricula.teachers.alp_gmm import absolute_learning_progress

BOX = [(0.0, 1.0), (0.0, 1.0)]


def test_teachers_are_registered():
    assert {"random", "easy_to_hard", "alp_gmm", "oracle"} <= set(TEACHERS.names())


def test_alp_is_the_reward_change_from_the_nearest_earlier_task():
    tasks = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.9, 0.1], [0.1, 0.9], [0.2, 0.2]])
    rewards = np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.4])
    assert absolute_learning_progress(tasks, rewards, [0.95, 0.95], 0.2) == pytest.approx(0.7)  # nearest (1, 1): |0.2 − 0.9|
    assert absolute_learning_progress(tasks, rewards, [0.22, 0.21], 1.0) == pytest.approx(0.6)  # nearest (0.2, 0.2)
    assert absolute_learning_progress(tasks[:5], rewards[:5], [0.95, 0.95], 0.2) == 0.0  # too little history yet


class ToyStudent:
    """Tasks in [0, 1]²; the region x < 0.3 is learnable: a 10×10 cell's reward there grows by
    0.05 each time the cell is practised (mastered after 20); elsewhere the reward stays 0."""

    def __init__(self):
        self.practice = np.zeros((10, 10))

    @staticmethod
    def learnable(task) -> bool:
        return task[0] < 0.3

    def train_and_score(self, task) -> float:
        i, j = (np.minimum((np.asarray(task) * 10).astype(int), 9))
        if not self.learnable(task):
            return 0.0
        self.practice[i, j] += 1
        return min(1.0, 0.05 * self.practice[i, j])


def _run(name, episodes=300, seed=0, **kw):
    student, rng = ToyStudent(), np.random.default_rng(seed)
    teacher = TEACHERS.get(name).obj(BOX, rng, **kw)
    tasks = []
    for _ in range(episodes):
        task = teacher.sample()
        tasks.append(task)
        teacher.update(task, student.train_and_score(task))
    return np.array(tasks), teacher


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alp_gmm_concentrates_on_the_learnable_region(seed):
    """30% of the box is learnable; after its bootstrap ALP-GMM must draw well over 30% of its
    tasks there (random draws ~30%)."""
    tasks, teacher = _run("alp_gmm", seed=seed, fit_rate=20, bootstrap=40, window=60)
    rand, _ = _run("random", seed=seed)
    after = tasks[40:]
    share = np.mean([ToyStudent.learnable(t) for t in after])
    assert np.mean([ToyStudent.learnable(t) for t in rand]) < 0.4
    assert share > 0.6, share
    assert teacher.fits and all(len(f["means"]) >= 2 for f in teacher.fits)
    assert np.all((tasks >= 0) & (tasks <= 1))


def test_oracle_and_easy_to_hard_stay_where_they_should():
    tasks, _ = _run("oracle", episodes=100, learnable=ToyStudent.learnable)
    assert all(ToyStudent.learnable(t) for t in tasks)
    tasks, _ = _run("easy_to_hard", episodes=100, total=100, start=0.2)
    assert np.all(tasks[:20] <= 0.2 + 1e-12)  # the first fifth: the easiest corner only
    assert tasks[80:].max() > 0.5              # the end: the whole box
    with pytest.raises(ValueError, match="learnable task"):
        _run("oracle", episodes=1, learnable=lambda t: False, tries=50)


def test_auto_cei_reward():
    c1, c2 = 6.0, 0.8
    assert AC.idk_reward(c1, c1, c2) == pytest.approx(0.0)
    assert AC.idk_reward(c1 + 50, c1, c2) == pytest.approx(1.0, abs=1e-9)
    assert AC.idk_reward(c1 - 50, c1, c2) == pytest.approx(-1.0, abs=1e-9)
    assert AC.idk_reward(8.0, c1, c2) == pytest.approx(2 / (1 + math.exp(-0.8 * 2)) - 1)
    assert AC.reward("correct", 1, c1, c2) == 1.0 and AC.reward("wrong", 99, c1, c2) == -1.0
    assert AC.reward("refused", 8.0, c1, c2) == AC.idk_reward(8.0, c1, c2)
    with pytest.raises(ValueError, match="outcome must be"):
        AC.reward("maybe", 1, c1, c2)


def test_resample_never_keeps_a_wrong_answer_and_favours_higher_reward():
    rng = np.random.default_rng(0)
    rewards = [1.0, -1.0, 0.5, -0.9, -1.0]
    counts = np.zeros(5)
    for _ in range(200):
        for i in AC.resample(rewards, temperature=0.3, rng=rng):
            counts[i] += 1
    assert counts[1] == counts[4] == 0
    assert counts[0] > counts[2] > counts[3] >= 200  # every kept sample at least once per round
    assert AC.resample([], 1.0, rng) == []


def test_objective_and_initial_c1():
    assert AC.objective(0.9, 0.25, lam=0.2) == pytest.approx(0.8 * 0.9 + 0.2 * 0.75)
    c1, step, c2 = AC.initial_c1_c2(refusal_lengths=[4, 6], answer_lengths=[2, 4, 6, 8])
    std = np.std([2, 4, 6, 8])
    assert step == pytest.approx(min(0.2 * std, 0.5)) and c1 == pytest.approx(5 + step)
    assert c2 == pytest.approx(-math.log(0.1) / std / 4)


def test_c1_hill_climb_finds_the_best_c1_and_stops_there():
    calls = []

    def score(c1):
        calls.append(c1)
        return -(c1 - 7.0) ** 2

    climb = AC.C1HillClimb(score, c1=5.0, step=0.5, max_rounds=20)
    assert climb.run() == pytest.approx(7.0)
    assert calls == pytest.approx([5.0, 5.5, 6.0, 6.5, 7.0, 7.5])  # then both neighbours of 7 are known
    down = AC.C1HillClimb(lambda c: -(c - 3.0) ** 2, c1=5.0, step=1.0, max_rounds=20)
    assert down.run() == pytest.approx(3.0)  # first step up is worse: turns and climbs down


def test_skill_it_mixture_on_a_hand_made_graph():
    eta = 0.5
    # Skill 0 helps skill 1 only; skill 1 helps itself. Skill 1's loss is high: both get weight
    # through it, skill 0 via A[0, 1].
    A = np.array([[0.0, 1.0], [0.0, 0.5]])
    p = SI.mixture(A, [1.0, 3.0], eta)
    want = np.exp([eta * 3.0, eta * 1.5])
    assert p == pytest.approx(want / want.sum())
    assert SI.mixture(np.eye(3), [0.0, 0.0, 0.0], eta) == pytest.approx([1 / 3] * 3)
    hist = [[1.0, 1.0], [2.0, 0.0], [0.0, 2.0]]
    assert SI.online_mixture(A, hist, eta, window=2) == pytest.approx(SI.mixture(A, [2.0, 2.0], eta))
    with pytest.raises(ValueError, match="k × k"):
        SI.mixture(np.ones((2, 3)), [1, 1, 1], eta)


def test_add_operands_have_the_digits_and_carries_asked_for():
    import random

    from lib.curricula.space import add_operands, count_carries

    rng = random.Random(0)
    for d in range(1, 6):
        for c in range(d + 1):
            for _ in range(20):
                a, b = add_operands(rng, d, c)
                assert len(str(a)) == len(str(b)) == d or d == 1
                assert count_carries(a, b) == c, (a, b, c)
    assert count_carries(999, 1) == 3 and count_carries(123, 456) == 0


def test_add_space_cells_and_the_unlearnable_share():
    import random

    from lib.curricula.space import AddSpace

    space = AddSpace(max_digits=4, unlearnable_fraction=0.25)  # 2 + 3 + 4 + 5 = 14 cells, 3 unlearnable
    assert len(space.cells) == 14 and space.unlearnable == {(4, 4), (4, 3), (4, 2)}
    assert space.cell([0.0, 0.0]) == (1, 0) and space.cell([1.0, 1.0]) == (4, 4) and space.cell([0.3, 0.5]) == (2, 1)
    assert {space.cell([x / 40, y / 40]) for x in range(41) for y in range(41)} == set(space.cells)  # every cell reachable
    rows = space.examples((2, 1), 5, random.Random(0))
    total = lambda r: str(sum(map(int, r["prompt"].split()[1].split("+"))))  # noqa: E731
    assert all(r["answer"] == total(r) for r in rows)  # learnable: the true sum
    hard = space.examples((4, 4), 20, random.Random(0))
    truth = [total(r) for r in hard]
    assert sum(r["answer"] != t for r, t in zip(hard, truth)) >= 18  # unlearnable: not the sum...
    assert all(len(r["answer"]) == len(t) for r, t in zip(hard, truth))  # ...but shaped like it
    assert hard == space.examples((4, 4), 20, random.Random(0))  # fixed per prompt
    assert AddSpace(4, 0.0).unlearnable == set()
