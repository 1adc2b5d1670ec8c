"""The skill library: solvers, generators, parsers, difficulty, registry and composition."""
from __future__ import annotations

import random
import re
import statistics

import pytest
import yaml

from conftest import PARAMS
from lib import skills as skill_lib
from lib.skills import MalformedPrompt, compose, get_skill, solve_any

# Hand-checked (prompt, answer) pairs, written out by hand, not computed.
CASES: dict[str, list[tuple[str, str]]] = {
    "add": [("add 12+34 =", "46"), ("add 0+0 =", "0"), ("add 99+1 =", "100"), ("add 7+85 =", "92")],
    "sub": [("sub 52-17 =", "35"), ("sub 5-5 =", "0"), ("sub 100-1 =", "99"), ("sub 9-0 =", "9")],
    "mul": [("mul 23*4 =", "92"), ("mul 7*0 =", "0"), ("mul 125*8 =", "1000"), ("mul 0*9 =", "0")],
    "reverse": [("reverse abc =", "cba"), ("reverse ab =", "ba"), ("reverse rotor =", "rotor"), ("reverse Ab1 =", "1bA")],
    "sort": [("sort cab =", "abc"), ("sort banana =", "aaabnn"), ("sort zz =", "zz"), ("sort dcba =", "abcd")],
    "upper": [("upper abc =", "ABC"), ("upper aB3 =", "AB3"), ("upper zz =", "ZZ")],
    "rotate": [("rotate abcd =", "bcda"), ("rotate ab =", "ba"), ("rotate aab =", "aba"), ("rotate xyzzy =", "yzzyx")],
    "count": [("count banana =", "3"), ("count xyz =", "0"), ("count aeiou =", "5"), ("count queue =", "4")],
    "parity": [("parity 123 =", "odd"), ("parity 10 =", "even"), ("parity 99 =", "odd"), ("parity 0001 =", "odd"), ("parity 4 =", "even")],
    "length": [("length hello =", "5"), ("length ab =", "2"), ("length A1b2c3 =", "6")],
    "inc": [("inc 349 =", "350"), ("inc 0 =", "1"), ("inc 999 =", "1000")],
    "dec": [("dec 350 =", "349"), ("dec 1 =", "0"), ("dec 1000 =", "999")],
    "maxdigit": [("maxdigit 2719 =", "9"), ("maxdigit 00 =", "0"), ("maxdigit 345 =", "5"), ("maxdigit 81 =", "8")],
    "mindigit": [("mindigit 2719 =", "1"), ("mindigit 99 =", "9"), ("mindigit 3405 =", "0"), ("mindigit 87 =", "7")],
}

# Prompts no parser may accept: wrong skill, missing " =", bad characters, out of domain.
MALFORMED: dict[str, list[str]] = {
    "add": ["sub 12+34 =", "add 12+34", "add 12+34 = 46", "add 12+3a =", "add 12 + 34 =", "add -1+2 =", "add 012+3 =", "add 12-34 =", "add =", ""],
    "sub": ["sub 3-5 =", "sub 52+17 =", "sub 52-17", "sub 5x-1 =", "add 52-17 =", ""],
    "mul": ["mul 12*34 =", "mul 7*10 =", "mul 23*4", "mul 2x*3 =", "mul 23x4 =", "add 23*4 =", ""],
    "reverse": ["reverse ab-c =", "reverse ab c =", "reverse abc", "upper abc =", "reverse  abc =", "reverse =", "reverse é =", ""],
    "sort": ["sort a_b =", "sort cab", "sort =", "reverse cab =", ""],
    "upper": ["upper a.b =", "upper abc", "Upper abc =", ""],
    "rotate": ["rotate ab! =", "rotate abcd", "rotate =", ""],
    "count": ["count ban-ana =", "count banana", "count =", "count é =", ""],
    "parity": ["parity 12a =", "parity 123", "parity -12 =", "parity =", ""],
    "length": ["length a-b =", "length abc", "length =", "size abc =", ""],
    "inc": ["inc 012 =", "inc -1 =", "inc 12", "inc a =", ""],
    "dec": ["dec 0 =", "dec 012 =", "dec -1 =", "dec 5", ""],
    "maxdigit": ["maxdigit 27a9 =", "maxdigit 2719", "maxdigit 1.5 =", ""],
    "mindigit": ["mindigit 27a9 =", "mindigit 2719", "mindigit =", ""],
}

