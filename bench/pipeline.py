"""Parts 4 and 5, the pipeline: wall time and peak memory of every stage of a real ``dvc repro``.

In a scratch copy of the project (sources, ``data/``, ``params.yaml``, ``profiles/``; no
outputs, a fresh ``dvc init --no-scm``), with the default profile (``--quick``: the smoke
profile):

1. ``dvc repro --keep-going`` of the whole pipeline. Its output is read line by line as it comes; a
   stage runs from its ``Running stage '<name>':`` line to the next one, so the stages are
   discovered from DVC itself (``dvc stage list``), never hard-coded. A thread samples the
   resident memory of every process under ``dvc`` every 0.1 s (psutil) and charges it to
   the running stage: the largest single process (a stage's Python process, or its
   papermill kernel) and the sum over the tree. The kernel's own count for the whole run
   (``os.wait4``'s ``ru_maxrss``: the largest process, exact) is recorded too.
2. A no-op ``dvc repro`` (nothing changed), timed over repeats.
3. ``merge_route.density`` changed in params.yaml: which stages ``dvc status`` reports,
   which stages the next ``dvc repro`` runs, and its wall time. Only stage 04 (merge_route)
   and stage 08 (report) should run.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import yaml

from . import common
from .stats import RUNNING, stage_spans, summarize, verdict

PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress bar
TARGET_TOTAL_S = 20 * 60
TARGET_NOOP_S = 10.0
BIN = Path(sys.executable).parent
TOP_EXCLUDE = {".git", ".venv", ".dvc", "datasets", "models", "reports", "metrics", "plots", "dvc.lock", "bench",
               "tests", "dvc-remote", ".pytest_cache", ".ci", "skill_experts_workbook.egg-info"}
ANY_EXCLUDE = {"__pycache__", ".ipynb_checkpoints"}


def _env() -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    # The default profile needs nothing from the network; forcing it offline proves it.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", DVC_NO_ANALYTICS="1")
    return env


def make_copy(dest: Path, profile: str | None) -> Path:
    """A scratch project: everything but outputs, caches and git; DVC initialised fresh."""
    def ignore(src, names):
        top = Path(src).resolve() == common.REPO
        return {n for n in names if n in ANY_EXCLUDE or n.endswith(".partial") or (top and n in TOP_EXCLUDE)}

    shutil.copytree(common.REPO, dest, ignore=ignore)
    if profile:
        from lib.cli.profile import apply

        apply(profile, dest / "params.yaml")
    dvc(dest, "init", "--no-scm", "-q")
    for key in ("core.analytics", "core.check_update"):
        subprocess.run([str(BIN / "dvc"), "config", key, "false"], cwd=dest, env=_env(), capture_output=True)
    return dest


def dvc(cwd: Path, *args: str) -> str:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=_env(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def repro(cwd: Path, *args: str, poll: float = 0.1, log: Path | None = None) -> dict:
    """Run ``dvc repro``; per-stage wall time and sampled memory, whole-run ru_maxrss."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: list[tuple[float, str]] = []
    current: dict = {"stage": None}
    mem: dict[str, dict] = {}
    stop = threading.Event()

    def sample():
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                kids = root.children(recursive=True)
            except psutil.Error:
                return
            rss = []
            for k in kids:
                try:
                    rss.append(k.memory_info().rss)
                except psutil.Error:
                    pass
            stage = current["stage"]
            if stage and rss:
                m = mem.setdefault(stage, {"peak_rss_mib": 0.0, "peak_tree_mib": 0.0, "samples": 0})
                m["peak_rss_mib"] = max(m["peak_rss_mib"], max(rss) / common.MIB)
                m["peak_tree_mib"] = max(m["peak_tree_mib"], sum(rss) / common.MIB)
                m["samples"] += 1
            stop.wait(poll)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = open(log, "a") if log else None
    recent: dict[str, deque] = {}  # the last lines each stage printed (progress bars left out)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            if out:
                out.write(line)
            m = RUNNING.match(line.strip())
            if m:
                current["stage"] = m.group(1)
            elif current["stage"] and line.strip() and not PROGRESS.search(line):
                recent.setdefault(current["stage"], deque(maxlen=12)).append(line.rstrip("\n"))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        stop.set()
        thread.join()
        if out:
            out.close()
    wall = time.perf_counter() - t0
    spans = stage_spans(lines, wall)
    for s in spans:
        s.update(mem.get(s["stage"], {"peak_rss_mib": None, "peak_tree_mib": None, "samples": 0}))
    out = {"wall_s": wall, "stages": spans, "ran": [s["stage"] for s in spans], "rc": proc.returncode,
           "max_process_rss_mib_wait4": usage.ru_maxrss / 1024}
    if proc.returncode:
        out["failed_stages"] = [s["stage"] for s in spans if not s["ok"]]
        out["errors"] = {name: list(recent.get(name, [])) for name in out["failed_stages"]}
        out["error_tail"] = [t for _, t in lines[-40:] if not PROGRESS.search(t)]
        print(f"pipeline: dvc repro {' '.join(args)} failed (exit {proc.returncode}); failed stages: "
              f"{out['failed_stages']}:\n" + "\n".join(out["error_tail"]), file=sys.stderr, flush=True)
    return out


