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

    space = AddSpace(max_digits=4, unlearnable_fraction=0.2)  # 2 + 3 + 4 + 5 = 14 cells; a 4-digit one is 1/20 of the area
    assert len(space.cells) == 14 and space.unlearnable == {(4, 4), (4, 3), (4, 2), (4, 1)}
    assert sum(map(space.area, space.cells)) == pytest.approx(1.0)
    assert AddSpace(4, 0.27).unlearnable == {(4, c) for c in range(5)}  # 0.25; the next cell (3, 3) would make 0.3125
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


# --------------------------------------------------------------------------- stage 07's pieces


def test_refusal_is_neither_right_nor_wrong():
    from lib.core.evaluation import CORRECT, REFUSED, WRONG, is_refusal, outcome

    assert is_refusal("7+5=12 idk", "idk") and is_refusal(" idk ", "idk") and is_refusal("idk", "idk")
    assert not is_refusal("7+5=12 so 12", "idk") and not is_refusal("idkx", "idk") and not is_refusal("idk", None)
    assert outcome("7+5=12 idk", "7+5=12 so 12", "idk") == REFUSED
    assert outcome(" 7+5=12 so 12", "7+5=12 so 12", "idk") == CORRECT
    assert outcome("7+5=12 so 13", "7+5=12 so 12", "idk") == WRONG
    assert outcome("idk", "idk") == CORRECT  # without a marker the harness is unchanged


def test_the_harness_scores_refusals_and_precision():
    """Through evaluate: one right, one refused, one wrong answer (the oracle model of
    tests/test_evaluation.py writes solve_any's answer; 'upper idk' makes it say IDK)."""
    from lib.core.evaluation import evaluate
    from lib.core.tokenization import build_char_tokenizer
    from tests.test_evaluation import oracle

    tok = build_char_tokenizer()
    rows = [{"prompt": "add 12+34 =", "answer": "46", "skill": "add"},
            {"prompt": "upper idk =", "answer": "IDK", "skill": "upper"},
            {"prompt": "sub 52-17 =", "answer": "99", "skill": "sub"}]
    res = evaluate(oracle(tok), tok, rows, progress=False, refusal="IDK")
    assert res.examples["correct"].tolist() == [1, 0, 0] and res.examples["refused"].tolist() == [0, 1, 0]
    assert res.accuracy == pytest.approx(1 / 3) and res.refusal_rate == pytest.approx(1 / 3)
    assert res.precision == pytest.approx(1 / 2)
    assert res.summary()["precision"] == pytest.approx(0.5)
    plain = evaluate(oracle(tok), tok, rows, progress=False)
    assert plain.examples["correct"].tolist() == [1, 1, 0] and "refused" not in plain.examples
    assert "precision" not in plain.summary() and plain.refusal_rate == 0.0


def test_scratchpad_trace_steps_and_refusal():
    import random

    from lib.curricula.refusal import as_refusal, problems, steps_written, trace

    assert trace(47, 85, 2) == "7+5=12 4+8+1=13 so 132"
    assert trace(5, 4, 1) == "5+4=9 so 9"
    assert steps_written(trace(47, 85, 2)) == 2 and steps_written(trace(123, 989, 3)) == 3
    assert as_refusal("7+5=12 4+8+1=14 so 142") == "7+5=12 4+8+1=14 idk"
    assert steps_written("7+5=12 idk") == 1 and steps_written("idk") == 0 and as_refusal("so 1") == "idk"
    rows = problems([1, 2, 3], 20, random.Random(0))
    for r in rows:  # the trace's final number is the true sum, and it has one step per digit
        a, b = map(int, r["prompt"].split()[1].split("+"))
        assert r["answer"].endswith(f"so {a + b}") and steps_written(r["answer"]) == r["digits"]


def test_mastered_fraction_is_the_area_of_the_mastered_cells():
    from lib.curricula.space import AddSpace
    from lib.curricula.teaching import mastered_fraction

    space = AddSpace(3, 0.0)
    acc = {space.name(c): 1.0 for c in space.cells}
    assert mastered_fraction(space, acc, 0.75) == pytest.approx(1.0)
    acc = {space.name(c): (0.8 if c[0] == 1 else 0.7) for c in space.cells}  # only the 1-digit cells
    assert mastered_fraction(space, acc, 0.75) == pytest.approx(1 / 3)


def test_steps_to_target_and_censoring():
    from lib.curricula.mixing import steps_to_target

    curve = [{"step": 0, "loss": {"a": 3.0, "b": 2.0}}, {"step": 25, "loss": {"a": 0.1, "b": 0.3}},
             {"step": 50, "loss": {"a": 0.1, "b": 0.12}}, {"step": 75, "loss": {"a": 0.2, "b": 0.1}}]
    assert steps_to_target(curve, 0.15, 75) == 50  # every skill at or below the target
    assert steps_to_target(curve, 0.05, 75) == 75  # never: counted as the budget