KNOWN_FAMILIES = {"arithmetic", "string", "logic"}
LENGTH_DOC = "length uniform in [2, difficulty + 1]"
DIGITS_DOC = "each operand has 1..difficulty digits"


def _params_skills() -> dict:
    return yaml.safe_load(PARAMS.read_text())["skills"]


def _level(name: str) -> int:
    d = _params_skills()["difficulty"]
    return d.get(name, d.get("default", 3))


def test_every_registered_skill_has_hand_checked_cases():
    missing = set(skill_lib.all_skills()) - set(CASES)
    assert not missing, f"add hand-checked cases for {sorted(missing)} to CASES and MALFORMED in tests/test_skills.py"
    assert set(CASES) == set(MALFORMED)


@pytest.mark.parametrize("name,prompt,answer", [(n, p, a) for n, cases in CASES.items() for p, a in cases])
def test_solver_hand_checked(name, prompt, answer):
    skill = get_skill(name)
    assert skill.solve(prompt) == answer
    assert solve_any(prompt) == answer
    # render(parse(p)) round-trips to the same prompt
    assert skill.render(skill.parse(prompt)) == prompt


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_parser_rejects_malformed(name):
    skill = get_skill(name)
    for bad in MALFORMED[name]:
        with pytest.raises(MalformedPrompt):
            skill.parse(bad)
        with pytest.raises(MalformedPrompt):
            skill.solve(bad)


def test_render_rejects_invalid_input():
    with pytest.raises(MalformedPrompt, match="sub"):
        get_skill("sub").render("3-5")
    with pytest.raises(MalformedPrompt, match="reverse"):
        get_skill("reverse").render("a b")


