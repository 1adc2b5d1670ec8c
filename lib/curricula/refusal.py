"""Auto-CEI (Zhao et al., ICLR 2025) against SFT, R-Tuning and expert iteration without "I don't know".

**The task**: ``add`` with operands of 1 … ``max_digits`` digits, answered with a scratchpad of one
step per column, least significant first, then the sum: ``add 47+85 =`` → ``7+5=12 4+8+1=13 so
132``. The number of steps is the number of digits, so reasoning length grows with difficulty.
A refusal is the steps written so far then ``idk`` (``7+5=12 idk``); the harness scores it as
neither right nor wrong (``lib.core.evaluation.evaluate(..., refusal="idk")``).

**Methods**, all from the same supervised start (``sft_steps`` LoRA steps on traces, uniform over
digits), each later one fine-tuning ``ft_steps`` steps per round on what it selected:

* ``sft``: the start itself (never refuses);
* ``r_tuning`` (Zhang et al. 2024): one round on the pool's prompts, answered with the trace where
  the SFT model's greedy answer is right and with ``idk`` alone where it is wrong;
* ``ei``: ``rounds`` rounds of expert iteration: ``k`` sampled answers per pool prompt, the
  correct ones kept;
* ``auto_cei``: first one round like R-Tuning's, but a wrong greedy attempt becomes a refusal
  *after trying* (its steps, then ``idk``); then expert iteration where a sampled refusal after
  ``d`` steps earns ``2/(1+exp(−c2·(d−c1)))−1`` (+1 correct, −1 wrong), selected by the
  authors' reward-weighted resampling (wrong answers never kept); c1 hill-climbed on the validation objective
  ``(1−λ)·precision + λ·(1 − refusal rate)`` (:mod:`lib.curricula.auto_cei`), one round per c1,
  each round continuing from the last; the model kept is the one of the best-scoring round.

Every method is scored on the same held-out prompts per digit count: accuracy, precision
(correct / answered) and refusal rate.
"""
from __future__ import annotations

import copy
import random
import re
import time

import numpy as np

from lib.core.evaluation import CORRECT, REFUSED, evaluate, max_new_tokens_for, outcome
from lib.curricula import auto_cei as AC
from lib.curricula.space import add_operands
from lib.curricula.student import Optimizer, load_student, sample_answers
from lib.continual.loop import stable_seed

IDK = "idk"
METHODS = ("sft", "r_tuning", "ei", "auto_cei")
_STEP = re.compile(r"\d\+\d(?:\+1)?=\d+")


def trace(a: int, b: int, digits: int) -> str:
    """The scratchpad of ``a + b``: one ``x+y(+1)=s`` step per column, then ``so`` and the sum."""
    steps, carry = [], 0
    for i in range(digits):
        x, y = a // 10**i % 10, b // 10**i % 10
        s = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        carry = int(s >= 10)
    return " ".join(steps) + f" so {a + b}"


def steps_written(text: str) -> int:
    """Reasoning steps in an answer: well-formed ``x+y(+1)=s`` steps before ``so`` or ``idk``."""
    head = re.split(r"\bso\b|\bidk\b", text, maxsplit=1)[0]
    return len(_STEP.findall(head))


def as_refusal(text: str) -> str:
    """An answer's steps (up to ``so``/``idk``) followed by ``idk``."""
    head = re.split(r"\bso\b|\bidk\b", text, maxsplit=1)[0].strip()
    return f"{head} {IDK}".strip()


def problems(digits: list[int], n: int, rng: random.Random) -> list[dict]:
    """``n`` rows per digit count ``{prompt, answer (trace), skill: '<d>d', digits}``."""
    rows = []
    for d in digits:
        for _ in range(n):
            a, b = add_operands(rng, d, rng.randint(0, d))
            rows.append({"prompt": f"add {a}+{b} =", "answer": trace(a, b, d), "skill": f"{d}d", "digits": d})
    return rows


class Student:
    """A LoRA student and its optimiser, with the steps Auto-CEI and its baselines share."""

    def __init__(self, job: dict, R):
        self.R, self.C = R, job["C"]
        self.model, self.tok = load_student(job["root"], self.C.student, job["target_modules"], job["seed"])
        self.opt = Optimizer(self.model, self.C.student.lr)
        self.rng = random.Random(stable_seed("cei-train", job["seed"]))
        self.budget = None

    def train(self, rows: list[tuple[str, str]], steps: int) -> None:
        if not rows:
            return
        bs = self.C.student.batch_size
        for _ in range(steps):
            pick = [self.rng.choice(rows) for _ in range(bs)]
            self.opt.step(self.tok, [p for p, _ in pick], [a for _, a in pick])

    def score(self, rows: list[dict]):
        return evaluate(self.model, self.tok, rows, max_new_tokens=self.budget, progress=False, refusal=IDK,
                        batch_size=256, n_boot=200)

    def samples(self, rows: list[dict], seed: int) -> list[list[str]]:
        return sample_answers(self.model, self.tok, [r["prompt"] for r in rows], self.R.k, self.budget,
                              self.R.temperature, seed)

    def state(self) -> tuple[dict, dict]:
        """The LoRA weights and the optimiser's moments: each method starts from both as SFT left them."""
        return ({n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad},
                copy.deepcopy(self.opt.opt.state_dict()))

    def load(self, state: tuple[dict, dict]) -> None:
        weights, opt_state = state
        params = dict(self.model.named_parameters())
        for n, v in weights.items():
            params[n].data.copy_(v)
        self.opt.opt.load_state_dict(copy.deepcopy(opt_state))


