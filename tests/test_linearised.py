"""Linearised experts (issue 19): the first-order expansion, its generation, and one trained expert."""
from __future__ import annotations

import pytest
import torch

from conftest import peaked_tiny_llama
from lib.core.config import make, ExpertsParams
from lib.core.evaluation import generate
from lib.core.tokenization import build_char_tokenizer
from lib.experts.linearised import LinearisedLM, adapted_weights, linear_logits, train_linearised

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(one_thread):
    tok = build_char_tokenizer()
    return peaked_tiny_llama(tok), tok


def _batch(tok, texts):
    tok.padding_side = "left"
    b = tok(texts, return_tensors="pt", padding=True)
    return b["input_ids"], b["attention_mask"]


def _delta(model, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(w.shape, generator=g) for n, w in adapted_weights(model, TARGETS).items()}


def test_linear_logits_are_the_first_order_expansion(tiny):
    """At ΔW = 0 the base's logits; linear in ΔW exactly; and f(W0 + εΔ) − f_lin(εΔ) shrinks as ε²."""
    from torch.func import functional_call

    model, tok = tiny
    ids, mask = _batch(tok, ["inc 12 =", "reverse abc ="])
    w0 = adapted_weights(model, TARGETS)
    zero = {n: torch.zeros_like(w) for n, w in w0.items()}
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        torch.testing.assert_close(linear_logits(model, zero, ids, mask), base)
        d1, d2 = _delta(model, 1.0, 1), _delta(model, 1.0, 2)
        both = linear_logits(model, {n: d1[n] + 2 * d2[n] for n in d1}, ids, mask)
        parts = linear_logits(model, d1, ids, mask) + 2 * linear_logits(model, d2, ids, mask) - 2 * base
        torch.testing.assert_close(both, parts, atol=1e-4, rtol=1e-4)
        errors = []
        for eps in (1e-2, 5e-3):
            moved = {f"{n}.weight": w0[n] + eps * d1[n] for n in w0}
            exact = functional_call(model, moved, args=(), kwargs={"input_ids": ids, "attention_mask": mask,
                                                                    "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}).logits
            errors.append(float((exact - linear_logits(model, {n: eps * d1[n] for n in d1}, ids, mask)).abs().max()))
    assert errors[1] < errors[0] / 3  # second order: halving ε quarters the error (3 allows for float32 noise)


def test_linearised_model_at_zero_generates_as_the_base(tiny):
    model, tok = tiny
    prompts = ["inc 12 =", "reverse abcd =", "upper ab ="]
    lin = LinearisedLM(model, {n: torch.zeros_like(w) for n, w in adapted_weights(model, TARGETS).items()})
    base = [(g.text, g.n_tokens, round(g.confidence, 4)) for g in generate(model, tok, prompts, max_new_tokens=5, progress=False)]
    same = [(g.text, g.n_tokens, round(g.confidence, 4)) for g in generate(lin, tok, prompts, max_new_tokens=5, progress=False)]
    assert same == base
    moved = LinearisedLM(model, _delta(model, 0.5))
    assert [g.text for g in generate(moved, tok, prompts, max_new_tokens=5, progress=False)] != [b[0] for b in base]


def test_a_linearised_expert_learns_its_rows(tiny):
    """Training B through the linearised model lowers the loss; ΔW = s·B·A0 has rank ≤ r; the same seed gives the same ΔW."""
    model, tok = tiny
    rows = {"prompt": ["inc 1 =", "inc 2 =", "inc 3 =", "inc 4 ="] * 4, "answer": ["2", "3", "4", "5"] * 4}
    e = make(ExpertsParams, rank=2, alpha=4, steps=40, lr=0.05, batch_size=8, target_modules=TARGETS, stop_loss=None)
    delta, info = train_linearised(model, tok, rows, e, steps=40, seed=3)
    assert info["steps_run"] == 40 and info["losses"][-1]["loss"] < 0.5 * info["losses"][0]["loss"]
    assert set(delta) == set(adapted_weights(model, TARGETS))
    assert all(torch.linalg.matrix_rank(d) <= 2 for d in delta.values())
    again, _ = train_linearised(model, tok, rows, e, steps=40, seed=3)
    assert all(torch.equal(delta[n], again[n]) for n in delta)
    assert all(not p.requires_grad for p in model.parameters())


def test_the_linearised_study_runs_on_the_smoke_project(project, tmp_path):
    """Trains a seed's linearised experts on the smoke run's base and data, scores their merges in both models and
    puts them beside stage 04's ordinary experts on the same seed."""
    from lib.experts.linearised_study import run

    found = run(project, [0], 1, tmp_path, lr=0.01)
    assert set(found["systems"]) == {f"{space}:{m}" for space in ("linearised", "ordinary") for m in ("task_arithmetic", "ties")}
    assert found["lr"] == 0.01 and set(found["linearised_expert_own"]["0"]) == set(__import__("conftest").smoke_params(project)["skills"]["train"])
    assert len(found["linearised_minus_ordinary"]["ties"]["per_seed"]) == 1
    assert (project / "models" / "linearised" / "lr0.01" / "0").is_dir() and (tmp_path / "linearised.json").is_file()
    with pytest.raises(Exception, match="not the study's"):
        run(project, [7], 1, tmp_path)
