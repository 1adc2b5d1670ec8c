"""lib.route.arrow: peft's Arrow routing (and GenKnowSub) over random LoRA experts saved to tmp dirs, on
a tiny char-level Llama, generating through the evaluation harness. Offline, no downloads."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import peaked_tiny_llama

from lib.route import arrow as A
from lib.core.evaluation import generate
from lib.core.tokenization import build_char_tokenizer

PROMPTS = [f"add {i}+{2 * i} =" for i in range(6)] + ["x", "a longer prompt here ="]
THREE = ("math", "logic", "upper")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _save(base, path, seed, **lora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(**{"r": 4, "lora_alpha": 16, "target_modules": TARGETS, "init_lora_weights": False, **lora})
    get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def lib(one_thread, tmp_path_factory):
    """(base, tokenizer, {name: adapter dir}): three task experts, a general adapter, two misfits."""

    tok = build_char_tokenizer()
    base = peaked_tiny_llama(tok)
    root = tmp_path_factory.mktemp("adapters")
    dirs = {n: _save(base, root / n, 10 + i) for i, n in enumerate((*THREE, "general"))}
    dirs["rank2"] = _save(base, root / "rank2", 20, r=2)
    dirs["qonly"] = _save(base, root / "qonly", 21, target_modules=["q_proj"])
    return base, tok, dirs


def _texts(model, tok, **kw):
    return [g.text for g in generate(model, tok, PROMPTS, max_new_tokens=6, progress=False, **kw)]


def _arrow(lib, names=THREE, **kw):
    base, _, dirs = lib
    return A.build_arrow_model(copy.deepcopy(base), {n: dirs[n] for n in names}, **kw)


def test_one_expert_with_top_1_is_that_expert(lib):
    from peft import PeftModel

    base, tok, dirs = lib
    arrow = _arrow(lib, ["math"], top_k=1)
    expert = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs["math"])).eval()
    assert _texts(arrow, tok) == _texts(expert, tok)
    ids = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(arrow(**ids).logits, expert(**ids).logits, atol=1e-5, rtol=1e-5)
    assert arrow.arrow_experts == {"task_0": "math"}


def test_generates_deterministically_and_batch_invariant(lib):
    _, tok, _ = lib
    model = _arrow(lib, top_k=2)
    one_by_one = _texts(model, tok, batch_size=1)
    assert _texts(model, tok, batch_size=8) == one_by_one  # left-padded batches: per-token routing, same answers
    assert _texts(_arrow(lib, top_k=2), tok) == one_by_one  # a rebuilt model: same prototypes (rng_seed)
    assert _texts(_arrow(lib, top_k=3), tok) != one_by_one  # and top_k matters


def test_routing_weights_reproduce_peft_forward(lib):
    """The recomputed coefficients, plugged into Σ_e c_e s_e B_e A_e x, give the layer's actual output."""
    _, tok, _ = lib
    model = _arrow(lib, top_k=2, temperature=0.5)
    ids = tok(PROMPTS[:3], return_tensors="pt", padding=True)
    coeff = A.routing_weights(model, ids["input_ids"], ids["attention_mask"])
    assert sorted(m.rsplit(".", 1)[1] for m in coeff) == sorted(TARGETS)
    for c in coeff.values():
        assert c.shape == (3, ids["input_ids"].shape[1], 3)
        torch.testing.assert_close(c.sum(-1), torch.ones(c.shape[:2]))
        assert ((c > 0).sum(-1) == 2).all()  # exactly top_k experts per token
    name = next(m for m in coeff if m.endswith("v_proj"))
    layer = model.base_model.model.get_submodule(name)
    seen = {}
    handle = layer.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(**ids)
        handle.remove()
        x, c = seen["x"], coeff[name]
        want = layer.base_layer(x)
        for e, task in enumerate(model.arrow_experts):
            lora = layer.lora_B[task](layer.lora_A[task](x)) * layer.scaling[task]
            want = want + c[..., e:e + 1] * lora
    torch.testing.assert_close(seen["y"], want, atol=1e-5, rtol=1e-4)
    table = A.routing_table(model, tok, "add 1+2 =")
    assert list(table.columns) == ["position", "token", "module", "expert", *THREE]
    assert len(table) == 3 * len(tok("add 1+2 =")["input_ids"]) and set(table["expert"]) <= set(THREE)


