"""Stage 06 (skill localization by grafting): the masks, the graft formulas and the mask
optimisation on tiny tensors and a tiny Llama built here, the params checks, and the
smoke-pipeline outputs."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import peaked_tiny_llama, smoke_params
from lib.core import config
from lib.core.stats import mantel_spearman, mean_ci
from lib.core import sft_data
from lib.localize import grafting as G, study as LZ
from lib.localize.finetune import considered_names
from lib.core.tokenization import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
T = torch.tensor


def close(a, b, **kw):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), **kw)


def count(mask) -> int:
    return sum(int(m.sum()) for m in mask.values())


# ---------------------------------------------------------------- masks


def test_n_keep_is_round_of_fraction_at_least_one():
    assert G.n_keep(0.1, 1000) == 100
    assert G.n_keep(0.0001, 327_680) == 33          # round(32.768)
    assert G.n_keep(1e-9, 50) == 1                  # a mask never keeps nothing
    assert G.n_keep(1.0, 7) == 7
    for bad in (0, -0.1, 1.5):
        with pytest.raises(G.GraftError, match=r"\(0, 1\]"):
            G.n_keep(bad, 10)


def test_topk_mask_exact_count_and_ties_to_lower_index():
    scores = {"a": T([[1.0, 5.0], [5.0, 0.0]]), "b": T([5.0, 5.0, 2.0])}   # five 5s tie
    m = G.topk_mask(scores, 3 / 7)                                          # k = 3 of 7
    assert count(m) == 3
    # one global ranking; among the tied 5s the lowest flat indices win: a[0,1], a[1,0], b[0]
    assert m["a"].tolist() == [[False, True], [True, False]] and m["b"].tolist() == [True, False, False]
    for s in (0.2, 0.5, 1.0):
        assert count(G.topk_mask(scores, s)) == G.n_keep(s, 7)


def test_magnitude_mask_keeps_largest_absolute_updates_over_all_tensors():
    delta = {"w1": T([[0.1, -3.0], [0.2, 0.0]]), "w2": T([2.0, -0.5, 1.0])}
    m = G.magnitude_mask(delta, 3 / 7)
    assert m["w1"].tolist() == [[False, True], [False, False]] and m["w2"].tolist() == [True, False, True]


def test_random_mask_has_the_sparsity_and_is_seed_reproducible():
    like = {"a": torch.zeros(40, 25), "b": torch.zeros(100)}
    n = 1100
    for s in (0.001, 0.05, 0.3, 1.0):
        m = G.random_mask(like, s, seed=7)
        assert count(m) == G.n_keep(s, n)
        assert all(m[k].shape == like[k].shape for k in like)
    a, b, c = G.random_mask(like, 0.2, 3), G.random_mask(like, 0.2, 3), G.random_mask(like, 0.2, 4)
    assert all(torch.equal(a[k], b[k]) for k in like)
    assert not all(torch.equal(a[k], c[k]) for k in like)


def test_random_masks_overlap_as_expected_by_chance():
    like = {"w": torch.zeros(20_000)}
    j = np.mean([G.jaccard(G.random_mask(like, 0.1, 2 * i), G.random_mask(like, 0.1, 2 * i + 1)) for i in range(10)])
    assert j == pytest.approx(LZ.random_jaccard(0.1), rel=0.05)          # s / (2 - s) = 0.0526


def test_jaccard_on_hand_made_masks():
    a = {"x": T([1, 1, 0, 0], dtype=torch.bool), "y": T([[1, 0]], dtype=torch.bool)}
    b = {"x": T([0, 1, 1, 0], dtype=torch.bool), "y": T([[1, 1]], dtype=torch.bool)}
    # intersection {x1, y0} = 2; union {x0, x1, x2, y0, y1} = 5
    assert G.jaccard(a, b) == pytest.approx(2 / 5)
    assert G.jaccard(a, a) == 1.0
    empty = {k: torch.zeros_like(v) for k, v in a.items()}
    assert G.jaccard(empty, empty) == 0.0
    with pytest.raises(G.GraftError):
        G.jaccard(a, {"x": b["x"]})


# ---------------------------------------------------------------- graft formulas


def test_graft_and_union_graft_formulas_on_small_tensors():
    pre = {"w": T([1.0, 1.0, 1.0, 1.0])}
    d1, d2 = {"w": T([2.0, 4.0, 0.0, 8.0])}, {"w": T([-2.0, 6.0, 3.0, 1.0])}
    m1 = {"w": T([1, 1, 0, 0], dtype=torch.bool)}
    m2 = {"w": T([0, 1, 1, 0], dtype=torch.bool)}
    close(G.graft(pre, d1, m1)["w"], [3.0, 5.0, 1.0, 1.0])
    # entry 0: only skill 1 -> 1 + 2; entry 1: both -> 1 + (4 + 6) / 2; entry 2: only skill 2 -> 1 + 3; entry 3: none
    close(G.union_graft(pre, [d1, d2], [m1, m2])["w"], [3.0, 6.0, 4.0, 1.0])
    full = {"w": torch.ones(4, dtype=torch.bool)}
    close(G.union_graft(pre, [d1, d2], [full, full])["w"], pre["w"] + (d1["w"] + d2["w"]) / 2)   # the plain average
    close(G.union_graft(pre, [d1], [m1])["w"], G.graft(pre, d1, m1)["w"])


def test_grafts_keep_the_base_dtype_so_a_bf16_model_loads_them():
    pre = {"w": T([1.0, 2.0, 3.0]).to(torch.bfloat16)}
    delta, mask = {"w": T([0.5, 0.25, -1.0])}, {"w": T([1, 0, 1], dtype=torch.bool)}
    g, u = G.graft(pre, delta, mask)["w"], G.union_graft(pre, [delta], [mask])["w"]
    assert g.dtype == u.dtype == torch.bfloat16
    close(g.float(), [1.5, 2.0, 2.0])
    close(u.float(), [1.5, 2.0, 2.0])


def test_init_logits_and_one_mask_step_follow_the_formula():
    delta = {"a": T([0.5, -2.0, 0.1]), "b": T([[1.0, 0.0]])}
    S = G.init_logits(delta, 2 / 5, s0=3.0)
    assert S["a"].tolist() == [-3.0, 3.0, -3.0] and S["b"].tolist() == [[3.0, -3.0]]
    S = {k: v.clone().requires_grad_(True) for k, v in S.items()}
    S["a"].grad, S["b"].grad = T([0.5, -4.0, 1.0]), T([[2.0, 0.0]])
    top = G.mask_step(S, lr=2.0)                       # S <- S - lr * g / max|g|, max|g| = 4
    assert top == 4.0
    close(S["a"].detach(), [-3.0 - 0.25, 3.0 + 2.0, -3.0 - 0.5])
    close(S["b"].detach(), [[3.0 - 1.0, -3.0]])


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer, considered names, θ_pre, fine-tuned Δθ, training examples): a tiny
    Llama, and the same model trained a few Adam steps on a toy skill (reverse two letters)."""
    tok = build_char_tokenizer()
    model = peaked_tiny_llama(tok, seed=0)
    names = considered_names(model, TARGETS)
    pre = G.weights_of(model, names)
    prompts = [f"rev {a}{b} =" for a in "abcd" for b in "efgh"]
    ex = sft_data.encode(tok, prompts, [p[5] + p[4] for p in prompts])
    batch = sft_data.collate(ex, tok.pad_token_id)
    params = dict(model.named_parameters())
    torch.manual_seed(0)
    opt = torch.optim.Adam([params[n] for n in names], lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        sft_data.completion_loss(model, batch).backward()
        opt.step()
    delta = G.delta_of(pre, G.weights_of(model, names))
    G.load_weights(model, pre)
    model.zero_grad(set_to_none=True)
    return model.eval(), tok, names, pre, delta, ex


def test_considered_parameters_are_the_blocks_linear_weights(tiny):
    model, _, names, *_ = tiny
    assert len(names) == 7 * model.config.num_hidden_layers
    assert all(n.endswith(".weight") and n.split(".")[-2] in TARGETS for n in names)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)
    with pytest.raises(config.ParamsError, match="matches no linear layer"):
        considered_names(model, ["nonexistent_proj"])


