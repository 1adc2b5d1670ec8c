"""lib.merge.adapter_space: peft's add_weighted_adapter against the exact ΔW-space merges, on a tiny
peft-wrapped Llama with random (untrained) LoRA experts. Offline, no downloads."""
from __future__ import annotations

import math

import pytest
import torch

from lib.merge import adapter_space as S, task_vectors as M

EXPERTS = ("math", "logic", "upper")  # names that are not substrings of peft's "lora_" prefix
W = [0.5, -1.2, 2.0]


def _tiny_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def _lora(r=4, alpha=8, targets=("q_proj", "v_proj"), **kw):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **kw)


@pytest.fixture(scope="module")
def model(one_thread):
    """Three rank-4 experts with different alphas; "upper" adapts o_proj instead of v_proj."""
    from peft import get_peft_model

    m = get_peft_model(_tiny_base(), _lora(alpha=8), adapter_name="math")
    m.add_adapter("logic", _lora(alpha=4))
    m.add_adapter("upper", _lora(alpha=16, targets=("q_proj", "o_proj")))
    return m.eval()


@pytest.fixture(scope="module")
def exact(model):
    return M.merge_task_vectors(M.task_vectors(model, list(EXPERTS)), "task_arithmetic", weights=W)


def _by_hand_linear(model, weights) -> dict[str, torch.Tensor]:
    """The formula of the module docstring: A = Σ sign(w s)·sqrt|w s|·A_i, B = Σ sqrt|w s|·B_i, ΔW = B A."""
    out = {}
    inner = model.base_model.model
    for name in {m for e in EXPERTS for m in M.task_vectors(model, [e])[e]}:
        layer = inner.get_submodule(name)
        a = b = 0
        for e, w in zip(EXPERTS, weights):
            if e not in layer.lora_A:
                continue
            ws = w * layer.scaling[e]
            a = a + math.copysign(math.sqrt(abs(ws)), ws) * layer.lora_A[e].weight
            b = b + math.sqrt(abs(ws)) * layer.lora_B[e].weight
        out[name] = (b @ a).detach()
    return out


def test_cat_is_the_exact_weighted_sum(model, exact):
    name = S.peft_merge(model, EXPERTS, "cat", weights=W, new_name="cat_w")
    assert name == "cat_w" and model.peft_config[name].r == 12  # ranks add up
    assert S.distance_to_exact(model, name, exact) < 1e-5


def test_linear_adds_cross_terms_and_matches_the_documented_formula(model, exact):
    name = S.peft_merge(model, EXPERTS, "linear", weights=W)
    assert name == "linear_math_logic_upper"
    got = M.task_vectors(model, [name])[name]
    by_hand = _by_hand_linear(model, W)
    assert set(got) == set(by_hand)
    for k in got:
        torch.testing.assert_close(got[k], by_hand[k], atol=1e-6, rtol=1e-5)
    # the cross terms B_i A_j are what separates it from Σ w_i ΔW_i: large here
    assert S.distance_to_exact(model, name, exact) > 0.1
    # peft - exact is exactly the cross terms Σ_{i≠j} b_i a_j B_i A_j (all three experts adapt q_proj)
    q = "model.layers.0.self_attn.q_proj"
    layer = model.base_model.model.get_submodule(q)
    ws = [w * layer.scaling[e] for e, w in zip(EXPERTS, W)]
    cross = sum(math.sqrt(abs(ws[i])) * math.copysign(math.sqrt(abs(ws[j])), ws[j])
                * layer.lora_B[EXPERTS[i]].weight @ layer.lora_A[EXPERTS[j]].weight
                for i in range(3) for j in range(3) if i != j).detach()
    torch.testing.assert_close(got[q] - exact[q], cross, atol=1e-5, rtol=1e-4)


def test_svd_full_rank_is_exact_default_rank_is_not(model, exact):
    full = S.peft_merge(model, EXPERTS, "svd", weights=W, new_name="svd_full", svd_rank=12)
    assert S.distance_to_exact(model, full, exact) < 1e-5
    low = S.peft_merge(model, EXPERTS, "svd", weights=W, new_name="svd_default")
    assert model.peft_config[low].r == 4  # the largest expert rank
    assert S.distance_to_exact(model, low, exact) > 1e-2


def test_existing_name_is_refused_because_peft_would_do_nothing(model):
    name = S.peft_merge(model, EXPERTS, "cat", new_name="taken")
    before = {k: v.clone() for k, v in model.state_dict().items() if ".taken." in k}
    assert before
    # peft itself: same name, other experts and type -> returns silently, adapter unchanged
    model.add_weighted_adapter(["math"], [5.0], "taken", combination_type="linear")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if ".taken." in k)
    with pytest.raises(ValueError, match="already exists"):
        S.peft_merge(model, EXPERTS, "linear", new_name=name)
    with pytest.raises(ValueError, match="already exists"):
        S.peft_merge(model, EXPERTS, "cat", new_name="math")


