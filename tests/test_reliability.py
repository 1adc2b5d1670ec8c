"""Reliability (issue 8): bad params, corrupt inputs, interrupted work, determinism, safety.

Each failure mode must stop with one clear message naming the key or file (never a silent
wrong result), an interrupted training run must leave nothing DVC takes as complete and
resume to the same adapter, reruns must give the same numbers, and nothing unsafe (pickle,
remote code, network) may be used by the default profile. What tests/test_config.py,
tests/test_training.py and tests/test_synthesize.py already check at the function level
is not repeated; these tests go through the commands the pipeline runs.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from datasets import DatasetDict

from conftest import BIN, REPO, dvc, peaked_tiny_llama, set_dotted, smoke_params
from lib.core.config import make as make_params
from lib.merge.methods import MERGE_METHODS
from lib.route.routers import ROUTERS
from lib.core import config
from lib.core import data
from lib.synth import datasets as synth
from lib.experts import adapters as experts
from lib.cli import run_stage
from lib.experts import train as train_expert
from lib.core import training
from lib.core.config import ExpertsParams, SkillsParams, SynthesizeParams
from lib.core.modeling import ModelLoadError, load_causal_lm
from lib.core.stages import STAGES
from lib.core.tokenization import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


_set = set_dotted


def _default(section: str, field: str):
    """params.yaml's value: the schemas have no defaults of their own."""
    return config.read_params(config.REPO_PARAMS)[section][field]


def _needs(section: str):
    return pytest.mark.skipif(section not in config.SCHEMAS, reason=f"params section {section!r} has no schema yet")


# --------------------------------------------------------------------------- 1. params

TRAIN = yaml.safe_load((REPO / "params.yaml").read_text())["skills"]["train"]

def _row(id_: str, key: str, value, needles: list[str]):
    section = key.split(".")[0]
    return pytest.param(key, value, needles, id=id_, marks=_needs(section))


def _known_strategies() -> list[str]:
    return list(_default("continual", "strategies")) if "continual" in config.SCHEMAS else []


# One row per kind of bad value: (id, dotted key, bad value, what the message must also say).
BAD_PARAMS = [
    _row("typo key", "experts.rnak", 8, ["unknown key", "allowed keys", "rank", "alpha", "target_modules"]),
    _row("nested typo key", "merge_route.router.eopchs", 5, ["unknown key", "epochs", "top_k"]),
    _row("wrong type", "experts.rank", "eight", ["'eight'", "valid integer"]),
    _row("wrong type, list", "merge_route.merges", "ties", ["'ties'", "valid list"]),
    _row("negative rate", "experts.lr", -0.001, ["-0.001", "greater than 0"]),
    _row("negative rate, base", "model.lr", -1.0, ["-1.0", "greater than 0"]),
    _row("negative rate, router", "merge_route.router.lr", -0.01, ["-0.01", "greater than 0"]),
    _row("rank 0", "experts.rank", 0, ["bad value 0", "greater than or equal to 1"]),
    _row("svd rank 0", "merge_route.svd_rank", 0, ["bad value 0", "greater than or equal to 1"]),
    _row("dropout 1", "experts.dropout", 1.0, ["1.0", "less than 1"]),
    _row("unknown skill", "skills.train", [*TRAIN, "revrse"], ["unknown skill 'revrse'", "known skills", "reverse", "mindigit"]),
    _row("unknown merge method", "merge_route.merges", ["ties", "tie"], ["unknown merge method ['tie']", *MERGE_METHODS.names()]),
    _row("unknown route method", "merge_route.routers", ["oracle", "rooter"], ["unknown router ['rooter']", *ROUTERS.names()]),
    _row("unknown peft merge", "merge_route.peft_merges", ["concat"], ["unknown peft combination type ['concat']", "cat", "svd"]),
    _row("unknown continual method", "continual.strategies", ["nope"], ["'nope'", "known", *_known_strategies()]),
    _row("empty skill list", "skills.train", [], ["bad value []", "at least 1 item"]),
    _row("sparsity 0", "localize.sparsities", [0.0, 0.1], ["0.0", "(0, 1]"]),
    _row("sparsity above 1", "localize.sparsities", [1.5], ["1.5", "(0, 1]"]),
    _row("density above 1", "merge_route.density", 1.2, ["1.2", "less than or equal to 1"]),
    _row("infinite rate", "experts.lr", float("inf"), ["inf", "finite number"]),
    _row("steps 0", "experts.steps", 0, ["bad value 0", "greater than or equal to 1"]),
    _row("batch size 0", "experts.batch_size", 0, ["bad value 0", "greater than or equal to 1"]),
    _row("alpha 0", "experts.alpha", 0, ["bad value 0", "greater than 0"]),
    _row("no target modules", "experts.target_modules", [], ["bad value []", "at least 1 item"]),
    _row("max length too small", "experts.max_length", 2, ["bad value 2", "greater than or equal to 8"]),
    _row("stop window 0", "experts.stop_window", 0, ["bad value 0", "greater than or equal to 1"]),
    _row("too few bootstrap resamples", "evaluation.n_boot", 10, ["bad value 10", "greater than or equal to 100"]),
    _row("one calibration bin", "evaluation.ece_bins", 1, ["bad value 1", "greater than or equal to 2"]),
    _row("tiny hidden size", "model.hidden_size", 4, ["bad value 4", "greater than or equal to 8"]),
    _row("no test prompts", "synthesize.n_test", 0, ["bad value 0", "greater than or equal to 1"]),
    _row("corpus all skill lines", "synthesize.corpus_skill_fraction", 1.0, ["1.0", "less than 1"]),
    _row("empty lambda grid", "merge_route.lam_grid", [], ["bad value []", "at least 1 item"]),
    _row("negative lambda", "merge_route.lam_grid", [-0.5, 1.0], ["-0.5"]),
    _row("merge method twice", "merge_route.merges", ["ties", "ties"], ["listed twice"]),
    _row("unknown sign method", "merge_route.majority_sign_method", "most", ["'most'", "total", "frequency"]),
    _row("router temperature 0", "merge_route.arrow.temperature", 0.0, ["bad value 0.0", "greater than 0"]),
    _row("lorahub budget 0", "merge_route.lorahub.budget", 0, ["bad value 0", "greater than or equal to 1"]),
    _row("one continual task", "continual.tasks", ["inc"], ["at least 2 items"]),
    _row("unknown task order", "continual.orders", ["random"], ["unknown task order ['random']", "alternating"]),
    _row("replay fraction 1", "continual.replay.fraction", 1.0, ["1.0", "less than 1"]),
    _row("no continual workers", "continual.workers", 0, ["bad value 0", "greater than or equal to 1"]),
    _row("no merge_route workers", "merge_route.workers", 0, ["bad value 0", "greater than or equal to 1"]),
    _row("negative EWC penalty", "continual.ewc.lam", -1.0, ["-1.0", "greater than or equal to 0"]),
    _row("unknown localize source", "localize.sources", ["full_ft", "adapter"], ["'adapter'"]),
    _row("nan rate", "continual.full_lr", float("nan"), ["nan", "finite number"]),
    # Cross-field errors name the fields involved, never the whole section's value.
    _row("cross-field, heads", "model.num_heads", 3, ["model.hidden_size, model.num_heads:", "divisible by num_heads 3"]),
    _row("cross-field, breadcrumbs", "merge_route.beta", 0.9, ["merge_route.beta, merge_route.density:", "beta + density <= 1"]),
    _row("cross-field, focus sparsity", "localize.focus_sparsity", 0.5,
         ["localize.focus_sparsity, localize.sparsities:", "must be one of sparsities"]),
    _row("cross-field, held out and trained", "skills.heldout", [TRAIN[0]],
         ["skills.train, skills.heldout:", "both trained on and held out"]),
    # Values the schema's bounds allowed that failed only later, after datasets were written.
    _row("one training row", "synthesize.n_train", 1, ["bad value 1", "at least 2", "stage 01 shows"]),
    _row("two composed rows", "synthesize.n_composed", 2, ["bad value 2", "0 or at least 3", "composed test rows"]),
    _row("one corpus line", "synthesize.corpus_size", 1, ["bad value 1", "at least 2", "validation split"]),
    _row("yes/no as a number", "experts.rank", True, ["bad value True", "a yes/no value where int is expected"]),
    # Across sections: valid alone, unusable together (each failed mid-stage).
    _row("held-out skill without prompts", "synthesize.n_heldout", 0,
         ["synthesize.n_heldout is 0 but skills.heldout is", "n_heldout >= 1"]),
    _row("arrow top_k above the experts", "merge_route.arrow.top_k", len(TRAIN) + 1,
         [f"top_k {len(TRAIN) + 1} is more than the {len(TRAIN)} experts of skills.train"]),
]


