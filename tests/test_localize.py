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
from lib.localize.grafting import considered_names
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


def test_topk_mask_equals_a_stable_descending_sort():
    # The selection (k-th largest, then ties in flat order) must keep exactly what a stable
    # descending argsort's first k keeps, including many ties and negative scores.
    gen = torch.Generator().manual_seed(3)
    scores = {"a": torch.randint(-4, 5, (37, 11), generator=gen).float(), "b": torch.randn(53, generator=gen).round()}
    flat = torch.cat([t.reshape(-1) for t in scores.values()])
    for s in (1 / 460, 0.01, 0.1, 0.37, 0.5, 0.9, 1.0):
        k = G.n_keep(s, flat.numel())
        ref = torch.zeros(flat.numel(), dtype=torch.bool)
        ref[torch.argsort(flat, descending=True, stable=True)[:k]] = True
        got = torch.cat([m.reshape(-1) for m in G.topk_mask(scores, s).values()])
        assert torch.equal(got, ref), s


def test_topk_mask_refuses_nan_scores():
    with pytest.raises(G.GraftError, match="NaN"):
        G.topk_mask({"a": T([1.0, float("nan"), 2.0])}, 0.5)


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


def test_random_overlap_interval_covers_random_masks_and_not_shared_ones():
    """The chance level of the disjointness claim: random masks of the same sizes land inside
    it; masks that share most of their entries land far above it."""
    like = {"w": torch.zeros(5_000), "v": torch.zeros(50, 20)}
    rand = {f"s{i}": G.random_mask(like, 0.1, i) for i in range(5)}
    chance = LZ.random_overlap_ci(rand, n_draws=2000, seed=0)
    assert chance["lo"] < chance["mean"] < chance["hi"] and chance["mean"] == pytest.approx(LZ.random_jaccard(0.1), rel=0.02)
    measured = LZ.offdiag_jaccard_ci(LZ.overlap_matrix(rand), n_boot=500, seed=0)
    assert chance["lo"] - 0.005 < measured["mean"] < chance["hi"] + 0.005 and measured["n"] == 10
    core = G.random_mask(like, 0.08, 99)
    shared = {f"s{i}": {k: core[k] | G.random_mask(like, 0.02, 10 + i)[k] for k in like} for i in range(5)}
    overlap = LZ.offdiag_jaccard_ci(LZ.overlap_matrix(shared), n_boot=500, seed=0)
    assert overlap["lo"] > LZ.random_overlap_ci(shared, n_draws=2000, seed=0)["hi"] + 0.3


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
    with pytest.raises(config.ParamsError, match=r"\['nonexistent_proj'\] is not a linear layer.*q_proj"):
        considered_names(model, ["nonexistent_proj"])
    with pytest.raises(config.ParamsError, match=r"\['qproj'\] is not a linear layer"):  # one typo among good names
        considered_names(model, ["q_proj", "qproj", "v_proj"])


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
    with pytest.raises(LZ.LocalizeError, match=r"no fine-tuned model for 'inc'; run `dvc repro finetune`"):
        LZ.load_deltas(tmp_path, model, "full_ft", ["inc"], pre)
    with pytest.raises(LZ.LocalizeError, match=r"no LoRA expert for 'inc'; run `dvc repro adapters`"):
        LZ.load_deltas(tmp_path, model, "lora", ["inc"], pre)
    with pytest.raises(LZ.LocalizeError, match="unknown source 'x'"):
        LZ.load_deltas(tmp_path, model, "x", ["inc"], pre)


def test_study_skills_must_be_training_skills():
    assert LZ.study_skills(["inc", "dec"], None) == ["inc", "dec"]
    with pytest.raises(LZ.LocalizeError, match="not training skills"):
        LZ.study_skills(["inc", "dec"], ["upper"])


# ---------------------------------------------------------------- study steps, tables, figures, metrics
# (the logic the notebook's cells held, moved into lib.localize; checked on tables built here)

SKILLS3 = ["a", "b", "c"]
FAMILIES3 = {"a": "fam1", "b": "fam1", "c": "fam2"}