def test_genknowsub_subtracts_the_general_factors_and_changes_outputs(lib):
    from safetensors.torch import load_file

    _, tok, dirs = lib
    plain = _texts(_arrow(lib, top_k=2), tok)
    gks = _arrow(lib, top_k=2, general_dirs={"general": dirs["general"]})
    assert gks.arrow_general == {"gks_0": "general"}
    assert _texts(gks, tok) != plain
    # peft subtracts the mean general A and B factors from each expert, in place, at the first forward
    sd = {k: v for k, v in load_file(str(dirs["general"] / "adapter_model.safetensors")).items()}
    ex = {k: v for k, v in load_file(str(dirs["math"] / "adapter_model.safetensors")).items()}
    key = next(k for k in ex if "v_proj.lora_A" in k)
    layer = gks.base_model.model.get_submodule(key.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0])
    torch.testing.assert_close(layer.lora_A["task_0"].weight.detach(), ex[key] - sd[key])


def test_base_model_is_modified_in_place(lib):
    base, _, dirs = lib
    copy_ = copy.deepcopy(base)
    A.build_arrow_model(copy_, {"math": dirs["math"]}, top_k=1)
    assert hasattr(copy_.model.layers[0].self_attn.q_proj, "lora_A")  # documented: callers pass a copy
    assert not hasattr(base.model.layers[0].self_attn.q_proj, "lora_A")


def test_bad_inputs_are_clear_errors(lib, tmp_path):
    base, _, dirs = lib
    three = {n: dirs[n] for n in THREE}
    cases = [
        (dict(expert_dirs={}), ValueError, "non-empty dict"),
        (dict(expert_dirs={"math": tmp_path / "nowhere"}), FileNotFoundError, "'math': no adapter directory"),
        (dict(expert_dirs={"math": tmp_path}), FileNotFoundError, "no adapter_config.json"),
        (dict(expert_dirs=three, top_k=4), ValueError, r"top_k must be an integer between 1 and .* \(3\), got 4"),
        (dict(expert_dirs=three, top_k=0), ValueError, "top_k"),
        (dict(expert_dirs=three, temperature=0.0), ValueError, "temperature"),
        (dict(expert_dirs={**three, "rank2": dirs["rank2"]}), ValueError, r"one rank.*'rank2': 2"),
        (dict(expert_dirs={**three, "qonly": dirs["qonly"]}), ValueError, "same target modules"),
        (dict(expert_dirs=three, general_dirs={}), ValueError, "general adapters must be a non-empty dict"),
        (dict(expert_dirs=three, general_dirs={"math": dirs["general"]}), ValueError, "both as experts and"),
        (dict(expert_dirs=three, general_dirs={"g": dirs["rank2"]}), ValueError, "one rank"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            A.build_arrow_model(base, **kwargs)
    assert not hasattr(base.model.layers[0].self_attn.q_proj, "lora_A")  # refused before peft touched it
    with pytest.raises(ValueError, match="not an Arrow model"):
        A.routing_weights(base, torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("how,match", [("truncated", "truncated or corrupt"), ("pickle", "adapter_model.bin: pickle files")])
def test_arrow_loads_adapters_through_the_safe_path(lib, tmp_path, how, match):
    """Arrow (stage 04's arrow and arrow_gks routers) refuses what every other stage refuses,
    naming the file: a truncated safetensors file, or only a pickle (never unpickled)."""
    import shutil

    from lib.core.modeling import AdapterError

    base, _, dirs = lib
    bad = tmp_path / "general"
    shutil.copytree(dirs["general"], bad)
    f = bad / "adapter_model.safetensors"
    if how == "truncated":
        f.write_bytes(f.read_bytes()[:100])
    else:
        f.rename(bad / "adapter_model.bin")
    with pytest.raises(AdapterError, match=match) as e:
        A.build_arrow_model(base, {n: dirs[n] for n in THREE}, general_dirs={"general": bad})
    assert str(bad) in str(e.value)
    assert not hasattr(base.model.layers[0].self_attn.q_proj, "lora_A")  # refused before peft touched it
