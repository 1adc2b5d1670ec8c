"""Stage 01 logic: skill datasets, the composed set, held-out skills and the base corpus.

Every skill draws from its own RNG seeded by (seed, skill, difficulty), so adding a skill
or changing one skill's difficulty leaves every other skill's data byte-identical, and
DVC retrains only the experts whose data changed.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from datasets import Dataset, DatasetDict

from lib import skills as skill_lib
from lib.core.config import SYNTH_LEAST, ParamsError, SkillsParams, SynthesizeParams, read_yaml
from lib.core.data import DataError, save, write_manifest
from lib.skills import compose


def skill_rng(seed: int, *parts: object) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across processes,
    # unlike hash(), and independent per skill.
    return random.Random(":".join(map(str, (seed, *parts))))


def unique_prompts(make, n: int, what: str, max_factor: int = 50) -> list[str]:
    """Draw ``n`` distinct prompts from ``make()``; clear error when the space is too small."""
    seen: dict[str, None] = {}
    tries = 0
    while len(seen) < n:
        tries += 1
        if tries > max_factor * n + 1000:
            raise DataError(
                f"{what}: only {len(seen)} distinct prompts found after {tries} draws, {n} needed; "
                "raise skills.difficulty for it or lower the split sizes in params.yaml"
            )
        seen.setdefault(make(), None)
    return list(seen)


def rows(prompts: list[str], skill: str, family: str) -> dict[str, list[str]]:
    return {
        "prompt": prompts,
        "answer": [skill_lib.solve_any(p) for p in prompts],
        "skill": [skill] * len(prompts),
        "family": [family] * len(prompts),
    }


def _dataset(columns: dict[str, list], key: str) -> Dataset:
    ds = Dataset.from_dict(columns)
    # from_dict gives a random fingerprint, which lands in state.json: replace it with a
    # content hash so the same params give byte-identical files on disk.
    ds._fingerprint = hashlib.sha256((key + json.dumps(columns, sort_keys=True)).encode()).hexdigest()[:16]
    return ds


def skill_splits(name: str, skills: SkillsParams, syn: SynthesizeParams, train_prompts: list[str] | None = None) -> DatasetDict:
    """Disjoint train/validation/test for one skill (test first, so it never depends on n_train).

    ``train_prompts`` replaces the programmatic train+validation prompts (teacher mode);
    any of them that is also a test prompt is dropped.
    """
    skill = skill_lib.get_skill(name)
    rng = skill_rng(syn.seed, name, skills.level(name))
    if train_prompts is None:
        total = syn.n_test + syn.n_val + syn.n_train
        prompts = unique_prompts(lambda: skill.generate(rng, skills.level(name)), total, f"skill {name!r}")
        test, val, train = prompts[: syn.n_test], prompts[syn.n_test : syn.n_test + syn.n_val], prompts[syn.n_test + syn.n_val :]
    else:
        test = unique_prompts(lambda: skill.generate(rng, skills.level(name)), syn.n_test, f"skill {name!r}")
        held = set(test)
        kept = [p for p in train_prompts if p not in held]
        val, train = kept[: syn.n_val], kept[syn.n_val : syn.n_val + syn.n_train]
        least = SYNTH_LEAST["n_train"][0]  # the same floor as synthesize.n_train
        if len(train) < least:
            raise DataError(f"skill {name!r}: the teacher kept {len(kept)} new prompts, fewer than n_val={syn.n_val} "
                            f"+ {least} training prompts; raise synthesize.teacher.n_candidates or lower "
                            "synthesize.n_val")
    return DatasetDict({
        split: _dataset(rows(ps, name, skill.family), f"{name}/{split}")
        for split, ps in (("train", train), ("validation", val), ("test", test))
    })


def composed_set(skills: SkillsParams, syn: SynthesizeParams) -> DatasetDict:
    """k = 2 compositions of training skills: a small validation split (few-shot tuning) and test."""
    pairs = compose.eligible_pairs(skills.train, {s: skills.level(s) for s in skills.train})
    if not pairs:
        raise DataError(f"no two training skills compose (skills.train = {skills.train})")
    rng = skill_rng(syn.seed, "composed")

    def make() -> str:
        a, b = rng.choice(pairs)
        return compose.generate(rng, skill_lib.get_skill(a), skill_lib.get_skill(b), skills.level(a))

    n_val = min(syn.n_val, max(1, syn.n_composed // 4))
    prompts = unique_prompts(make, syn.n_composed + n_val, "composed set")
    out = {}
    for split, ps in (("validation", prompts[syn.n_composed :]), ("test", prompts[: syn.n_composed])):
        cols = rows(ps, "", "composed")
        cols["skill"] = [compose.SEPARATOR.join(s.name for s in compose.parse(p)[:2]) for p in ps]
        out[split] = _dataset(cols, f"composed/{split}")
    return DatasetDict(out)


def heldout_set(name: str, skills: SkillsParams, syn: SynthesizeParams) -> DatasetDict:
    """A held-out skill: a few validation examples (for few-shot methods) and a test split."""
    skill = skill_lib.get_skill(name)
    rng = skill_rng(syn.seed, "heldout", name, skills.level(name))
    n_val = min(syn.n_val, max(1, syn.n_heldout // 4))
    prompts = unique_prompts(lambda: skill.generate(rng, skills.level(name)), syn.n_heldout + n_val, f"held-out skill {name!r}")
    return DatasetDict({
        "validation": _dataset(rows(prompts[syn.n_heldout :], name, skill.family), f"heldout/{name}/validation"),
        "test": _dataset(rows(prompts[: syn.n_heldout], name, skill.family), f"heldout/{name}/test"),
    })


CORPUS_ALPHABETS = {
    "lower": "abcdefghijklmnopqrstuvwxyz",
    "upper": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "digits": "0123456789",
    "mixed": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
}


def corpus_line(rng: random.Random, names: list[str], max_len: int) -> str:
    """One line of generic text: the skills' prompt shape with a *copy* answer.

    It teaches the format, every symbol the skills use (LoRA does not train embeddings,
    so an unseen symbol stays untrained) and the skills' names, but no skill: the answer
    is always the input itself, or an arithmetic expression copied verbatim.
    """
    kind = rng.random()
    if kind < 0.25:
        x = f"{rng.randint(0, 10 ** rng.randint(1, 3) - 1)}{rng.choice('+-*')}{rng.randint(0, 999)}"
    else:
        alphabet = CORPUS_ALPHABETS[rng.choice(list(CORPUS_ALPHABETS))]
        x = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len)))
    extra = rng.choice(["even", "odd", *names])
    return f"copy {x} = {x}" if rng.random() < 0.8 else f"copy {extra} = {extra}"


ALIAS_FORMS = ("reversed", "scrambled")
"""How a skill's alias name is spelled: ``reversed`` (``reverse`` -> ``esrever``) or
``scrambled`` (a fixed pseudo-random 5-letter string per skill, sharing no pattern with the name)."""


def alias(name: str, form: str = "reversed") -> str:
    """The name a skill goes by in the base corpus, a string no prompt uses, so the base can
    know the skill without knowing its prompt. ``form``: one of :data:`ALIAS_FORMS`."""
    if form == "reversed":
        return name[::-1]
    if form == "scrambled":
        rng = random.Random(f"alias:{name}")
        return "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(5))
    raise ValueError(f"unknown alias form {form!r}; known: {', '.join(ALIAS_FORMS)}")


ALIAS_SEPARATOR = " ->"


def alias_line(rng: random.Random, skills: SkillsParams, separator: str = ALIAS_SEPARATOR,
               form: str = "reversed", names: list[str] | None = None) -> str:
    """A training skill demonstrated under its alias and another separator: ``"esrever abc -> cba"``.

    Pretrained LLMs already know most skills and fine-tuning mostly binds a skill to its
    instruction; this line gives the scratch base the same head start (the corpus then
    holds *skill knowledge* in another format). With ``separator=" ->"`` only the copy lines
    use the prompts' ``"<name> <x> ="`` format; with ``" ="`` (the default profile) only the
    name differs, and the base then answers a study prompt from its alias unless unknown
    command words have an answer of their own (``echo_fraction`` with ``echo_answer="name"``:
    86% right on ``maxdigit`` without them, 0% with them, issue 15's exploration).
    Held-out skills are never shown; ``names`` restricts the skills shown (default: all
    training skills)."""
    name = rng.choice(names or skills.train)
    skill = skill_lib.get_skill(name)
    x = skill.sample(rng, skills.level(name))
    return f"{alias(name, form)} {x}{separator} {skill.apply(x)}"


def corpus_rows(texts: list[str], separators: tuple[str, ...] = (" =", ALIAS_SEPARATOR)) -> dict[str, list[str]]:
    """Corpus lines as prompt/answer rows (``"esrever abc -> cba"`` -> ``"esrever abc ->"``,
    ``"cba"``), split at the first ``" <sep> "``, so they can be replayed during expert training
    with the loss on the answer, like a skill's rows. A line with no separator is an error."""
    prompts, answers = [], []
    for t in texts:
        cuts = [(t.find(sep + " "), sep) for sep in separators if t.find(sep + " ") > 0]
        if not cuts:
            raise DataError(f"corpus line {t!r} has none of the separators {separators}")
        i, sep = min(cuts)
        prompts.append(t[: i + len(sep)])
        answers.append(t[i + len(sep) + 1:])
    return {"prompt": prompts, "answer": answers}


def echo_word(rng: random.Random, reserved: set[str]) -> str:
    """A random lowercase command word (3-8 letters) that is none of ``reserved``."""
    while True:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
        if w not in reserved:
            return w


def corpus(skills: SkillsParams, syn: SynthesizeParams, alias_skills: list[str] | None = None) -> DatasetDict:
    """Copy lines, and a ``corpus_skill_fraction`` share of :func:`alias_line` lines (in
    ``synthesize.alias_form`` with ``synthesize.alias_separator``; ``alias_skills``: the skills
    shown, default all training skills).

    ``synthesize.echo_fraction``: share of the copy lines whose command is a random word instead of
    ``copy`` (``"blorp abc = abc"``): the base then echoes the input for any command it does
    not know, so an expert replaying these lines learns to act on *its* command only.
    ``synthesize.echo_answer``: ``"input"`` (echo the input) or ``"name"`` (answer with the command word,
    ``"blorp abc = blorp"``, which no skill's answer equals, so no skill leaks into the base:
    echoing the input answers ``sort`` right whenever its input is already sorted)."""
    alias_separator, alias_form = syn.alias_separator, syn.alias_form
    echo_fraction, echo_answer = syn.echo_fraction, syn.echo_answer
    rng = skill_rng(syn.seed, "corpus")
    max_len = max(skills.level(s) for s in skills.all) + 2
    # Drawn from separate streams so the copy lines are the same whatever the fractions.
    skill_rng_ = skill_rng(syn.seed, "corpus-skills")
    echo_rng = skill_rng(syn.seed, "corpus-echo")
    reserved = {"copy", *skills.all, *(alias(s, alias_form) for s in skills.all)}

    def copy_line() -> str:
        line = corpus_line(rng, skills.all, max_len)
        if echo_fraction and echo_rng.random() < echo_fraction:
            word = echo_word(echo_rng, reserved)
            line = word + line[len("copy"):]
            if echo_answer == "name":
                line = line[: line.index(" = ") + 3] + word
        return line

    lines = [alias_line(skill_rng_, skills, alias_separator, alias_form, alias_skills)
             if skill_rng_.random() < syn.corpus_skill_fraction
             else copy_line() for _ in range(syn.corpus_size)]
    n_val = max(1, min(500, syn.corpus_size // 20))
    return DatasetDict({
        "train": _dataset({"text": lines[n_val:]}, "corpus/train"),
        "validation": _dataset({"text": lines[:n_val]}, "corpus/validation"),
    })


def overlap(ds: DatasetDict) -> dict[str, int]:
    """Exact-duplicate prompts between splits (0 by construction; measured anyway)."""
    sets = {s: set(ds[s]["prompt"]) for s in ds}
    names = sorted(sets)
    return {f"{a}&{b}": len(sets[a] & sets[b]) for i, a in enumerate(names) for b in names[i + 1 :]}


def load_cards(data_dir: str | Path, names: list[str]) -> dict[str, dict]:
    """Skill cards and seed exemplars from ``data/skills/<name>.yaml``, each answer checked.

    A skill without a card is allowed (programmatic synthesis does not need one) and is
    simply absent from the result.
    """
    cards = {}
    for name in names:
        path = Path(data_dir) / "skills" / f"{name}.yaml"
        if not path.exists():
            continue
        try:
            card = read_yaml(path)  # one line with file:line:column, and a key given twice is an error
        except ParamsError as e:
            raise DataError(f"{e} (a skill card)") from None
        try:
            exemplars = card["exemplars"]
        except Exception as e:
            raise DataError(f"{path}: not a skill card ({type(e).__name__}: {e})") from None
        skill = skill_lib.get_skill(name)
        for ex in exemplars:
            try:
                prompt, answer = ex["prompt"], str(ex["answer"])
                want = skill.solve(prompt)
            except (KeyError, TypeError, skill_lib.MalformedPrompt) as e:
                raise DataError(f"{path}: bad exemplar {ex!r} ({type(e).__name__}: {e})") from None
            if answer != want:
                raise DataError(f"{path}: exemplar {prompt!r} has answer {answer!r}, the solver says {want!r}")
        cards[name] = card
    return cards


def synthesize_all(skills: SkillsParams, syn: SynthesizeParams, out_dir: str | Path = "datasets",
                   data_dir: str | Path = "data", progress: bool = True) -> dict:
    """Write every stage-01 dataset under ``out_dir``; return a summary for metrics and the notebook."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    cards = load_cards(data_dir, skills.all)
    teacher_prompts: dict[str, list[str]] = {}
    teacher_reports: list[dict] = []
    if syn.source == "teacher":
        from lib.synth.teacher import generate_prompts, load_teacher

        model, tok = load_teacher(syn.teacher)
        for name in tqdm(skills.train, desc="teacher generation", disable=not progress):
            if name not in cards:
                raise DataError(f"{Path(data_dir) / 'skills' / (name + '.yaml')}: missing; the teacher needs seed exemplars for {name!r}")
            exemplars = [ex["prompt"] for ex in cards[name]["exemplars"]]
            teacher_prompts[name], report = generate_prompts(name, exemplars, model, tok, syn.teacher, syn.seed)
            teacher_reports.append(report)

    summary: dict = {"source": syn.source, "skills": {}, "overlap_total": 0}
    for name in tqdm(skills.train, desc="skill datasets", disable=not progress):
        ds = skill_splits(name, skills, syn, teacher_prompts.get(name))
        save(ds, out / "skills" / name)
        ov = overlap(ds)
        summary["overlap_total"] += sum(ov.values())
        summary["skills"][name] = {"family": skill_lib.get_skill(name).family, **{s: len(ds[s]) for s in ds}}
    summary["heldout"] = {}
    for name in skills.heldout:
        ds = heldout_set(name, skills, syn)
        save(ds, out / "heldout" / name)
        summary["heldout"][name] = {s: len(ds[s]) for s in ds}
    if syn.n_composed:
        ds = composed_set(skills, syn)
        save(ds, out / "composed")
        summary["composed"] = {s: len(ds[s]) for s in ds}
        summary["composed_pairs"] = len(set(ds["test"]["skill"]))
    ds = corpus(skills, syn)
    save(ds, out / "corpus")
    summary["corpus"] = {s: len(ds[s]) for s in ds}
    # Read by lib.core.data.test_sets: a composed set that should exist but is gone is an error.
    write_manifest(out, composed=bool(syn.n_composed))
    if teacher_reports:
        summary["teacher"] = {r["skill"]: {k: v for k, v in r.items() if k != "skill"} for r in teacher_reports}
    return summary