def _study_table(sources=("full_ft", "lora"), sparsities=(0.1, 0.3)) -> pd.DataFrame:
    """A recovery_study-shaped table: accuracy = ft · (rank of the kind + sparsity)/2, ECE fixed per cell."""
    ft = {"a": 0.8, "b": 0.5, "c": 0.0}
    rows = []
    for si, src in enumerate(sources):
        for ki, kind in enumerate(LZ.KINDS):
            for sp in sparsities:
                for i, s in enumerate(SKILLS3):
                    acc = ft[s] * (1 - ki / 3) * sp / max(sparsities)
                    rows.append({"source": src, "kind": kind, "sparsity": sp, "skill": s, "accuracy": acc,
                                 "finetuned_accuracy": ft[s], "recovery": acc / ft[s] if ft[s] > 0 else float("nan"),
                                 "ece": 0.1 * (i + 1) + 0.01 * si, "finetuned_ece": 0.05 * (i + 1),
                                 "train_loss": 1.0 + ki + sp, "kept": 10})
    return pd.DataFrame(rows)


def _hand_masks(sources=("full_ft", "lora"), sp=0.1) -> dict:
    """Graft masks of 3 entries in 8: Jaccard(a, b) = 2/4, Jaccard(a, c) = 0, Jaccard(b, c) = 1/5."""
    m = {"a": [1, 1, 1, 0, 0, 0, 0, 0], "b": [0, 1, 1, 1, 0, 0, 0, 0], "c": [0, 0, 0, 1, 1, 1, 0, 0]}
    return {(src, "graft", sp, s): {"w": T(v, dtype=torch.bool)} for src in sources for s, v in m.items()}


def _behaviour(values: dict) -> pd.DataFrame:
    B = pd.DataFrame(np.eye(3), index=SKILLS3, columns=SKILLS3)
    for (x, y), v in values.items():
        B.loc[x, y] = v
    return B


def test_concentration_table_rows_per_source_and_skill():
    deltas = {"full_ft": {"a": {"w": T([3.0, 1.0, 0.0, 0.0])}, "b": {"w": T([1.0, 1.0, 1.0, 1.0])}}}
    t = LZ.concentration_table(deltas, [0.25, 1.0])
    assert list(t.columns) == ["source", "skill", "top 0.25", "top 1"]
    assert t["top 0.25"].tolist() == pytest.approx([0.9, 0.25]) and t["top 1"].tolist() == pytest.approx([1.0, 1.0])


def test_sources_reported_and_write_csv(tmp_path):
    assert LZ.main_source(["lora", "full_ft"]) == "full_ft" and LZ.main_source(["lora"]) == "lora"
    assert LZ.merge_source(["full_ft", "lora"]) == "lora" and LZ.merge_source(["full_ft"]) == "full_ft"
    t = _study_table()
    path = LZ.write_csv(t[LZ.RECOVERY_COLUMNS], tmp_path / "new" / "r.csv")
    assert path.read_text() == t[LZ.RECOVERY_COLUMNS].to_csv(index=False)
    assert list(pd.read_csv(path).columns) == ["source", "kind", "sparsity", "skill", "accuracy", "recovery"]


def test_finetuned_accuracy_and_calibration_on_a_small_table():
    t = _study_table()
    ft = LZ.finetuned_accuracy(t)
    assert list(ft.columns) == ["full_ft", "lora"] and ft.loc["a", "lora"] == 0.8 and ft.loc["c", "full_ft"] == 0.0
    cal, calib = LZ.calibration(t, ["full_ft", "lora"], 0.1, n_boot=200, seed=0)
    assert list(cal.columns) == ["source", "skill", "finetuned_accuracy", "grafted_accuracy", "finetuned_ece", "grafted_ece"]
    assert len(cal) == 6 and (t.loc[cal.index, "kind"] == "graft").all() and (t.loc[cal.index, "sparsity"] == 0.1).all()
    c = calib["full_ft"]
    assert c["sparsity"] == 0.1 and c["ece_finetuned"]["mean"] == pytest.approx(0.1) and c["ece_grafted"]["mean"] == pytest.approx(0.2)
    assert c["relative_reduction"] == pytest.approx(1 - 0.2 / 0.1)                          # grafting doubled the ECE: −1
    assert calib["lora"]["ece_grafted"]["mean"] == pytest.approx(0.21) and calib["lora"]["ece_finetuned"]["n"] == 3
    zero = t.assign(finetuned_ece=0.0)
    assert np.isnan(LZ.calibration(zero, ["lora"], 0.1, n_boot=50)[1]["lora"]["relative_reduction"])


