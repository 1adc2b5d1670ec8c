"""Reliability probe (issue 16): bad inputs tried as a new user would, on any revision's tree.

    python -m bench.probe                      # this tree
    python -m bench.probe --tree DIR --out F   # another checkout (e.g. a git worktree of an older commit)

Every case runs the project's own commands in a subprocess, in a scratch project made from
the tree's ``data/``, ``params.yaml`` and ``profiles/``, with the code of ``--tree`` (its
``lib`` first on ``PYTHONPATH``, notebooks included) and *without* the test suite's offline
variables. Each case is classed:

* **good**: a non-zero exit with one message line that names the key or file, no traceback,
  and no work done (no ``datasets/``, ``models/`` or ``metrics/`` written; the executed
  notebook a failing stage leaves in ``reports/notebooks/`` is its log, not work);
* **partial**: a non-zero exit that names the key or file, but with a traceback, more than one
  line, or after some work;
* **bad**: an exit 0, no mention of the key or file, or still running after ``--timeout``
  seconds (the work started: the input was not checked up front).

The params cases are the rows of ``tests/test_reliability.py``'s ``BAD_PARAMS`` (one per kind of
bad value); the others cover the issue's classes that a command can show without a trained
model (params file syntax and duplicate keys, missing inputs, a missing teacher model).
Results go to a JSON file and a printed table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
WORK_DIRS = ("datasets", "models", "metrics")


@dataclass
class Case:
    id: str
    cmd: list[str]                      # after `python -m`; "{w}" is the scratch project
    names: list[str]                    # the message must name one of these (key or file)
    edit: dict = field(default_factory=dict)     # dotted params key -> value
    text_edit: str | None = None        # "syntax" | "duplicate": break params.yaml's text
    needs_data: bool = False            # run stage 01 (smoke profile) first
    needs_base_metrics: bool = False    # a scratch project holding only stage 02's metrics


def _stage_of(section: str) -> str:
    from lib.core.stages import STAGES

    return next(name for name, st in STAGES.items() if section in st.sections)


def params_cases() -> list[Case]:
    sys.path.insert(0, str(REPO / "tests"))
    from test_reliability import BAD_PARAMS  # the tests' table: one row per kind of bad value

    out = []
    for row in BAD_PARAMS:
        key, value, _ = row.values
        out.append(Case(f"params: {row.id}", ["lib.cli.run_stage", _stage_of(key.split(".")[0]), "--workdir", "{w}"],
                        [key], edit={key: value}))
    return out


def other_cases() -> list[Case]:
    return [
        Case("params.yaml syntax error", ["lib.cli.run_stage", "experts", "--workdir", "{w}"], ["params.yaml"], text_edit="syntax"),
        Case("params.yaml key given twice", ["lib.cli.run_stage", "experts", "--workdir", "{w}"], ["rank"], text_edit="duplicate"),
        Case("train an expert before the base exists", ["lib.experts.train", "inc", "--workdir", "{w}", "--profile", "smoke"],
             ["models/base"], needs_data=True),
        Case("fine-tune before the base exists", ["lib.localize.finetune", "inc", "--workdir", "{w}", "--profile", "smoke"],
             ["models/base"], needs_data=True),
        Case("stage 03 before any expert", ["lib.cli.run_stage", "experts", "--workdir", "{w}", "--profile", "smoke"],
             ["models/"], needs_data=True),
        Case("report without the stages' metrics", ["lib.cli.run_stage", "report", "--workdir", "{w}"],
             ["metrics/"], needs_base_metrics=True),
        Case("teacher model path that does not exist", ["lib.cli.run_stage", "synthesize", "--workdir", "{w}"],
             ["synthesize.teacher.model"], edit={"synthesize.source": "teacher", "synthesize.teacher.model": "no/such/dir"}),
    ]


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


def _break(text: str, how: str) -> str:
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("  rank:"))
    if how == "syntax":
        lines[i] = "  rank: [8"
    else:
        lines.insert(i + 1, lines[i].replace("8", "4").replace("2", "4"))
    return "\n".join(lines) + "\n"


def _env(tree: Path) -> dict:
    # The tree's lib first on the path, for the command and for the notebook kernels it starts
    # (they would otherwise import the installed, editable checkout's lib).
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    env["PYTHONPATH"] = str(tree)
    return env


def _run(tree: Path, args: list[str], timeout: float) -> tuple[int | None, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", *args], cwd=tree, env=_env(tree), capture_output=True, text=True,
                           timeout=timeout)
        return p.returncode, p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, err, time.perf_counter() - t0


def _scratch(tree: Path, root: Path, case: Case, seeded: Path | None) -> Path:
    w = root / "project"
    if seeded is not None:
        shutil.copytree(seeded, w)
    else:
        w.mkdir(parents=True)
        # data/ is DVC-tracked: an older checkout may not have pulled it, then this one's is used.
        shutil.copytree(tree / "data" if (tree / "data" / "skills").exists() else REPO / "data", w / "data")
        shutil.copytree(tree / "profiles", w / "profiles")
        shutil.copy2(tree / "params.yaml", w / "params.yaml")
    params = w / "params.yaml"
    if case.edit:
        raw = yaml.safe_load(params.read_text())
        for k, v in case.edit.items():
            _set(raw, k, v)
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
    if case.text_edit:
        params.write_text(_break(params.read_text(), case.text_edit))
    return w


# stderr lines that are not messages: papermill's progress bar and its kernel's log, its notes
# on the parameters cell, and library warnings.
NOISE = ("Executing:", "[IPKernelApp]", "Unable to parse line", "Passed unknown parameter", "Warning", "warnings.warn")


def classify(rc: int | None, err: str, names: list[str], before: set[str], after: set[str]) -> tuple[str, str]:
    """(verdict, why) for one case: see the module docstring."""
    lines = [line for line in err.strip().splitlines() if line.strip() and not any(n in line for n in NOISE)]
    named = any(n in err for n in names)
    worked = bool(after - before)
    if rc is None:
        return "bad", "still running at the timeout: the work started"
    if rc == 0:
        return "bad", "exit 0"
    if not named:
        return "bad", f"exit {rc} without naming {names}"
    problems = [w for w, bad in (("traceback", "Traceback" in err), (f"{len(lines)} lines", len(lines) > 1),
                                 ("work done first", worked)) if bad]
    return ("partial", ", ".join(problems)) if problems else ("good", "one line naming it, before any work")


def run_probe(tree: Path, timeout: float, only: str | None = None) -> list[dict]:
    cases = [c for c in params_cases() + other_cases() if only is None or only in c.id]
    results = []
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp:
        tmp = Path(tmp)
        seeded = {}
        for kind in ("data", "base_metrics"):
            if not any(getattr(c, f"needs_{kind}") for c in cases):
                continue
            base = _scratch(tree, tmp / f"seed-{kind}", Case("seed", [], []), None)
            if kind == "data":
                rc, err, _ = _run(tree, ["lib.cli.run_stage", "synthesize", "--workdir", str(base), "--profile", "smoke"], 600)
                if rc != 0:
                    raise SystemExit(f"probe: stage 01 failed in the scratch project:\n{err[-2000:]}")
                shutil.rmtree(base / "reports", ignore_errors=True)
                shutil.rmtree(base / "metrics", ignore_errors=True)
            else:
                (base / "metrics").mkdir()
                (base / "metrics" / "base.json").write_text(json.dumps({"mean_skill_accuracy": 0.0}))
            seeded[kind] = base
        for i, case in enumerate(cases):
            seed = seeded.get("data") if case.needs_data else seeded.get("base_metrics") if case.needs_base_metrics else None
            w = _scratch(tree, tmp / f"case{i}", case, seed)
            before = {str(p.relative_to(w)) for d in WORK_DIRS for p in (w / d).rglob("*")} if seed else set()
            rc, err, secs = _run(tree, [a.replace("{w}", str(w)) for a in case.cmd], timeout)
            after = {str(p.relative_to(w)) for d in WORK_DIRS for p in (w / d).rglob("*")}
            verdict, why = classify(rc, err, case.names, before, after)
            results.append({"case": case.id, "verdict": verdict, "why": why, "rc": rc, "seconds": round(secs, 1),
                            "message": err.strip().splitlines()[-1][:300] if err.strip() else ""})
            print(f"[{i + 1}/{len(cases)}] {verdict:7s} {case.id}: {why}", flush=True)
            shutil.rmtree(tmp / f"case{i}", ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=str(REPO), help="checkout whose code and params are probed (default: this one)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "probe.json"))
    ap.add_argument("--timeout", type=float, default=45.0, help="seconds before a case counts as work started")
    ap.add_argument("--only", default=None, help="only the cases whose id contains this")
    args = ap.parse_args(argv)
    tree = Path(args.tree).resolve()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
    results = run_probe(tree, args.timeout, args.only)
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("good", "partial", "bad")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tree": str(tree), "revision": rev, "counts": counts, "cases": results}, indent=1))
    print(f"{rev}: {len(results)} cases: {counts['good']} good, {counts['partial']} partial, {counts['bad']} bad -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