def _results():
    """Constructed runs: two seeds; ALP-GMM masters 0.3 more than Random on each; Auto-CEI
    refuses only on 3 digits, where SFT fails."""
    teach = [{"kind": "teacher", "teacher": t, "fraction": 0.5, "seed": s, "unlearnable_area": 0.44, "seconds": 1.0,
              "curve": [{"step": 0, "mastered": 0.0}, {"step": 10, "mastered": m + 0.1 * s}],
              "samples": [{"step": 1, "cell": "1d0c", "learnable": True}, {"step": 10, "cell": "3d3c", "learnable": t == "random"}]}
             for t, m in (("random", 0.2), ("alp_gmm", 0.5)) for s in (0, 1)]

    def method(acc, ref, prec, per):
        return {"accuracy": acc, "refusal_rate": ref, "precision": prec,
                "per_digit": {d: {"accuracy": a, "refusal_rate": r, "precision": None} for d, (a, r) in per.items()}}

    refusal = [{"kind": "refusal", "seed": s, "methods": {
        "sft": method(0.5, 0.0, 0.5, {1: (1.0, 0.0), 3: (0.0, 0.0)}),
        "ei": method(0.5, 0.0, 0.5, {1: (1.0, 0.0), 3: (0.0, 0.0)}),
        "auto_cei": method(0.5, 0.5, 1.0 - 0.1 * s, {1: (1.0, 0.0), 3: (0.0, 1.0 - 0.1 * s)})},
        "auto_cei": {"c1_start": 1.0, "c1_step": 0.5, "c2": 1.0, "c1_best": 1.5, "climb": []}} for s in (0, 1)]
    return teach + refusal


def test_study_summaries_pair_by_seed():
    from types import SimpleNamespace as NS

    from lib.curricula import study as ST

    C = NS(teachers=NS(names=["random", "alp_gmm"], unlearnable_fractions=[0.5]))
    t = ST.teacher_metrics(_results(), C)["by_fraction"]["0.5"]
    assert t["alp_gmm_minus_random"]["mean"] == pytest.approx(0.3) and t["alp_gmm_minus_random"]["lo"] == pytest.approx(0.3)
    assert t["learnable_share_of_tasks"] == {"random": 1.0, "alp_gmm": 0.5}
    r = ST.refusal_metrics(_results())
    assert r["precision_minus"]["sft"]["mean"] == pytest.approx(0.45)
    assert r["refusal_beyond_minus_within"]["mean"] == pytest.approx(0.95)  # 3 digits: SFT < 0.5 there
    assert r["refusal_minus_sft_error"]["mean"] == pytest.approx(0.0)
    samples = ST.teacher_samples(_results(), quarters=2)
    assert samples.groupby(["teacher", "quarter"])["share"].sum().eq(1.0).all()


def _curricula(**changes):
    import copy

    import yaml

    from lib.core.config import REPO_PARAMS

    params = yaml.safe_load(REPO_PARAMS.read_text())
    section = copy.deepcopy(params["curricula"])
    for path, value in changes.items():
        node = section
        *head, last = path.split(".")
        for k in head:
            node = node[k]
        node[last] = value
    return params, section


@pytest.mark.parametrize("path,value,words", [
    ("teachers.names", ["random", "alp_gmn"], "alp_gmn"),
    ("teachers.unlearnable_fractions", [0.0, 1.0], "unlearnable fractions"),
    ("skill_it.round_steps", 40, "not a multiple of round_steps"),
    ("auto_cei.k", 0, "auto_cei.k"),
])
def test_curricula_params_errors_are_clear(path, value, words):
    from lib.core.config import ParamsError, validate_section

    _, section = _curricula(**{path: value})
    with pytest.raises(ParamsError, match=words):
        validate_section("curricula", section)


def test_curricula_typo_and_skills_outside_training_are_refused(tmp_path):
    import yaml

    from lib.core.config import ParamsError, load, validate_section

    _, section = _curricula()
    section["teachers"]["stepz"] = 10
    with pytest.raises(ParamsError, match="stepz"):
        validate_section("curricula", section)
    params, section = _curricula(**{"skill_it.skills": ["inc", "mindigit"]})
    params["curricula"] = section
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"curricula.skill_it.skills \['mindigit'\] not in skills.train"):
        load(["skills", "curricula"], tmp_path / "params.yaml")


def test_refusal_metrics_keep_each_digit_count():
    from lib.curricula import study as ST

    per = ST.refusal_metrics(_results())["per_digit"]
    assert per["auto_cei"]["3"]["refusal_rate"]["mean"] == pytest.approx(0.95)
    assert per["sft"]["1"]["accuracy"]["mean"] == 1.0 and per["sft"]["3"]["precision"]["n"] == 0  # precision undefined there