def test_overlap_from_hand_made_masks_and_behaviour():
    loss = _behaviour({("a", "b"): 0.8, ("b", "a"): 0.6, ("a", "c"): 0.0, ("c", "a"): 0.2, ("b", "c"): 0.3, ("c", "b"): 0.3})
    expert = _behaviour({})
    ov = LZ.overlap_from(_hand_masks(), {"full_ft": loss, "lora": loss}, expert, SKILLS3, FAMILIES3,
                         ["full_ft", "lora"], 0.1, n_boot=100, n_perm=20, seed=0)
    assert ov.main_source == "full_ft" and ov.sparsity == 0.1 and ov.chance == pytest.approx(LZ.random_jaccard(0.1))
    J = ov.matrices["lora"]
    assert J.loc["a", "b"] == pytest.approx(0.5) and J.loc["a", "c"] == 0.0 and J.loc["c", "b"] == pytest.approx(0.2)
    assert list(ov.pairs.columns) == ["skill_a", "skill_b", "jaccard", "same_family", "loss_transfer", "expert_accuracy", "source"]
    assert ov.pairs.source.tolist() == ["full_ft"] * 3 + ["lora"] * 3
    ab = ov.pairs.iloc[0]
    assert (ab.skill_a, ab.skill_b, ab.same_family) == ("a", "b", True) and ab.loss_transfer == pytest.approx(0.7)
    mean, same, cross = ov.family["full_ft"]
    assert same == pytest.approx(0.5) and cross == pytest.approx(0.1) and mean == pytest.approx(0.7 / 3)
    assert set(ov.corr["full_ft"]) == {"loss_transfer", "expert_accuracy"}
    assert ov.corr["full_ft"]["loss_transfer"]["r"] == pytest.approx(1.0)         # Jaccard 0.5 > 0.2 > 0; transfer 0.7 > 0.3 > 0.1
    alone = LZ.overlap_from(_hand_masks(("lora",)), {"lora": loss}, None, SKILLS3, FAMILIES3, ["lora"], 0.1, 50, 10, 0)
    assert alone.main_source == "lora" and set(alone.corr["lora"]) == {"loss_transfer"}
    assert "expert_accuracy" not in alone.pairs.columns


