"""Stage 05: the continual-learning measurements on hand-written answers, the penalties on small
tensors, replay's mixing, the params, a tiny end-to-end run, and the smoke pipeline's output."""
from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import peaked_tiny_llama, smoke_params
from lib.core.config import make as make_params
from lib.core.stats import t_interval
from lib.core import config
from lib.continual import loop as CT, study as C
from lib.core import sft_data

# --------------------------------------------------------------------------- accuracy-matrix metrics

# T = 3; row 0 is the base model.
R_FORGETS = [[0.0, 0.0, 0.0],
             [0.8, 0.1, 0.0],
             [0.4, 0.9, 0.2],
             [0.3, 0.5, 0.7]]
R_MIXED = [[0.1, 0.2, 0.0],
           [0.5, 0.3, 0.1],
           [0.9, 0.6, 0.2],
           [0.7, 0.6, 0.8]]


def test_metrics_on_a_matrix_that_forgets():
    m = C.matrix_metrics(R_FORGETS)
    assert m["ACC"] == pytest.approx((0.3 + 0.5 + 0.7) / 3)
    assert m["BWT"] == pytest.approx(((0.3 - 0.8) + (0.5 - 0.9)) / 2)      # -0.45
    assert m["FWT"] == pytest.approx(((0.1 - 0.0) + (0.2 - 0.0)) / 2)      # 0.15
    assert C.forgetting_per_task(R_FORGETS) == pytest.approx([0.8 - 0.3, 0.9 - 0.5])
    assert m["forgetting"] == pytest.approx(0.45)


def test_metrics_where_forgetting_is_not_minus_bwt():
    # Skill 1 peaks after task 2 (0.9), not when it was learned (0.5): BWT says it gained,
    # forgetting says it lost 0.2 from its best.
    m = C.matrix_metrics(R_MIXED)
    assert m["ACC"] == pytest.approx(0.7)
    assert m["BWT"] == pytest.approx(((0.7 - 0.5) + (0.6 - 0.6)) / 2)      # +0.1
    assert m["FWT"] == pytest.approx(((0.3 - 0.2) + (0.2 - 0.0)) / 2)      # 0.15, against the base row
    assert m["forgetting"] == pytest.approx(((0.9 - 0.7) + (0.6 - 0.6)) / 2)


def test_metrics_of_a_learner_that_never_forgets():
    R = [[0, 0], [1, 0], [1, 1]]
    assert C.matrix_metrics(R) == {"ACC": 1.0, "BWT": 0.0, "FWT": 0.0, "forgetting": 0.0}


def test_forgetting_ignores_the_base_row():
    # The base scores 0.9 on skill 1; the learner never exceeds 0.4 and ends at 0.4: no forgetting.
    R = [[0.9, 0.0], [0.4, 0.0], [0.4, 1.0]]
    assert C.forgetting(R) == pytest.approx(0.0)


def test_a_matrix_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="T \\+ 1 rows"):
        C.acc([[0.1, 0.2], [0.3, 0.4]])


# --------------------------------------------------------------------------- stability gap


def _curve(points: dict[str, dict[int, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"step": s, "skill": k, "accuracy": a} for k, pts in points.items() for s, a in pts.items()])


def test_stability_gap_on_a_hand_written_curve():
    # steps_per_task 10, gap_window 0.5 -> the first part of a task is the 5 steps after a switch.
    curve = _curve({
        "a": {0: 0.0, 5: 0.5, 10: 0.9, 13: 0.5, 15: 0.3, 18: 0.1, 20: 0.6, 25: 0.4, 30: 0.5},
        "b": {10: 0.0, 15: 0.4, 20: 0.8, 25: 0.8, 30: 0.7},
        "c": {20: 0.0, 25: 0.3, 30: 0.6},
    })
    g = C.stability_gap(curve, ["a", "b", "c"], steps_per_task=10, gap_window=0.5)
    # switch to b (step 10), skill a: min over (10, 15] is 0.3 (step 18's 0.1 is after the window);
    # depth 0.9 - 0.3, recovery a(20) - 0.3.
    # switch to c (step 20): a: 0.6 -> min 0.4, end 0.5; b: 0.8 -> min 0.8, end 0.7.
    assert g["depth"] == pytest.approx((0.6 + 0.2 + 0.0) / 3)
    assert g["recovery"] == pytest.approx((0.3 + 0.1 - 0.1) / 3)
    assert g["min_after_switch"] == pytest.approx((0.3 + 0.4 + 0.8) / 3)