def test_a_failed_merge_leaves_no_half_made_adapter(model, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(type(model.base_model), "_generalized_task_arithmetic_weighted_adapter", boom)
    with pytest.raises(RuntimeError, match="boom"):
        S.peft_merge(model, EXPERTS, "linear", new_name="halfmade")
    assert "halfmade" not in model.peft_config  # peft alone would leave it registered


@pytest.mark.parametrize("ctype", ["dare_linear", "dare_ties", "dare_linear_svd"])
def test_dare_is_reproducible_with_a_seed(model, ctype):
    rng = torch.get_rng_state()
    tv = {}
    for tag, seed in (("a", 1), ("b", 1), ("c", 2)):
        n = S.peft_merge(model, EXPERTS, ctype, weights=W, new_name=f"{ctype}_{tag}", density=0.5, seed=seed)
        tv[tag] = M.task_vectors(model, [n])[n]
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is untouched
    assert all(torch.equal(tv["a"][k], tv["b"][k]) for k in tv["a"])
    assert any(not torch.equal(tv["a"][k], tv["c"][k]) for k in tv["a"])


def test_unknown_type_and_bad_options_are_clear_errors(model):
    with pytest.raises(ValueError, match="unknown combination_type 'mean'.*linear, cat, svd, ties"):
        S.peft_merge(model, EXPERTS, "mean")
    with pytest.raises(ValueError, match="ties needs density"):
        S.peft_merge(model, EXPERTS, "ties")
    with pytest.raises(ValueError, match="does not use density"):
        S.peft_merge(model, EXPERTS, "linear", density=0.5)
    with pytest.raises(ValueError, match="does not use svd_rank"):
        S.peft_merge(model, EXPERTS, "cat", svd_rank=4)
    with pytest.raises(ValueError, match="majority_sign_method"):
        S.peft_merge(model, EXPERTS, "ties", density=0.5, majority_sign_method="vote")
    with pytest.raises(ValueError, match=r"\['nope'\] not in this model"):
        S.peft_merge(model, ["math", "nope"], "cat")
    with pytest.raises(ValueError, match="2 weights for 3 experts"):
        S.peft_merge(model, EXPERTS, "cat", weights=[1.0, 2.0])
    for bad in ("a.b", "half", ""):
        with pytest.raises(ValueError, match="cannot be a key"):
            S.peft_merge(model, EXPERTS, "cat", new_name=bad)
    assert not any(n.startswith(("mean_", "ties_math")) for n in model.peft_config)


def test_experts_of_different_ranks(one_thread):
    """linear/ties/dare/magnitude_prune refuse (factor space needs one rank); cat is exact with rank r1 + r2;
    svd defaults to the larger rank and is exact at r1 + r2."""
    from peft import get_peft_model

    m = get_peft_model(_tiny_base(), _lora(r=2, alpha=4), adapter_name="math")
    m.add_adapter("logic", _lora(r=6, alpha=3))
    exact = M.merge_task_vectors(M.task_vectors(m, ["math", "logic"]), "task_arithmetic", weights=[1.0, 0.5])
    for ctype, extra in (("linear", {}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.5})):
        with pytest.raises(ValueError, match=r"one rank; got ranks \{'math': 2, 'logic': 6\}"):
            S.peft_merge(m, ["math", "logic"], ctype, weights=[1.0, 0.5], **extra)
    cat = S.peft_merge(m, ["math", "logic"], "cat", weights=[1.0, 0.5])
    assert m.peft_config[cat].r == 8 and S.distance_to_exact(m, cat, exact) < 1e-5
    svd = S.peft_merge(m, ["math", "logic"], "svd", weights=[1.0, 0.5])
    assert m.peft_config[svd].r == 6 and S.distance_to_exact(m, svd, exact) > 1e-3
    svd8 = S.peft_merge(m, ["math", "logic"], "svd", weights=[1.0, 0.5], new_name="svd8", svd_rank=8)
    assert S.distance_to_exact(m, svd8, exact) < 1e-5


def test_one_expert_warns_and_is_exact(model):
    with pytest.warns(UserWarning, match="uses linear"):
        name = S.peft_merge(model, ["logic"], "ties", weights=[-0.7], density=0.1)
    exact = M.merge_task_vectors(M.task_vectors(model, ["logic"]), "task_arithmetic", weights=[-0.7])
    assert S.distance_to_exact(model, name, exact) < 1e-5  # density ignored, negative weight kept


def test_rslora_experts_are_refused(one_thread):
    from peft import get_peft_model

    m = get_peft_model(_tiny_base(), _lora(use_rslora=True), adapter_name="math")
    m.add_adapter("logic", _lora(use_rslora=True))
    with pytest.raises(ValueError, match="rsLoRA"):
        S.peft_merge(m, ["math", "logic"], "cat")
    # the peft behaviour behind the refusal: the merged adapter's scaling is sqrt(r), not 1
    m.add_weighted_adapter(["math", "logic"], [1.0, 1.0], "raw", combination_type="cat")
    q = m.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.scaling["raw"] == pytest.approx(math.sqrt(8))


def test_distance_to_exact_counts_missing_modules(model, exact):
    name = S.peft_merge(model, EXPERTS, "cat", weights=W, new_name="cat_for_missing")
    partial = {k: v for k, v in exact.items() if not k.endswith("o_proj")}
    o = "model.layers.0.self_attn.o_proj"
    expected = math.sqrt(float((exact[o] ** 2).sum()) / sum(float((v ** 2).sum()) for v in partial.values()))
    assert S.distance_to_exact(model, name, partial) == pytest.approx(expected, rel=1e-4)