def test_metrics_assembly_on_a_constructed_study():
    from types import SimpleNamespace

    t = _study_table()
    L = SimpleNamespace(sparsities=[0.1, 0.3], sources=["full_ft", "lora"], focus_sparsity=0.1)
    loss = _behaviour({("a", "b"): 0.8, ("b", "a"): 0.6, ("c", "a"): 0.2, ("b", "c"): 0.3, ("c", "b"): 0.3})
    ov = LZ.overlap_from(_hand_masks(), {"full_ft": loss, "lora": loss}, None, SKILLS3, FAMILIES3, L.sources, 0.1, 100, 20, 0)
    _, calib = LZ.calibration(t, L.sources, 0.1, 100)
    recovery = LZ.recovery_summary(t, 100)
    merge_res = {(src, kind): {"mean": 0.1 * i, "lo": 0.0, "hi": 1.0, "n": 3}
                 for i, (src, kind) in enumerate((s, k) for s in L.sources for k in LZ.MERGE_KINDS)}
    m = LZ.metrics(L, 1234, SKILLS3, LZ.finetuned_accuracy(t), recovery, ov, calib, merge_res)
    assert set(m) == {"sparsities", "considered_params", "finetuned_accuracy", "recovery", "overlap", "calibration", "graft_merge"}
    assert m["sparsities"] == [0.1, 0.3] and m["considered_params"] == 1234 and m["recovery"] is recovery
    assert m["finetuned_accuracy"] == {src: {"a": 0.8, "b": 0.5, "c": 0.0} for src in L.sources}
    o = m["overlap"]
    assert (o["sparsity"], o["source"], o["random_expectation"]) == (0.1, "full_ft", ov.chance)
    assert (o["mean_offdiag_jaccard"], o["same_family_jaccard"], o["cross_family_jaccard"]) == ov.family["full_ft"]
    c = ov.corr["full_ft"]["loss_transfer"]
    assert o["corr_with_behaviour"] == {**{k: c[k] for k in ("r", "lo", "hi", "method", "p_permutation", "n_pairs")},
                                        "behaviour": "loss transfer (symmetrised)"}
    assert set(o["by_source"]) == set(L.sources)
    assert set(o["by_source"]["lora"]["corr_with_behaviour"]["loss_transfer"]) == {"r", "lo", "hi", "p_permutation"}
    cal = m["calibration"]
    assert cal["source"] == "full_ft" and cal["ece_grafted"] == calib["full_ft"]["ece_grafted"] and cal["by_source"] == calib
    gm = m["graft_merge"]
    assert gm["source"] == "lora" and gm["mean_normalised"] == merge_res[("lora", "graft union")]
    assert list(gm["by_source"]) == [f"{s}: {k}" for s in L.sources for k in LZ.MERGE_KINDS]
    only_ft = SimpleNamespace(sparsities=[0.1, 0.3], sources=["full_ft"], focus_sparsity=0.1)
    ov1 = LZ.overlap_from(_hand_masks(("full_ft",)), {"full_ft": loss}, None, SKILLS3, FAMILIES3, ["full_ft"], 0.1, 50, 10, 0)
    m1 = LZ.metrics(only_ft, 1, SKILLS3, LZ.finetuned_accuracy(t), recovery, ov1, {"full_ft": calib["full_ft"]},
                    {("full_ft", k): merge_res[("full_ft", k)] for k in LZ.MERGE_KINDS})
    assert m1["graft_merge"]["source"] == "full_ft" and m1["overlap"]["source"] == "full_ft"


def test_tables_format_the_study_results():
    from lib.localize import tables as TB

    assert TB.fmt_ci({"mean": 0.5, "lo": 0.25, "hi": 0.754}) == "0.50 [0.25, 0.75]"
    t = _study_table()
    recovery = LZ.recovery_summary(t, 100)
    rt = TB.recovery_table(recovery)
    assert list(rt.index) == ["0.1", "0.3"] and ("lora", "magnitude") in rt.columns
    assert rt.loc["0.3", ("full_ft", "graft")] == "1.00 [1.00, 1.00]"
    text = TB.recovery_sentences(recovery, LZ.finetuned_accuracy(t))
    assert text.startswith("Measured recovery (mean over skills [95% interval]):\n\n* **full_ft**: graft recovery at sparsity 0.1: ")
    assert "(fine-tuned accuracy 0.433 on average)" in text and text.count("\n* ") == 2
    per = TB.graft_recovery_per_skill(t)
    assert per.shape == (4, 2) and per.loc[("lora", "a"), 0.3] == pytest.approx(1.0)    # skill c (ft accuracy 0) has no recovery
    assert TB.train_loss_by_kind(t).loc[("lora", 0.1), "random"] == pytest.approx(3.1)
    loss = _behaviour({("a", "b"): 0.8, ("b", "a"): 0.6, ("c", "a"): 0.2, ("b", "c"): 0.3, ("c", "b"): 0.3})
    expert = _behaviour({("a", "b"): 0.05})
    ov = LZ.overlap_from(_hand_masks(), {"full_ft": loss, "lora": loss}, expert, SKILLS3, FAMILIES3,
                         ["full_ft", "lora"], 0.1, 100, 20, 0)
    s = TB.overlap_summary(ov)
    assert list(s.columns) == ["full_ft", "lora"] and s.loc["same family", "lora"] == pytest.approx(0.5)
    assert s.loc["ρ with loss_transfer", "full_ft"].startswith("1.00 [")
    notes = TB.overlap_notes(ov).splitlines()
    assert len(notes) == 3
    assert notes[0].startswith("* full_ft: the most-overlapping pair is a–b (Jaccard 0.500, 9.5× chance, same family), rank 1 of 3")
    assert notes[2].startswith("* Expert accuracy off the diagonal is nonzero for 1 of 3 pairs (largest 0.025)")