def test_stability_gap_needs_the_switch_and_window_points():
    curve = _curve({"a": {10: 0.9, 20: 0.5}})  # nothing inside (10, 15]
    with pytest.raises(ValueError, match="no evaluation"):
        C.stability_gap(curve, ["a", "b"], steps_per_task=10, gap_window=0.5)
    with pytest.raises(ValueError, match="lacks step 20"):
        C.stability_gap(_curve({"a": {10: 0.9, 15: 0.5}}), ["a", "b"], steps_per_task=10, gap_window=0.5)


def test_ci_is_a_student_t_interval_over_runs():
    out = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} · sd / √n
    assert out["mean"] == pytest.approx(2.0) and out["n"] == 3
    assert out["lo"] == pytest.approx(2.0 - half) and out["hi"] == pytest.approx(2.0 + half)
    assert t_interval([0.4]) == {"mean": 0.4, "lo": 0.4, "hi": 0.4, "n": 1}
    assert t_interval([])["n"] == 0


# --------------------------------------------------------------------------- penalties


def test_ewc_penalty_is_half_lambda_times_fisher_weighted_squares():
    params = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([[0.5]])}
    f1, s1 = {"w": torch.tensor([0.5, 2.0]), "v": torch.tensor([[4.0]])}, {"w": torch.tensor([0.0, 1.0]), "v": torch.tensor([[0.0]])}
    f2, s2 = {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([[1.0]])}, {"w": torch.tensor([3.0, 0.0]), "v": torch.tensor([[1.5]])}
    # Σ_k Σ_i F_k,i (θ_i − θ*_k,i)²: task 1: 0.5·1 + 2·1 + 4·0.25 = 3.5; task 2: 1·4 + 0 + 1·1 = 5.
    assert float(CT.ewc_penalty(params, [(f1, s1), (f2, s2)], lam=3.0)) == pytest.approx(3.0 / 2 * (3.5 + 5.0))
    assert float(CT.ewc_penalty(params, [], lam=3.0)) == 0.0


def test_l2_penalty_is_half_lambda_times_squared_distance():
    params = {"w": torch.tensor([1.0, 2.0]), "v": torch.tensor([[0.5]])}
    anchor = {"w": torch.tensor([0.0, 4.0]), "v": torch.tensor([[0.0]])}
    assert float(CT.l2_penalty(params, anchor, lam=0.2)) == pytest.approx(0.1 * (1 + 4 + 0.25))
    # EWC with F = 1 and one anchor is the L2 penalty.
    ones = {k: torch.ones_like(v) for k, v in params.items()}
    assert float(CT.ewc_penalty(params, [(ones, anchor)], 0.2)) == pytest.approx(float(CT.l2_penalty(params, anchor, 0.2)))


def test_olora_penalty_is_the_squared_frobenius_norm_of_a_new_times_a_old():
    g = torch.Generator().manual_seed(0)
    new = {"q": torch.randn(2, 5, generator=g), "k": torch.randn(3, 5, generator=g)}
    old = [{"q": torch.randn(2, 5, generator=g), "k": torch.randn(3, 5, generator=g)},
           {"q": torch.randn(4, 5, generator=g)}]  # an earlier task of another rank, one module only
    # Σ_k Σ_m Σ_{a,b} (row a of A_new · row b of A_k)², written out entry by entry.
    want = sum(float(new[m][a] @ o[m][b]) ** 2 for o in old for m in o for a in range(new[m].shape[0])
               for b in range(o[m].shape[0]))
    assert float(CT.olora_penalty(new, old, lam=0.5)) == pytest.approx(0.5 * want, rel=1e-5)


def test_olora_penalty_is_zero_for_orthogonal_rows():
    eye = torch.eye(4)
    assert float(CT.olora_penalty({"m": eye[:2]}, [{"m": eye[2:]}], lam=10.0)) == 0.0
    assert float(CT.olora_penalty({"m": eye[:2]}, [{"m": eye[1:3]}], lam=1.0)) == pytest.approx(1.0)  # e2 · e2 = 1


