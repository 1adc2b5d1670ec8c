"""Issue 15: seeds as the unit of the claims' intervals, and the testbed's corpus replay.

The interval over seeds must hold the seed-to-seed spread (a bootstrap over prompts alone
would not); the replicate seeds are validated up front; the claims read the intervals over
seeds where they exist; replay mixes the stated share of corpus rows, the same ones every run.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from lib.core import config
from lib.core.stats import macro_ci, seed_macro_ci
from lib.merge import stage as ST
from lib.report import claims as C
from lib.report.claims import HELD, INCONCLUSIVE, NOT_HELD


def examples(acc: float, n: int = 400, skills=("a", "b"), seed: int = 0) -> pd.DataFrame:
    """n prompts per skill, exactly round(acc * n) of them correct, in a shuffled order."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in skills:
        correct = np.r_[np.ones(round(acc * n)), np.zeros(n - round(acc * n))]
        rows.append(pd.DataFrame({"skill": s, "correct": rng.permutation(correct)}))
    return pd.concat(rows, ignore_index=True)


# ---- the interval over seeds -------------------------------------------------------------

def test_seed_interval_holds_the_spread_between_seeds():
    seeds = [examples(0.2), examples(0.5, seed=1), examples(0.8, seed=2)]
    ci = seed_macro_ci(seeds, n_boot=2000)
    assert ci["n"] == 3 and ci["per_seed"] == pytest.approx([0.2, 0.5, 0.8])
    assert ci["mean"] == pytest.approx(0.5)
    # Each seed's own prompt interval is about ±0.03 wide; the seeds' spread must show.
    assert ci["lo"] < 0.3 and ci["hi"] > 0.7
    # Seeds that agree give an interval about as narrow as one seed's prompt interval.
    agree = seed_macro_ci([examples(0.5, seed=k) for k in range(3)], n_boot=2000)
    assert agree["hi"] - agree["lo"] < 0.1


def test_one_seed_is_the_prompt_bootstrap_and_references_normalise():
    ex = examples(0.6)
    one = seed_macro_ci([ex], [{"a": 0.5, "b": 1.0}], n_boot=2000)
    point, lo, hi = macro_ci(ex, {"a": 0.5, "b": 1.0}, n_boot=2000)
    assert one["mean"] == pytest.approx(point) == pytest.approx((0.6 / 0.5 + 0.6) / 2)
    assert one["lo"] == pytest.approx(lo, abs=0.03) and one["hi"] == pytest.approx(hi, abs=0.03)


