"""Shared test fixtures. Every test is offline and writes only under tmp_path."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# Offline before anything imports huggingface_hub / transformers / datasets (the
# papermill kernels started by the tests inherit this environment too).
os.environ["DVC_NO_ANALYTICS"] = "1"  # dvc init in a scratch project would otherwise send usage analytics
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
PARAMS = REPO / "params.yaml"
PROFILES = REPO / "profiles"


def make_workdir(dest: Path) -> Path:
    """A scratch project root: data/, params.yaml and profiles/ copied from the repo."""
    if not (DATA / "skills").is_dir():
        pytest.fail(f"{DATA}/skills is missing: run `make setup` (it runs `dvc pull data.dvc`) first")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(DATA, dest / "data")
    shutil.copytree(PROFILES, dest / "profiles")
    shutil.copy2(PARAMS, dest / "params.yaml")
    return dest


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return make_workdir(tmp_path / "project")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a busy 2-core box: one torch thread is faster (thread start-up costs
    more than it saves on tiny matmuls) and keeps runs reproducible."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def peaked_tiny_llama(tok, seed: int = 0):
    """A 1-layer, hidden-32 Llama for tests, with initializer_range 0.3 (not 0.02) so a
    random model's next-token distributions are peaked and its greedy answers differ by adapter."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=64, initializer_range=0.3,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


# The smoke-profile pipeline, run once per test session in a scratch copy of the project and
# shared by every module that checks a stage's smoke outputs (tests/test_pipeline_smoke.py and
# the stage modules): `dvc repro` of the whole pipeline takes a few minutes, so only once.
BIN = Path(sys.executable).parent


def dvc(cwd: Path, *args: str) -> str:
    # PYTHONPATH: the stages (and their papermill kernels) import the project's own lib/, as
    # they do in a user's clone, not the lib/ the test environment has installed.
    path = os.pathsep.join(p for p in (str(cwd), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": path}
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def readme_skill() -> tuple[str, str]:
    """(file name, code) of the skill README's "Adding a skill" shows, taken from README.md."""
    import re

    section = (REPO / "README.md").read_text().split("### Adding a skill", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return re.match(r"# lib/skills/(\w+\.py)", code).group(1), code


def add_readme_skill(root: Path) -> str:
    """Do what README's "Adding a skill" says in the project at ``root``: the file in
    lib/skills/ and its name in skills.train. Returns the skill's name."""
    import yaml

    name, code = readme_skill()
    (root / "lib" / "skills" / name).write_text(code)
    params = yaml.safe_load((root / "params.yaml").read_text())
    skill = name.removesuffix(".py")
    params["skills"]["train"].append(skill)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return skill


def _smoke_project(root: Path, with_readme_skill: bool = False) -> Path:
    make_workdir(root)
    for d in ("lib", "notebooks", "docs", "results/linearised"):  # the report reads the committed linearised study
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    from lib.cli.profile import apply

    apply("smoke", root / "params.yaml")
    if with_readme_skill:
        add_readme_skill(root)
    dvc(root, "init", "--no-scm", "-q")
    dvc(root, "repro")
    return root


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    return _smoke_project(tmp_path_factory.mktemp("smoke") / "project")


@pytest.fixture(scope="session")
def readme_project(tmp_path_factory) -> Path:
    """The smoke pipeline with README's example skill added exactly as README says (its own
    project: the shared one's params must stay valid for tests that run stage code in-process)."""
    return _smoke_project(tmp_path_factory.mktemp("readme") / "project", with_readme_skill=True)


def smoke_params(root: Path) -> dict:
    import yaml

    return yaml.safe_load((root / "params.yaml").read_text())


def set_dotted(d: dict, dotted: str, value) -> dict:
    """A deep copy of a params dict with ``a.b.c`` set to ``value`` (missing levels created)."""
    import copy

    d = copy.deepcopy(d)
    *parents, last = dotted.split(".")
    node = d
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return d


def train_tiny_teacher(path: Path, skill_name: str, steps: int = 200) -> None:
    """A 2-layer Llama over the character tokenizer, trained to write lines of ``skill_name`` prompts."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lib import skills as skill_lib
    from lib.core.tokenization import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=128, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    ))
    skill = skill_lib.get_skill(skill_name)
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = ["\n".join(skill.generate(rng, 4) for _ in range(4)) + "\n" for _ in range(16)]
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 1.5, f"the tiny teacher did not learn the prompt format (loss {loss.item():.2f})"
    model.save_pretrained(path)
    tok.save_pretrained(path)