@pytest.fixture(scope="module")
def tiny(one_thread):
    from lib.core.tokenization import build_char_tokenizer

    tok = build_char_tokenizer()
    model = peaked_tiny_llama(tok)
    return tok, model


def test_rows_are_tokenized_as_trl_does_and_the_loss_is_on_the_answer(tiny):
    tok, _ = tiny
    (ids, n_prompt), = sft_data.encode(tok, ["inc 12 ="], ["13"], max_length=64)
    assert list(ids) == tok("inc 12 = 13" + tok.eos_token)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert n_prompt == len("inc 12 =") + 1  # BOS + the prompt's characters
    batch = sft_data.collate([(ids, n_prompt), (ids[:5], 3)], tok.pad_token_id)
    assert batch["labels"][0].tolist() == [-100] * n_prompt + list(ids[n_prompt:])
    assert batch["labels"][1].tolist() == [-100] * 3 + list(ids[3:5]) + [-100] * (len(ids) - 5)
    assert batch["attention_mask"][1].sum() == 5


def test_fisher_is_the_mean_squared_gradient(tiny):
    tok, model = tiny
    peft_model = CT.add_lora(__import__("copy").deepcopy(model), make_params(config.ExpertsParams, rank=2, alpha=4, target_modules=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():  # B starts at zero: give it values so A's gradients are not zero too
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    rows = sft_data.encode(tok, ["inc 12 =", "dec 40 =", "upper ab ="], ["13", "39", "AB"], 64)
    params = CT.trainable(peft_model)
    grads = []
    for r in rows:
        loss = peft_model(**sft_data.collate([r], tok.pad_token_id)).loss
        grads.append(torch.autograd.grad(loss, list(params.values())))
    want = {n: torch.stack([g[i] ** 2 for g in grads]).mean(0) for i, n in enumerate(params)}
    got = CT.fisher_diagonal(peft_model, rows, tok.pad_token_id, batch_size=1)
    assert set(got) == set(params) and all(float(want[n].abs().sum()) > 0 for n in want)
    for n in params:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-10)
    # batch_size = 3: the square of the whole batch's gradient (one batch).
    loss = peft_model(**sft_data.collate(rows, tok.pad_token_id)).loss
    batch_grads = torch.autograd.grad(loss, list(params.values()))
    got3 = CT.fisher_diagonal(peft_model, rows, tok.pad_token_id, batch_size=3)
    for i, n in enumerate(params):
        torch.testing.assert_close(got3[n], batch_grads[i] ** 2, rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in params.values())


# --------------------------------------------------------------------------- replay


def _rows(n: int, tag: int) -> list:
    return [((tag, i), 0) for i in range(n)]


def test_replay_mixes_the_requested_fraction_of_every_batch():
    current, pool = _rows(100, 0), _rows(30, 1)
    batches = CT.MixedBatches(current, batch_size=16, seed=0, pool=pool, fraction=0.25)
    for _ in range(20):
        batch = next(batches)
        assert len(batch) == 16
        assert sum(ids[0] == 1 for ids, _ in batch) == 4  # round(0.25 · 16) rows from earlier tasks
    # No pool (the first task): every row is current and each epoch covers the task once.
    plain = CT.MixedBatches(current, batch_size=10, seed=0, pool=None, fraction=0.25)
    epoch = [ids for _ in range(10) for ids, _ in next(plain)]
    assert sorted(epoch) == sorted(ids for ids, _ in current)
    # ...drawn exactly as a sampler without replay: the first task is shared between strategies.
    same = CT.MixedBatches(current, batch_size=10, seed=0)
    again = CT.MixedBatches(current, batch_size=10, seed=0, pool=None, fraction=0.25)
    assert [next(same) for _ in range(3)] == [next(again) for _ in range(3)]


def test_replay_buffer_keeps_a_seeded_subset():
    rows = _rows(50, 0)
    buf = CT.replay_buffer(rows, 10, seed=3)
    assert len(buf) == 10 and len(set(buf)) == 10 and set(buf) <= set(rows)
    assert buf == CT.replay_buffer(rows, 10, seed=3)
    assert CT.replay_buffer(rows, None, seed=3) == rows


# --------------------------------------------------------------------------- params and registry


def _continual(**kw) -> dict:
    """params.yaml's continual section with ``kw`` merged on top."""
    return config.deep_merge(config.read_params(config.REPO_PARAMS)["continual"], {"tasks": ["inc", "dec", "maxdigit", "count"], **kw})


def test_unknown_strategy_is_a_clear_params_error():
    from lib.continual.strategies import STRATEGIES

    with pytest.raises(config.ParamsError) as err:
        config.validate_section("continual", _continual(strategies=["sequential_lora", "bogus"]))
    msg = str(err.value)
    assert "continual.strategies" in msg
    assert f"unknown continual strategy ['bogus']; known: {', '.join(STRATEGIES.names())}" in msg
    with pytest.raises(config.ParamsError, match="a continual strategy is listed twice"):
        config.validate_section("continual", _continual(strategies=["ewc", "ewc"]))


def test_other_bad_continual_params():
    with pytest.raises(config.ParamsError, match="unknown task order"):
        config.validate_section("continual", _continual(orders=["random"]))
    with pytest.raises(config.ParamsError, match="unknown skill"):
        config.validate_section("continual", _continual(tasks=["inc", "incc"]))
    with pytest.raises(config.ParamsError, match="continual.library.merge"):
        config.validate_section("continual", _continual(library={"merge": "avg"}))
    with pytest.raises(config.ParamsError, match="lower eval_every"):
        config.validate_section("continual", _continual(steps_per_task=10, eval_every=8))
    with pytest.raises(config.ParamsError, match="continual.tasks"):
        config.validate_section("continual", _continual(tasks=["inc"]))


def test_every_strategy_is_registered_with_its_paper():
    from lib.continual.strategies import STRATEGIES
    from lib.core.registry import UnknownName

    assert set(STRATEGIES.names()) == {"sequential_lora", "sequential_full", "replay", "ewc", "l2", "olora",
                                       "library_merge", "library_route", "multitask"}
    assert set(C.CURVE_STRATEGIES) < set(STRATEGIES.names())
    assert set(_continual()["strategies"]) <= set(STRATEGIES.names())  # params.yaml's list
    for name in STRATEGIES.names():
        entry = STRATEGIES.get(name)
        assert entry.kind == "continual strategy" and entry.paper and entry.url.startswith("https://"), name
        assert callable(entry.obj) and entry.obj.__module__ == f"lib.continual.strategies.{name}"  # one file each
    assert "Kirkpatrick et al. 2017" in STRATEGIES.get("ewc").paper and "Wang et al. 2023" in STRATEGIES.get("olora").paper
    with pytest.raises(UnknownName, match="unknown continual strategy 'bogus'; known: .*sequential_lora"):
        STRATEGIES.get("bogus")


def test_a_new_strategy_is_one_file(tiny_project, tmp_path, monkeypatch):
    """A toy strategy in a new module registers itself, passes params validation and runs
    through the stage's code path (run_study -> Study.run_all -> summarize)."""
    from lib.continual.strategies import STRATEGIES

    (tmp_path / "toy_strategy_plugin.py").write_text(textwrap.dedent('''
        from lib.continual.strategies import STRATEGIES
        from lib.continual.strategies._common import result

        @STRATEGIES.register("toy_frozen", paper="none", url="https://example.org")
        def toy_frozen(study, order, skills, seed):
            """Never learns: every row after a task is the base model's."""
            rows = [study.base_row] * len(skills)
            return result(study, "toy_frozen", order, skills, seed, rows, [], 0, study.base_params, 0.0)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    root, skills = tiny_project
    e = make_params(config.ExpertsParams, rank=2, alpha=4, target_modules=["q_proj", "v_proj"], batch_size=4, lr=1e-2)
    ev = make_params(config.EvalParams, batch_size=64, n_boot=100)
    try:
        __import__("toy_strategy_plugin")
        assert STRATEGIES.get("toy_frozen").paper == "none"
        c = make_params(config.ContinualParams, tasks=["inc", "maxdigit"], strategies=["toy_frozen"], orders=["given"],
                        seeds=[0], steps_per_task=4, eval_every=2, eval_n=4, workers=1)
        results = C.run_study(root, skills, e, ev, c, progress=False)
        assert [(r.strategy, r.order, r.seed) for r in results] == [("toy_frozen", "given", 0)]
        assert results[0].R.shape == (3, 2) and (results[0].R == results[0].R[0]).all()
        metrics, summary = C.summarize(results, c)
        toy = metrics["strategies"]["toy_frozen"]
        assert toy["BWT"]["mean"] == 0.0 and toy["FWT"]["mean"] == 0.0 and toy["forgetting"]["mean"] == 0.0
        assert metrics["best_strategy"] == "toy_frozen" and list(summary.strategy) == ["toy_frozen"]
    finally:
        STRATEGIES.remove("toy_frozen")
        sys.modules.pop("toy_strategy_plugin", None)
    with pytest.raises(config.ParamsError, match=r"unknown continual strategy \['toy_frozen'\]; known: .*sequential_lora"):
        make_params(config.ContinualParams, strategies=["toy_frozen"])


def test_orders_alternate_or_group_the_families():
    tasks = ["inc", "dec", "maxdigit", "count"]  # arithmetic, arithmetic, logic, logic
    assert C.build_order("grouped", tasks) == ["inc", "dec", "maxdigit", "count"]
    assert C.build_order("alternating", tasks) == ["inc", "maxdigit", "dec", "count"]
    assert C.build_order("alternating", ["inc", "dec", "reverse", "maxdigit"]) == ["inc", "reverse", "maxdigit", "dec"]
    assert C.build_order("given", ["dec", "inc"]) == ["dec", "inc"]


def test_tasks_must_be_training_skills(tmp_path):
    skills = make_params(config.SkillsParams, train=["inc", "dec"])
    c = make_params(config.ContinualParams, tasks=["inc", "maxdigit"])
    with pytest.raises(config.ParamsError, match="not in skills.train"):
        C.check_params(skills, c, tmp_path)


# --------------------------------------------------------------------------- a tiny end-to-end run


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory, tiny):
    from lib.core import data
    from lib.synth import datasets as synth

    tok, model = tiny
    root = tmp_path_factory.mktemp("continual")
    skills = make_params(config.SkillsParams, train=["inc", "maxdigit"], difficulty={"default": 2})
    syn = make_params(config.SynthesizeParams, n_train=40, n_val=8, n_test=12)
    for s in skills.train:
        data.save(synth.skill_splits(s, skills, syn), root / "datasets" / "skills" / s)
    model.save_pretrained(root / "models" / "base")
    tok.save_pretrained(root / "models" / "base")
    return root, skills


STRATS = ["sequential_lora", "replay", "ewc", "l2", "olora", "sequential_full", "multitask"]


def test_tiny_end_to_end_run(tiny_project):
    root, skills = tiny_project
    e = make_params(config.ExpertsParams, rank=2, alpha=4, target_modules=["q_proj", "v_proj"], batch_size=4, lr=1e-2)
    ev = make_params(config.EvalParams, batch_size=64, n_boot=100)
    c = make_params(config.ContinualParams, tasks=["inc", "maxdigit"], strategies=STRATS, orders=["given"], seeds=[0],
                               steps_per_task=4, eval_every=2, eval_n=4, workers=1,
                               replay={"fraction": 0.5, "buffer": 5}, ewc={"lam": 10.0, "fisher_n": 3})
    results = C.run_study(root, skills, e, ev, c, progress=False)
    assert [r.strategy for r in results] == STRATS
    base_row = results[0].R[0]
    for r in results:
        assert r.R.shape == (3, 2) and ((0 <= r.R) & (r.R <= 1)).all(), r.strategy
        assert (r.R[0] == base_row).all()  # row 0 is the base model for every strategy
        assert r.trainable_params > 0 and r.params_held >= r.trainable_params and r.wall_s > 0
    by = {r.strategy: r for r in results}
    # The first task is shared: same model after task 1 for every LoRA strategy and multitask's row 1.
    for s in ("replay", "ewc", "l2", "olora", "multitask"):
        assert (by[s].R[1] == by["sequential_lora"].R[1]).all()
    # Probe points every 2 steps and at each task end, on the skills seen so far.
    seq = by["sequential_lora"].curve
    assert sorted(seq.step.unique()) == [0, 2, 4, 6, 8]
    assert set(seq[seq.step > 4].skill) == {"inc", "maxdigit"} and set(seq[seq.step <= 4].skill) == {"inc"}
    assert by["multitask"].curve.empty
    # Costs: full fine-tuning trains every weight; EWC, L2 and O-LoRA hold more than plain LoRA.
    assert by["sequential_full"].trainable_params == by["sequential_full"].params_held
    for s in ("ewc", "l2", "olora"):
        assert by[s].params_held > by["sequential_lora"].params_held
    assert by["replay"].info["replay_rows"] == 10  # 5 kept per task

    metrics, summary = C.summarize(results, c)
    assert set(metrics["strategies"]) == set(STRATS) and len(summary) == len(STRATS)
    assert set(metrics["stability_gap"]) == set(STRATS) - {"multitask"}
    assert metrics["best_strategy"] in set(STRATS) - {"multitask"}
    assert metrics["tasks"] == {"given": ["inc", "maxdigit"]}
    stab = C.stability_table(results)
    assert list(stab.columns) == ["strategy", "order", "seed", "step", "task", "skill", "accuracy"]


# --------------------------------------------------------------------------- the smoke pipeline

CI_KEYS = {"mean", "lo", "hi", "n"}


def test_smoke_pipeline_wrote_the_continual_metrics(project):
    p = smoke_params(project)["continual"]
    m = json.loads((project / "metrics" / "continual.json").read_text())
    orders = {o: C.build_order(o, p["tasks"]) for o in p["orders"]}
    assert m["tasks"] == orders and m["seeds"] == p["seeds"]
    assert set(m["strategies"]) == set(p["strategies"])
    T = len(p["tasks"])
    for name, s in m["strategies"].items():
        for key in ("ACC", "BWT", "FWT", "forgetting"):
            assert set(s[key]) == CI_KEYS and s[key]["lo"] <= s[key]["mean"] <= s[key]["hi"], (name, key)
        assert set(s["R"]) == set(orders)
        for R in s["R"].values():
            assert np.asarray(R).shape == (T + 1, T) and np.all((np.asarray(R) >= 0) & (np.asarray(R) <= 1))
        assert isinstance(s["trainable_params"], int) and s["params_held"] >= s["trainable_params"] > 0
        assert s["wall_s"] >= 0
    curve_strategies = set(C.CURVE_STRATEGIES) & set(p["strategies"])
    assert set(m["stability_gap"]) == curve_strategies
    for g in m["stability_gap"].values():
        assert set(g) == {"depth", "recovery", "min_after_switch"} and all(set(v) == CI_KEYS for v in g.values())
    assert m["best_strategy"] in set(p["strategies"]) - {"multitask"}
    stab = pd.read_csv(project / "plots" / "continual_stability.csv")
    assert list(stab.columns) == ["strategy", "order", "seed", "step", "task", "skill", "accuracy"]
    assert set(stab.strategy) == curve_strategies
    summary = pd.read_csv(project / "plots" / "continual_summary.csv")
    assert sorted(summary.strategy) == sorted(p["strategies"])
    assert (project / "reports" / "notebooks" / "05_continual.ipynb").is_file()


def test_results_do_not_depend_on_the_number_of_workers(tiny_project):
    root, skills = tiny_project
    e = make_params(config.ExpertsParams, rank=2, alpha=4, target_modules=["q_proj", "v_proj"], batch_size=4, lr=1e-2)
    ev = make_params(config.EvalParams, batch_size=64, n_boot=100)
    # Two orders: with workers, each (seed, order) is its own job, gathered back in order.
    kw = dict(tasks=["inc", "maxdigit"], strategies=["replay", "sequential_lora"], orders=["given", "alternating"],
              seeds=[0, 1], steps_per_task=4, eval_every=2, eval_n=4, replay={"fraction": 0.5, "buffer": 5})
    one = C.run_study(root, skills, e, ev, make_params(config.ContinualParams, **kw, workers=1), progress=False)
    two = C.run_study(root, skills, e, ev, make_params(config.ContinualParams, **kw, workers=2), progress=False)
    assert [(r.seed, r.strategy, r.order) for r in one] == [(r.seed, r.strategy, r.order) for r in two]
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a.R, b.R)
        pd.testing.assert_frame_equal(a.curve, b.curve)