def test_completion_loss_equals_the_models_own_loss_on_answer_tokens(tiny):
    model, tok, *_, ex = tiny
    batch = sft_data.collate(ex[:5], tok.pad_token_id)
    assert (batch["labels"][:, 0] == -100).all()                     # prompt positions are not scored
    ours = sft_data.completion_loss(model, batch)
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    close(ours.detach(), float(theirs.detach()), rtol=1e-5, atol=1e-6)


def test_full_mask_graft_equals_finetuned_and_empty_mask_equals_base(tiny):
    model, tok, names, pre, delta, ex = tiny
    batch = sft_data.collate(ex[:8], tok.pad_token_id)
    ft_weights = {n: pre[n] + delta[n] for n in names}
    with torch.no_grad():
        G.load_weights(model, ft_weights)
        ft_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        G.load_weights(model, pre)
        base_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full = {n: torch.ones_like(d, dtype=torch.bool) for n, d in delta.items()}
    empty = {n: torch.zeros_like(d, dtype=torch.bool) for n, d in delta.items()}
    assert G.topk_mask(delta, 1.0).keys() == full.keys() and count(G.topk_mask(delta, 1.0)) == count(full)
    for mask, weights, logits in ((full, ft_weights, ft_logits), (empty, pre, base_logits)):
        grafted = G.graft(pre, delta, mask)
        for n in names:
            torch.testing.assert_close(grafted[n], weights[n])
        with torch.no_grad():
            out = torch.func.functional_call(model, grafted, args=(), kwargs={"input_ids": batch["input_ids"],
                                             "attention_mask": batch["attention_mask"]}, strict=False).logits
        torch.testing.assert_close(out, logits)
    assert not torch.allclose(ft_logits, base_logits)