def test_setup_summary_sentence():
    from types import SimpleNamespace

    from lib.localize import tables as TB

    st = SimpleNamespace(names=["inc", "dec"], n_considered=1000, n_total=4000,
                         localize=SimpleNamespace(sources=["full_ft", "lora"], sparsities=[0.001, 0.1]))
    assert TB.setup_summary(st) == ("2 skills (inc, dec), sources full_ft, lora. Considered parameters: 1,000 of the "
                                    "model's 4,000 (25.0%); sparsities 0.001, 0.1 keep 1, 100 entries.")


def test_figures_draw_from_small_tables():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.core.evaluation import EvalResult
    from lib.localize import figures as FG

    t = _study_table()
    g = FG.recovery_curves(t)
    assert g.axes.shape == (1, 2) and g.axes[0, 0].get_ylabel().startswith("recovery")
    assert FG.recovery_curves(t.assign(recovery=float("nan"))).axes[0, 0].get_ylabel() == "accuracy (recovery undefined)"
    loss = _behaviour({("a", "b"): 0.8, ("b", "a"): 0.6, ("c", "a"): 0.2, ("b", "c"): 0.3, ("c", "b"): 0.3})
    ov = LZ.overlap_from(_hand_masks(), {"full_ft": loss, "lora": loss}, None, SKILLS3, FAMILIES3,
                         ["full_ft", "lora"], 0.1, 50, 10, 0)
    fig = FG.overlap_heatmaps(ov.matrices, FAMILIES3, 0.1)
    assert fig.axes[0].get_title() == "full_ft: graft masks at sparsity 0.1"
    assert [x.get_text() for x in fig.axes[0].get_xticklabels()] == ["a (fam1)", "b (fam1)", "c (fam2)"]
    assert [ax.get_title() for ax in FG.overlap_scatter(ov.pairs).axes[:2]] == ["full_ft", "lora"]
    ex = pd.DataFrame({"correct": [True, False, True], "confidence": [0.9, 0.4, 0.7], "skill": ["a", "b", "c"]})
    results = {(src, kind, sp, s): EvalResult(ex[ex.skill == s], 0)
               for src in ("full_ft", "lora") for kind, sp in (("finetuned", 1.0), ("graft", 0.1)) for s in SKILLS3}
    fig = FG.reliability_grid(results, SKILLS3, ["full_ft", "lora"], 0.1, 5)
    assert len(fig.axes) >= 4 and fig.axes[1].get_title() == "full_ft, grafted (s = 0.1)"
    merges = pd.DataFrame({"system": ["lora: graft union", "lora: magnitude union"], "normalised accuracy": [0.8, 0.5],
                           "lo": [0.7, 0.4], "hi": [0.9, 0.6], "mean accuracy": [0.6, 0.4]})
    ax = FG.merge_bars(merges).axes[0]
    assert [x.get_text() for x in ax.get_yticklabels()] == ["lora: graft union", "lora: magnitude union"]
    plt.close("all")


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


# ---- stage `finetune`: every skill in one pool, kept when its inputs did not change ----------

def _finetune_project(root, workers: int):
    """A project root with a tiny base, two skills' data and params asking 3 fine-tuning steps."""
    import yaml

    from conftest import make_workdir
    from lib.core import data
    from lib.synth import datasets as synth

    make_workdir(root)
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["skills"]["train"], raw["skills"]["heldout"] = ["inc", "maxdigit"], []
    raw["experts"]["target_modules"] = ["q_proj", "v_proj"]
    raw["localize"]["skills"] = None
    raw["localize"]["finetune"].update(steps=3, batch_size=4)
    raw["localize"]["workers"] = workers
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = config.load(["skills", "synthesize"], root / "params.yaml")
    syn = cfg["synthesize"].model_copy(update={"n_train": 12, "n_val": 2, "n_test": 2})
    for s in raw["skills"]["train"]:
        data.save(synth.skill_splits(s, cfg["skills"], syn), root / "datasets" / "skills" / s)
    tok = build_char_tokenizer()
    model = peaked_tiny_llama(tok)
    model.save_pretrained(root / "models" / "base")
    tok.save_pretrained(root / "models" / "base")
    return root


