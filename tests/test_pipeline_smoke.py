"""The whole DVC pipeline on the smoke profile, end to end, in a scratch copy of the project.

This is what `make repro` does, shrunk: stage 01 data, stage 02 base, one expert per skill
(foreach), both joint budgets, the stage-03 aggregate. It also checks that DVC reruns only
what a changed parameter touches.
"""
from __future__ import annotations

import json
import re

import pandas as pd
import yaml

from conftest import dvc, readme_skill, smoke_params  # the `project` fixture (the smoke pipeline) lives in conftest


def test_readme_example_skill_went_through_every_stage(readme_project):
    """README's "Adding a skill", followed literally, is trained, merged and scored like any skill."""
    project = readme_project
    skill = readme_skill()[0].removesuffix(".py")
    assert skill in smoke_params(project)["skills"]["train"]
    assert (project / "datasets" / "skills" / skill).is_dir()
    assert (project / "models" / "experts" / skill / "adapter_model.safetensors").is_file()
    assert skill in json.loads((project / "metrics" / "experts.json").read_text())["expert_own"]
    assert skill in json.loads((project / "metrics" / "merge_route.json").read_text())["expert_own"]
    assert f"expert:{skill}" in (project / "plots" / "merge_route_leaderboard.csv").read_text()


def test_every_stage_wrote_its_outputs(project):
    p = smoke_params(project)
    for skill in p["skills"]["train"]:
        assert (project / "models" / "experts" / skill / "adapter_model.safetensors").is_file()
        saved = json.loads((project / "models" / "experts" / skill / "params.json").read_text())
        assert saved["experts"] == p["experts"] and saved["name"] == skill
    cap = p["experts"]["steps"]  # the joint budgets: one expert's step cap, and all experts' caps
    for budget, steps in (("same_steps", cap), ("total_steps", cap * len(p["skills"]["train"]))):
        info = json.loads((project / "models" / "joint" / budget / "train_info.json").read_text())
        assert info["steps"] == steps
    assert (project / "models" / "base" / "model.safetensors").is_file()
    assert (project / "models" / "general" / "adapter_model.safetensors").is_file()
    for nb in ("01_synthesize", "02_base", "03_experts", "04_merge_route", "08_report"):
        assert (project / "reports" / "notebooks" / f"{nb}.ipynb").is_file()
    assert not list(project.rglob("*.partial"))


def test_metrics_cover_base_experts_and_joint(project):
    p = smoke_params(project)
    base = json.loads((project / "metrics" / "base.json").read_text())
    experts = json.loads((project / "metrics" / "experts.json").read_text())
    assert set(base["accuracy"]) == set(p["skills"]["train"])
    assert set(experts["expert_own"]) == set(p["skills"]["train"])
    assert {"joint_same_steps", "joint_total_steps"} <= set(experts)
    for v in [*base["accuracy"].values(), *experts["expert_own"].values()]:
        assert 0.0 <= v <= 1.0
    shown = dvc(project, "metrics", "show")
    assert "metrics/experts.json" in shown and "metrics/base.json" in shown and "metrics/synthesize.json" in shown
    assert "metrics/merge_route.json" in shown


def test_merge_route_leaderboard_has_every_method(project):
    p = smoke_params(project)["merge_route"]
    m = json.loads((project / "metrics" / "merge_route.json").read_text())
    systems = set(m["systems"])
    skills = smoke_params(project)["skills"]["train"]
    expected = {"base", "joint_same_steps", "joint_total_steps", *(f"expert:{s}" for s in skills),
                *(f"merge:{x}" for x in p["merges"]), *(f"merge:{x}@global" for x in p["both_trim_scopes"]),
                *(f"peft:{x}" for x in p["peft_merges"]),
                "route:oracle", "route:router_top1", "route:arrow", "route:arrow_gks", "route:ensemble",
                *(f"lorahub→{t}" for t in p["lorahub"]["targets"])}
    assert expected <= systems, expected - systems
    assert any(s.startswith("route:router_soft_top") for s in systems)
    for name, row in m["systems"].items():
        assert 0.0 <= row["mean_acc"] <= 1.0, name
        assert row["mean_lo"] <= row["mean_acc"] <= row["mean_hi"], name
    # peft's cat stacks the factors: exactly the weighted sum of the ΔW; linear is not.
    assert m["peft_distance_to_exact"]["cat"] < 1e-4
    assert m["peft_distance_to_exact"]["linear"] > 1e-3
    assert set(m["chosen_lambda"]) == set(p["merges"]) | {f"{x}@global" for x in p["both_trim_scopes"]}
    board = (project / "plots" / "merge_route_leaderboard.csv").read_text().splitlines()
    assert len(board) == len(systems) + 1


def test_pipeline_is_clean_and_a_param_reruns_only_its_stages(project):
    assert "up to date" in dvc(project, "status")
    original = (project / "params.yaml").read_text()
    try:
        params = smoke_params(project)
        params["experts"]["lr"] = params["experts"]["lr"] * 2
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        changed = set(json.loads(dvc(project, "status", "--json")))
        assert {"adapters", "experts", "merge_route"} <= changed
        assert not changed & {"synthesize", "base"}
    finally:
        (project / "params.yaml").write_text(original)


def test_a_merge_parameter_reruns_only_stages_04_and_07_and_rescores_the_levels(project):
    original = (project / "params.yaml").read_text()
    try:
        params = smoke_params(project)
        params["merge_route"]["density"] = 0.5
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        levels = {"level_score"}  # rescored, not retrained
        assert set(json.loads(dvc(project, "status", "--json"))) == {"merge_route", *levels}
        # `dvc status` (and a dry run) stop at the first changed stage; a real run follows the
        # change downstream, to the report that reads stage 04's metrics, and no further.
        ran = set(re.findall(r"Running stage '([^']+)'", dvc(project, "repro")))
        assert ran == {"merge_route", "report", *levels}
    finally:
        (project / "params.yaml").write_text(original)
        dvc(project, "repro")  # back to the smoke run's outputs for the tests that follow