def _stage_reading(section: str) -> str | None:
    return next((name for name, st in STAGES.items() if section in st.sections), None)


@pytest.mark.parametrize("key,value,needles", BAD_PARAMS)
def test_bad_param_stops_the_stage_with_one_message(workdir, capsys, key, value, needles):
    params = workdir / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    section = key.split(".")[0]
    stage = _stage_reading(section)
    if section not in raw or stage is None:
        # A section with a schema but no stage or no default yet: validated the same way.
        with pytest.raises(config.ParamsError) as e:
            config.validate_section(section, _set(raw.get(section) or {}, key.split(".", 1)[1], value), str(params))
        err, rc = f"error: {e.value}\n", 2
    else:
        params.write_text(yaml.safe_dump(_set(raw, key, value), sort_keys=False))
        rc = run_stage.main([stage, "--workdir", str(workdir)])
        err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"one message, got:\n{err}"
    msg = lines[0]
    assert msg.startswith(f"error: {params}: "), msg
    assert key in msg, f"{key!r} not in {msg!r}"
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    # Validation comes before any work.
    for out in ("reports", "models", "datasets", "metrics"):
        assert not (workdir / out).exists(), out


def test_cross_field_errors_do_not_print_the_section():
    with pytest.raises(config.ParamsError) as e:
        config.make(config.ModelParams, hidden_size=32, num_heads=3)
    assert "{" not in str(e.value) and "pretrain_steps" not in str(e.value), str(e.value)