def test_relaxed_mask_gradient_is_the_chain_rule_formula(tiny):
    model, tok, names, pre, delta, ex = tiny
    batch = sft_data.collate(ex[:8], tok.pad_token_id)
    S = {n: torch.randn(d.shape, generator=torch.Generator().manual_seed(i)).requires_grad_(True)
         for i, (n, d) in enumerate(delta.items())}
    theta = {n: (pre[n] + torch.sigmoid(S[n].detach()) * delta[n]).requires_grad_(True) for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        sft_data.completion_loss(model, batch, theta).backward()                        # ∂L/∂θ at θ = θ_pre + σ(S) ⊙ Δθ
        sft_data.completion_loss(model, batch, G.relaxed(pre, delta, S)).backward()     # ∂L/∂S by autograd
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    for n in names:
        torch.testing.assert_close(S[n].grad, G.sigmoid_grad_formula(theta[n].grad, delta[n], S[n].detach()),
                                   rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())                       # the model is never trained


def test_mask_optimisation_lowers_the_loss_and_keeps_the_sparsity(tiny):
    model, tok, names, pre, delta, ex = tiny
    sp = 0.02
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = G.magnitude_mask(delta, sp)                         # what the optimisation starts from
    mask, losses = G.optimise_mask(model, pre, delta, G.batches(ex, 8, tok.pad_token_id, seed=0), sp,
                                   steps=30, lr=8.0, s0=3.0)
    assert count(mask) == G.n_keep(sp, G.numel(delta))
    assert losses[-1] < losses[0]                               # the relaxed objective went down
    loss = lambda m: sft_data.mean_loss(model, sft_data.make_batches(ex, 128, tok.pad_token_id), G.graft(pre, delta, m))  # noqa: E731
    assert loss(mask) < loss(start) - 0.05                      # and so did the rounded graft's loss
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())   # base weights untouched
    zero, _ = G.optimise_mask(model, pre, delta, G.batches(ex, 8, tok.pad_token_id, seed=0), sp, steps=0, lr=8.0)
    assert all(torch.equal(zero[n], start[n]) for n in names)  # 0 steps: the magnitude mask