def test_seed_interval_skips_seeds_without_a_reference_and_checks_lengths():
    ci = seed_macro_ci([examples(0.5), examples(0.7)], [{"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 1.0}], n_boot=200)
    assert ci["per_seed"][0] is None and ci["n"] == 1 and ci["mean"] == pytest.approx(0.7)
    none = seed_macro_ci([examples(0.5)], [{"a": 0.0, "b": 0.0}], n_boot=200)
    assert none["mean"] is None and none["n"] == 0
    with pytest.raises(ValueError, match="references"):
        seed_macro_ci([examples(0.5)], [None, None], n_boot=200)


def test_seed_table_divides_each_seed_by_its_own_experts():
    """Stage 04's table over seeds: one row per system scored on every seed; seed 1's merge at
    0.4 with experts at 0.8 is 0.5 normalised, like seed 0's 0.5 with experts at 1.0."""
    b0 = SimpleNamespace(systems={"merge:ta": SimpleNamespace(kind="merge"),
                                  "router:only_seed0": SimpleNamespace(kind="router")})  # not on every seed: left out
    seed0 = {("merge:ta", "skills"): examples(0.5), ("router:only_seed0", "skills"): examples(0.9)}
    seed1 = {("merge:ta", "skills"): examples(0.4)}
    st = SimpleNamespace(bench=b0, E=SimpleNamespace(n_boot=500),
                         found={"seeds": {0: (seed0, {"a": 1.0, "b": 1.0}), 1: (seed1, {"a": 0.8, "b": 0.8})}})
    table = ST.seed_table(st)
    assert list(table.system) == ["merge:ta"]
    row = table.iloc[0]
    assert row.n_seeds == 2 and row.seed_0 == pytest.approx(0.5) and row.seed_1 == pytest.approx(0.5)
    assert row.seed_lo <= 0.5 <= row.seed_hi


# ---- replicate seeds in params -------------------------------------------------------------

def _load_with(tmp_path, **sections):
    raw = yaml.safe_load(open(config.REPO_PARAMS))
    raw.update(sections)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return config.load(["experts", "replicates"], p)


def test_replicate_seeds_are_checked_up_front(tmp_path):
    assert _load_with(tmp_path)["replicates"].seeds == [1, 2]
    with pytest.raises(config.ParamsError, match="replicates.seeds.*listed twice"):
        _load_with(tmp_path, replicates={"seeds": [1, 1], "workers": 1})
    with pytest.raises(config.ParamsError, match="repeats experts.seed"):
        _load_with(tmp_path, replicates={"seeds": [0, 1], "workers": 1})
    with pytest.raises(config.ParamsError, match="replicates.seeds"):
        _load_with(tmp_path, replicates={"seeds": [], "workers": 1})


# ---- the claims read intervals over seeds ---------------------------------------------------

def _row(kind, norm, seeds=None, half=0.01):
    row = {"kind": kind, "norm_acc": norm, "norm_lo": norm - half, "norm_hi": norm + half}
    if seeds:
        row["seeds"] = {"mean": float(np.mean(seeds)), "lo": min(seeds), "hi": max(seeds), "n": len(seeds)}
    return row


@pytest.mark.parametrize("merge_seeds, want", [
    ([0.80, 0.82, 0.81], HELD),          # every seed above the joint's seeds
    ([0.50, 0.52, 0.51], NOT_HELD),      # every seed below
    ([0.55, 0.80, 0.70], INCONCLUSIVE),  # seed 0 alone (0.55 ± 0.01) would say "did not hold"
])
def test_selma_claim_uses_the_interval_over_seeds(merge_seeds, want):
    systems = {"joint_total_steps": _row("joint", 0.60, [0.60, 0.62, 0.61]),
               "merge:task_arithmetic": _row("merge", merge_seeds[0], merge_seeds),
               "peft:svd": _row("peft_merge", 0.99)}  # one seed only: not a candidate once others have seeds
    out = C.selma({"merge_route": {"systems": systems}})
    assert out.verdict == want
    assert "merge:task_arithmetic" in out.measured and "3 seeds" in out.measured


def test_claims_say_when_an_interval_is_over_prompts_of_one_seed():
    systems = {"joint_total_steps": _row("joint", 0.6), "merge:task_arithmetic": _row("merge", 0.8)}
    out = C.selma({"merge_route": {"systems": systems}})
    assert out.verdict == HELD and "1 seed, intervals over prompts" in out.measured


# ---- corpus replay during expert training ---------------------------------------------------

def test_replay_mixes_the_stated_share_of_corpus_rows(tmp_path):
    from datasets import Dataset, DatasetDict

    from lib.experts.train import with_replay

    corpus = DatasetDict({"train": Dataset.from_dict({"text": [f"copy w{i} = w{i}" for i in range(500)]
                                                      + [f"esrever ab{i} = {i}ba" for i in range(500)]})})
    corpus.save_to_disk(str(tmp_path / "datasets" / "corpus"))
    train = Dataset.from_dict({"prompt": [f"inc {i} =" for i in range(100)], "answer": [str(i + 1) for i in range(100)],
                               "skill": ["inc"] * 100})
    assert with_replay(train, tmp_path, 0.0, 0, "inc") is train
    mixed = with_replay(train, tmp_path, 0.5, 0, "inc")
    assert len(mixed) == 200 and mixed.column_names == ["prompt", "answer"]
    replayed = [p for p in mixed["prompt"] if not p.startswith("inc ")]
    assert len(replayed) == 100 and all(p.endswith(" =") for p in replayed)
    assert sorted(p for p in mixed["prompt"] if p.startswith("inc ")) == sorted(train["prompt"])
    assert len(with_replay(train, tmp_path, 0.8, 0, "inc")) == 500  # 400 corpus rows: 0.8 of the rows
    # The same rows in the same order every run; another seed or adapter draws others.
    assert with_replay(train, tmp_path, 0.5, 0, "inc")["prompt"] == mixed["prompt"]
    assert with_replay(train, tmp_path, 0.5, 1, "inc")["prompt"] != mixed["prompt"]
    assert with_replay(train, tmp_path, 0.5, 0, "dec")["prompt"] != mixed["prompt"]


def test_well_formed_compares_the_shape_of_prediction_and_answer():
    from lib.experts.base import answer_shape, well_formed

    assert [answer_shape(x) for x in ("123", "odd", "abc", "ABC", "aBc", "", "a1")] == \
        ["digits", "parity", "lower", "upper", "letters", "empty", "other"]
    ex = pd.DataFrame({"skill": ["inc", "inc", "upper", "upper", "parity"],
                       "answer": ["124", "10", "ABC", "XY", "even"],
                       "prediction": ["999", "inc", "ABD", "xy", "odd"]})
    assert well_formed(ex).to_dict() == {"inc": 0.5, "parity": 1.0, "upper": 0.5}


def test_perturbation_check_flags_exactly_the_verdicts_that_changed():
    """bench.perturb's comparison: the same metrics agree on every claim; a run where TIES fell
    below task arithmetic flips ties_dare alone, and the table says so."""
    import copy

    from bench.perturb import compare, markdown
    from test_report import metrics_fixture

    ref = metrics_fixture()
    assert all(r["same"] for r in compare(ref, copy.deepcopy(ref)))
    other = copy.deepcopy(ref)
    other["merge_route"]["systems"]["merge:ties"].update(norm_acc=0.1, norm_lo=0.09, norm_hi=0.11)
    rows = compare(ref, other)
    assert [r["claim"] for r in rows if not r["same"]] == ["ties_dare"]
    text = markdown(rows, "a full `dvc repro` with one thread", (0.5, 0.51), 60.0)
    assert "ties_dare | held | inconclusive **(differs)**" in text and f"{len(rows) - 1} of {len(rows)}" in text
    assert "Nothing changed" not in text
    same = markdown(compare(ref, copy.deepcopy(ref)), "another run", (0.5, 0.5), None)  # a perturbation that moved nothing
    assert "Nothing changed" in same
    # the levels' verdicts are compared too, one row per level
    level = pd.DataFrame([{"fraction": 0.0, "best_merge": "merge:ties", "merge:ties": 0.1, "joint_total_steps": 0.9,
                           "merge_beats_joint": "did not hold"}])
    flipped = level.assign(**{"merge:ties": 0.88, "merge_beats_joint": "inconclusive"})
    rows = compare(ref, copy.deepcopy(ref), (level, flipped))
    assert [(r["claim"], r["verdict"], r["perturbed_verdict"]) for r in rows if not r["same"]] == [
        ("level 0: merging beats joint", "did not hold", "inconclusive")]
    assert rows[-1]["perturbed_measured"] == "best merge (ties) 0.880 vs joint 0.900"


def test_base_perturbation_is_a_few_ulps_recorded_and_refused_when_malformed(monkeypatch):
    """bench.perturb --noise: every weight moves by about rel·|w| (not zero, not more), the
    same seed gives the same perturbation, and a malformed level is a clear error."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lib.experts import base as B

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2))

    ref, a, b = model(), model(), model()
    info = B.perturb_weights(a, 1e-6, seed=0)
    B.perturb_weights(b, 1e-6, seed=0)
    assert info == {"relative_noise": 1e-6, "seed": 10_007}
    for (name, p0), p1, p2 in zip(ref.named_parameters(), a.parameters(), b.parameters()):
        rel = ((p1 - p0).abs() / p0.abs().clamp_min(1e-30))[p0 != 0]
        assert torch.equal(p1, p2), name                   # reproducible
        assert (p1 != p0).float().mean() > 0.5, name        # most weights move (some by less than an ulp)
        assert rel.max() < 1e-5, name                       # and only by a few ulps
    monkeypatch.delenv(B.PERTURB_ENV, raising=False)
    assert B.perturbation() == 0.0
    monkeypatch.setenv(B.PERTURB_ENV, "1e-6")
    assert B.perturbation() == 1e-6
    for bad in ("tiny", "2", "-1e-6"):
        monkeypatch.setenv(B.PERTURB_ENV, bad)
        with pytest.raises(ValueError, match=B.PERTURB_ENV):
            B.perturbation()


def test_report_figures_state_the_numbers_they_read():
    """The report's over-seeds and locality captions are computed from the tables (stage 04's
    leaderboard, stage 03's locality), never typed."""
    from lib.report import figures as RF

    board = pd.DataFrame([  # as stage 04's leaderboard CSV has them (n_seeds: seeds with a usable value)
        {"system": "merge:ta", "kind": "merge", "seed_mean": 0.79, "seed_lo": 0.78, "seed_hi": 0.80, "seed_0": 0.79, "seed_1": 0.79},
        {"system": "merge:ties", "kind": "merge", "seed_mean": 0.60, "seed_lo": 0.55, "seed_hi": 0.68, "seed_0": 0.56, "seed_1": 0.64},
        {"system": "joint_total_steps", "kind": "joint", "seed_mean": 0.99, "seed_lo": 0.98, "seed_hi": 1.0, "seed_0": 0.99, "seed_1": 0.99},
        {"system": "expert:a", "kind": "expert", "seed_mean": 1.0, "seed_lo": 1.0, "seed_hi": 1.0, "seed_0": 1.0, "seed_1": 1.0}])
    board["n_seeds"], board["norm_acc"] = 2, board["seed_0"]  # the leaderboard's first-seed column is there too
    _, cap = RF.over_seeds(board)
    assert "2 seeds" in cap and "merge:ta, 0.790 [0.780, 0.800]" in cap and "0.990 [0.980, 1.000]" in cap
    _, one = RF.over_seeds(board.drop(columns=["n_seeds", "seed_mean", "seed_lo", "seed_hi", "seed_0", "seed_1"]))
    assert "one seed" in one
    loc = pd.DataFrame({"model": ["base", "a", "b"], "form": ["copy"] * 3, "accuracy": [1.0, 0.9, 1.0],
                        "change": [0.0, -0.1, 0.0]})
    assert "-0.100 to +0.000 (largest |change|: a)" in RF.locality(loc)[1]