def _per_digit(result) -> dict:
    ex = result.examples
    out = {}
    for d, g in ex.groupby("digits"):
        answered = g[g["refused"] == 0]
        out[int(d)] = {"accuracy": float(g["correct"].mean()), "refusal_rate": float(g["refused"].mean()),
                       "precision": float(answered["correct"].mean()) if len(answered) else None, "n": int(len(g))}
    return out


def _summary(result) -> dict:
    p = result.precision
    return {"accuracy": result.accuracy, "refusal_rate": result.refusal_rate,
            "precision": None if np.isnan(p) else p, "per_digit": _per_digit(result)}


def run_refusal(job: dict) -> dict:
    """Every method for one seed; per method the held-out summary (overall and per digit)."""
    from lib.core.training import one_cpu_thread

    one_cpu_thread()
    C, seed = job["C"], job["seed"]
    R = C.auto_cei
    t0 = time.perf_counter()
    digits = list(range(1, R.max_digits + 1))
    rng = random.Random(stable_seed("cei-data", seed))
    train = problems(digits, R.n_train, rng)
    pool, val = problems(digits, R.n_pool, rng), problems(digits, R.n_val, rng)
    test = problems(digits, R.n_test, random.Random(stable_seed("cei-test")))  # one test set for every seed
    st = Student(job, R)
    st.budget = max_new_tokens_for(st.tok, [r["answer"] for r in train + test]) + 2
    st.train([(r["prompt"], r["answer"]) for r in train], R.sft_steps)
    start = st.state()
    out = {"seed": seed, "methods": {"sft": _summary(st.score(test))}}

    # R-Tuning: refuse, without trying, where the SFT model is wrong.
    greedy = st.score(pool).examples
    st.train([(r.prompt, r.answer if r.correct else IDK) for r in greedy.itertuples()], R.ft_steps)
    out["methods"]["r_tuning"] = _summary(st.score(test))

    # Expert iteration without refusals: keep the correct samples.
    st.load(start)
    for i in range(R.rounds):
        kept = [(r["prompt"], s) for r, ss in zip(pool, st.samples(pool, stable_seed("ei", seed, i)))
                for s in ss if outcome(s, r["answer"]) == CORRECT]
        st.train(kept, R.ft_steps)
    out["methods"]["ei"] = _summary(st.score(test))

    # Auto-CEI: first taught to refuse after trying (the SFT model's wrong greedy attempts, their
    # steps then idk), then c1, c2 from that model's samples (the authors' start), then the climb.
    st.load(start)
    st.train([(r.prompt, r.answer if r.correct else as_refusal(r.prediction)) for r in greedy.itertuples()], R.ft_steps)
    first = st.samples(pool, stable_seed("cei", seed, "init"))
    lengths = [steps_written(s) for ss in first for s in ss]
    refused = [steps_written(s) for r, ss in zip(pool, first) for s in ss if outcome(s, r["answer"], IDK) == REFUSED]
    c1, step, c2 = AC.initial_c1_c2(refused, lengths)
    sel_rng = np.random.default_rng(stable_seed("cei-select", seed))
    climb: list[dict] = []

    def one_round(c1_now: float) -> float:
        batch = st.samples(pool, stable_seed("cei", seed, len(climb)))
        rows = []
        for r, ss in zip(pool, batch):
            rewards = [AC.reward(outcome(s, r["answer"], IDK), steps_written(s), c1_now, c2) for s in ss]
            rows += [(r["prompt"], ss[i]) for i in AC.resample(rewards, R.select_temperature, sel_rng)]
        st.train(rows, R.ft_steps)
        res = st.score(val)
        prec = 0.0 if np.isnan(res.precision) else res.precision
        obj = AC.objective(prec, res.refusal_rate, R.lam)
        if not climb or obj > max(c["objective"] for c in climb):
            kept["state"] = st.state()  # the model of the best round so far (checkpoint selection on validation)
        climb.append({"c1": c1_now, "objective": obj, "precision": prec, "refusal_rate": res.refusal_rate})
        return obj

    kept: dict = {}
    best = AC.C1HillClimb(one_round, c1, step, max_rounds=R.max_rounds).run()
    st.load(kept["state"])
    out["methods"]["auto_cei"] = _summary(st.score(test))
    out["auto_cei"] = {"c1_start": c1, "c1_step": step, "c2": c2, "c1_best": best, "climb": climb}
    out["seconds"] = time.perf_counter() - t0
    return out