# ---------------------------------------------------------------- study helpers


def test_ci_over_skills_and_recovery_summary():
    ci = mean_ci([0.5, 1.0, float("nan"), 0.75], n_boot=200)
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(0.75) and ci["lo"] <= 0.75 <= ci["hi"]
    table = pd.DataFrame({"source": ["lora"] * 4, "kind": ["graft"] * 4, "sparsity": [0.1, 0.1, 0.3, 0.3],
                          "skill": ["a", "b", "a", "b"], "recovery": [0.2, 0.4, 1.0, 1.0]})
    out = LZ.recovery_summary(table, 200)
    assert out["lora"]["graft"]["0.1"]["mean"] == pytest.approx(0.3)
    assert out["lora"]["graft"]["0.3"] == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 2}


def test_concentration_of_a_hand_made_update():
    delta = {"w": T([3.0, 1.0, 0.0, 0.0])}                      # |Δ|² = 9, 1: total 10
    c = LZ.concentration(delta, [0.25, 0.5, 1.0])
    assert c[0.25] == pytest.approx(0.9) and c[0.5] == pytest.approx(1.0) and c[1.0] == pytest.approx(1.0)


def test_correlation_spearman_and_family_overlap():
    skills = ["a", "b", "c", "d"]
    J = pd.DataFrame(np.eye(4), index=skills, columns=skills)
    B = J.copy()
    vals = {("a", "b"): 1, ("a", "c"): 2, ("a", "d"): 3, ("b", "c"): 4, ("b", "d"): 5, ("c", "d"): 6}
    for (x, y), v in vals.items():
        J.loc[x, y] = J.loc[y, x] = v / 10
        B.loc[x, y] = B.loc[y, x] = v ** 2            # monotone in J: Spearman 1
    c = mantel_spearman(J, B, n_boot=200, n_perm=200)
    assert c["r"] == pytest.approx(1.0) and c["n_pairs"] == 6 and c["hi"] == pytest.approx(1.0)
    assert 0 < c["p_permutation"] <= 1
    B2 = B.copy()
    for (x, y), v in vals.items():
        B2.loc[x, y] = B2.loc[y, x] = -v              # reversed: -1
    assert mantel_spearman(J, B2, n_boot=50, n_perm=50)["r"] == pytest.approx(-1.0)
    mean, same, cross = LZ.family_overlap(J, {"a": "f", "b": "f", "c": "g", "d": "g"})
    assert same == pytest.approx((0.1 + 0.6) / 2) and cross == pytest.approx((0.2 + 0.3 + 0.4 + 0.5) / 4)
    assert mean == pytest.approx(2.1 / 6)


def test_missing_updates_are_clear_errors(tmp_path, tiny):
    model, _, _, pre, *_ = tiny
    with pytest.raises(LZ.LocalizeError, match=r"no fine-tuned model for 'inc'; run `dvc repro finetune@inc`"):
        LZ.load_deltas(tmp_path, model, "full_ft", ["inc"], pre)
    with pytest.raises(LZ.LocalizeError, match=r"no LoRA expert for 'inc'; run `dvc repro expert@inc`"):
        LZ.load_deltas(tmp_path, model, "lora", ["inc"], pre)
    with pytest.raises(LZ.LocalizeError, match="unknown source 'x'"):
        LZ.load_deltas(tmp_path, model, "x", ["inc"], pre)


def test_study_skills_must_be_training_skills():
    assert LZ.study_skills(["inc", "dec"], None) == ["inc", "dec"]
    with pytest.raises(LZ.LocalizeError, match="not training skills"):
        LZ.study_skills(["inc", "dec"], ["upper"])


# ---------------------------------------------------------------- params


def _localize(values: dict):
    """Validate params.yaml's localize section with ``values`` merged on top."""
    return config.validate_section("localize", config.deep_merge(config.read_params(config.REPO_PARAMS)["localize"], values))


