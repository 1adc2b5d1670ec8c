"""Stages 02-03 on tiny models: the base (scratch or by path), LoRA training, the train_expert
CLI, adapter loading and the expert x skill score matrix.

Every model is built here (hidden size 32, one layer, a few steps), offline, under tmp_path.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO, make_workdir
from lib.core.config import make as make_params
from lib.core import config, data
from lib.synth import datasets as synth
from lib.experts import adapters as experts, train as train_expert
from lib.core import training
from lib.experts.base import prepare_base
from lib.core.config import EvalParams, ExpertsParams, ModelParams, SkillsParams, SynthesizeParams
from lib.core.modeling import ModelLoadError, load_causal_lm
from lib.core.tokenization import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, max_len=32, pretrain_steps=5, batch_size=8)
EXPERT = make_params(ExpertsParams, rank=4, alpha=12, target_modules=["q_proj", "v_proj"], steps=5, lr=1e-2, batch_size=4, max_length=32, seed=0)
SKILLS = make_params(SkillsParams, train=["reverse", "upper"], difficulty={"default": 3})
SYN = make_params(SynthesizeParams, n_train=12, n_val=1, n_test=3)




def tiny_llama(tok, hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


def skill_sets() -> dict:
    return {s: synth.skill_splits(s, SKILLS, SYN) for s in SKILLS.train}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    from datasets import Dataset, DatasetDict

    rng = random.Random(0)
    lines = [synth.corpus_line(rng, SKILLS.train, 5) for _ in range(50)]
    path = tmp_path_factory.mktemp("corpus") / "corpus"
    data.save(DatasetDict({"train": Dataset.from_dict({"text": lines[5:]}),
                           "validation": Dataset.from_dict({"text": lines[:5]})}), path)
    return path


@pytest.fixture(scope="module")
def scratch_base(tmp_path_factory, corpus_dir):
    """(info, curve, models/base) of a scratch base, built once for the module."""
    out = tmp_path_factory.mktemp("scratch") / "models" / "base"
    info, curve = prepare_base(make_params(ModelParams, **TINY), corpus_dir, out, progress=False)
    return info, curve, out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scratch_base):
    """One LoRA trained by train_lora on the scratch base: (out_dir, info, resolved params)."""
    _, _, base = scratch_base
    out = tmp_path_factory.mktemp("lora") / "models" / "experts" / "reverse"
    resolved = {"experts": EXPERT.model_dump(mode="json"), "name": "reverse", "steps": EXPERT.steps}
    info = training.train_lora(base, skill_sets()["reverse"]["train"], EXPERT, EXPERT.steps, EXPERT.seed, out,
                               progress=False, resolved_params=resolved)
    return out, info, resolved


@pytest.fixture(scope="module")
def second_adapter(tmp_path_factory, scratch_base) -> Path:
    """A second valid adapter on the same base (peft, random non-zero LoRA weights; no training needed)."""
    from peft import LoraConfig, get_peft_model

    _, _, base = scratch_base
    model, _ = load_causal_lm(base)
    torch.manual_seed(1)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM", init_lora_weights=False)
    out = tmp_path_factory.mktemp("lora2") / "upper"
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------- 1. base by path


@pytest.fixture
def hf_model(tmp_path):
    tok = build_char_tokenizer()
    model = tiny_llama(tok)
    path = tmp_path / "hf_model"
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path, model, tok


def test_base_from_path_is_saved_and_gives_identical_logits(tmp_path, hf_model):
    path, model, tok = hf_model
    assert (path / "model.safetensors").is_file()
    out = tmp_path / "models" / "base"
    info, curve = prepare_base(make_params(ModelParams, base=str(path)), corpus_dir=tmp_path / "no_corpus", out_dir=out, progress=False)
    assert info["source"] == str(path)
    assert info["pretrain_steps"] == 0 and info["tokens_seen"] == 0
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["vocab_size"] == len(tok)
    assert curve.empty
    assert (out / "model.safetensors").is_file()
    assert not out.with_name("base.partial").exists()

    loaded, ltok = load_causal_lm(out)
    ids = tok(["copy abc = abc", "reverse xyz ="], return_tensors="pt", padding=True)
    assert ltok(["copy abc = abc"])["input_ids"] == tok(["copy abc = abc"])["input_ids"]
    with torch.no_grad():
        want = model(**ids).logits
        got = loaded(**ids).logits
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-6)


def test_base_from_missing_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    out = tmp_path / "models" / "base"
    with pytest.raises(ModelLoadError, match="no_such_model"):
        prepare_base(make_params(ModelParams, base=str(missing)), corpus_dir=tmp_path / "no_corpus", out_dir=out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("trust", [None, False, True])
def test_trust_remote_code_is_off_by_default_and_passed_through(tmp_path, hf_model, monkeypatch, trust):
    path, _, _ = hf_model
    calls: dict[str, list[dict]] = {"model": [], "tokenizer": []}
    real_model = transformers.AutoModelForCausalLM.from_pretrained
    real_tok = transformers.AutoTokenizer.from_pretrained

    def fake_model(*args, **kwargs):
        calls["model"].append(kwargs)
        return real_model(*args, **kwargs)

    def fake_tok(*args, **kwargs):
        calls["tokenizer"].append(kwargs)
        return real_tok(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_tok)
    m = make_params(ModelParams, base=str(path)) if trust is None else make_params(ModelParams, base=str(path), trust_remote_code=trust)
    if trust is None:
        assert m.trust_remote_code is False
    prepare_base(m, corpus_dir=tmp_path / "no_corpus", out_dir=tmp_path / "base", progress=False)
    want = bool(trust)
    assert [c["trust_remote_code"] for c in calls["model"]] == [want]
    assert [c["trust_remote_code"] for c in calls["tokenizer"]] == [want]
    assert calls["model"][0]["use_safetensors"] is True


# --------------------------------------------------------------------------- 2. scratch base


def test_scratch_base_is_saved_complete(scratch_base):
    info, curve, out = scratch_base
    assert info["source"] == "scratch" and info["pretrain_steps"] == TINY["pretrain_steps"]
    assert info["tokens_seen"] > 0
    assert info["parameters"] > 0
    assert len(curve) > 0 and list(curve.columns) == ["step", "loss"]
    assert curve["loss"].notna().all()
    assert (out / "model.safetensors").is_file()
    assert (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not list(out.parent.rglob("*.partial"))
    assert not (out / "trainer").exists()
    model, tok = load_causal_lm(out)
    assert model.config.hidden_size == TINY["hidden_size"] and model.config.num_hidden_layers == TINY["num_layers"]
    assert model.config.vocab_size == len(tok) == info["vocab_size"]


def test_scratch_base_is_deterministic(tmp_path, scratch_base, corpus_dir):
    _, _, first = scratch_base
    info, _ = prepare_base(make_params(ModelParams, **TINY), corpus_dir, tmp_path / "models" / "base", progress=False)
    assert (tmp_path / "models" / "base" / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert info["tokens_seen"] == scratch_base[0]["tokens_seen"]


# --------------------------------------------------------------------------- 3. LoRA training


def test_train_lora_writes_a_complete_adapter(trained, scratch_base):
    out, info, resolved = trained
    for f in ("adapter_config.json", "adapter_model.safetensors", "train_loss.csv", "train_info.json", "params.json"):
        assert (out / f).is_file(), f
    assert not Path(str(out) + ".partial").exists()
    assert not (out / "trainer").exists()
    saved = json.loads((out / "train_info.json").read_text())
    assert saved == info
    assert saved["steps"] == EXPERT.steps and saved["seed"] == EXPERT.seed
    total = scratch_base[0]["parameters"]
    assert 0 < saved["trainable_params"] < total
    assert json.loads((out / "params.json").read_text()) == resolved
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == EXPERT.rank and cfg["lora_alpha"] == EXPERT.alpha
    assert set(cfg["target_modules"]) == set(EXPERT.target_modules)
    loss = (out / "train_loss.csv").read_text().splitlines()
    assert loss[0] == "step,loss" and len(loss) > 1


def test_general_adapter_trains_on_plain_text(tmp_path, scratch_base, corpus_dir):
    """The GenKnowSub "general" LoRA: language modelling on every token of the corpus text."""
    _, _, base = scratch_base
    corpus = data.load(corpus_dir, ("train",))["train"]
    e = EXPERT.model_copy(update={"steps": 3})
    info = training.train_lora(base, corpus, e, e.steps, 0, tmp_path / "general", progress=False)
    assert info["steps_run"] == 3 and info["train_examples"] == len(corpus)
    assert (tmp_path / "general" / "adapter_model.safetensors").is_file()


def test_sft_rows_put_the_answer_in_the_completion():
    train = skill_sets()["reverse"]["train"]
    rows = training.sft_rows(train)
    assert set(rows.column_names) == {"prompt", "completion"}
    assert rows["prompt"] == train["prompt"]
    assert rows["completion"] == [" " + a for a in train["answer"]]


def test_interrupted_training_leaves_nothing_complete(tmp_path, trained, scratch_base, monkeypatch):
    import trl

    def killed(self, *a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(trl.SFTTrainer, "train", killed)
    _, _, base = scratch_base
    train = skill_sets()["reverse"]["train"]

    out = tmp_path / "experts" / "reverse"
    with pytest.raises(RuntimeError, match="killed"):
        training.train_lora(base, train, EXPERT, EXPERT.steps, 0, out, progress=False, resolved_params={"x": 1})
    assert not out.exists()
    partial = Path(str(out) + ".partial")
    assert not (partial / "adapter_config.json").exists() and not (partial / "train_info.json").exists()

    # An earlier finished adapter under out_dir: the failed rerun leaves it as it was (the
    # old one is only replaced by the rename at the very end of a successful run).
    done, _, _ = trained
    old = tmp_path / "old" / "reverse"
    shutil.copytree(done, old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    with pytest.raises(RuntimeError, match="killed"):
        training.train_lora(base, train, EXPERT, EXPERT.steps, 1, old, progress=False, resolved_params={"x": 2})
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_a_finished_adapter_from_the_same_inputs_is_kept_and_other_inputs_retrain(tmp_path, trained, scratch_base,
                                                                                  monkeypatch, capsys):
    """How the `adapters` stage (outputs kept by DVC) resumes: an adapter in place whose
    run_key.json equals this run's inputs is returned as it is; any other input retrains it."""
    from lib.core.sft import LeanSFTTrainer

    done, info, resolved = trained
    _, _, base = scratch_base
    assert (done / training.RUN_KEY).is_file()
    out = tmp_path / "experts" / "reverse"
    shutil.copytree(done, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real = LeanSFTTrainer.train
    monkeypatch.setattr(LeanSFTTrainer, "train", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    train = skill_sets()["reverse"]["train"]
    again = training.train_lora(base, train, EXPERT, EXPERT.steps, EXPERT.seed, out, progress=False,
                                resolved_params=resolved)
    assert again == info and not calls
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert "already trained from the same inputs" in capsys.readouterr().err
    other = training.train_lora(base, train, EXPERT, EXPERT.steps, EXPERT.seed + 1, out, progress=False,
                                resolved_params=resolved)
    assert calls == [1] and other["seed"] == EXPERT.seed + 1
    assert json.loads((out / "train_info.json").read_text()) == other


def test_the_adapters_stage_trains_every_seeds_set_in_one_pool_longest_first(tmp_path, monkeypatch):
    """What `python -m lib.experts.train adapters` hands its pool: the primary seed's experts,
    both joint budgets and the general LoRA under models/, each replicate seed's experts and
    joint LoRA at the total steps under models/replicates/<seed>/; a dropped seed is removed."""
    handed = {}

    def fake_run_jobs(jobs, workers, progress):
        handed.update(jobs=jobs, workers=workers)
        return [{"steps_run": j["steps"]} for j in jobs]

    monkeypatch.setattr(train_expert, "run_jobs", fake_run_jobs)
    (tmp_path / "models" / "replicates" / "7" / "experts" / "inc").mkdir(parents=True)  # a seed no longer in params
    e = config.make(config.ExpertsParams, steps=10, seed=0, step_factor={"dec": 2})
    skills = config.make(config.SkillsParams, train=["inc", "dec"])
    reps = config.make(config.ReplicatesParams, seeds=[1, 2], workers=2)
    steps = train_expert.all_adapters(tmp_path, skills, e, reps, progress=False)
    got = {(j["name"], j.get("budget"), j["seed"], Path(j["out"]).relative_to(tmp_path).as_posix(), j["steps"])
           for j in handed["jobs"]}
    want = {("joint", "same_steps", 0, "models/joint/same_steps", 15), ("joint", "total_steps", 0, "models/joint/total_steps", 30),
            ("inc", None, 0, "models/experts/inc", 10), ("dec", None, 0, "models/experts/dec", 20),
            ("general", None, 0, "models/general", 10)}
    for seed in (1, 2):
        want |= {("joint", "total_steps", seed, f"models/replicates/{seed}/joint/total_steps", 30),
                 ("inc", None, seed, f"models/replicates/{seed}/experts/inc", 10),
                 ("dec", None, seed, f"models/replicates/{seed}/experts/dec", 20)}
    assert got == want and len(handed["jobs"]) == len(want) and handed["workers"] == 2
    assert steps[0] == {"joint_same_steps": 15, "joint_total_steps": 30, "inc": 10, "dec": 20, "general": 10}
    assert steps[1] == steps[2] == {"joint_total_steps": 30, "inc": 10, "dec": 20}
    assert not (tmp_path / "models" / "replicates" / "7").exists()


def test_run_jobs_hands_out_the_longest_first_and_returns_infos_in_order(monkeypatch):
    trained = []
    monkeypatch.setattr(train_expert, "train_one", lambda job, progress=False: trained.append(job["name"]) or {"n": job["name"]})
    jobs = [{"name": "a", "steps": 5}, {"name": "b", "steps": 50}, {"name": "c", "steps": 20}]
    assert train_expert.run_jobs(jobs, workers=1) == [{"n": "a"}, {"n": "b"}, {"n": "c"}]
    assert trained == ["b", "c", "a"]


def test_remove_stale_drops_the_adapters_of_dropped_skills_only(tmp_path):
    from lib.core.pool import remove_stale

    for name in ("inc", "inc.partial", "dec", "sort.partial"):
        (tmp_path / name).mkdir()
    (tmp_path / "README.txt").write_text("not an adapter")
    remove_stale(tmp_path, ["inc"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.txt", "inc", "inc.partial"]
    remove_stale(tmp_path / "absent", ["inc"])  # nothing there yet: nothing to do


# --------------------------------------------------------------------------- 4. train_expert CLI


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    root = make_workdir(tmp_path / "project")
    monkeypatch.chdir(root)
    return root


def test_train_expert_unknown_skill(project, capsys):
    assert train_expert.main(["nosuchskill"]) == 2
    err = capsys.readouterr().err
    assert "nosuchskill" in err and "skills.train" in err
    import yaml

    for skill in yaml.safe_load((project / "params.yaml").read_text())["skills"]["train"]:
        assert skill in err
    assert not (project / "models").exists()


def test_train_expert_before_the_base_exists_is_one_line_without_a_hub_lookup(tmp_path, capsys, monkeypatch):
    """models/base missing: a local path, so one clear line and no hub lookup (no retries)."""
    import socket

    root = make_workdir(tmp_path / "elsewhere")
    skill = SKILLS.train[0]
    data.save(skill_sets()[skill], root / "datasets" / "skills" / skill)
    (root / "models").mkdir()
    lookups = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: lookups.append(host) or [])
    monkeypatch.chdir(tmp_path)  # --workdir, not the current directory, is the project
    capsys.readouterr()  # the dataset writer's progress bars
    assert train_expert.main([skill, "--workdir", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models/base: no such local directory" in err[0] and "dvc repro base" in err[0], err
    assert lookups == []


NO_NETWORK_HOOK = """
import os, socket
_log, _local = os.environ["NET_LOG"], {"127.0.0.1", "::1", "localhost", None}
_getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect
def getaddrinfo(host, *a, **k):
    if host not in _local:
        open(_log, "a").write(f"lookup {host}\\n")
        raise socket.gaierror(f"network disabled: {host}")
    return _getaddrinfo(host, *a, **k)
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in _local:
        open(_log, "a").write(f"connect {address}\\n")
        raise OSError(f"network disabled: {address}")
    return _connect(self, address)
socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
"""


def test_a_training_command_is_offline_without_the_test_suites_offline_variables(tmp_path, scratch_base):
    """The project's entry points go offline by themselves (lib/__init__.py): a training run in a
    subprocess whose environment has none of the offline variables makes no name lookup."""
    import os
    import subprocess
    import sys

    import yaml

    *_, base = scratch_base
    root = make_workdir(tmp_path / "project")
    skill = SKILLS.train[0]
    data.save(skill_sets()[skill], root / "datasets" / "skills" / skill)
    shutil.copytree(base, root / "models" / "base")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["experts"].update(steps=2, stop_loss=None, replay=0.0)  # no corpus here
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(NO_NETWORK_HOOK)
    log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                        "SKILL_EXPERTS_ONLINE")}
    env.update(NET_LOG=str(log), PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]))
    proc = subprocess.run([sys.executable, "-m", "lib.experts.train", skill, "--workdir", str(root)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "models" / "experts" / skill / "adapter_model.safetensors").is_file()
    assert not log.exists(), log.read_text()


def test_train_expert_joint_needs_budget(project, capsys):
    assert train_expert.main(["joint"]) == 2
    err = capsys.readouterr().err
    assert "same_steps" in err and "total_steps" in err and "budget" in err
    assert not (project / "models").exists()


def test_joint_train_set_is_the_shuffled_union(tmp_path):
    sets = skill_sets()
    for s, ds in sets.items():
        data.save(ds, tmp_path / "datasets" / "skills" / s)
    a = train_expert.joint_train_set(SKILLS.train, tmp_path, seed=0)
    assert len(a) == sum(len(ds["train"]) for ds in sets.values())
    union = sorted(p for ds in sets.values() for p in ds["train"]["prompt"])
    assert sorted(a["prompt"]) == union
    assert a["prompt"] == train_expert.joint_train_set(SKILLS.train, tmp_path, seed=0)["prompt"]
    assert a["prompt"] != train_expert.joint_train_set(SKILLS.train, tmp_path, seed=1)["prompt"]
    concat = [p for s in SKILLS.train for p in sets[s]["train"]["prompt"]]
    assert a["prompt"] != concat  # shuffled, not just concatenated


def test_joint_budgets_are_the_experts_step_caps():
    e = config.make(config.ExpertsParams, steps=20, step_factor={"sort": 1})
    assert train_expert.joint_budget("same_steps", ["inc", "dec", "sort"], e) == 20
    assert train_expert.joint_budget("total_steps", ["inc", "dec", "sort"], e) == 60
    # A skill given twice the steps: its cap is 40, the total is the sum of the caps, one
    # expert's budget their mean.
    e = config.make(config.ExpertsParams, steps=20, step_factor={"sort": 2})
    assert [train_expert.expert_steps(e, s) for s in ("inc", "dec", "sort")] == [20, 20, 40]
    assert train_expert.joint_budget("total_steps", ["inc", "dec", "sort"], e) == 80
    assert train_expert.joint_budget("same_steps", ["inc", "dec", "sort"], e) == 27
    assert train_expert.expert_steps(config.make(config.ExpertsParams, steps=3, step_factor={"inc": 0.1}), "inc") == 1


@pytest.mark.parametrize("factor, message", [({"nosuch": 2}, "unknown skill 'nosuch'"),
                                             ({"inc": 0}, "step_factor of 'inc' must be > 0")])
def test_a_bad_step_factor_is_a_params_error(factor, message):
    with pytest.raises(config.ParamsError, match=message):
        config.make(config.ExpertsParams, step_factor=factor)


class _State:
    def __init__(self):
        self.global_step = 0


def test_loss_threshold_stop_waits_for_a_full_window_below_the_threshold():
    from transformers import TrainerControl

    stop, state, control = training.LossThresholdStop(0.1, window=3), _State(), TrainerControl()
    # mean of the last 3: (0.5+0.05+0.05)/3 = 0.2, then (0.05+0.05+0.15)/3 = 0.083 -> stop at step 40
    for step, loss in ((10, 0.5), (20, 0.05), (30, 0.05), (40, 0.15)):
        state.global_step = step
        stop.on_log(None, state, control, logs={"loss": loss})
        assert control.should_training_stop == (step == 40), step
    stop.on_log(None, state, control, logs={"train_runtime": 1.0})  # logs without a loss are ignored
    assert stop.stopped_at == 40 and stop.losses == [0.5, 0.05, 0.05, 0.15]


def test_train_lora_stops_early_and_records_the_steps_it_ran(tmp_path, scratch_base):
    _, _, base = scratch_base
    e = EXPERT.model_copy(update={"steps": 50, "stop_loss": 1e6, "stop_window": 2})  # any loss is below 1e6
    info = training.train_lora(base, skill_sets()["reverse"]["train"], e, e.steps, e.seed, tmp_path / "a", progress=False)
    assert info["stopped_early"] and info["steps"] == 50
    assert info["steps_run"] == 2  # logging every 50 // 50 = 1 step, a window of 2 logs
    assert info["examples_seen"] == 2 * e.batch_size
    never = training.train_lora(base, skill_sets()["reverse"]["train"], EXPERT, EXPERT.steps, 0, tmp_path / "b", progress=False)
    assert not never["stopped_early"] and never["steps_run"] == EXPERT.steps


# --------------------------------------------------------------------------- 5. adapter loading


def test_a_target_module_typo_is_an_error_before_training(tmp_path, scratch_base):
    *_, base = scratch_base
    e = EXPERT.model_copy(update={"target_modules": ["q_proj", "qproj"]})
    with pytest.raises(config.ParamsError, match=r"experts.target_modules: \['qproj'\] is not a linear layer.*v_proj"):
        training.train_lora(base, skill_sets()["reverse"]["train"], e, e.steps, 0, tmp_path / "typo", progress=False)
    assert not (tmp_path / "typo").exists()


def test_max_length_shorter_than_an_example_is_an_error_before_training(tmp_path, scratch_base):
    *_, base = scratch_base
    e = EXPERT.model_copy(update={"max_length": 4})
    with pytest.raises(config.ParamsError, match=r"experts.max_length 4 is shorter than the longest training example \(\d+ tokens"):
        training.train_lora(base, skill_sets()["reverse"]["train"], e, e.steps, 0, tmp_path / "short", progress=False)
    assert not (tmp_path / "short").exists()


def test_a_diverging_run_is_an_error_and_leaves_no_adapter(tmp_path, scratch_base):
    """A learning rate that blows the weights up must never look like convergence."""
    *_, base = scratch_base
    # lr 1e30 blew up to NaN on an AMD EPYC but saturated to a finite, flat loss on an Intel Xeon;
    # an infinite step is non-finite on any CPU.
    e = EXPERT.model_copy(update={"lr": float("inf"), "stop_loss": 0.5})
    with pytest.raises(training.TrainingDiverged, match="diverged; lower the learning rate"):
        training.train_lora(base, skill_sets()["reverse"]["train"], e, e.steps, 0, tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan").exists()


def test_finite_loss_guard_and_check_on_constructed_inputs():
    from types import SimpleNamespace

    guard, state, args = training.FiniteLossGuard(), SimpleNamespace(global_step=7), SimpleNamespace(learning_rate=1.0)
    guard.on_log(args, state, None, logs={"loss": 0.5})
    with pytest.raises(training.TrainingDiverged, match="became nan at step 7"):
        guard.on_log(args, state, None, logs={"loss": float("nan")})
    layer = torch.nn.Linear(2, 2)
    training.check_finite(layer, "ok")
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    with pytest.raises(training.TrainingDiverged, match="1 trained weight tensors hold NaN or inf"):
        training.check_finite(layer, "x")


def test_missing_adapter_config_is_an_adapter_error(tmp_path, scratch_base, trained):
    _, _, base = scratch_base
    empty = tmp_path / "empty_adapter"
    empty.mkdir()
    with pytest.raises(experts.AdapterError, match="empty_adapter"):
        experts.load_with_adapters(base, {"reverse": trained[0], "empty": empty})


def test_adapter_for_another_hidden_size_is_an_adapter_error(tmp_path, scratch_base):
    from peft import LoraConfig, get_peft_model

    _, _, base = scratch_base
    tok = build_char_tokenizer()
    other = get_peft_model(tiny_llama(tok, hidden=48), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    path = tmp_path / "hidden48_adapter"
    other.save_pretrained(str(path))
    with pytest.raises(experts.AdapterError) as err:
        experts.load_with_adapters(base, {"wide": path})
    assert str(path) in str(err.value) and "'wide'" in str(err.value)


def test_truncated_adapter_weights_are_an_adapter_error(tmp_path, scratch_base, trained):
    _, _, base = scratch_base
    bad = tmp_path / "truncated_adapter"
    shutil.copytree(trained[0], bad)
    f = bad / "adapter_model.safetensors"
    blob = f.read_bytes()
    f.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(experts.AdapterError) as err:
        experts.load_with_adapters(base, {"reverse": trained[0], "bad": bad})
    assert str(bad) in str(err.value)
    # Named as truncated, not as a rank or target-module mismatch to retrain (the probe's finding).
    assert "truncated or corrupt" in str(err.value) and "rank" not in str(err.value)
    # Stage 04's and 06's way in (task vectors from adapter directories) goes through the same gate.
    from lib.merge.task_vectors import task_vectors

    with pytest.raises(experts.AdapterError, match="truncated or corrupt"):
        task_vectors(load_causal_lm(base)[0], {"bad": bad})
    pickled = tmp_path / "pickled_adapter"
    shutil.copytree(trained[0], pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(experts.AdapterError, match="adapter_model.bin: pickle files"):
        task_vectors(load_causal_lm(base)[0], {"p": pickled})


def test_an_adapter_trained_with_other_params_is_refused_naming_the_keys(scratch_base, trained):
    *_, base = scratch_base
    out, _, _ = trained
    experts.load_with_adapters(base, {"reverse": out}, EXPERT)  # the recipe it was trained with
    other = EXPERT.model_copy(update={"rank": EXPERT.rank * 2, "steps": EXPERT.steps + 5})
    with pytest.raises(experts.AdapterError, match=r"trained with other params.*experts.rank .*experts.steps"):
        experts.load_with_adapters(base, {"reverse": out}, other)


def test_two_adapters_load_side_by_side(scratch_base, trained, second_adapter):
    _, _, base = scratch_base
    model, tok = experts.load_with_adapters(base, {"reverse": trained[0], "upper": second_adapter})
    assert set(model.peft_config) == {"reverse", "upper"}
    assert model.peft_config["reverse"].r == EXPERT.rank and model.peft_config["upper"].r == 2
    assert not model.training
    # The trained adapter's weights are the ones on disk, not a fresh init.
    from safetensors.torch import load_file

    saved = load_file(str(trained[0] / "adapter_model.safetensors"))
    state = model.state_dict()
    assert saved and all(".lora_" in k for k in saved)
    for key, value in saved.items():
        in_model = re.sub(r"\.(lora_[AB])\.weight$", r".\1.reverse.weight", key)
        assert torch.equal(state[in_model].cpu(), value), key


# --------------------------------------------------------------------------- 6. score matrix


def test_score_matrix_rows(scratch_base, trained, second_adapter):
    from datasets import concatenate_datasets

    _, _, base = scratch_base
    model, tok = experts.load_with_adapters(base, {"reverse": trained[0], "upper": second_adapter})
    tests = concatenate_datasets([ds["test"] for ds in skill_sets().values()]).select_columns(["prompt", "answer", "skill"])
    names = ["__base__", "reverse", "upper"]
    table = experts.score_matrix(model, tok, tests, names, make_params(EvalParams, batch_size=8, n_boot=100, ece_bins=2), progress=False)
    assert list(table.columns) == ["model", "skill", "n", "accuracy", "ci_low", "ci_high", "ece"]
    assert len(table) == len(names) * len(SKILLS.train)
    assert set(zip(table["model"], table["skill"])) == {(m, s) for m in ("base", "reverse", "upper") for s in SKILLS.train}
    assert table["accuracy"].between(0, 1).all()
    assert (table.groupby("model")["n"].sum() == len(tests)).all()


def test_lean_trainer_loss_equals_trls_own_loss_on_the_same_batch(tmp_path, scratch_base):
    """LeanSFTTrainer only swaps how the training loss is computed (the model's own causal-LM
    loss instead of trl's fused LM head with its per-token metrics): on one batch, with the
    trainer's token count, both give the same number and the same gradients."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lib.core.sft import LeanSFTTrainer

    _, _, base = scratch_base
    rows = training.sft_rows(skill_sets()["reverse"]["train"])
    results = []
    for cls in (SFTTrainer, LeanSFTTrainer):
        model, tok = load_causal_lm(base)
        tok.padding_side = "right"
        args = SFTConfig(**training.trainer_args(tmp_path / cls.__name__, 1, 1e-2, 4, 0, progress=False),
                         completion_only_loss=True, max_length=32, packing=False, gradient_checkpointing=False)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                          init_lora_weights=False)
        torch.manual_seed(0)
        trainer = cls(model=model, args=args, train_dataset=rows, processing_class=tok, peft_config=lora)
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # prompt masked, answer kept
        n = (batch["labels"][:, 1:] != -100).sum()
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (l_trl, g_trl), (l_lean, g_lean) = results
    assert torch.isfinite(l_trl) and l_trl > 0
    torch.testing.assert_close(l_lean, l_trl, rtol=1e-5, atol=1e-6)
    assert g_trl.keys() == g_lean.keys() and g_trl
    for k in g_trl:
        torch.testing.assert_close(g_lean[k], g_trl[k], rtol=1e-4, atol=1e-6)


def test_train_expert_runs_data_parallel_under_a_distributed_launcher(project, scratch_base):
    """`torchrun` (what `accelerate launch --multi_gpu` runs underneath; here two CPU processes
    with the gloo backend) runs the unchanged training step: each process takes its shard of
    every batch, and the main process alone writes one complete adapter."""
    import subprocess
    import sys

    import yaml

    _, _, base = scratch_base
    shutil.copytree(base, project / "models" / "base")
    data.save(skill_sets()["reverse"], project / "datasets" / "skills" / "reverse")
    p = yaml.safe_load((project / "params.yaml").read_text())
    p["skills"]["train"] = ["reverse"]
    p["experts"].update(steps=6, batch_size=4, rank=4, alpha=8, target_modules=["q_proj", "v_proj"], stop_loss=None,
                        replay=0.0)  # no corpus here
    (project / "params.yaml").write_text(yaml.safe_dump(p))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "lib.experts.train", "reverse"], cwd=project, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-12000:]
    out = project / "models" / "experts" / "reverse"
    info = json.loads((out / "train_info.json").read_text())
    assert info["processes"] == 2 and info["steps_run"] == 6
    assert info["examples_seen"] == 6 * 4 * 2  # a per-process batch of 4 on each of 2 processes
    assert not Path(str(out) + ".partial").exists()
    from lib.experts.adapters import load_with_adapters

    model, _ = load_with_adapters(project / "models" / "base", {"reverse": out})  # checks files and keys
    assert "reverse" in model.peft_config
