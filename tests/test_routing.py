"""Routers between LoRA experts (lib/route/task_router.py, soft_mixture.py, ensemble.py): task router, soft mixture, logit ensemble.

Every model is a tiny random Llama (hidden 32, one layer) with two random LoRA adapters
(``init_lora_weights=False``: non-zero updates without training), built here. Each method
is checked against an independent reference: the harness run with one adapter, hard
routing through peft's mixed-adapter batches, the exact linear merge of ``lib.merge.task_vectors``,
or per-adapter softmaxes computed from scratch without a KV cache.
"""
from __future__ import annotations

import contextlib
import copy
import random

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lib.core.evaluation import evaluate, generate
from lib.merge.task_vectors import apply_merged, merge_task_vectors, task_vectors
from lib.route.ensemble import LogitEnsemble
from lib.route.soft_mixture import SoftMixture
from lib.route.task_router import TaskRouter, confusion_matrix, family_mass
from lib.core.tokenization import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SKILLS = {"reverse": "alpha", "upper": "beta", "sort": "__base__"}  # skill -> expert it is routed to
NAMES = ["alpha", "beta", "__base__"]
MAX_NEW = 6


def toy_rows(n_per_skill: int, seed: int) -> list[dict]:
    """Prompts ``"<skill> <letters> ="``: the skill word is the only thing that tells them apart."""
    rng = random.Random(seed)
    rows = []
    for skill in SKILLS:
        for _ in range(n_per_skill):
            word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7)))
            rows.append({"prompt": f"{skill} {word} =", "answer": word, "skill": skill})
    return rows


def labels(rows):
    return [SKILLS[r["skill"]] for r in rows]


def prompts(rows):
    return [r["prompt"] for r in rows]