def test_a_noop_repro_runs_nothing(project):
    out = dvc(project, "repro")
    assert "Running stage" not in out and "is cached" not in out
    assert "Data and pipelines are up to date." in out


def test_replicate_seeds_are_trained_and_scored(project):
    """The adapters stage's replicate seeds: every expert and the joint LoRA retrained with seed 1 (other weights than seed
    0's), and stage 04 scored the references, merges and routers on both seeds."""
    from safetensors.torch import load_file

    p = smoke_params(project)
    skills, seeds = p["skills"]["train"], p["replicates"]["seeds"]
    for seed in seeds:
        root = project / "models" / "replicates" / str(seed)
        for skill in skills:
            info = json.loads((root / "experts" / skill / "train_info.json").read_text())
            assert info["seed"] == seed
        assert (root / "joint" / "total_steps" / "adapter_config.json").is_file()
        a = load_file(project / "models" / "experts" / skills[0] / "adapter_model.safetensors")
        b = load_file(root / "experts" / skills[0] / "adapter_model.safetensors")
        assert any(not (a[k] == b[k]).all() for k in a), "seed changes nothing"
    m = json.loads((project / "metrics" / "merge_route.json").read_text())
    assert set(m["expert_own_by_seed"]) == {str(p["experts"]["seed"]), *map(str, seeds)}
    board = pd.read_csv(project / "plots" / "merge_route_leaderboard.csv")
    scored = board[board.kind.isin(["merge", "router", "joint"]) & board.n_seeds.notna()]
    assert {f"merge:{x}" for x in p["merge_route"]["merges"]} | {"joint_total_steps"} <= set(scored.system)
    assert (scored.n_seeds <= 1 + len(seeds)).all()


def test_levels_are_trained_scored_and_reported(project):
    """The levels stage, level 0.0: its own base (from a corpus without alias lines), and on every seed the experts of
    levels.skills and their joint LoRA; the main study's level: the joint LoRAs alone; level_score scored every level
    on every seed; the report's table has a verdict per level."""
    p = smoke_params(project)
    seeds = [p["experts"]["seed"], *p["replicates"]["seeds"]]
    skills, main = p["levels"]["skills"], p["synthesize"]["corpus_skill_fraction"]
    found = json.loads((project / "metrics" / "levels.json").read_text())
    assert set(found) == {str(float(f)) for f in [*p["levels"]["fractions"], main]}
    for f in p["levels"]["fractions"]:
        root = project / "models" / "levels" / str(f)
        assert (root / "base" / "model.safetensors").is_file()
        for seed in seeds:
            assert (root / "seeds" / str(seed) / "joint" / "total_steps" / "adapter_config.json").is_file()
            for s in skills:
                assert json.loads((root / "seeds" / str(seed) / "experts" / s / "train_info.json").read_text())["seed"] == seed
    main_root = project / "models" / "levels" / "main"
    assert not (main_root / "base").exists() and not (main_root / "seeds" / "0" / "experts").exists()
    assert all((main_root / "seeds" / str(s) / "joint" / "total_steps" / "adapter_config.json").is_file() for s in seeds)
    for name, m in found.items():
        assert m["main"] == (float(name) == main) and m["skills"] == skills
        assert set(m["base"]["accuracy"]) == set(p["skills"]["train"])  # the base is checked on every training skill
        assert set(m["expert_own"]) == {str(s) for s in seeds} and all(set(v) == set(skills) for v in m["expert_own"].values())
        assert {"joint_total_steps", *(f"merge:{x}" for x in p["levels"]["merges"])} == set(m["systems"])
        assert all(set(v["norm_per_seed"]) == {str(s) for s in seeds} for v in m["systems"].values())
    levels = json.loads((project / "metrics" / "report.json").read_text())["levels"]
    assert set(levels) == {f"{f:g}" for f in [*p["levels"]["fractions"], main]}
    assert set(levels.values()) <= {"held", "did not hold", "inconclusive"}


def test_curricula_stage_ran_every_part(project):
    """Stage 07 on the smoke profile: every teacher, fraction and seed, Auto-CEI's four methods,
    Skill-it's two, and the report judged its four claims from those numbers."""
    p = smoke_params(project)["curricula"]
    m = json.loads((project / "metrics" / "curricula.json").read_text())
    for f in p["teachers"]["unlearnable_fractions"]:
        e = m["teachers"]["by_fraction"][str(f)]
        assert set(e["mastered"]) == set(p["teachers"]["names"])
        assert all(ci["n"] == len(p["seeds"]) and 0 <= ci["mean"] <= 1 for ci in e["mastered"].values())
    assert set(m["auto_cei"]["methods"]) == {"sft", "r_tuning", "ei", "auto_cei"}
    assert m["auto_cei"]["methods"]["sft"]["refusal_rate"]["mean"] == 0.0  # SFT never saw idk
    assert set(m["skill_it"]["steps_to_target"]) == {"uniform", "skill_it"}
    curve = pd.read_csv(project / "plots" / "curricula_mastered.csv")
    assert set(curve["teacher"]) == set(p["teachers"]["names"]) and curve["step"].max() == p["teachers"]["steps"]
    assert (project / "reports" / "notebooks" / "07_curricula.ipynb").is_file()
    verdicts = json.loads((project / "metrics" / "report.json").read_text())["claims"]
    assert {"alp_gmm", "auto_cei", "auto_cei_limit", "skill_it"} <= set(verdicts)
