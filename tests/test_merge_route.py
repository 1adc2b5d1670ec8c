"""Stage 04's bookkeeping: macro accuracy with intervals, normalised accuracy, λ choice,
the joint-baseline verdicts and the leaderboard, on hand-made results."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lib.core.config import make as make_params
from lib.core.stats import macro_ci
from lib.core.bench import Bench, System
from lib.merge import leaderboard as MR
from lib.core.config import EvalParams


def _examples(correct_by_skill: dict[str, list[int]]) -> pd.DataFrame:
    rows = [{"skill": s, "correct": c} for s, cs in correct_by_skill.items() for c in cs]
    return pd.DataFrame(rows)


def test_macro_ci_is_the_mean_over_skills_not_over_examples():
    # 'a' has 4 examples all right, 'b' has 1 example wrong: macro 0.5, micro 0.8.
    ex = _examples({"a": [1, 1, 1, 1], "b": [0]})
    mean, lo, hi = macro_ci(ex, n_boot=200)
    assert mean == pytest.approx(0.5)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # no variance within a skill


def test_normalised_accuracy_divides_by_the_expert():
    ex = _examples({"a": [1, 0, 1, 0], "b": [1, 1, 1, 1]})
    mean, lo, hi = macro_ci(ex, {"a": 0.5, "b": 0.8}, n_boot=500)
    assert mean == pytest.approx((0.5 / 0.5 + 1.0 / 0.8) / 2)
    assert lo <= mean <= hi
    # A skill whose expert scores 0 cannot be normalised and is left out.
    assert macro_ci(ex, {"a": 0.0, "b": 0.8}, n_boot=100)[0] == pytest.approx(1.0 / 0.8)


def test_macro_ci_interval_covers_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small = _examples({"a": list(rng.integers(0, 2, 20)), "b": list(rng.integers(0, 2, 20))})
    big = _examples({"a": list(rng.integers(0, 2, 2000)), "b": list(rng.integers(0, 2, 2000))})
    _, lo_s, hi_s = macro_ci(small, n_boot=500)
    m, lo_b, hi_b = macro_ci(big, n_boot=500)
    assert hi_b - lo_b < hi_s - lo_s
    assert lo_b < 0.5 < hi_b and abs(m - 0.5) < 0.05


def test_choose_lambda_picks_the_best_validation_score_and_the_smaller_on_ties():
    scores = {0.1: 0.2, 0.3: 0.7, 0.5: 0.7, 1.0: 0.4}
    discarded = []
    lam, model, curve, build_s = MR.choose_lambda(lambda lam: lam, [1.0, 0.5, 0.1, 0.3], scores.__getitem__,
                                                  discard=discarded.append)
    assert lam == 0.3 and model == 0.3
    assert sorted(discarded) == [0.1, 0.5, 1.0]  # every loser, and never the winner
    assert build_s == curve.set_index("lam").build_s[0.3] >= 0
    assert curve.lam.tolist() == [0.1, 0.3, 0.5, 1.0]
    assert curve.val_accuracy.tolist() == [0.2, 0.7, 0.7, 0.4]


def _per_skill(rows):
    return pd.DataFrame(rows, columns=["system", "kind", "skill", "n", "accuracy", "ci_low", "ci_high", "ece"])


def test_beats_joint_needs_separated_intervals():
    per = _per_skill([
        ("joint_total_steps", "joint", "a", 100, 0.50, 0.40, 0.60, 0),
        ("joint_total_steps", "joint", "b", 100, 0.90, 0.85, 0.95, 0),
        ("merge:ties", "merge", "a", 100, 0.75, 0.65, 0.85, 0),   # above: beats
        ("merge:ties", "merge", "b", 100, 0.88, 0.80, 0.94, 0),   # overlaps: tie
        ("route:x", "router", "a", 100, 0.20, 0.10, 0.30, 0),     # below: loses
        ("route:x", "router", "b", 100, 0.90, 0.86, 0.96, 0),
        ("expert:a", "expert", "a", 100, 1.0, 1.0, 1.0, 0),       # experts are not compared
    ])
    v = MR.beats_joint(per, ["joint_total_steps"], ["a", "b"]).set_index(["system", "skill"]).verdict
    assert v[("merge:ties", "a")] == "beats" and v[("merge:ties", "b")] == "tie"
    assert v[("route:x", "a")] == "loses" and v[("route:x", "b")] == "tie"
    assert "expert:a" not in v.index.get_level_values(0)


def test_describe_names_the_winners():
    board = pd.DataFrame([
        {"system": "merge:ties", "kind": "merge", "norm_acc": 0.7, "norm_lo": 0.6, "norm_hi": 0.8, "mean_acc": 0.65,
         "composed": 0.1, "composed_lo": 0.05, "composed_hi": 0.15},
        {"system": "merge:linear", "kind": "merge", "norm_acc": 0.4, "norm_lo": 0.3, "norm_hi": 0.5, "mean_acc": 0.38,
         "composed": 0.2, "composed_lo": 0.1, "composed_hi": 0.3},
    ])
    verdicts = pd.DataFrame([{"system": "merge:ties", "joint": "joint_same_steps", "skill": "sort", "verdict": "beats"}])
    text = MR.describe(board, verdicts, {})
    assert "Best merge: merge:ties, normalised accuracy 0.700" in text
    assert "Best on composed: merge:linear" in text
    assert "Beat joint_same_steps (CI-separated): merge:ties on sort." in text


class _FakeResult:
    def __init__(self, correct, skill, n_tokens):
        self.examples = pd.DataFrame({"correct": correct, "skill": skill, "n_tokens": n_tokens})

    def accuracy_ci(self):
        c = self.examples.correct.mean()
        return float(c), float(c) - 0.1, float(c) + 0.1


def test_leaderboard_rows_costs_and_relative_speed():
    bench = Bench(tok=None, tests={}, ev=make_params(EvalParams, n_boot=100))
    bench.systems = {"base": System("base", "base", None),
                     "merge:x": System("merge:x", "merge", None, extra_params=0, build_s=1.5),
                     "route:y": System("route:y", "router", None, extra_params=1000)}
    for name, correct, secs in (("base", [0, 0, 0, 0], 1.0), ("merge:x", [1, 0, 1, 1], 1.0), ("route:y", [1, 1, 1, 1], 4.0)):
        bench.results[(name, "skills")] = _FakeResult(correct, ["a", "a", "b", "b"], [3, 3, 3, 3])
        bench.seconds[(name, "skills")] = secs
    bench.results[("merge:x", "composed")] = _FakeResult([1, 0], ["a>b", "b>a"], [2, 2])
    bench.seconds[("merge:x", "composed")] = 0.0
    board = bench.leaderboard({"a": 1.0, "b": 0.5}).set_index("system")
    assert board.loc["merge:x", "mean_acc"] == pytest.approx((0.5 + 1.0) / 2)
    assert board.loc["merge:x", "norm_acc"] == pytest.approx((0.5 / 1.0 + 1.0 / 0.5) / 2)
    assert board.loc["merge:x", "composed"] == pytest.approx(0.5)
    assert np.isnan(board.loc["route:y", "composed"])
    assert board.loc["route:y", "tokens_per_s_rel"] == pytest.approx(0.25)  # 4x slower than the base
    assert board.loc["merge:x", "tokens_per_s_rel"] == pytest.approx(16 / 12)  # (12 + 4) tokens in 1 s vs 12 in 1 s
    assert board.loc["route:y", "extra_params"] == 1000 and board.loc["merge:x", "build_s"] == 1.5


def test_stage_metrics_pick_the_best_merge_and_collect_lorahub_weights():
    """``lib.merge.stage.metrics`` reads the board: best merge by normalised accuracy, LoraHub's
    weights from the systems its router built, the readable table with intervals."""
    from types import SimpleNamespace

    from lib.merge import stage as ST

    board = pd.DataFrame({"system": ["base", "merge:a", "merge:b", "lorahub→composed"],
                          "kind": ["base", "merge", "merge", "router"],
                          "mean_acc": [0.1, 0.4, 0.3, 0.2], "mean_lo": [0.0, 0.3, 0.2, 0.1], "mean_hi": [0.2, 0.5, 0.4, 0.3],
                          "norm_acc": [0.1, 0.35, 0.45, 0.2], "norm_lo": [0.0, 0.3, 0.4, 0.1], "norm_hi": [0.2, 0.4, 0.5, 0.3],
                          "extra_params": [0, 0, 0, 0], "build_s": [0.0, 1.0, 1.0, 2.0],
                          "tokens_per_s_rel": [1.0, 1.0, 1.0, 1.0]})
    hub = System("lorahub→composed", "router", None, info={"weights": {"a": 0.5, "b": -0.1}})
    st = SimpleNamespace(bench=SimpleNamespace(systems={"lorahub→composed": hub}),
                         found={"expert_acc": {"a": 1.0, "b": 0.9}, "chosen_lambda": {"a": 0.3, "b": 1.0},
                                "peft": pd.DataFrame({"type": ["ties"], "distance_to_exact": [0.123456]})})
    m = ST.metrics(st, board, router=None)
    assert m["best_merge"] == "merge:b" and m["best_merge_norm_acc"] == pytest.approx(0.45)
    assert m["lorahub_weights"] == {"composed": {"a": 0.5, "b": -0.1}}
    assert m["peft_distance_to_exact"] == {"ties": 0.1235} and m["refactor"] is None
    assert m["systems"]["merge:a"]["norm_acc"] == 0.35 and set(m["systems"]) == set(board.system)
    nan = board.assign(norm_acc=float("nan"))  # smoke profile: every expert at 0
    assert ST.metrics(st, nan, router=None)["best_merge"] == "merge:a"
    shown = ST.readable(board)
    assert list(shown.kind) == ["base", "merge", "merge", "router"]
    assert shown.set_index("system").loc["merge:b", "norm_acc"] == "0.450 [0.40, 0.50]"


def test_metrics_json_writes_nan_as_null(tmp_path):
    import json

    from lib.core import io

    path = io.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": np.float64("nan")}, "e": 0.5})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 0.5}


def test_recipe_row_reads_params_and_measured_metrics(tmp_path):
    import json

    import yaml

    from lib.report import recipes

    (tmp_path / "metrics").mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "synthesize": {"corpus_skill_fraction": 0.3}, "model": {"hidden_size": 64, "num_layers": 2, "pretrain_steps": 10},
        "experts": {"rank": 4, "alpha": 8, "lr": 0.01, "steps": 5, "stop_loss": None, "weight_decay": 0.0,
                    "target_modules": ["q_proj", "v_proj"], "seed": 1, "step_factor": {"sort": 2, "inc": 1.5}}}))
    (tmp_path / "metrics" / "base.json").write_text(json.dumps({"max_skill_accuracy": 0.1}))
    (tmp_path / "metrics" / "experts.json").write_text(json.dumps({"expert_own_min": 0.9, "expert_own_median": 0.95}))
    (tmp_path / "metrics" / "merge_route.json").write_text(json.dumps({
        "best_merge": "merge:ties", "best_merge_norm_acc": 0.6,
        "systems": {"merge:ties": {"kind": "merge", "norm_acc": 0.6}, "route:a": {"kind": "router", "norm_acc": 0.97},
                    "route:oracle": {"kind": "router", "norm_acc": 1.0},  # told the skill: never the best router
                    "route:b": {"kind": "router", "norm_acc": None}, "joint_total_steps": {"kind": "joint", "norm_acc": 0.99}}}))
    csv = tmp_path / "recipes.csv"
    recipes.record(tmp_path, "first", csv=csv)
    table = recipes.record(tmp_path, "second", csv=csv)
    assert table.note.tolist() == ["first", "second"]
    row = table.iloc[-1]
    assert row["synthesize.corpus_skill_fraction"] == 0.3 and row["experts.target_modules"] == "q_proj,v_proj"
    assert row["experts.step_factor"] == "inc:1.5,sort:2"  # as params.yaml was written (yaml sorts the keys)
    assert row.best_merge_norm_acc == 0.6 and row.ties_norm_acc == 0.6 and row.best_router_norm_acc == 0.97
    assert row.expert_own_min == 0.9 and row.joint_total_norm_acc == 0.99 and row.base_max == 0.1
    # --levels: one more row per level, its fraction and its own measured results
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**params, "levels": {"fractions": [0.0]}}))
    (tmp_path / "metrics" / "levels.json").write_text(json.dumps({"0.0": {
        "base": {"max_accuracy": 0.02}, "expert_own": {"0": {"a": 0.5, "b": 0.9}, "1": {"a": 0.8, "b": 1.0}},
        "skills": ["a", "b"], "systems": {"joint_total_steps": {"norm_acc": 0.95}, "merge:task_arithmetic": {"norm_acc": 0.1},
                                          "merge:ties": {"norm_acc": 0.2}}}}))
    table = recipes.record(tmp_path, "third", csv=csv, levels=True)
    assert table.note.tolist() == ["first", "second", "third", "third"]
    main, level = table.iloc[-2], table.iloc[-1]
    assert main["synthesize.corpus_skill_fraction"] == 0.3 and level["synthesize.corpus_skill_fraction"] == 0.0
    assert level["experts.rank"] == 4 and level.base_max == 0.02 and level.expert_own_min == 0.5
    assert level.expert_own_median == pytest.approx(0.85) and level.best_merge == "merge:ties" and level.best_merge_norm_acc == 0.2
    assert level.task_arithmetic_norm_acc == 0.1 and level.joint_total_norm_acc == 0.95 and pd.isna(level.best_router_norm_acc)
    assert "experts of a,b, mean over 2 seeds" in level.source