TRAIN, HELDOUT = toy_rows(10, seed=1), toy_rows(6, seed=2)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def models(tok):
    """``(clean base, peft model with adapters alpha and beta, alpha active)``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=0.5,  # large random logits: no near-ties for greedy to flip on
    )
    base = LlamaForCausalLM(cfg).eval()
    clean = copy.deepcopy(base)

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                          init_lora_weights=False, lora_dropout=0.0)

    torch.manual_seed(1)
    model = get_peft_model(base, lora(), adapter_name="alpha")
    model.add_adapter("beta", lora())
    return clean, model.eval()


@pytest.fixture(scope="module")
def router(tok, models):
    r = TaskRouter(NAMES, epochs=200)
    r.stats = r.fit(models[1], tok, prompts(TRAIN), labels(TRAIN))
    return r


def texts(gens):
    return [g.text for g in gens]


def confidences(gens):
    return np.array([g.confidence for g in gens])


def lora_grads(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


@contextlib.contextmanager
def frozen(model):
    """Every parameter frozen for the block (as after ``PeftModel.from_pretrained``), then as before."""
    before = lora_grads(model)
    model.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


def with_adapter(model, name, fn):
    """``fn()`` with ``name`` the single active adapter (the ordinary peft way), then alpha again."""
    try:
        if name == "__base__":
            with model.disable_adapter():
                return fn()
        model.set_adapter(name)
        return fn()
    finally:
        model.set_adapter("alpha")


# --------------------------------------------------------------------------- task router


def test_router_learns_separable_skills(tok, models, router):
    model = models[1]
    assert router.stats["train_accuracy"] == 1.0
    assert router.stats["n_examples"] == len(TRAIN) and router.stats["seconds"] > 0
    assert router.predict(model, tok, prompts(HELDOUT)) == labels(HELDOUT)  # held-out words
    proba = router.predict_proba(model, tok, prompts(HELDOUT))
    assert proba.shape == (len(HELDOUT), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert router.n_parameters == 32 * 3 + 3  # linear: d x classes + bias
    mlp = TaskRouter(NAMES, hidden=8, epochs=200)
    assert mlp.fit(model, tok, prompts(TRAIN), labels(TRAIN))["train_accuracy"] == 1.0
    assert mlp.predict(model, tok, prompts(HELDOUT)) == labels(HELDOUT)
    assert mlp.n_parameters == 32 * 8 + 8 + 8 * 3 + 3
    # The router plugs into the harness: hard routing per example.
    res = evaluate(model, tok, HELDOUT, router=router.router(model, tok), progress=False)
    assert res.examples["adapter"].tolist() == labels(HELDOUT)


def test_router_is_seeded_and_deterministic(tok, models):
    model = models[1]
    feats = TaskRouter(NAMES).features(model, tok, prompts(TRAIN))
    rng_before = torch.get_rng_state()
    a, b, c = TaskRouter(NAMES, seed=3), TaskRouter(NAMES, seed=3), TaskRouter(NAMES, seed=4)
    for r in (a, b, c):
        r.fit_features(feats, labels(TRAIN))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is not consumed
    pa, pb, pc = (r.proba_from_features(feats) for r in (a, b, c))
    assert torch.equal(pa, pb)
    assert not torch.equal(pa, pc)  # the seed really drives the initialisation


def test_router_rejects_bad_input(tok, models):
    model = models[1]
    r = TaskRouter(NAMES)
    with pytest.raises(RuntimeError, match="not trained"):
        r.predict(model, tok, ["reverse ab ="])
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['gamma'\].*alpha"):
        r.fit(model, tok, ["reverse ab =", "upper ab ="], ["alpha", "gamma"])
    with pytest.raises(ValueError, match="one label per prompt"):
        r.fit(model, tok, ["reverse ab ="], ["alpha", "beta"])
    with pytest.raises(ValueError, match="unique"):
        TaskRouter(["alpha", "alpha"])


def test_features_ignore_padding_and_adapters(tok, models):
    from lib.core.evaluation import _left_pad

    model = models[1]
    r = TaskRouter(NAMES, batch_size=64)
    ps = ["reverse abcdefg =", "upper ab =", "sort cab =", "reverse x ="]
    batched = r.features(model, tok, ps)
    alone = torch.cat([r.features(model, tok, [p]) for p in ps])
    assert batched.shape == (4, 32)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    # Much more left padding, with a real token as the pad (the pad embedding is zero, which
    # could hide pads leaking into the mean): only the mask decides what is pooled.
    ids = tok(ps, add_special_tokens=True)["input_ids"]
    padded, mask = _left_pad(ids + [[5] * 25], tok.convert_tokens_to_ids("z"), torch.device("cpu"))
    torch.testing.assert_close(r.features_from_ids(model, padded[:4], mask[:4]), alone, atol=1e-5, rtol=1e-5)
    # Base-model features: the active adapter does not matter, and the model is left as it was
    # (frozen, as an expert loaded for inference is: peft's disable_adapter would unfreeze it).
    with frozen(model):
        beta = with_adapter(model, "beta", lambda: r.features(model, tok, ps))
        torch.testing.assert_close(beta, batched, atol=1e-6, rtol=1e-6)
        with model.disable_adapter():
            base = r.features(model, tok, ps)
        torch.testing.assert_close(base, batched, atol=1e-6, rtol=1e-6)
        model.requires_grad_(False)  # undo the test's own set_adapter / disable_adapter calls
        r.features(model, tok, ps)
        assert not any(lora_grads(model).values()) and model.active_adapter == "alpha"
    # ...whereas the adapters do change the last hidden state (so "base" is a real choice).
    with torch.no_grad():
        enc = tok(ps[:1], return_tensors="pt")
        h_alpha = model(**enc, output_hidden_states=True).hidden_states[-1]
        with model.disable_adapter():
            h_base = model(**enc, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(h_alpha, h_base)


def test_confusion_matrix_counts():
    true = ["a", "a", "b", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "c", "c"]
    cm = confusion_matrix(true, pred, ["a", "b", "c"])
    want = pd.DataFrame([[1, 1, 0], [0, 2, 1], [0, 0, 1]], index=["a", "b", "c"], columns=["a", "b", "c"])
    np.testing.assert_array_equal(cm.to_numpy(), want.to_numpy())
    assert cm.index.name == "true" and cm.columns.name == "predicted"
    assert list(cm.index) == list(cm.columns) == ["a", "b", "c"]
    assert int(cm.to_numpy().sum()) == len(true)
    with pytest.raises(ValueError, match="not in names"):
        confusion_matrix(["a"], ["z"], ["a", "b"])


# --------------------------------------------------------------------------- soft mixture


def fixed(weights):
    """``weights_fn`` giving every row the same weights."""
    w = torch.tensor(weights, dtype=torch.float32)
    return lambda ids, mask: w.expand(ids.shape[0], -1)


def test_soft_mixture_one_hot_equals_single_adapter(tok, models):
    model = models[1]
    ps = prompts(HELDOUT)
    runs = {}
    for name, w in (("alpha", [1.0, 0.0]), ("beta", [0.0, 1.0])):
        mix = SoftMixture(model, names=["alpha", "beta"], weights_fn=fixed(w))
        got = generate(mix, tok, ps, max_new_tokens=MAX_NEW, batch_size=8, progress=False)
        want = with_adapter(model, name, lambda: generate(model, tok, ps, max_new_tokens=MAX_NEW, batch_size=8, progress=False))
        assert texts(got) == texts(want)
        np.testing.assert_allclose(confidences(got), confidences(want), rtol=1e-5)
        runs[name] = texts(got)
    assert runs["alpha"] != runs["beta"]  # the weights really pick the expert


def test_soft_mixture_top1_equals_hard_routing(tok, models, router):
    model = models[1]
    hard = evaluate(model, tok, HELDOUT, router=router.router(model, tok), batch_size=8, progress=False)
    soft = evaluate(SoftMixture(model, router, top_k=1), tok, HELDOUT, batch_size=8, progress=False)
    assert hard.examples["adapter"].nunique() == 3  # mixed batches: alpha, beta and base rows together
    assert soft.examples["prediction"].tolist() == hard.examples["prediction"].tolist()
    np.testing.assert_allclose(soft.examples["confidence"], hard.examples["confidence"], rtol=1e-5)


def test_soft_mixture_top_k_weights(tok, models, router):
    model = models[1]
    ids = tok(prompts(HELDOUT)[:1] + prompts(HELDOUT)[-1:], return_tensors="pt", padding=True)
    proba = torch.as_tensor(router.predict_proba(model, tok, prompts(HELDOUT)[:1] + prompts(HELDOUT)[-1:]))
    w = SoftMixture(model, router, top_k=2).mixture_weights(ids["input_ids"], ids["attention_mask"])
    top2 = proba.topk(2, dim=-1)
    want = torch.zeros_like(proba).scatter(-1, top2.indices, top2.values / top2.values.sum(-1, keepdim=True))
    torch.testing.assert_close(w, want, atol=1e-5, rtol=1e-5)  # renormalised kept probabilities
    assert ((w > 0).sum(-1) == 2).all()
    sharp = SoftMixture(model, router, top_k=3, temperature=0.01).mixture_weights(ids["input_ids"], ids["attention_mask"])
    assert torch.equal(sharp.argmax(-1), proba.argmax(-1)) and (sharp.max(-1).values > 0.99).all()


def test_soft_mixture_equals_linear_merge(tok, models):
    clean, model = models
    tvs = task_vectors(model, ["alpha", "beta"])
    enc = tok(["reverse abcd =", "upper xy ="], return_tensors="pt", padding=True)
    for w in ([0.5, 0.5], [0.25, 0.75]):
        merged = apply_merged(clean, merge_task_vectors(tvs, "linear", weights=w))
        with torch.no_grad():
            want = merged(**enc).logits
            got = SoftMixture(model, names=["alpha", "beta"], weights_fn=fixed(w))(**enc).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # Per example: row 0 half-half, row 1 alpha only, in one batch.
    per_row = lambda ids, mask: torch.tensor([[0.5, 0.5], [1.0, 0.0]])  # noqa: E731
    with torch.no_grad():
        got = SoftMixture(model, names=["alpha", "beta"], weights_fn=per_row)(**enc).logits
        half = apply_merged(clean, merge_task_vectors(tvs, "linear"))(**enc).logits
        alpha = model(**enc).logits
    torch.testing.assert_close(got[0], half[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], alpha[1], atol=1e-5, rtol=1e-5)


def test_soft_mixture_leaves_model_as_it_was(tok, models, router):
    model = models[1]
    enc = tok(["reverse abcd ="], return_tensors="pt")
    with torch.no_grad():
        before = model(**enc).logits
    mix = SoftMixture(model, router, top_k=2)
    with frozen(model):  # set_adapter would unfreeze the experts: frozen must stay frozen
        generate(mix, tok, prompts(HELDOUT)[:4], max_new_tokens=3, progress=False)
        with pytest.raises(RuntimeError, match="boom"), mix.mixing(torch.ones(1, 3)):
            raise RuntimeError("boom")  # an error mid-generation still restores everything
        assert not any(lora_grads(model).values())
    grads = lora_grads(model)
    mix(**enc)
    assert lora_grads(model) == grads and grads["base_model.model.model.layers.0.self_attn.q_proj.lora_A.alpha.weight"]
    lora_a = [m for n, m in model.named_modules() if n.endswith(("lora_A.alpha", "lora_A.beta"))]
    assert lora_a and all(not m._forward_hooks for m in lora_a)
    assert model.active_adapter == "alpha" and model.base_model.active_adapter in ("alpha", ["alpha"])
    assert not model.training and not mix.training  # the harness's eval()/train(flag) round trip keeps eval
    with torch.no_grad():
        torch.testing.assert_close(model(**enc).logits, before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="names="):
        SoftMixture(model, weights_fn=fixed([1.0, 0.0]))
    with pytest.raises(ValueError, match="unknown adapter"):
        SoftMixture(model, names=["alpha", "gamma"], weights_fn=fixed([1.0, 0.0]))


# --------------------------------------------------------------------------- logit ensemble

PROMPTS = ["reverse abcdefgh =", "upper ab =", "sort cab =", "reverse xy =", "upper abcdef ="]


def test_ensemble_of_one_equals_harness(tok, models):
    model = models[1]
    for name in ("alpha", "beta", "__base__"):
        got = generate(LogitEnsemble(model, [name]), tok, PROMPTS, max_new_tokens=MAX_NEW, batch_size=8, progress=False)
        want = with_adapter(model, name, lambda: generate(model, tok, PROMPTS, max_new_tokens=MAX_NEW, batch_size=8, progress=False))
        assert texts(got) == texts(want)
        assert [g.n_tokens for g in got] == [g.n_tokens for g in want]
        np.testing.assert_allclose(confidences(got), confidences(want), rtol=1e-4)


def _mean_probs_from_scratch(model, ids: list[int], names) -> torch.Tensor:
    """log(mean_i softmax(logits_i)) for the next token after ``ids``: no cache, no padding,
    each adapter set the ordinary way."""
    x = torch.tensor([ids])
    probs = []
    for name in names:
        with torch.no_grad():
            logits = with_adapter(model, name, lambda: model(input_ids=x).logits[0, -1])
        probs.append(torch.softmax(logits.float(), -1))
    return torch.stack(probs).mean(0).log()


def test_ensemble_distribution_is_mean_of_expert_softmaxes(tok, models):
    from lib.core.evaluation import _left_pad

    model = models[1]
    names = ["alpha", "beta"]
    ps = ["reverse abcdef =", "upper ab ="]  # different lengths: the second row is left-padded
    enc = tok(ps, add_special_tokens=True)["input_ids"]
    ids, mask = _left_pad(enc, tok.pad_token_id, torch.device("cpu"))
    out = LogitEnsemble(model, names).generate(ids, mask, max_new_tokens=4, eos_token_id=[tok.eos_token_id],
                                               pad_token_id=tok.pad_token_id)
    new = out.sequences[:, ids.shape[1]:]
    assert len(out.logits) == new.shape[1] == 4 and out.logits[0].dtype == torch.float32
    for row, prompt_ids in enumerate(enc):
        for t in range(4):
            want = _mean_probs_from_scratch(model, prompt_ids + new[row, :t].tolist(), names)
            torch.testing.assert_close(out.logits[t][row], want, atol=1e-4, rtol=1e-4)
            assert int(new[row, t]) == int(want.argmax())
    # The ensemble is neither expert: its first-step distribution differs from each one's.
    first = [torch.log_softmax(with_adapter(model, n, lambda: model(input_ids=ids, attention_mask=mask).logits[:, -1]), -1)
             for n in names]
    assert all(not torch.allclose(out.logits[0], f, atol=1e-3) for f in first)


def test_ensemble_batched_equals_one_at_a_time(tok, models):
    model = models[1]
    ens = LogitEnsemble(model, ["alpha", "beta", "__base__"])
    batched = generate(ens, tok, PROMPTS, max_new_tokens=MAX_NEW, batch_size=8, progress=False)
    single = generate(ens, tok, PROMPTS, max_new_tokens=MAX_NEW, batch_size=1, progress=False)
    assert texts(batched) == texts(single)
    np.testing.assert_allclose(confidences(batched), confidences(single), rtol=1e-4)
    assert len(set(texts(batched))) > 1
    assert not model.training and not ens.training
    assert all(0.0 < g.confidence <= 1.0 for g in batched)


def test_ensemble_stops_rows_at_eos_and_pads(tok, models):
    model = models[1]
    ens = LogitEnsemble(model, ["alpha", "beta"])
    enc = tok(PROMPTS, add_special_tokens=True)["input_ids"]
    from lib.core.evaluation import _left_pad

    ids, mask = _left_pad(enc, tok.pad_token_id, torch.device("cpu"))
    free = ens.generate(ids, mask, max_new_tokens=MAX_NEW, eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    free_new = free.sequences[:, ids.shape[1]:]
    stop = int(free_new[0, 0])  # row 0's first token becomes "EOS": row 0 stops at once
    out = ens.generate(ids, mask, max_new_tokens=MAX_NEW, eos_token_id=[stop], pad_token_id=tok.pad_token_id)
    new = out.sequences[:, ids.shape[1]:]
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    ends = []
    for r in range(len(PROMPTS)):
        hits = (free_new[r] == stop).nonzero()
        end = int(hits[0]) + 1 if len(hits) else free_new.shape[1]
        ends.append(end)
        assert torch.equal(new[r, :end], free_new[r, :end])  # same tokens up to its own EOS
        assert (new[r, end:] == tok.pad_token_id).all()  # then padding
    assert new.shape[1] == max(ends)
    # Every row's first token is an EOS: one step, then stop (not max_new_tokens of padding).
    out = ens.generate(ids, mask, max_new_tokens=MAX_NEW, eos_token_id=free_new[:, 0].tolist(), pad_token_id=tok.pad_token_id)
    assert torch.equal(out.sequences[:, ids.shape[1]:], free_new[:, :1]) and len(out.logits) == 1
    with pytest.raises(ValueError, match="greedily"):
        ens.generate(ids, mask, max_new_tokens=2, do_sample=True)


def test_family_mass_is_the_same_family_share_of_wrong_skill_probability():
    names = ["a1", "a2", "b1", "b2"]
    family = {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}
    proba = np.array([[0.6, 0.3, 0.1, 0.0],    # wrong mass 0.4, same family 0.3 -> 0.75
                      [0.0, 0.9, 0.05, 0.05],  # wrong mass 0.1, same family 0.0 -> 0.0
                      [0.1, 0.1, 0.4, 0.4]])   # wrong mass 0.6, same family 0.4 -> 2/3
    out = family_mass(proba, ["a1", "a2", "b1"], names, family, n_boot=200)
    assert out["mean"] == pytest.approx((0.75 + 0.0 + 2 / 3) / 3)
    assert out["chance"] == pytest.approx(1 / 3)  # one same-family skill among three others
    assert out["lo"] <= out["mean"] <= out["hi"] and out["n"] == 3
    # Evenly spread wrong-skill probability scores exactly chance.
    even = family_mass(np.array([[0.7, 0.1, 0.1, 0.1]]), ["a1"], names, family, n_boot=100)
    assert even["mean"] == pytest.approx(even["chance"])
    with pytest.raises(ValueError, match="shape"):
        family_mass(proba[:, :3], ["a1", "a2", "b1"], names, family)