def _weights(root, skill):
    from safetensors.torch import load_file

    return load_file(root / "models" / "finetuned" / skill / "model.safetensors")


def test_finetune_stage_pools_the_skills_and_keeps_unchanged_models(tmp_path, capfd):  # capfd: workers write to fd 2
    from lib.localize import finetune

    two = _finetune_project(tmp_path / "two", workers=2)
    one = _finetune_project(tmp_path / "one", workers=1)
    assert finetune.main(["--workdir", str(two)]) == 0
    assert finetune.main(["--workdir", str(one)]) == 0
    for s in ("inc", "maxdigit"):  # one torch thread per process: the pool does not change a model
        a, b = _weights(two, s), _weights(one, s)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), s
        assert json.loads((two / "models" / "finetuned" / s / "train_info.json").read_text())["steps_run"] == 3
    stamp = {s: (two / "models" / "finetuned" / s / "model.safetensors").stat().st_mtime_ns for s in ("inc", "maxdigit")}
    capfd.readouterr()
    assert finetune.main(["--workdir", str(two)]) == 0  # same inputs: both kept, nothing trained
    assert capfd.readouterr().err.count("already trained from the same inputs") == 2
    assert {s: (two / "models" / "finetuned" / s / "model.safetensors").stat().st_mtime_ns for s in stamp} == stamp

    import yaml
    raw = yaml.safe_load((two / "params.yaml").read_text())
    raw["skills"]["train"] = ["inc"]                       # a dropped skill's model goes
    raw["localize"]["finetune"]["lr"] *= 2                 # a changed recipe retrains
    (two / "params.yaml").write_text(yaml.safe_dump(raw))
    assert finetune.main(["--workdir", str(two)]) == 0
    assert not (two / "models" / "finetuned" / "maxdigit").exists()
    assert (two / "models" / "finetuned" / "inc" / "model.safetensors").stat().st_mtime_ns != stamp["inc"]


def test_recovery_study_is_the_same_in_worker_processes(tiny):
    """Stage 06's masks and grafts, one job per source and skill: two worker processes give the
    caller's numbers exactly (one torch thread everywhere), in the same order."""
    from lib.core.config import make as make_params

    model, tok, names, pre, delta, ex = tiny
    prompts = [f"rev {a}{b} =" for a in "abcd" for b in "efgh"]
    test = pd.DataFrame({"prompt": prompts, "answer": [p[5] + p[4] for p in prompts], "skill": "rev"})
    half = {n: d * 0.5 for n, d in delta.items()}
    deltas = {"full_ft": {"rev": delta, "rev2": half}, "lora": {"rev": half, "rev2": delta}}
    tests, train = {"rev": test, "rev2": test.assign(skill="rev2")}, {"rev": ex, "rev2": ex}
    E = make_params(config.EvalParams, batch_size=64, n_boot=100)
    out = {}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for w in (1, 2):
        L = make_params(config.LocalizeParams, sparsities=[0.01, 0.1], mask_steps=2, mask_batch_size=8, workers=w)
        out[w] = LZ.recovery_study(model, tok, pre, deltas, tests, train, L, E, progress=False)
    # one worker runs the jobs on the caller's model: every graft must be taken back out of it
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    (t1, m1, r1), (t2, m2, r2) = out[1], out[2]
    pd.testing.assert_frame_equal(t1, t2)
    assert list(m1) == list(m2) and all(torch.equal(m1[k][n], m2[k][n]) for k in m1 for n in m1[k])
    assert list(r1) == list(r2) and len(t1) == 2 * 2 * 3 * 2  # sources × skills × kinds × sparsities
    assert (t1.source.iloc[:12] == "full_ft").all() and set(t1.skill) == {"rev", "rev2"}
