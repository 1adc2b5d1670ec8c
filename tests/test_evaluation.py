"""The evaluation harness: exact match, generation budget, batching, adapter routing, metrics.

Every model is built here (no hub downloads): an *oracle* that always writes the right
answer (and a variant that always writes a wrong one), and tiny random Llamas for
batching and peft routing.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, LlamaConfig, LlamaForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from lib import skills as skill_lib
from lib.core.stats import bootstrap_ci
from lib.core.evaluation import (
    EvalResult,
    evaluate,
    exact_match,
    expected_calibration_error,
    generate,
    max_new_tokens_for,
    normalize,
    reliability_table,
)
from lib.core.tokenization import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Several skills, answers of different lengths; the mul prompt has the longest answer.
PROMPTS = [
    "add 12+34 =",
    "count banana =",
    "parity 123 =",
    "reverse abcdefgh =",
    "upper abc =",
    "mul 98765*9 =",
    "sort cab =",
    "sub 52-17 =",
]


def rows(prompts=PROMPTS):
    return [{"prompt": p, "answer": skill_lib.solve_any(p), "skill": skill_lib.skill_of(p)} for p in prompts]


LONGEST = max(rows(), key=lambda r: len(r["answer"]))




@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


# --------------------------------------------------------------------------- oracle model


class OracleConfig(PreTrainedConfig):
    model_type = "test-oracle"

    def __init__(self, vocab_size: int = 128, wrong: bool = False, **kwargs):
        self.vocab_size = vocab_size
        self.wrong = wrong
        self.num_hidden_layers = 1  # one cache layer, used to keep the token history
        super().__init__(**kwargs)


class Oracle(PreTrainedModel, GenerationMixin):
    """Emits, one character per step, ``" " + solve_any(prompt)`` then EOS.

    It needs the whole sequence so far, but with the KV cache on, ``generate`` feeds only
    the newest token after the first step. The history lives where a transformer keeps
    it: in the cache. The token ids (as floats) are the "keys" of the single cache layer
    of a ``DynamicCache``; ``update`` appends the new ids and returns the full history, and
    ``get_seq_length`` (what ``generate`` slices the inputs by) stays right. The attention
    mask (always full length) removes the left padding before decoding.
    """

    config_class = OracleConfig

    def __init__(self, config: OracleConfig, tokenizer=None):
        super().__init__(config)
        self.tokenizer = tokenizer
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the model a device and dtype
        self.post_init()

    def target(self, prompt: str) -> str:
        answer = skill_lib.solve_any(prompt)
        if self.config.wrong:
            answer = ("#" if answer[0] != "#" else "@") + answer[1:]
        return " " + answer

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=True, **kwargs):
        if past_key_values is None:
            past_key_values = DynamicCache()
        ids_as_keys = input_ids[:, None, :, None].float()
        history, _ = past_key_values.update(ids_as_keys, ids_as_keys, layer_idx=0)
        history = history[:, 0, :, 0].long()
        if attention_mask is None:
            attention_mask = torch.ones_like(history)
        assert attention_mask.shape == history.shape, (attention_mask.shape, history.shape)
        tok = self.tokenizer
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.config.vocab_size)
        for r in range(input_ids.shape[0]):
            text = tok.decode(history[r][attention_mask[r].bool()].tolist(), skip_special_tokens=True)
            prompt, _, written = text.partition(" =")
            target = self.target(prompt + " =")
            if len(written) < len(target) and target.startswith(written):
                nxt = tok.convert_tokens_to_ids(target[len(written)])
            else:
                nxt = tok.eos_token_id
            logits[r, -1, nxt] = 30.0  # softmax ~ 1 - vocab * e^-30
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values if use_cache else None)


def oracle(tok, wrong=False):
    cfg = OracleConfig(vocab_size=len(tok), wrong=wrong, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    return Oracle(cfg, tok).eval()


def test_oracle_scores_one_with_confidence_one_and_no_calibration_error(tok):
    res = evaluate(oracle(tok), tok, rows(), batch_size=3, progress=False)
    ex = res.examples
    assert res.accuracy == 1.0, ex[["prompt", "answer", "prediction"]]
    # Raw text, not just after normalize: exactly the trained format " <answer>".
    assert ex["prediction"].tolist() == [" " + a for a in ex["answer"]]
    assert ex["stopped"].all()
    # The longest answer is generated in full and still stops with EOS inside the budget.
    longest = ex[ex["prompt"] == LONGEST["prompt"]].iloc[0]
    assert longest["prediction"] == " " + LONGEST["answer"] and longest["n_tokens"] == res.max_new_tokens
    assert np.allclose(ex["confidence"], 1.0, atol=1e-6)
    assert res.ece() == pytest.approx(0.0, abs=1e-6)
    per = res.per_skill()
    assert sorted(per["skill"]) == sorted({r["skill"] for r in rows()})
    assert (per["accuracy"] == 1.0).all() and (per["n"] == 1).all()


def test_wrong_model_scores_zero(tok):
    res = evaluate(oracle(tok, wrong=True), tok, rows(), batch_size=4, progress=False)
    assert res.accuracy == 0.0
    assert res.examples["prediction"].str.startswith(" #").all()
    # Confident and always wrong: the worst possible calibration.
    assert res.ece() == pytest.approx(1.0, abs=1e-6)


def test_generation_budget_is_derived_from_the_longest_answer(tok):
    answers = [r["answer"] for r in rows()]
    mnt = max_new_tokens_for(tok, answers)
    assert mnt == len(LONGEST["answer"]) + 2  # " " + answer, one char per token, + EOS
    assert max_new_tokens_for(tok, answers, margin=3) == mnt + 3
    model = oracle(tok)
    full = generate(model, tok, [LONGEST["prompt"]], max_new_tokens=mnt, progress=False)[0]
    assert full.stopped and exact_match(full.text, LONGEST["answer"])
    # Without EOS in the budget the text survives but the answer is cut (no EOS) ...
    no_eos = generate(model, tok, [LONGEST["prompt"]], max_new_tokens=mnt - 1, progress=False)[0]
    assert not no_eos.stopped
    # ... and one token less loses part of the answer: it is scored wrong.
    cut = evaluate(model, tok, [LONGEST], max_new_tokens=mnt - 2, progress=False)
    assert cut.accuracy == 0.0 and cut.summary()["truncated"] == 1
    with pytest.raises(ValueError):
        max_new_tokens_for(tok, [])


def test_summary_is_json_serialisable(tok):
    summary = evaluate(oracle(tok), tok, rows(), progress=False).summary()
    again = json.loads(json.dumps(summary))
    assert again == summary
    assert summary["accuracy"] == 1.0 and summary["n"] == len(PROMPTS)
    assert set(summary["per_skill"]) == {r["skill"] for r in rows()}
    assert all(type(v) in (int, float, dict) for v in summary.values())


def test_evaluation_settings_pass_as_one_object(tok):
    """``settings=`` (the evaluation params section) sets batch size, bootstrap and bins at once."""
    from lib.core.config import EvalParams, make

    E = make(EvalParams, batch_size=2, n_boot=200, ece_bins=4)
    res = evaluate(oracle(tok, wrong=True), tok, rows(), settings=E, progress=False)
    assert (res.n_boot, res.n_bins) == (200, 4)
    plain = evaluate(oracle(tok, wrong=True), tok, rows(), batch_size=2, n_boot=200, n_bins=4, progress=False)
    pd.testing.assert_frame_equal(res.examples, plain.examples)


def test_evaluate_accepts_datasets_and_rejects_bad_input(tok):
    from datasets import Dataset

    ds = Dataset.from_list([{**r, "family": skill_lib.get_skill(r["skill"]).family} for r in rows()])
    res = evaluate(oracle(tok), tok, ds, progress=False)
    assert res.accuracy == 1.0 and "family" in res.examples.columns
    with pytest.raises(ValueError, match="answer"):
        evaluate(oracle(tok), tok, [{"prompt": "add 1+2 =", "skill": "add"}], progress=False)
    with pytest.raises(ValueError, match="not a peft model"):
        evaluate(oracle(tok), tok, rows(), adapter_names=["a"] * len(PROMPTS), progress=False)
    with pytest.raises(ValueError, match="one per prompt"):
        evaluate(oracle(tok), tok, rows(), router=lambda ps: ["__base__"], progress=False)
    # Routing everything to the base model works on any model.
    assert evaluate(oracle(tok), tok, rows(), router=lambda ps: ["__base__"] * len(ps), progress=False).accuracy == 1.0


# --------------------------------------------------------------------------- real (tiny) models


def tiny_llama(tok, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=0.5,  # large random logits: no near-ties for greedy to flip on
    )
    return LlamaForCausalLM(cfg).eval()


def texts(gens):
    return [g.text for g in gens]


def test_batched_generation_equals_one_at_a_time(tok):
    model = tiny_llama(tok)
    batched = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=8, progress=False)
    single = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=1, progress=False)
    assert texts(batched) == texts(single)
    assert [g.n_tokens for g in batched] == [g.n_tokens for g in single]
    assert np.allclose([g.confidence for g in batched], [g.confidence for g in single], rtol=1e-4)
    assert len(set(texts(single))) > 1  # the prompts do steer this random model
    assert all(0.0 < g.confidence <= 1.0 for g in batched)


def test_generation_ignores_tokenizer_padding_side_and_model_decoding_tweaks(tok):
    model = tiny_llama(tok)
    want = texts(generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=8, progress=False))
    right = build_char_tokenizer()
    right.padding_side = "right"
    assert texts(generate(model, right, PROMPTS, max_new_tokens=6, batch_size=8, progress=False)) == want
    assert right.padding_side == "right"  # the caller's tokenizer is left as it was
    # A hub model's generation_config may ask for sampling or a repetition penalty: still pure greedy.
    model.generation_config.update(do_sample=True, temperature=0.7, repetition_penalty=3.0, no_repeat_ngram_size=1)
    assert texts(generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=8, progress=False)) == want


@pytest.fixture(scope="module")
def two_adapters(tok):
    from peft import LoraConfig, get_peft_model

    def lora():
        return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                          init_lora_weights=False, lora_dropout=0.0)

    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(tok), lora(), adapter_name="alpha")
    model.add_adapter("beta", lora())
    return model.eval()


def _per_adapter_reference(model, tok, prompts, names, max_new_tokens=6):
    """Each example generated with its adapter set the ordinary way (one adapter per run)."""
    out = {}
    for name in sorted(set(names)):
        subset = [p for p, n in zip(prompts, names) if n == name]
        if name == "__base__":
            with model.disable_adapter():
                gens = generate(model, tok, subset, max_new_tokens=max_new_tokens, progress=False)
        else:
            model.set_adapter(name)
            gens = generate(model, tok, subset, max_new_tokens=max_new_tokens, progress=False)
        out.update(zip(subset, texts(gens)))
    model.set_adapter("alpha")
    return [out[p] for p in prompts]


def test_mixed_adapter_batch_equals_separate_runs(tok, two_adapters):
    model = two_adapters
    names = ["alpha", "beta", "__base__"] * 3
    names = names[: len(PROMPTS)]
    mixed = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=8, adapter_names=names, progress=False)
    assert texts(mixed) == _per_adapter_reference(model, tok, PROMPTS, names)
    # The adapters really differ from each other and from the base model, so routing is tested.
    only_a = texts(generate(model, tok, PROMPTS, max_new_tokens=6, adapter_names=["alpha"] * len(PROMPTS), progress=False))
    only_b = texts(generate(model, tok, PROMPTS, max_new_tokens=6, adapter_names=["beta"] * len(PROMPTS), progress=False))
    base = texts(generate(model, tok, PROMPTS, max_new_tokens=6, adapter_names=["__base__"] * len(PROMPTS), progress=False))
    assert only_a != only_b and only_a != base and only_b != base
    with pytest.raises(ValueError, match="unknown adapter"):
        generate(model, tok, PROMPTS[:1], max_new_tokens=2, adapter_names=["c"], progress=False)


def test_router_plugs_into_evaluate(tok, two_adapters):
    model = two_adapters
    table = {"add": "alpha", "sub": "alpha", "mul": "alpha", "count": "beta", "parity": "beta"}

    def router(prompts):
        return [table.get(skill_lib.skill_of(p), "__base__") for p in prompts]

    res = evaluate(model, tok, rows(), router=router, batch_size=4, progress=False)
    names = router(PROMPTS)
    assert res.examples["adapter"].tolist() == names
    assert res.examples["prediction"].tolist() == _per_adapter_reference(model, tok, PROMPTS, names, res.max_new_tokens)
    same = evaluate(model, tok, rows(), adapter_names=names, batch_size=4, progress=False)
    assert same.examples["prediction"].tolist() == res.examples["prediction"].tolist()
    assert not model.training


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("text", "want"),
    [("46", "46"), (" 46", "46"), ("46 \n", "46"), ("a  b\t\nc", "a b c"), ("ABC", "ABC"), ("", "")],
)
def test_normalize(text, want):
    assert normalize(text) == want


def test_exact_match_keeps_case_and_content():
    assert exact_match(" 46", "46")
    assert not exact_match("abc", "ABC")  # the upper skill is about case
    assert not exact_match("46", "460")
    assert not exact_match("4 6", "46")


def test_bootstrap_ci():
    rng = np.random.default_rng(123)
    small = (rng.random(50) < 0.7).astype(int)
    large = (rng.random(2000) < 0.7).astype(int)
    m, lo, hi = bootstrap_ci(small, seed=7)
    assert (m, lo, hi) == bootstrap_ci(small, seed=7)  # deterministic
    assert bootstrap_ci(small, seed=8) != (m, lo, hi)  # and really seeded
    assert lo <= m <= hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = bootstrap_ci(large, seed=7)
    assert hi2 - lo2 < (hi - lo) / 3  # ~ 1/sqrt(n): 40x the data, ~6x narrower
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0, 1.0)
    assert all(type(v) is float for v in bootstrap_ci(small))
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_ece_hand_computed():
    assert expected_calibration_error([1.0] * 5, [1] * 5) == pytest.approx(0.0)
    assert expected_calibration_error([0.9, 0.9], [1, 0]) == pytest.approx(0.4)
    assert expected_calibration_error([1.0, 1.0], [0, 0]) == pytest.approx(1.0)
    # Two bins: {0.25, 0.35} (acc 0, conf 0.3) and {0.85} (acc 1, conf 0.85):
    # 2/3 * 0.3 + 1/3 * 0.15 = 0.25
    assert expected_calibration_error([0.25, 0.35, 0.85], [0, 0, 1]) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        expected_calibration_error([1.2], [1])


def test_reliability_table():
    conf = [0.05, 0.15, 0.15, 0.95, 1.0, 0.999]
    corr = [0, 1, 0, 1, 1, 0]
    t = reliability_table(conf, corr, n_bins=10)
    assert len(t) == 10 and t["count"].sum() == len(conf)
    assert t.loc[1, "count"] == 2 and t.loc[1, "accuracy"] == 0.5 and t.loc[1, "confidence"] == pytest.approx(0.15)
    assert t.loc[9, "count"] == 3  # 1.0 falls in the last (closed) bin
    assert math.isnan(t.loc[5, "accuracy"])  # empty bins are listed, blank
    assert reliability_table(conf, corr, n_bins=4)["count"].sum() == len(conf)


def test_reliability_diagram_draws(tok):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.core.plotting import reliability_diagram, set_style

    set_style()
    res = EvalResult(
        examples=pd.DataFrame({
            "prompt": ["p"] * 4, "answer": ["a"] * 4, "prediction": ["a", "b", "a", "a"],
            "correct": [1, 0, 1, 1], "confidence": [0.9, 0.8, 0.55, 0.99], "skill": ["s"] * 4, "stopped": [True] * 4,
        }),
        max_new_tokens=3,
    )
    ax = reliability_diagram(res, title="test")
    assert ax.get_title() == "test" and len(ax.patches) > 0
    _, ax2 = plt.subplots()
    assert reliability_diagram(res.reliability_table(), ax=ax2) is ax2
    assert "ECE" in ax.get_legend().get_title().get_text()
    with pytest.raises(TypeError):
        reliability_diagram([0.5, 1.0])
    plt.close("all")