def test_localize_params_validation():
    ok = _localize({})
    assert ok.sparsities == sorted(ok.sparsities) and ok.focus_sparsity in ok.sparsities
    for bad in ([0], [1.5], [0.1, -0.2]):
        with pytest.raises(config.ParamsError, match=r"localize\.sparsities.*\(0, 1\]"):
            _localize({"sparsities": bad, "focus_sparsity": 0.1})
    with pytest.raises(config.ParamsError, match=r"unknown localization source \['full'\]; known: full_ft, lora"):
        _localize({"sources": ["full"]})
    with pytest.raises(config.ParamsError, match="focus_sparsity 0.5 must be one of sparsities"):
        _localize({"focus_sparsity": 0.5})
    with pytest.raises(config.ParamsError, match="unknown key"):
        _localize({"mask_stpes": 3})
    with pytest.raises(config.ParamsError, match="unknown skill"):
        _localize({"skills": ["nope"]})


# ---------------------------------------------------------------- the smoke pipeline


def test_smoke_pipeline_wrote_localize_outputs(project):
    p = smoke_params(project)
    L, skills = p["localize"], p["skills"]["train"]
    m = json.loads((project / "metrics" / "localize.json").read_text())
    assert {"sparsities", "finetuned_accuracy", "recovery", "overlap", "calibration", "graft_merge"} <= set(m)
    assert m["sparsities"] == sorted(L["sparsities"])
    assert set(m["finetuned_accuracy"]) == {"full_ft", "lora"} and set(m["finetuned_accuracy"]["lora"]) == set(skills)
    for src in ("full_ft", "lora"):
        assert set(m["recovery"][src]) == {"graft", "magnitude", "random"}
        for kind in ("graft", "magnitude", "random"):
            assert set(m["recovery"][src][kind]) == {str(float(s)) for s in L["sparsities"]}
            for ci in m["recovery"][src][kind].values():
                assert set(ci) == {"mean", "lo", "hi", "n"}
    ov = m["overlap"]
    assert ov["sparsity"] == L["focus_sparsity"]
    assert {"mean_offdiag_jaccard", "same_family_jaccard", "cross_family_jaccard", "corr_with_behaviour"} <= set(ov)
    assert {"r", "lo", "hi", "method"} <= set(ov["corr_with_behaviour"])
    assert 0 <= ov["mean_offdiag_jaccard"] <= 1
    cal = m["calibration"]
    assert {"sparsity", "ece_finetuned", "ece_grafted", "relative_reduction"} <= set(cal)
    assert {"mean", "lo", "hi", "n"} == set(cal["ece_finetuned"])
    gm = m["graft_merge"]
    assert set(gm["mean_normalised"]) == {"mean", "lo", "hi", "n"} and gm["mean_normalised"]["n"] == len(skills)
    assert set(gm["by_source"]) == {f"{s}: {k}" for s in ("full_ft", "lora")
                                    for k in ("graft union", "magnitude union", "average of full updates")}
    rec = pd.read_csv(project / "plots" / "localize_recovery.csv")
    assert list(rec.columns) == ["source", "kind", "sparsity", "skill", "accuracy", "recovery"]
    assert len(rec) == 2 * 3 * len(L["sparsities"]) * len(skills)
    assert (project / "plots" / "localize_overlap.csv").is_file()
    assert (project / "reports" / "notebooks" / "06_localize.ipynb").is_file()
    # Full fine-tuning changed only the considered weights: embeddings and norms are the base's.
    from safetensors.torch import load_file
    base = load_file(str(project / "models" / "base" / "model.safetensors"))
    for s in skills:
        ft = load_file(str(project / "models" / "finetuned" / s / "model.safetensors"))
        info = json.loads((project / "models" / "finetuned" / s / "train_info.json").read_text())
        changed = {n for n in ft if not torch.equal(ft[n], base[n])}
        assert changed <= set(info["considered"]) and changed, s
