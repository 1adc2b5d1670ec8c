"""lib.route.lorahub: LoraHub's gradient-free weight search in ΔW space, on a tiny char-level Llama with
two random LoRA "experts"; the target task is whatever expert A answers. Offline, no downloads."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from conftest import peaked_tiny_llama

from lib.core import sft_data
from lib.route import lorahub as H
from lib.merge import task_vectors as M
from lib.core.evaluation import generate
from lib.core.tokenization import build_char_tokenizer

EXPERTS = ("skill_a", "skill_b")
PROMPTS = [f"add {i}+{2 * i} =" for i in range(8)]


@pytest.fixture(scope="module")
def setup(one_thread):
    """(base, tokenizer, task vectors, examples): the examples are expert A's greedy answers."""
    from peft import LoraConfig, get_peft_model

    tok = build_char_tokenizer()
    base = peaked_tiny_llama(tok)
    lora = dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora), adapter_name=EXPERTS[0])
    torch.manual_seed(2)
    peft_model.add_adapter(EXPERTS[1], LoraConfig(**lora))
    tvs = M.task_vectors(peft_model, list(EXPERTS))
    expert_a = M.apply_merged(base, tvs[EXPERTS[0]])
    # prompt + " " is where a trained expert starts its answer (completion = " " + answer)
    gens = generate(expert_a, tok, [p + " " for p in PROMPTS], max_new_tokens=5, progress=False)
    examples = [(p, g.text) for p, g in zip(PROMPTS, gens)]
    return base, tok, tvs, examples


def test_search_puts_weight_on_the_expert_that_answers(setup):
    base, tok, tvs, examples = setup
    before = {k: v.clone() for k, v in base.state_dict().items()}
    res = H.lorahub_search(base, tok, tvs, examples, budget=40, seed=0)
    w = res["weights"]
    assert list(w) == list(EXPERTS)
    assert w["skill_a"] > 0.5 and w["skill_a"] - w["skill_b"] > 0.5, w
    assert res["loss"] < res["start_loss"] - 0.5, res
    loss = H.make_loss_fn(base, tok, tvs, examples)
    assert res["start_loss"] == pytest.approx(loss([0.0, 0.0]))
    assert res["loss"] == pytest.approx(loss([w["skill_a"], w["skill_b"]]))
    assert res["objective"] == pytest.approx(res["loss"] + 0.05 * (abs(w["skill_a"]) + abs(w["skill_b"])) / 2)
    hist = res["history"]
    assert len(hist) == 40 and [h["step"] for h in hist] == list(range(40))
    assert hist[0]["weights"] == {"skill_a": 0.0, "skill_b": 0.0}  # starts from zeros, as in the paper
    assert res["optimizer"] and res["seconds"] > 0
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # base never modified


def test_loss_equals_a_hand_computation_on_one_example(setup):
    base, tok, tvs, examples = setup
    prompt, answer = examples[3]
    w = [0.7, -0.4]
    # independent path: a composed copy of the model and the token ids built piece by piece
    model = M.apply_merged(base, {m: 0.7 * tvs["skill_a"].get(m, 0) + -0.4 * tvs["skill_b"].get(m, 0)
                                  for m in tvs["skill_a"]})
    prompt_ids = tok(prompt)["input_ids"]  # BOS + prompt
    answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    n = len(prompt_ids)
    by_hand = -sum(float(logp[n + i - 1, t]) for i, t in enumerate(answer_ids)) / len(answer_ids)
    assert H.make_loss_fn(base, tok, tvs, [(prompt, answer)])(w) == pytest.approx(by_hand, rel=1e-5)


def test_loss_does_not_depend_on_batching_or_input_form(setup):
    base, tok, tvs, examples = setup
    w = [0.3, 0.9]
    one = H.make_loss_fn(base, tok, tvs, examples, batch_size=1)(w)
    three = H.make_loss_fn(base, tok, tvs, examples, batch_size=3)(w)
    frame = pd.DataFrame(examples, columns=["prompt", "answer"]).assign(skill="x")
    as_frame = H.make_loss_fn(base, tok, tvs, frame, batch_size=16)(w)
    assert one == pytest.approx(three, rel=1e-5) and one == pytest.approx(as_frame, rel=1e-5)


@pytest.mark.parametrize("bounds", [(-1.5, 1.5), (-0.2, 0.3)])
def test_bounds_are_respected(setup, bounds):
    base, tok, tvs, examples = setup
    res = H.lorahub_search(base, tok, tvs, examples[:3], budget=15, bounds=bounds)
    lo, hi = bounds
    for h in res["history"]:
        assert all(lo <= x <= hi for x in h["weights"].values()), h
    assert all(lo <= x <= hi for x in res["weights"].values())


def test_deterministic_with_the_same_seed(setup):
    base, tok, tvs, examples = setup
    a = H.lorahub_search(base, tok, tvs, examples[:4], budget=12, seed=3)
    b = H.lorahub_search(base, tok, tvs, examples[:4], budget=12, seed=3)
    assert a["weights"] == b["weights"] and a["loss"] == b["loss"]
    assert [h["weights"] for h in a["history"]] == [h["weights"] for h in b["history"]]


def test_compose_matches_the_loss_fn(setup):
    base, tok, tvs, examples = setup
    w = {"skill_a": 1.1, "skill_b": 0.2}
    model = H.compose(base, tvs, w)
    batches = sft_data.make_batches(H.encode_examples(tok, examples), 4, tok.pad_token_id)
    assert sft_data.mean_loss(model, batches) == pytest.approx(H.make_loss_fn(base, tok, tvs, examples)(list(w.values())),
                                                          rel=1e-5)


def test_bad_inputs_are_clear_errors(setup):
    base, tok, tvs, examples = setup
    with pytest.raises(ValueError, match="no examples"):
        H.lorahub_search(base, tok, tvs, [])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['answer'\]"):
        H.lorahub_search(base, tok, tvs, pd.DataFrame({"prompt": ["x"]}))
    with pytest.raises(ValueError, match="lower <= 0 <= upper"):
        H.lorahub_search(base, tok, tvs, examples, bounds=(0.5, 1.5))
    with pytest.raises(ValueError, match="budget"):
        H.lorahub_search(base, tok, tvs, examples, budget=0)
    with pytest.raises(ValueError, match="l1"):
        H.lorahub_search(base, tok, tvs, examples, l1=-1)
    with pytest.raises(ValueError, match="no experts"):
        H.lorahub_search(base, tok, {}, examples)
    bad = {"skill_a": {"model.layers.0.self_attn.q_proj": torch.zeros(3, 3)}}
    with pytest.raises(ValueError, match="shape"):
        H.lorahub_search(base, tok, bad, examples)
    with pytest.raises(ValueError, match="3 weights for 2 experts"):
        H.make_loss_fn(base, tok, tvs, examples)([1.0, 2.0, 3.0])