def _break_yaml(text: str, how: str) -> tuple[str, int]:
    """params.yaml with a syntax error or a key given twice; returns the text and the bad line."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("  rank:"))
    if how == "syntax":
        lines[i] = "  rank: [8"
    else:
        lines.insert(i + 1, lines[i].replace("8", "4"))
        i += 1
    return "\n".join(lines) + "\n", i + 1


@pytest.mark.parametrize("how,needle", [("syntax", "YAML syntax error"), ("duplicate", "key 'rank' is given twice")])
def test_broken_params_yaml_is_one_line_with_file_line_and_column(workdir, capsys, how, needle):
    params = workdir / "params.yaml"
    text, line = _break_yaml(params.read_text(), how)
    params.write_text(text)
    rc = run_stage.main(["experts", "--workdir", str(workdir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {params}:") and needle in err[0], err[0]
    if how == "duplicate":
        assert f"{params}:{line}:" in err[0] and f"first on line {line - 1}" in err[0], err[0]
    assert "Traceback" not in err[0]


def test_bad_param_stops_a_training_step_with_one_message(workdir, capsys, monkeypatch):
    params = workdir / "params.yaml"
    params.write_text(yaml.safe_dump(_set(yaml.safe_load(params.read_text()), "experts.lr", -0.5), sort_keys=False))
    monkeypatch.chdir(workdir)
    assert train_expert.main([TRAIN[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: params.yaml: experts.lr: bad value -0.5"), err
    assert not (workdir / "models").exists()


# --------------------------------------------------------------------------- 2. corrupt inputs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A saved tiny base and one valid rank-4 adapter on q_proj/v_proj (random, non-zero)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("tiny")
    tok = build_char_tokenizer()
    base = peaked_tiny_llama(tok)
    base.save_pretrained(str(root / "base"))
    tok.save_pretrained(str(root / "base"))
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(peaked_tiny_llama(tok), cfg).save_pretrained(str(root / "adapter"))
    return {"root": root, "base": root / "base", "adapter": root / "adapter", "tok": tok}


def test_truncated_base_weights_name_the_file(tiny, tmp_path):
    bad = tmp_path / "base"
    shutil.copytree(tiny["base"], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError) as e:
        load_causal_lm(bad)
    msg = str(e.value)
    assert msg.startswith(f"{f}: not a readable safetensors file"), msg
    assert "truncated or corrupt" in msg


def test_pickle_only_base_is_refused_without_unpickling(tiny, tmp_path, monkeypatch):
    d = tmp_path / "pickled"
    shutil.copytree(tiny["base"], d)
    state = {k: v.clone() for k, v in load_causal_lm(tiny["base"])[0].state_dict().items()}
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelLoadError) as e:
        load_causal_lm(d)
    msg = str(e.value)
    assert str(d) in msg and "pytorch_model.bin" in msg and "safetensors only" in msg, msg


def _edited_adapter(tiny, tmp_path, name: str, **config_changes) -> Path:
    d = tmp_path / name
    shutil.copytree(tiny["adapter"], d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("name,changes,needles", [
    ("rank_8_config_rank_4_weights", {"r": 8}, ["size mismatch", "[4, 32]", "[8, 32]"]),
    ("rank_2_config_rank_4_weights", {"r": 2}, ["size mismatch"]),
    ("config_adds_k_proj", {"target_modules": ["q_proj", "v_proj", "k_proj"]},
     ["adapter_config.json targets modules with no weights in the file", "k_proj"]),
    ("config_drops_v_proj", {"target_modules": ["q_proj"]},
     ["the file has weights for modules adapter_config.json does not target", "v_proj"]),
    ("target_not_in_base", {"target_modules": ["c_attn"]}, ["c_attn", "not found in the base model"]),
])
def test_adapter_not_matching_its_base_or_config_is_an_error(tiny, tmp_path, name, changes, needles):
    d = _edited_adapter(tiny, tmp_path, name, **changes)
    with pytest.raises(experts.AdapterError) as e:
        experts.load_with_adapters(tiny["base"], {"good": tiny["adapter"], "bad": d})
    msg = str(e.value)
    assert str(d) in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_the_unedited_adapter_loads_with_its_weights(tiny):
    from safetensors.torch import load_file

    model, _ = experts.load_with_adapters(tiny["base"], {"good": tiny["adapter"]})
    saved = load_file(str(tiny["adapter"] / "adapter_model.safetensors"))
    state = model.state_dict()
    assert len(saved) == 4  # q_proj and v_proj, A and B
    for key, value in saved.items():
        assert torch.equal(state[key.replace(".weight", ".good.weight")], value), key


def test_pickle_adapter_is_refused_without_unpickling(tiny, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    d = tmp_path / "pickled_adapter"
    d.mkdir()
    shutil.copy2(tiny["adapter"] / "adapter_config.json", d)
    torch.save(load_file(str(tiny["adapter"] / "adapter_model.safetensors")), d / "adapter_model.bin")

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(experts.AdapterError) as e:
        experts.load_with_adapters(tiny["base"], {"pickled": d})
    msg = str(e.value)
    assert str(d) in msg and "adapter_model.bin" in msg and "only safetensors adapters are loaded" in msg


def test_dataset_with_a_missing_split_stops_the_training_step(workdir, capsys, monkeypatch):
    skills = make_params(SkillsParams, **yaml.safe_load((workdir / "params.yaml").read_text())["skills"])
    ds = synth.skill_splits(TRAIN[0], skills, make_params(SynthesizeParams, n_train=8, n_val=2, n_test=2))
    path = workdir / "datasets" / "skills" / TRAIN[0]
    data.save(DatasetDict({"validation": ds["validation"], "test": ds["test"]}), path)
    monkeypatch.chdir(workdir)
    capsys.readouterr()  # the progress bars of the save above
    assert train_expert.main([TRAIN[0]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (f"error: datasets/skills/{TRAIN[0]}: split(s) ['train'] missing "
                      "(found ['validation', 'test']); rerun stage 01"), err
    assert not (workdir / "models").exists()


def test_wrong_answer_in_a_test_set_is_caught_before_scoring(tmp_path):
    skills = make_params(SkillsParams, train=["reverse", "upper"], heldout=[])
    syn = make_params(SynthesizeParams, n_train=4, n_val=2, n_test=6)
    for s in skills.train:
        data.save(synth.skill_splits(s, skills, syn), tmp_path / "datasets" / "skills" / s)
    assert len(data.test_sets(tmp_path, skills)["skills"]) == 12  # intact: loads
    path = tmp_path / "datasets" / "skills" / "upper"
    ds = data.load(path)
    answers = list(ds["test"]["answer"])
    answers[3] = answers[3].lower()
    data.save(DatasetDict({**ds, "test": ds["test"].remove_columns("answer").add_column("answer", answers)}), path)
    with pytest.raises(data.DataError) as e:
        data.test_sets(tmp_path, skills)
    msg = str(e.value)
    assert msg.startswith(f"{path} [test row 3]: answer {answers[3]!r}"), msg
    assert "the solver says" in msg


def test_a_deleted_composed_set_is_an_error_not_a_smaller_study(tmp_path):
    """Stage 01's manifest says a composed set was written; if it is gone, scoring stops naming it."""
    skills = make_params(SkillsParams, train=["reverse", "upper"], heldout=[])
    syn = make_params(SynthesizeParams, n_train=4, n_val=2, n_test=4, n_composed=6, n_heldout=0, corpus_size=4)
    synth.synthesize_all(skills, syn, tmp_path / "datasets", data_dir=REPO / "data", progress=False)
    assert set(data.test_sets(tmp_path, skills)) == {"skills", "composed"}
    shutil.rmtree(tmp_path / "datasets" / "composed")
    with pytest.raises(data.DataError, match=r"datasets/composed: dataset not found"):
        data.test_sets(tmp_path, skills)
    # Without a composed set in the params there is nothing to miss.
    synth.synthesize_all(skills, make_params(SynthesizeParams, n_train=4, n_val=2, n_test=4, n_composed=0,
                                             n_heldout=0, corpus_size=4),
                         tmp_path / "d2" / "datasets", data_dir=REPO / "data", progress=False)
    assert set(data.test_sets(tmp_path / "d2", skills)) == {"skills"}


