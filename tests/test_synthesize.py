"""Stage 01: skill datasets, composed and held-out sets, the corpus, determinism, bad data, teacher path."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml
from datasets import DatasetDict

from conftest import DATA, make_workdir, train_tiny_teacher
from lib.core.config import make as make_params
from lib.core import config
from lib.core import data
from lib.synth import datasets as synth
from lib.cli import run_stage
from lib import skills as skill_lib
from lib.core.config import SkillsParams, SynthesizeParams, TeacherParams
from lib.core.stages import get_stage

SECTIONS = list(get_stage("synthesize").sections)


def _tree(root: Path) -> dict[str, bytes]:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _digest(tree: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in tree.items()}


# ---- the stage run by papermill with the smoke profile ---------------------------------


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Stage 01 run once through lib.cli.run_stage (papermill) in a scratch project."""
    root = make_workdir(tmp_path_factory.mktemp("stage01") / "project")
    notebook = run_stage.run("synthesize", profile="smoke", workdir=root, progress=False)
    cfg = config.load(SECTIONS, root / "params.yaml", profile="smoke")
    return root, notebook, cfg["skills"], cfg["synthesize"]


def test_stage_writes_every_dataset_with_smoke_sizes(smoke):
    root, _, S, P = smoke
    smoke_profile = yaml.safe_load((root / "profiles" / "smoke.yaml").read_text())["synthesize"]
    assert (P.n_train, P.n_val, P.n_test) == (smoke_profile["n_train"], smoke_profile["n_val"], smoke_profile["n_test"])
    for name in S.train:
        ds = data.load(root / "datasets" / "skills" / name, data.SPLITS)
        assert {s: len(ds[s]) for s in ds} == {"train": P.n_train, "validation": P.n_val, "test": P.n_test}, name
        for split in ds:
            assert set(ds[split].column_names) == set(data.COLUMNS)
            assert set(ds[split]["skill"]) == {name}
            assert set(ds[split]["family"]) == {skill_lib.get_skill(name).family}
            assert all(p.startswith(f"{name} ") and p.endswith(" =") for p in ds[split]["prompt"])
    for name in S.heldout:
        ds = data.load(root / "datasets" / "heldout" / name, ("validation", "test"))
        assert len(ds["test"]) == P.n_heldout
        assert len(ds["validation"]) == min(P.n_val, max(1, P.n_heldout // 4))
        assert not set(ds["validation"]["prompt"]) & set(ds["test"]["prompt"])
        assert not (root / "datasets" / "skills" / name).exists(), "a held-out skill must not get training data"
    comp = data.load(root / "datasets" / "composed", ("validation", "test"))
    assert len(comp["test"]) == P.n_composed
    assert not set(comp["validation"]["prompt"]) & set(comp["test"]["prompt"])
    for p, sk in zip(comp["test"]["prompt"], comp["test"]["skill"]):
        a, b, _ = skill_lib.compose.parse(p)
        assert sk == f"{a.name}>{b.name}" and a.name in S.train and b.name in S.train
    corpus = data.load(root / "datasets" / "corpus", ("train", "validation"))
    assert len(corpus["train"]) + len(corpus["validation"]) == P.corpus_size


def test_stage_splits_are_disjoint_and_answers_correct(smoke):
    root, _, S, _ = smoke
    paths = [root / "datasets" / "skills" / n for n in S.train]
    paths += [root / "datasets" / "heldout" / n for n in S.heldout] + [root / "datasets" / "composed"]
    for path in paths:
        ds = data.load(path)
        prompts = {s: list(ds[s]["prompt"]) for s in ds}
        for split, ps in prompts.items():
            assert len(set(ps)) == len(ps), f"{path} {split}: duplicate prompts"
            for p, a in zip(ps, ds[split]["answer"]):
                assert a == skill_lib.solve_any(p)
        names = sorted(prompts)
        for i, x in enumerate(names):
            for y in names[i + 1 :]:
                assert not set(prompts[x]) & set(prompts[y]), f"{path}: {x} and {y} share prompts"
        data.verify(ds, path)
        assert synth.overlap(ds) == {k: 0 for k in synth.overlap(ds)}


def test_stage_corpus_never_shows_a_study_prompt(smoke):
    """The default corpus (issue 15's testbed): copy lines, unknown commands answering with their
    own name, and the training skills under their alias names; never a study prompt itself."""
    root, _, S, P = smoke
    corpus = data.load(root / "datasets" / "corpus")
    lines = list(corpus["train"]["text"]) + list(corpus["validation"]["text"])
    aliases = {synth.alias(s, P.alias_form): s for s in S.train}
    kinds = {"copy": 0, "echo": 0, "alias": 0}
    for line in lines:
        word, rest = line.split(" ", 1)
        assert word not in S.all, line
        x, answer = rest.rsplit(" = ", 1)
        if word == "copy":
            kinds["copy"] += 1
            assert answer == x, line
        elif word in aliases:
            kinds["alias"] += 1
            assert answer == skill_lib.get_skill(aliases[word]).apply(x), line
        else:
            kinds["echo"] += 1
            assert answer == word, line
    n = len(lines)
    assert abs(kinds["alias"] / n - P.corpus_skill_fraction) < 0.1, kinds
    assert abs(kinds["echo"] / (n - kinds["alias"]) - P.echo_fraction) < 0.15, kinds
    assert len(set(lines)) > n // 2


def test_stage_metrics_and_report(smoke):
    root, notebook, S, P = smoke
    metrics = json.loads((root / "metrics" / "synthesize.json").read_text())
    assert metrics["overlap_total"] == 0
    assert metrics["source"] == "programmatic"
    assert metrics["n_train_skills"] == len(S.train)
    assert metrics["n_heldout_skills"] == len(S.heldout)
    assert metrics["train_examples"] == P.n_train * len(S.train)
    assert metrics["test_examples"] == P.n_test * len(S.train)
    assert metrics["composed_test"] == P.n_composed
    assert metrics["heldout_test"] == P.n_heldout * len(S.heldout)
    assert metrics["corpus_lines"] == P.corpus_size
    assert 1 <= metrics["composed_pairs"] <= len(S.train) * (len(S.train) - 1)
    assert notebook == root / "reports" / "notebooks" / "01_synthesize.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "every code cell ran"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "n_train" in injected[0].source and str(P.n_train) in injected[0].source
    assert not list(root.rglob("*.partial")), "no half-written output is left behind"


def test_stage_equals_direct_synthesis(smoke, tmp_path):
    """The notebook writes exactly what synth.synthesize_all writes for the same params."""
    root, _, S, P = smoke
    synth.synthesize_all(S, P, tmp_path / "datasets", root / "data")
    assert _digest(_tree(tmp_path / "datasets")) == _digest(_tree(root / "datasets"))


# ---- determinism (synth.synthesize_all directly) ----------------------------------------


@pytest.fixture(scope="module")
def smoke_params(tmp_path_factory):
    root = make_workdir(tmp_path_factory.mktemp("params") / "project")
    cfg = config.load(SECTIONS, root / "params.yaml", profile="smoke")
    return cfg["skills"], cfg["synthesize"]


def _replace(section, **changes):
    return type(section).model_validate({**section.model_dump(), **changes})


def test_same_params_byte_identical(smoke_params, tmp_path):
    S, P = smoke_params
    s1 = synth.synthesize_all(S, P, tmp_path / "a", DATA)
    s2 = synth.synthesize_all(S, P, tmp_path / "b", DATA)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert s1 == s2
    assert len(a) > 4 * len(S.train)
    assert a.keys() == b.keys()
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"files differ between two runs with the same params: {diff}"


def test_other_seed_other_prompts(smoke_params, tmp_path):
    S, P = smoke_params
    synth.synthesize_all(S, P, tmp_path / "a", DATA)
    synth.synthesize_all(S, _replace(P, seed=P.seed + 1), tmp_path / "b", DATA)
    for name in S.train:
        a = list(data.load(tmp_path / "a" / "skills" / name)["train"]["prompt"])
        b = list(data.load(tmp_path / "b" / "skills" / name)["train"]["prompt"])
        assert a != b, name


def test_one_difficulty_change_leaves_other_skills_identical(smoke_params, tmp_path):
    S, P = smoke_params
    changed = "reverse" if "reverse" in S.train else S.train[0]
    S2 = _replace(S, difficulty={**S.difficulty, changed: S.level(changed) + 2})
    synth.synthesize_all(S, P, tmp_path / "a", DATA)
    synth.synthesize_all(S2, P, tmp_path / "b", DATA)
    for name in S.train:
        a, b = _tree(tmp_path / "a" / "skills" / name), _tree(tmp_path / "b" / "skills" / name)
        if name == changed:
            assert a != b
        else:
            assert a == b, f"skill {name!r} changed although only {changed!r}'s difficulty did"
    for name in S.heldout:
        assert _tree(tmp_path / "a" / "heldout" / name) == _tree(tmp_path / "b" / "heldout" / name)


def test_split_sizes_do_not_move_the_test_set(smoke_params):
    """Test prompts come first from each skill's stream: more training data keeps the test set."""
    S, P = smoke_params
    name = S.train[0]
    a = synth.skill_splits(name, S, P)
    b = synth.skill_splits(name, S, _replace(P, n_train=P.n_train * 2))
    assert list(a["test"]["prompt"]) == list(b["test"]["prompt"])
    assert list(b["train"]["prompt"])[: P.n_train] == list(a["train"]["prompt"])


# ---- bad data ---------------------------------------------------------------------------


def test_wrong_answer_on_disk_is_caught(smoke_params, tmp_path):
    S, P = smoke_params
    name = S.train[0]
    ds = synth.skill_splits(name, S, P)
    answers = list(ds["test"]["answer"])
    answers[5] = answers[5] + "9"
    bad = DatasetDict({**ds, "test": ds["test"].remove_columns("answer").add_column("answer", answers)})
    path = tmp_path / "corrupt" / name
    bad.save_to_disk(str(path))
    loaded = data.load(path, data.SPLITS)
    with pytest.raises(data.DataError) as e:
        data.verify(loaded, path)
    msg = str(e.value)
    assert str(path) in msg and "test row 5" in msg and repr(answers[5]) in msg
    data.verify(DatasetDict({"train": loaded["train"], "validation": loaded["validation"]}), path)  # the rest is fine


def test_missing_split_and_missing_path(smoke_params, tmp_path):
    S, P = smoke_params
    ds = synth.skill_splits(S.train[0], S, P)
    path = tmp_path / "partial"
    DatasetDict({"train": ds["train"], "test": ds["test"]}).save_to_disk(str(path))
    with pytest.raises(data.DataError) as e:
        data.load(path, data.SPLITS)
    assert str(path) in str(e.value) and "'validation'" in str(e.value)
    with pytest.raises(data.DataError) as e:
        data.load(tmp_path / "nowhere", data.SPLITS)
    assert str(tmp_path / "nowhere") in str(e.value) and "not found" in str(e.value)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "state.json").write_text("{")
    with pytest.raises(data.DataError, match="not a readable dataset"):
        data.load(junk)


def test_save_is_atomic(tmp_path, smoke_params):
    S, P = smoke_params
    ds = synth.skill_splits(S.train[0], S, P)
    path = tmp_path / "out"
    data.save(ds, path)
    data.save(ds, path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert list(data.load(path, data.SPLITS)["train"]["prompt"]) == list(ds["train"]["prompt"])


def test_unique_prompts_space_too_small():
    S = make_params(SkillsParams, train=["mul"], difficulty={"mul": 1})
    P = make_params(SynthesizeParams, n_train=500, n_val=10, n_test=10)
    with pytest.raises(data.DataError) as e:
        synth.skill_splits("mul", S, P)
    msg = str(e.value)
    assert "skill 'mul'" in msg and "only 100 distinct prompts" in msg and "520 needed" in msg
    assert "skills.difficulty" in msg
    with pytest.raises(data.DataError, match="thing: only 1 distinct"):
        synth.unique_prompts(lambda: "x", 2, "thing")
    assert synth.unique_prompts(iter(["a", "a", "b", "c"]).__next__, 3, "t") == ["a", "b", "c"]


def test_cards_validate():
    names = sorted(skill_lib.all_skills())
    cards = synth.load_cards(DATA, names)
    files = sorted(p.stem for p in (DATA / "skills").glob("*.yaml"))
    assert sorted(cards) == files
    assert files, "data/skills has no cards"
    for name, card in cards.items():
        assert card["name"] == name
        assert card["family"] == skill_lib.get_skill(name).family
        assert card["card"].strip()
        assert len(card["exemplars"]) >= 4
        for ex in card["exemplars"]:
            assert skill_lib.solve_any(ex["prompt"]) == str(ex["answer"])
    assert synth.load_cards(DATA, ["add", "nocardforthis"]).keys() == {"add"}


def test_card_with_wrong_answer_names_the_file(tmp_path):
    shutil.copytree(DATA, tmp_path / "data")
    path = tmp_path / "data" / "skills" / "reverse.yaml"
    card = yaml.safe_load(path.read_text())
    card["exemplars"][1]["answer"] = "wrong"
    path.write_text(yaml.safe_dump(card))
    with pytest.raises(data.DataError) as e:
        synth.load_cards(tmp_path / "data", ["add", "reverse"])
    assert str(path) in str(e.value) and "'wrong'" in str(e.value)
    path.write_text("just a string\n")
    with pytest.raises(data.DataError, match="not a skill card"):
        synth.load_cards(tmp_path / "data", ["reverse"])


# ---- teacher (SELMA-style) path -------------------------------------------------------


def test_near_duplicate_filter():
    from lib.synth import teacher

    assert teacher.near_duplicate_filter(["abcd", "abce", "zzzz"], 0.7) == ([0, 2], [1])
    assert teacher.near_duplicate_filter(["abcd", "abce", "zzzz"], 0.8) == ([0, 1, 2], [])
    assert teacher.near_duplicate_filter(["ab", "ab", "ba"], 1.0) == ([0, 2], [1])
    assert teacher.near_duplicate_filter([], 0.5) == ([], [])


def test_missing_teacher_is_a_clear_error(tmp_path):
    from lib.core.modeling import ModelLoadError, load_causal_lm

    missing = tmp_path / "no_teacher_here"
    with pytest.raises(ModelLoadError) as e:
        load_causal_lm(missing)
    assert str(missing) in str(e.value)
    S = make_params(SkillsParams, train=["reverse"], heldout=[])
    P = make_params(SynthesizeParams, source="teacher", n_composed=0, corpus_size=10, teacher=make_params(TeacherParams, model=str(missing)))
    with pytest.raises(ModelLoadError, match="^synthesize.teacher.model: " + re.escape(str(missing))) as e:
        synth.synthesize_all(S, P, tmp_path / "out", DATA)
    assert "model.base" not in str(e.value)  # the probe found the teacher's error blaming the base
    assert not (tmp_path / "out").exists()


def test_teacher_path_end_to_end(tmp_path, one_thread):
    path = tmp_path / "teacher"
    train_tiny_teacher(path, "reverse")
    assert (path / "model.safetensors").exists()
    S = make_params(SkillsParams, train=["reverse"], heldout=[], difficulty={"default": 4})
    P = make_params(SynthesizeParams, 
        source="teacher", seed=0, n_train=1000, n_val=4, n_test=16, n_composed=0, n_heldout=0, corpus_size=20,
        teacher=make_params(TeacherParams, model=str(path), n_candidates=64, batch_size=32, max_new_tokens=16, rouge_l_max=0.8),
    )
    out = tmp_path / "datasets"
    summary = synth.synthesize_all(S, P, out, DATA)
    assert summary["source"] == "teacher"
    report = summary["teacher"]["reverse"]
    rejected = {k: v for k, v in report.items() if k.startswith("rejected: ")}
    assert set(report) == {"generated", "kept", "examples", *rejected}
    assert report["generated"] == P.teacher.n_candidates
    assert report["generated"] == report["kept"] + sum(rejected.values())
    assert report["kept"] > P.n_val, report
    assert report["kept"] >= report["generated"] // 4, f"the teacher should mostly write valid prompts: {report}"
    # a few prompts of each outcome, the kept ones among those trained on
    assert set(report["examples"]) == {"kept", *rejected} and 0 < len(report["examples"]["kept"]) <= 5

    ds = data.load(out / "skills" / "reverse", data.SPLITS)
    data.verify(ds, out / "skills" / "reverse")
    test = set(ds["test"]["prompt"])
    generated = list(ds["train"]["prompt"]) + list(ds["validation"]["prompt"])
    assert len(ds["test"]) == P.n_test
    assert len(ds["validation"]) == P.n_val
    assert 0 < len(generated) <= report["kept"]
    assert len(set(generated)) == len(generated)
    assert not test & set(generated), "a teacher prompt leaked into the test split"
    seeds = {ex["prompt"] for ex in synth.load_cards(DATA, ["reverse"])["reverse"]["exemplars"]}
    assert not seeds & set(generated), "seed exemplars are not new prompts"
    skill = skill_lib.get_skill("reverse")
    for p, a in zip(generated, list(ds["train"]["answer"]) + list(ds["validation"]["answer"])):
        x = skill.parse(p)
        assert a == x[::-1]
    assert summary["skills"]["reverse"] == {"family": "string", "train": len(ds["train"]), "validation": P.n_val, "test": P.n_test}
    assert summary["overlap_total"] == 0


def test_a_new_skill_flows_through_synthesis_without_code_changes(smoke_params, tmp_path, request):
    """The README's example: one registered Skill, named in params, gets its datasets."""
    from lib.skills.base import LOWER, Skill, is_word, random_string

    twice = Skill(name="twice", family="string", description="write the input twice: twice ab = abab",
                   sample=lambda rng, d: random_string(rng, LOWER, d), apply=lambda x: x + x, accepts=is_word,
                   difficulty_doc="length uniform in [2, difficulty + 1]")
    skill_lib.register(twice)
    request.addfinalizer(lambda: skill_lib.base.SKILLS.remove("twice"))
    S, P = smoke_params
    S2 = config.validate_section("skills", {**S.model_dump(), "train": [*S.train, "twice"]})
    summary = synth.synthesize_all(S2, P, tmp_path / "datasets", DATA)
    assert summary["skills"]["twice"]["train"] == P.n_train
    ds = data.load(tmp_path / "datasets" / "skills" / "twice", ("train", "test"))
    assert all(a == p.split(" ")[1] * 2 for p, a in zip(ds["test"]["prompt"], ds["test"]["answer"]))
    composed = data.load(tmp_path / "datasets" / "composed", ("test",))["test"]["skill"]
    assert any("twice" in s for s in composed), "the new skill also enters the composed set"


def test_a_skill_named_like_a_torch_module_attribute_is_refused_up_front(request):
    """peft stores adapters in ModuleDicts by name: "half", "double", "train" ... cannot work."""
    from lib.skills.base import LOWER, Skill, is_word, random_string

    half = Skill(name="half", family="string", description="first half", sample=lambda rng, d: random_string(rng, LOWER, d),
                 apply=lambda x: x[: len(x) // 2], accepts=is_word, difficulty_doc="length uniform in [2, difficulty + 1]")
    skill_lib.register(half)
    request.addfinalizer(lambda: skill_lib.base.SKILLS.remove("half"))
    S = make_params(config.SkillsParams)
    with pytest.raises(config.ParamsError, match=r"skills.train: .*skill 'half' cannot be trained.*ModuleDict"):
        config.validate_section("skills", {**S.model_dump(), "train": [*S.train, "half"]})


def test_corpus_skill_lines_show_training_skills_under_an_alias():
    from lib.core.config import SkillsParams, SynthesizeParams

    skills = make_params(SkillsParams, train=["inc", "reverse", "count"], heldout=["mindigit"], difficulty={"default": 3})
    knobs = dict(corpus_size=400, echo_fraction=0.0, alias_separator=synth.ALIAS_SEPARATOR)  # the pre-issue-15 corpus
    plain = synth.corpus(skills, make_params(SynthesizeParams, **knobs, corpus_skill_fraction=0.0))
    mixed = synth.corpus(skills, make_params(SynthesizeParams, **knobs, corpus_skill_fraction=0.3))
    assert all(t.startswith("copy ") for t in list(plain["train"]["text"]) + list(plain["validation"]["text"]))
    lines = list(mixed["train"]["text"]) + list(mixed["validation"]["text"])
    shown = [t for t in lines if not t.startswith("copy ")]
    assert 0.2 < len(shown) / len(lines) < 0.4
    aliases = {synth.alias(s): s for s in skills.train}
    assert set(aliases) & set(skill_lib.all_skills()) == set()  # no alias is a real skill's name
    for line in shown:
        name, rest = line.split(" ", 1)
        prompt_input, answer = rest.split(synth.ALIAS_SEPARATOR + " ")
        skill = skill_lib.get_skill(aliases[name])  # KeyError for a held-out or unknown skill
        assert skill.apply(prompt_input) == answer, line
    assert {line.split(" ", 1)[0] for line in shown} == set(aliases)
    # The copy lines come from their own random stream: the same sequence, only fewer of them.
    in_order = lambda c: list(c["validation"]["text"]) + list(c["train"]["text"])  # validation is the first lines drawn
    copies = [t for t in in_order(mixed) if t.startswith("copy ")]
    assert copies == in_order(plain)[: len(copies)]


def test_echo_lines_answer_with_their_command_and_leave_the_rest_unchanged():
    """Issue 15's testbed knobs: unknown commands with a fixed answer, alias lines in the study's
    own ' =' form. The copy and alias streams are the same whatever the echo share."""
    from lib.core.config import SkillsParams, SynthesizeParams

    skills = make_params(SkillsParams, train=["inc", "reverse", "sort"], heldout=["mindigit"], difficulty={"default": 3})
    base = dict(corpus_size=600, corpus_skill_fraction=0.5, alias_separator=" =")
    lines = lambda **kw: (lambda c: list(c["validation"]["text"]) + list(c["train"]["text"]))(  # noqa: E731
        synth.corpus(skills, make_params(SynthesizeParams, **base, **kw)))
    plain, named, echoed = lines(echo_fraction=0.0), lines(echo_fraction=0.8, echo_answer="name"), \
        lines(echo_fraction=0.8, echo_answer="input")
    aliases = {synth.alias(s) for s in skills.train}
    reserved = {"copy", *skills.all, *aliases}
    echo = [t for t in named if t.split(" ", 1)[0] not in reserved]
    assert 0.3 < len(echo) / len(named) < 0.5  # 0.8 of the copy half
    for t in echo:
        word, rest = t.split(" ", 1)
        assert rest.endswith(" = " + word), t  # answers with its own name: no skill's answer
    for t in [t for t in echoed if t.split(" ", 1)[0] not in reserved]:
        x, answer = t.split(" ", 1)[1].split(" = ")
        assert answer == x, t
    # Alias lines use the study's separator and are the same lines at any echo share.
    alias_lines = lambda ls: [t for t in ls if t.split(" ", 1)[0] in aliases]  # noqa: E731
    assert alias_lines(plain) == alias_lines(named) and all(" = " in t for t in alias_lines(plain))
    rows = synth.corpus_rows(alias_lines(plain)[:5] + echo[:5])
    assert all(p.endswith(" =") and not a.startswith(" ") for p, a in zip(rows["prompt"], rows["answer"]))