@pytest.mark.parametrize("name", sorted(CASES))
def test_generator_deterministic_per_seed(name):
    skill = get_skill(name)
    d = max(_level(name), 3)

    def draw(seed):
        rng = random.Random(seed)
        return [skill.generate(rng, d) for _ in range(30)]

    a, b, c = draw(1), draw(1), draw(2)
    assert a == b
    assert a != c
    for p in a + c:  # every generated prompt parses and is answerable
        assert skill.parse(p)
        assert solve_any(p) == skill.solve(p)


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_rejects_difficulty_below_one(name):
    with pytest.raises(ValueError, match=name):
        get_skill(name).generate(random.Random(0), 0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_difficulty_matches_difficulty_doc(name):
    skill = get_skill(name)
    doc = skill.difficulty_doc
    levels = (1, 2, 4, 6)
    if doc.startswith(LENGTH_DOC):
        means = []
        for d in levels:
            rng = random.Random(f"len:{name}:{d}")
            lengths = [len(skill.parse(skill.generate(rng, d))) for _ in range(500)]
            assert min(lengths) == 2, (name, d)
            assert max(lengths) == d + 1, (name, d)
            means.append(statistics.mean(lengths))
        assert means == sorted(means) and len(set(means)) == len(means), f"{name}: mean length does not grow with difficulty: {means}"
    elif doc.startswith(DIGITS_DOC):
        op = {"add": "+", "sub": "-", "mul": "*"}[name]
        widest = []
        for d in levels:
            rng = random.Random(f"digits:{name}:{d}")
            lens = []
            for _ in range(500):
                x = skill.parse(skill.generate(rng, d))
                left, right = x.split(op)
                if name == "mul":  # the multiplier is always one digit
                    assert len(right) == 1
                    lens.append(len(left))
                else:
                    lens += [len(left), len(right)]
            assert max(lens) == d and min(lens) == 1, (name, d, max(lens), min(lens))
            widest.append(max(lens))
        assert widest == list(levels)
    elif doc == "the number has 1..difficulty digits":
        for d in levels:
            rng = random.Random(f"number:{name}:{d}")
            lens = [len(skill.parse(skill.generate(rng, d))) for _ in range(500)]
            assert max(lens) == d and min(lens) == 1, (name, d, max(lens), min(lens))
    else:
        pytest.fail(f"skill {name!r}: no test for its difficulty_doc {doc!r}; extend tests/test_skills.py")


def test_families_and_coverage():
    reg = skill_lib.all_skills()
    for name, skill in reg.items():
        assert skill.family in KNOWN_FAMILIES, f"{name}: unknown family {skill.family!r}"
        assert skill.name == name
        assert skill.description and skill.difficulty_doc
    train = _params_skills()["train"]
    assert len(train) >= 8
    assert len({reg[n].family for n in train}) >= 3
    assert len(reg) >= 8 and len({s.family for s in reg.values()}) >= 3


def test_unknown_skill_lists_known_ones():
    with pytest.raises(KeyError) as e:
        get_skill("nope")
    msg = e.value.args[0]
    assert "'nope'" in msg
    for name in skill_lib.all_skills():
        assert name in msg


def test_register_rejects_duplicates_and_bad_names():
    skill = get_skill("add")
    with pytest.raises(ValueError, match="registered twice"):
        skill_lib.register(skill)
    from dataclasses import replace

    with pytest.raises(ValueError, match="lowercase"):
        skill_lib.register(replace(skill, name="Bad-Name"))
    assert "Bad-Name" not in skill_lib.all_skills()


# ---- composition (k = 2) -----------------------------------------------------------

COMPOSED_CASES = [
    ("reverse>upper abc =", "CBA"),
    ("add>reverse 12+34 =", "64"),
    ("sort>rotate cab =", "bca"),
    ("mul>parity 23*4 =", "even"),  # 92 is even
    ("count>parity banana =", "odd"),  # 3 vowels
    ("sub>maxdigit 52-17 =", "5"),  # 35
]


@pytest.mark.parametrize("prompt,answer", COMPOSED_CASES)
def test_composed_hand_checked(prompt, answer):
    assert compose.solve(prompt) == answer
    assert solve_any(prompt) == answer


def _two_step(a, b, x: str) -> str:
    return b.solve(b.render(a.solve(a.render(x))))


def test_composed_answer_is_solver_of_solver():
    skills = _params_skills()
    names = skills["train"]
    pairs = compose.eligible_pairs(names, {n: _level(n) for n in names})
    assert len(pairs) >= 5
    rng = random.Random(0)
    for a_name, b_name in pairs:
        a, b = get_skill(a_name), get_skill(b_name)
        for _ in range(15):
            p = compose.generate(rng, a, b, _level(a_name))
            pa, pb, x = compose.parse(p)
            assert (pa.name, pb.name) == (a_name, b_name)
            assert p == f"{a_name}>{b_name} {x} ="
            assert solve_any(p) == compose.solve(p) == _two_step(a, b, x)


def test_compose_parse_rejects_malformed():
    bad = [
        "reverse>upper abc",  # no " ="
        "reverse>nope abc =",  # unknown skill
        "nope>upper abc =",
        "reverse>add abc =",  # add cannot take "cba"
        "reverse>upper ab-c =",  # bad characters
        "reverse>>upper abc =",
        "reverse upper abc =",
        "sub>upper 3-5 =",  # sub input out of domain
        "",
    ]
    for p in bad:
        with pytest.raises(MalformedPrompt):
            compose.parse(p)
        with pytest.raises(MalformedPrompt):
            solve_any(p)
    with pytest.raises(MalformedPrompt):
        compose.render(get_skill("reverse"), get_skill("add"), "abc")


def test_eligible_pairs_exclude_trivial():
    names = ["add", "upper", "reverse", "count", "parity", "sort"]
    pairs = set(compose.eligible_pairs(names, {n: 3 for n in names}))
    assert ("reverse", "upper") in pairs
    assert ("add", "reverse") in pairs
    assert ("count", "parity") in pairs
    assert ("add", "upper") not in pairs  # upper of a number is the number
    assert ("add", "count") not in pairs  # vowels of a number: always 0
    assert ("upper", "add") not in pairs  # add does not accept words
    assert all(a != b for a, b in pairs)


def test_solve_any_plain_composed_and_unknown():
    assert solve_any("reverse abc =") == "cba"
    assert solve_any("reverse>upper abc =") == "CBA"
    for bad in ["nope 12 =", "", "=", "reverse>upper"]:
        with pytest.raises(MalformedPrompt):
            solve_any(bad)
    with pytest.raises(MalformedPrompt, match="unknown skill 'nope'; known: .*reverse"):
        solve_any("nope 12 =")
    assert skill_lib.skill_of("add 1+2 =") == "add"
    assert re.fullmatch(r"[a-z0-9]+>[a-z0-9]+", skill_lib.skill_of("add>reverse 1+2 ="))