def test_localize_without_stage_03s_interference_table_is_an_error(tmp_path):
    from lib.localize.study import interference_behaviour

    with pytest.raises(FileNotFoundError, match=r"interference.csv: missing; stage 03 writes it"):
        interference_behaviour(tmp_path / "plots" / "interference.csv", ["inc", "dec"])


def test_failing_notebook_cell_fails_the_stage_with_the_cells_error(project, tmp_path, capsys):
    """Stage 03 on a copy of the smoke project whose test set holds a wrong answer."""
    root = tmp_path / "project"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns(".dvc"))
    skill = smoke_params(root)["skills"]["train"][0]
    path = root / "datasets" / "skills" / skill
    ds = data.load(path)
    answers = list(ds["test"]["answer"])
    answers[0] = answers[0] + "7"
    data.save(DatasetDict({**ds, "test": ds["test"].remove_columns("answer").add_column("answer", answers)}), path)
    before = (root / "metrics" / "experts.json").read_bytes()
    capsys.readouterr()  # the save's progress bars
    rc = run_stage.main(["experts", "--workdir", str(root)])
    err = capsys.readouterr().err
    # One of the project's input errors: one line (after papermill's progress bar), the message
    # and where the executed notebook is.
    messages = [line for line in err.strip().splitlines() if not line.startswith("Executing:")]
    assert rc == 2 and len(messages) == 1 and messages[0].startswith("error: ") and "Traceback" not in err, err
    # The notebook reads datasets relative to the workdir.
    assert f"datasets/skills/{skill} [test row 0]" in err and repr(answers[0]) in err
    assert err.strip().endswith(f"(stage 'experts'; executed notebook: {root}/reports/notebooks/03_experts.ipynb)")
    assert (root / "metrics" / "experts.json").read_bytes() == before  # no new metrics from a failed run


@pytest.mark.parametrize("ename,rc", [("DataError", 2), ("ZeroDivisionError", 1)])
def test_a_notebook_cells_error_is_one_line_only_when_it_is_about_the_inputs(monkeypatch, capsys, ename, rc):
    """A bug (any other exception) keeps the cell's whole traceback: it is there to be read."""
    from papermill.exceptions import PapermillExecutionError

    def fail(*a, **k):
        raise PapermillExecutionError(3, 1, "x = load()", ename, "what went wrong\nsecond line", ["Traceback line 1", "line 2"])

    monkeypatch.setattr(run_stage, "run", fail)
    assert run_stage.main(["experts"]) == rc
    err = capsys.readouterr().err
    assert ("what went wrong second line (stage 'experts'" in err and len(err.strip().splitlines()) == 1) == (rc == 2), err
    assert ("failed in a notebook cell" in err and "Traceback line 1" in err) == (rc == 1), err


# --------------------------------------------------------------------------- 3. interrupted work


EXPERT = make_params(ExpertsParams, rank=4, alpha=8, target_modules=["q_proj", "v_proj"], steps=12, lr=1e-2, batch_size=4,
                       max_length=32, seed=0)


@pytest.fixture(scope="module")
def lora_inputs(tiny):
    skills = make_params(SkillsParams, train=["reverse", "upper"])
    train = synth.skill_splits("reverse", skills, make_params(SynthesizeParams, n_train=12, n_val=1, n_test=2))["train"]
    return tiny["base"], train  # 12 rows, batch 4: 3 steps per epoch