def _target_stages() -> set[str]:
    """What a merge param should rerun: merge_route, the report and the levels' scoring
    (``level_score``), which chooses each level's λ from ``merge_route.lam_grid``. No training
    stage (named, not found by notebook number: the numbers move when a stage is added)."""
    return {"merge_route", "report", "level_score"}


def run(quick: bool = False, root: Path = common.REPO, keep: bool = False, noop_repeats: int = 3) -> dict:
    profile = "smoke" if quick else None
    scratch = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    project = scratch / "project"
    log = scratch / "dvc_repro.log"
    try:
        t0 = time.perf_counter()
        make_copy(project, profile)
        setup_s = time.perf_counter() - t0
        stages = dvc(project, "stage", "list", "--name-only").split()
        print(f"pipeline: {len(stages)} stages in {project}: {', '.join(stages)}", file=sys.stderr, flush=True)
        # --keep-going: a failing stage does not hide the timings of the stages that do not need it.
        full = repro(project, "--keep-going", log=log)
        missing = sorted(set(stages) - set(full["ran"]))
        result = {
            "what": "dvc repro of the whole pipeline in a scratch copy: per-stage wall time and peak memory, "
                    "no-op repro, rerun after one merge parameter",
            "profile": profile or "default", "stages_declared": stages, "stages_not_run": missing, "setup_s": setup_s,
            "total_s": full["wall_s"], "stages": full["stages"],
            "max_process_rss_mib_wait4": full["max_process_rss_mib_wait4"], "memory_sampling_s": 0.1,
            "failed_stages": full.get("failed_stages", []), "errors": full.get("errors", {}),
            "error_tail": full.get("error_tail"),
        }
        if full["rc"]:
            # Nothing after a failed repro means anything; the stages that ran are still reported.
            return {**result, "target_total": None, "clean_after_repro": False}
        clean = "up to date" in dvc(project, "status")
        noop = [repro(project, log=log) for _ in range(noop_repeats)]
        params_path = project / "params.yaml"
        params = yaml.safe_load(params_path.read_text())
        old = params["merge_route"]["density"]
        new = 0.5 if old != 0.5 else 0.4
        params["merge_route"]["density"] = new
        params_path.write_text(yaml.safe_dump(params, sort_keys=False))
        import json

        status_changed = sorted(json.loads(dvc(project, "status", "--json")))
        rerun = repro(project, log=log)
        expected = _target_stages()
    finally:
        if keep:
            print(f"pipeline: kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    noop_s = summarize([r["wall_s"] for r in noop])
    return {
        **result,
        "clean_after_repro": clean,
        "target_total": verdict(full["wall_s"], TARGET_TOTAL_S, higher_is_better=False) if not quick else None,
        "noop_s": noop_s, "noop_ran": sorted({s for r in noop for s in r["ran"]}),
        "target_noop": verdict(noop_s["max"], TARGET_NOOP_S, higher_is_better=False),
        "rerun": {"param": "merge_route.density", "from": old, "to": new, "status_changed": status_changed,
                  "ran": rerun["ran"], "wall_s": rerun["wall_s"], "stages": rerun["stages"],
                  "expected": sorted(expected), "only_expected": set(rerun["ran"]) <= expected,
                  "all_expected_ran": expected <= set(rerun["ran"]), "rc": rerun["rc"],
                  "failed_stages": rerun.get("failed_stages", [])},
    }