def _weights(d: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def _interrupt_at(monkeypatch, step: int):
    import trl

    real = trl.SFTTrainer.training_step
    calls = {"n": 0}

    def training_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt(f"killed at step {step}")
        return real(self, *a, **k)

    monkeypatch.setattr(trl.SFTTrainer, "training_step", training_step)
    return lambda: monkeypatch.setattr(trl.SFTTrainer, "training_step", real)


def test_interrupted_lora_run_resumes_to_the_same_adapter(lora_inputs, tmp_path, monkeypatch, capsys):
    base, train = lora_inputs
    ref = training.train_lora(base, train, EXPERT, 12, 0, tmp_path / "ref", progress=False, save_steps=4)
    assert ref["resumed_from_step"] is None

    out = tmp_path / "run"
    restore = _interrupt_at(monkeypatch, 7)  # steps 1-6 done, checkpoint-4 saved (mid-epoch: epoch 2, batch 1)
    with pytest.raises(KeyboardInterrupt):
        training.train_lora(base, train, EXPERT, 12, 0, out, progress=False, save_steps=4)
    restore()
    partial = Path(f"{out}.partial")
    assert not out.exists()  # nothing under the final name: DVC sees the output missing
    assert training.last_checkpoint(partial / "trainer").name == "checkpoint-4"
    assert not (partial / "adapter_config.json").exists() and not (partial / "train_info.json").exists()
    assert "keeps checkpoint checkpoint-4" in capsys.readouterr().err

    info = training.train_lora(base, train, EXPERT, 12, 0, out, progress=False, save_steps=4)
    assert "resuming from" in capsys.readouterr().err
    assert info["resumed_from_step"] == 4 and info["steps_run"] == ref["steps_run"] == 12
    got, want = _weights(out), _weights(tmp_path / "ref")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert (out / "train_loss.csv").read_text() == (tmp_path / "ref" / "train_loss.csv").read_text()
    assert not partial.exists()


def test_partial_run_with_other_inputs_starts_clean(lora_inputs, tmp_path, monkeypatch, capsys):
    base, train = lora_inputs
    out = tmp_path / "run"
    restore = _interrupt_at(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        training.train_lora(base, train, EXPERT, 12, 0, out, progress=False, save_steps=4)
    restore()
    capsys.readouterr()
    info = training.train_lora(base, train, EXPERT, 12, 1, out, progress=False, save_steps=4)  # another seed
    err = capsys.readouterr().err
    assert "not resuming" in err and "seed differ" in err and "starting clean" in err
    assert info["resumed_from_step"] is None and info["seed"] == 1


def test_last_checkpoint_skips_one_cut_short(tmp_path):
    def ckpt(step: int, state: str | None):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if state is not None:
            (d / "trainer_state.json").write_text(state)

    assert training.last_checkpoint(tmp_path) is None
    ckpt(4, json.dumps({"global_step": 4}))
    ckpt(8, '{"global_st')  # killed while writing its state (written last)
    ckpt(12, None)  # killed before its state
    assert training.last_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


@pytest.mark.parametrize("steps", [1, 10, 49, 50, 176, 300, 800, 3120])
def test_checkpoint_interval_is_a_multiple_of_the_logging_interval(steps):
    every, log_every = training.default_save_steps(steps), max(1, steps // 50)
    assert every % log_every == 0
    assert steps / training.CHECKPOINTS_PER_RUN <= every < steps / training.CHECKPOINTS_PER_RUN + log_every


def test_killed_training_stage_leaves_nothing_complete_and_resumes(project, tmp_path):
    """SIGKILL `dvc repro adapters` once an expert has a checkpoint; rerun it; that expert
    resumes and equals an uninterrupted run's."""
    root = tmp_path / "project"
    shutil.copytree(project, root)
    params = smoke_params(root)
    params["experts"].update(steps=60, stop_loss=None)  # a checkpoint every 6 steps
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    skill = params["skills"]["train"][0]
    stage = "adapters"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", "--single-item", stage], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    trainer_dir = root / "models" / "experts" / f"{skill}.partial" / "trainer"
    deadline = time.monotonic() + 300
    try:
        while training.last_checkpoint(trainer_dir) is None:
            assert proc.poll() is None, "the stage ended before a checkpoint could be caught"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # DVC keeps the stage's outputs (persist): the earlier 10-step adapter is still there, and
    # nothing claims to be the killed 60-step run.
    old = root / "models" / "experts" / skill / "train_info.json"
    assert not old.exists() or json.loads(old.read_text())["steps"] != 60
    assert stage in json.loads(dvc(root, "status", "--json"))

    done = subprocess.run([str(BIN / "dvc"), "repro", "--single-item", stage], cwd=root, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "train_lora: resuming from" in done.stdout + done.stderr
    info = json.loads((root / "models" / "experts" / skill / "train_info.json").read_text())
    assert info["resumed_from_step"] >= 1 and info["steps_run"] == 60
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"][stage]
    assert sorted(o["path"] for o in lock["outs"]) == ["models/experts", "models/general", "models/joint", "models/replicates"]
    assert all(o["md5"] for o in lock["outs"])  # DVC took the rerun
    assert not list((root / "models").rglob("*.partial"))
    assert sorted(p.name for p in (root / "models" / "experts").iterdir()) == sorted(params["skills"]["train"])

    # The same step, never interrupted, in a fresh copy (a process like the stage's: same torch threads).
    ref = _minimal_copy(root, tmp_path / "ref", skill)
    want = _train_expert_process(ref, skill)
    assert want["resumed_from_step"] is None and want["steps_run"] == 60
    got_w, want_w = _weights(root / "models" / "experts" / skill), _weights(ref / "models" / "experts" / skill)
    assert got_w.keys() == want_w.keys()
    for k in want_w:
        assert torch.equal(got_w[k], want_w[k]), k
    assert (root / "models" / "experts" / skill / "train_loss.csv").read_text() == \
        (ref / "models" / "experts" / skill / "train_loss.csv").read_text()


# --------------------------------------------------------------------------- 4. determinism


def _without_timings(obj):
    """Metrics minus wall-clock fields (``seconds``), which no rerun can reproduce."""
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k != "seconds" and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_rerunning_a_stage_gives_identical_metrics(project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project, root, ignore=shutil.ignore_patterns(".dvc"))
    assert run_stage.run("base", workdir=root, progress=False)
    first = json.loads((project / "metrics" / "base.json").read_text())
    again = json.loads((root / "metrics" / "base.json").read_text())
    assert _without_timings(again) == _without_timings(first)
    assert set(first) - set(_without_timings(first)) == {"seconds"}
    assert (root / "models" / "base" / "model.safetensors").read_bytes() == \
        (project / "models" / "base" / "model.safetensors").read_bytes()


def _minimal_copy(src: Path, dest: Path, skill: str) -> Path:
    """What ``python -m lib.experts.train <skill>`` reads: the base, the skill's data, the corpus (replay), params."""
    for part in ("models/base", f"datasets/skills/{skill}", "datasets/corpus", "profiles"):
        shutil.copytree(src / part, dest / part)
    shutil.copy2(src / "params.yaml", dest / "params.yaml")
    return dest


def _train_expert_process(root: Path, skill: str, *more_roots: Path) -> dict | list[dict]:
    """``lib.experts.train``'s ``run(skill)`` in each root, in one process of its own like the one DVC
    starts (default torch threads, unlike this test process)."""
    roots = [root, *more_roots]
    code = ("import sys\nfrom lib.experts import train as train_expert\n"
            f"for r in {[str(r) for r in roots]!r}:\n    train_expert.run({skill!r}, root=r, progress=False)\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([str(BIN / "python"), "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = [json.loads((r / "models" / "experts" / skill / "train_info.json").read_text()) for r in roots]
    return infos[0] if not more_roots else infos


def test_expert_seed_changes_the_adapter_but_it_stays_valid(project, tmp_path):
    from lib.core.evaluation import evaluate

    params = smoke_params(project)
    skill = params["skills"]["train"][0]
    root = _minimal_copy(project, tmp_path / "seed0", skill)  # the pipeline's params
    seeded = _minimal_copy(project, tmp_path / "seed1", skill)
    params["experts"]["seed"] = 1
    (seeded / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    trained = project / "models" / "experts" / skill

    same, other = _train_expert_process(root, skill, seeded)
    first = json.loads((trained / "train_info.json").read_text())
    assert _without_timings(same) == _without_timings(first)
    for k, v in _weights(trained).items():
        assert torch.equal(_weights(root / "models" / "experts" / skill)[k], v), k

    out = seeded / "models" / "experts" / skill
    w0, w1 = _weights(trained), _weights(out)
    assert w0.keys() == w1.keys()
    assert any(not torch.equal(w0[k], w1[k]) for k in w0), "seed 1 gave the seed-0 adapter"
    assert all(torch.isfinite(v).all() for v in w1.values())
    assert other["seed"] == 1 and other["steps_run"] >= 1 and other["final_loss"] == other["final_loss"]
    model, tok = experts.load_with_adapters(seeded / "models" / "base", {skill: out})
    test = data.load(seeded / "datasets" / "skills" / skill, ("test",))["test"]
    res = evaluate(model, tok, test, adapter_names=[skill] * len(test), progress=False, n_boot=100)
    assert len(res.examples) == len(test) and 0.0 <= res.examples["correct"].mean() <= 1.0


# --------------------------------------------------------------------------- 5. safety

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def test_pipeline_writes_only_safetensors_weights(project):
    files = [p for p in (project / "models").rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    assert (project / "models" / "base" / "model.safetensors").is_file()
    adapters = [p.parent for p in files if p.name == "adapter_config.json"]
    assert adapters and all((a / "adapter_model.safetensors").is_file() for a in adapters)
    assert not list(project.rglob("checkpoint-*")), "training checkpoints left behind"


def test_loading_the_pipelines_models_never_unpickles(project, monkeypatch):
    def no_unpickling(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    S = make_params(SkillsParams, **smoke_params(project)["skills"])
    load_causal_lm(project / "models" / "base")
    model, _ = experts.load_with_adapters(project / "models" / "base", experts.adapter_dirs(project, S.train))
    assert set(model.peft_config) >= set(S.train)


def test_trust_remote_code_is_off_by_default():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert make_params(config.ModelParams).trust_remote_code is False and raw["model"]["trust_remote_code"] is False
    assert make_params(config.TeacherParams).trust_remote_code is False
    assert raw["synthesize"]["teacher"]["trust_remote_code"] is False
    sources = [*(REPO / "lib").rglob("*.py"), *(REPO / "notebooks").glob("*.ipynb")]
    on = [str(p.relative_to(REPO)) for p in sources if "trust_remote_code=True" in p.read_text().replace(" ", "")]
    assert not on, f"trust_remote_code switched on in {on}"


def test_default_profile_makes_no_network_connection(tmp_path, monkeypatch):
    """Stage 01-03 code paths of the default profile (shrunk) with the hub forced offline and
    every non-loopback connection or DNS lookup refused and recorded."""
    from lib.experts.base import prepare_base
    from lib.core.evaluation import evaluate

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest forces the hub offline for every test
    attempts = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    local = {"127.0.0.1", "::1", "localhost"}

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in local:
            attempts.append(address)
            raise OSError(f"network disabled in this test: {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *a, **k):
        if host not in local and host is not None:
            attempts.append(host)
            raise socket.gaierror(f"network disabled in this test: {host}")
        return real_getaddrinfo(host, *a, **k)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    cfg = config.load(["skills", "synthesize", "model", "experts", "evaluation"], REPO / "params.yaml")
    S, P, M, E = cfg["skills"], cfg["synthesize"], cfg["model"], cfg["experts"]
    P = P.model_copy(update=dict(n_train=16, n_val=4, n_test=4, n_composed=4, n_heldout=4, corpus_size=200))
    synth.synthesize_all(S, P, tmp_path / "datasets", data_dir=REPO / "data", progress=False)
    prepare_base(M.model_copy(update={"pretrain_steps": 2}), tmp_path / "datasets" / "corpus", tmp_path / "base",
                 progress=False)
    skill = S.train[0]
    train = data.load(tmp_path / "datasets" / "skills" / skill, ("train",))["train"]
    training.train_lora(tmp_path / "base", train, E, 2, E.seed, tmp_path / "expert", progress=False)
    model, tok = experts.load_with_adapters(tmp_path / "base", {skill: tmp_path / "expert"})
    tests = data.test_sets(tmp_path, S)["skills"]
    evaluate(model, tok, tests, adapter_names=[skill] * len(tests), progress=False, n_boot=100)
    assert attempts == []


# --------------------------------------------------------------------------- 6. every name, every stage


@pytest.mark.parametrize("name,needles", [
    ("general", ["general LoRA", "python -m lib.experts.train general"]),
    ("joint", ["joint LoRA", "python -m lib.experts.train joint"]),
    ("replicate", ["python -m lib.experts.train replicate"]),
    ("base", ["base model's row"]),
    ("half", ["attribute of torch's ModuleDict"]),
    ("to", ["attribute of torch's ModuleDict"]),
    ("copy", ["attribute of torch's ParameterDict"]),
])
def test_a_skill_name_no_stage_can_use_is_refused_before_any_work(workdir, capsys, request, name, needles):
    """A skill the registry accepts must work in every stage or stop at validation: names the
    pipeline gives its own adapters or rows (``general`` would train the general LoRA, exit 0)
    and names peft cannot key an adapter by."""
    from lib import skills as skill_lib
    from lib.skills.base import LOWER, Skill, is_word, random_string

    skill_lib.register(Skill(name=name, family="string", description="toy", accepts=is_word, apply=lambda x: x,
                             sample=lambda rng, d: random_string(rng, LOWER, d), difficulty_doc="length"))
    request.addfinalizer(lambda: skill_lib.base.SKILLS.remove(name))
    params = workdir / "params.yaml"
    params.write_text(yaml.safe_dump(_set(yaml.safe_load(params.read_text()), "skills.train", [*TRAIN, name]),
                                     sort_keys=False))
    assert run_stage.main(["synthesize", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {params}: skills.train: ") and f"skill {name!r} cannot be trained" in err[0], err
    for needle in needles:
        assert needle in err[0], f"{needle!r} not in {err[0]!r}"
    assert not (workdir / "datasets").exists()


def test_a_teacher_that_keeps_too_few_prompts_is_a_data_error():
    """Teacher mode: fewer kept prompts than n_val + 2 would leave stage 01 an IndexError."""
    skills = make_params(SkillsParams, train=["reverse", "upper"])
    syn = make_params(SynthesizeParams, n_train=8, n_val=3, n_test=2)
    prompts = [f"reverse {w} =" for w in ("abc", "bcd", "cde", "def", "efg", "fgh")]
    assert len(synth.skill_splits("reverse", skills, syn, prompts)["train"]) >= 2
    with pytest.raises(data.DataError) as e:
        synth.skill_splits("reverse", skills, syn, prompts[:4])
    msg = str(e.value)
    assert "skill 'reverse'" in msg and "fewer than n_val=3 + 2 training prompts" in msg and "n_candidates" in msg, msg


def test_continual_lora_with_a_target_module_typo_is_an_error(tiny):
    from lib.continual import loop as CT

    e = EXPERT.model_copy(update={"target_modules": ["q_proj", "vproj"]})
    with pytest.raises(config.ParamsError) as err:
        CT.add_lora(peaked_tiny_llama(tiny["tok"]), e, seed=0)
    msg = str(err.value)
    assert msg.startswith("experts.target_modules: ['vproj'] is not a linear layer") and "'v_proj'" in msg, msg
    assert CT.add_lora(peaked_tiny_llama(tiny["tok"]), EXPERT, seed=0).peft_config["default"].r == EXPERT.rank


def _continual_root(tiny, tmp_path, tasks) -> Path:
    shutil.copytree(tiny["base"], tmp_path / "models" / "base")
    skills = make_params(SkillsParams, train=list(tasks))
    for t in tasks:
        data.save(synth.skill_splits(t, skills, make_params(SynthesizeParams, n_train=8, n_val=2, n_test=2)),
                  tmp_path / "datasets" / "skills" / t)
    return tmp_path


def test_continual_refuses_a_max_length_that_would_cut_answers(tiny, tmp_path, capsys):
    from lib.continual.study import Study

    tasks = ["reverse", "upper"]
    root = _continual_root(tiny, tmp_path, tasks)
    skills = make_params(SkillsParams, train=tasks, heldout=[])
    c = make_params(config.ContinualParams, tasks=tasks)
    with pytest.raises(config.ParamsError) as err:
        Study(root, skills, EXPERT.model_copy(update={"max_length": 8}), make_params(config.EvalParams), c)
    msg = str(err.value)
    assert msg.startswith("experts.max_length 8 is shorter than the longest training example"), msg
    assert "raise it to at least" in msg


def test_localize_refuses_a_lora_expert_trained_with_other_params(tiny, tmp_path):
    """Stage 06's LoRA source checks the recorded recipe as stages 03-05 do."""
    from lib.localize import grafting as G
    from lib.localize import study as LZ
    from lib.localize.grafting import considered_names

    d = tmp_path / "models" / "experts" / "reverse"
    shutil.copytree(tiny["adapter"], d)
    (d / "params.json").write_text(json.dumps({"experts": EXPERT.model_dump(mode="json")}))
    model = load_causal_lm(tiny["base"])[0]
    pre = G.weights_of(model, considered_names(model, EXPERT.target_modules))
    assert set(LZ.load_deltas(tmp_path, model, "lora", ["reverse"], pre, EXPERT)["reverse"]) == set(pre)
    other = EXPERT.model_copy(update={"rank": 8, "steps": 50})
    with pytest.raises(experts.AdapterError) as err:
        LZ.load_deltas(tmp_path, model, "lora", ["reverse"], pre, other)
    msg = str(err.value)
    assert msg.startswith(f"{d}: trained with other params") and "experts.rank 4 there, 8 in params.yaml" in msg, msg
    assert "experts.steps 12 there, 50" in msg


@pytest.mark.parametrize("top_k,want", [(1, 1), (2, 2), (10, 2)])
def test_router_soft_is_labelled_with_the_k_it_mixes(tiny, top_k, want):
    """router.top_k above the number of experts mixes them all: the label says so, not top10."""
    from types import SimpleNamespace

    from lib.route.routers.task_router import router_soft

    names = ["reverse", "upper"]
    model, _ = experts.load_with_adapters(tiny["base"], {n: tiny["adapter"] for n in names})
    router = SimpleNamespace(names=names, n_parameters=0)
    stage = SimpleNamespace(P=SimpleNamespace(router=SimpleNamespace(top_k=top_k)), names=names, peft_model=model,
                            cache={"task_router": (router, 0.0)})
    (system,) = list(router_soft(stage))
    assert system.name == f"route:router_soft_top{want}" and system.model.top_k == want


@pytest.mark.parametrize("how,needle", [("syntax", "YAML syntax error"), ("duplicate", "is given twice")])
def test_a_broken_skill_card_is_one_line_naming_file_and_line(tmp_path, how, needle):
    """data/skills/<skill>.yaml read like params.yaml: no PyYAML traceback, no silent last value."""
    shutil.copytree(REPO / "data", tmp_path / "data")
    path = tmp_path / "data" / "skills" / "reverse.yaml"
    lines = path.read_text().splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("exemplars:"))
    lines.insert(i, "exemplars: [" if how == "syntax" else "exemplars: []")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError) as e:
        synth.load_cards(tmp_path / "data", ["reverse"])
    msg = str(e.value)
    assert msg.startswith(f"{path}:") and needle in msg and "\n" not in msg, msg


# --------------------------------------------------------------------------- 7. divergence, every training loop


def test_a_diverging_base_pretraining_is_an_error(tmp_path):
    """Stage 02: a finite but absurd model.lr gives NaN weights; the base is refused, not saved."""
    from lib.experts.base import prepare_base

    skills = make_params(SkillsParams, train=["reverse", "upper"])
    data.save(synth.corpus(skills, make_params(SynthesizeParams, corpus_size=100)), tmp_path / "corpus")
    m = make_params(config.ModelParams, lr=1e30, pretrain_steps=6, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, batch_size=8)
    with pytest.raises(training.TrainingDiverged) as e:
        prepare_base(m, tmp_path / "corpus", tmp_path / "base", progress=False)
    assert "the base model (model.lr)" in str(e.value) and "lower the learning rate" in str(e.value)
    assert not (tmp_path / "base").exists() and not (tmp_path / "base.partial").exists()


def test_a_diverging_continual_run_is_an_error(tiny):
    """Stage 05's own loop: a non-finite loss stops it (NaN weights would be scored as forgetting)."""
    from lib.continual import loop as CT
    from lib.core.sft_data import encode

    tok = tiny["tok"]
    rows = encode(tok, ["reverse abc =", "reverse hello ="] * 2, ["cba", "olleh"] * 2)
    model = CT.full_finetune(peaked_tiny_llama(tok))
    with pytest.raises(training.TrainingDiverged) as e:
        CT.train_task(model, iter([rows] * 20), 20, 1e30, tok.pad_token_id)
    assert str(e.value).startswith("continual training: the loss became") and "lower the learning rate" in str(e.value)
    log = CT.train_task(CT.full_finetune(peaked_tiny_llama(tok)), iter([rows] * 3), 3, 1e-3, tok.pad_token_id)
    assert log.steps == 3 and math.isfinite(log.final_loss)


def test_finetune_takes_workdir_and_reports_missing_inputs_in_one_line(workdir, tmp_path, capsys, monkeypatch):
    """``python -m lib.localize.finetune <skill> --workdir DIR`` like lib.cli.run_stage and
    lib.experts.train: run from elsewhere, it reads DIR and names what DIR lacks."""
    from lib.localize import finetune

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert finetune.main([TRAIN[0], "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {workdir}/datasets/skills/{TRAIN[0]}: dataset not found; run stage 01 (dvc repro synthesize)"]
    skills = make_params(SkillsParams, **yaml.safe_load((workdir / "params.yaml").read_text())["skills"])
    data.save(synth.skill_splits(TRAIN[0], skills, make_params(SynthesizeParams, n_train=8, n_val=2, n_test=2)),
              workdir / "datasets" / "skills" / TRAIN[0])
    capsys.readouterr()
    assert finetune.main([TRAIN[0], "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {workdir}/models/base: no such local directory"), err
    assert not (workdir / "models" / "finetuned").exists()


def test_a_notebook_run_by_hand_makes_the_cross_section_checks_too():
    """JupyterLab runs validate through config.from_notebook: the same checks as the runner."""
    raw = config.read_params(config.REPO_PARAMS)
    assert raw["skills"]["heldout"], "the default holds a skill out"
    with pytest.raises(config.ParamsError) as e:
        config.from_notebook(skills=raw["skills"], synthesize={**raw["synthesize"], "n_heldout": 0})
    assert str(e.value).startswith("notebook parameters: synthesize.n_heldout is 0 but skills.heldout is"), str(e.value)
    config.from_notebook(skills={**raw["skills"], "heldout": []}, synthesize={**raw["synthesize"], "n_heldout": 0})
