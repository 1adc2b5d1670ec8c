"""The benchmark package's own pure helpers (bench/): summaries, ratios, growth fits, verdicts,
log parsing, the report. No timing is asserted anywhere: the numbers here are synthetic."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bench import report
from bench.__main__ import main as bench_main
from bench.common import PeakRSS
from bench.stats import (growth, linear_fit, loglog_slope, ratios, replace_block, stage_spans, summarize, verdict,
                         verdict_text)


def test_summarize_min_median_max():
    s = summarize([3.0, 1.0, 2.0])
    assert (s["min"], s["median"], s["max"], s["n"]) == (1.0, 2.0, 3.0, 3)
    assert summarize([4, 1, 3, 2])["median"] == 2.5  # even count: mean of the middle two
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError, match="non-finite"):
        summarize([1.0, math.nan])


def test_ratios_pair_repeats():
    assert ratios([2.0, 9.0], [1.0, 3.0]) == [2.0, 3.0]
    with pytest.raises(ValueError):
        ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        ratios([1.0], [0.0])


def test_linear_fit_matches_numpy():
    xs = [2, 4, 8, 16]
    exact = linear_fit(xs, [2 + 3 * x for x in xs])
    assert exact["slope"] == pytest.approx(3) and exact["intercept"] == pytest.approx(2) and exact["r2"] == pytest.approx(1)
    ys = [1.0, 4.5, 7.0, 18.0]
    fit = linear_fit(xs, ys)
    slope, intercept = np.polyfit(xs, ys, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept)
    pred = intercept + slope * np.array(xs)
    r2 = 1 - ((np.array(ys) - pred) ** 2).sum() / ((np.array(ys) - np.mean(ys)) ** 2).sum()
    assert fit["r2"] == pytest.approx(r2)
    with pytest.raises(ValueError):
        linear_fit([1, 1], [1, 2])


def test_loglog_slope_recovers_the_exponent():
    xs = [2, 4, 8, 16]
    assert loglog_slope(xs, [5 * x ** 1.5 for x in xs]) == pytest.approx(1.5)
    assert loglog_slope(xs, [7.0] * 4) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        loglog_slope([0, 1], [1, 2])


def test_growth_verdicts_on_synthetic_costs():
    ns = [2, 4, 8, 16]
    fixed_plus_linear = growth(ns, [10 + 2 * n for n in ns])  # a fixed cost on top of linear growth
    assert fixed_plus_linear["verdict"] == "linear" and fixed_plus_linear["exponent"] < 1
    assert growth(ns, [3 * n for n in ns])["verdict"] == "linear"
    assert growth(ns, [3 * n for n in ns])["exponent"] == pytest.approx(1.0)
    quad = growth(ns, [n * n for n in ns])
    assert quad["verdict"] == "superlinear" and quad["exponent"] == pytest.approx(2.0)
    assert growth(ns, [1.0, 1.1, 1.05, 1.2])["verdict"] == "flat"
    noisy = growth(ns, [1.0, 6.0, 2.0, 7.0])
    assert noisy["r2"] < 0.95 and noisy["exponent"] <= 1.2 and noisy["verdict"] == "irregular"


def test_verdict_met_and_missed():
    v = verdict(0.80, 0.85)
    assert not v["met"] and v["missed_by"] == pytest.approx(0.05) and v["missed_by_rel"] == pytest.approx(0.05 / 0.85)
    assert "missed" in verdict_text(v) and "0.05" in verdict_text(v) and "6%" in verdict_text(v)
    assert verdict(12.0, 10.0)["met"] and verdict(12.0, 10.0)["missed_by"] == 0
    lower = verdict(1300, 1200, higher_is_better=False)
    assert not lower["met"] and lower["missed_by"] == 100
    assert verdict(9.0, 10.0, higher_is_better=False)["met"]
    assert "≤ 10 s: **met**" in verdict_text(verdict(9.0, 10.0, higher_is_better=False), "{:.0f}", " s")


def test_stage_spans_from_a_timestamped_dvc_log():
    lines = [
        (0.0, "Running stage 'synthesize':"),
        (0.1, "> python -m lib.cli.run_stage synthesize"),
        (9.0, "Updating lock file 'dvc.lock'"),
        (9.5, "Running stage 'expert@inc':"),
        (10.0, "Stage 'base' didn't change, skipping"),
        (30.0, "> echo Running stage 'x' (not at the start of the line: not a marker)"),
    ]
    spans = stage_spans(lines, end=40.0)
    assert [(s["stage"], s["wall_s"], s["ok"]) for s in spans] == [("synthesize", 9.5, True), ("expert@inc", 30.5, False)]
    assert stage_spans([(0.0, "Stage 'x' didn't change, skipping")], end=1.0) == []


def test_replace_block_keeps_the_rest():
    text = "a\n<!-- bench:start -->\nold\n<!-- bench:end -->\nb\n"
    assert replace_block(text, "new\ntable") == "a\n<!-- bench:start -->\nnew\ntable\n<!-- bench:end -->\nb\n"
    with pytest.raises(ValueError):
        replace_block("no markers", "x")


def test_peak_rss_sees_a_64_mib_block():
    with PeakRSS() as mem:
        block = np.ones(8 << 20)  # 64 MiB of float64, touched
        block[::4096] += 1
        del block
    assert mem.delta_mib >= 60, (mem.delta_mib, mem.method)
    with PeakRSS() as nothing:
        pass
    assert nothing.delta_mib < 16


def test_unknown_part_is_a_clear_error(capsys):
    assert bench_main(["trainig"]) == 2
    err = capsys.readouterr().err
    assert "unknown part(s) ['trainig']" in err and all(p in err for p in report.PARTS)


# --------------------------------------------------------------------------- the report


def _s(*values):
    return summarize(values)


def _results() -> dict:
    machine = {"cpu": "Test CPU", "usable_cpus": 2, "ram_gib": 8.0, "gpu": None, "python": "3.11", "torch": "2",
               "torch_threads": 2, "load_avg_1m": 0.5}
    meta = {"machine": machine, "started": "today", "wall_s": 1.0, "quick": False, "load_avg_end": 0.6}
    training = {
        "meta": meta, "base": "a base", "base_parameters": 1000, "data": "some data", "batch_size": 32, "lora_rank": 8,
        "target_modules": ["q_proj"], "steps": 10, "repeats": 3, "save_steps": 2,
        "tokens_per_s": {"ours": _s(80, 90, 85), "hand": _s(100, 100, 100), "ours_no_checkpoints": _s(95, 95, 95)},
        "train_loop_s": {"ours": _s(1, 1, 1), "hand": _s(1, 1, 1), "ours_no_checkpoints": _s(1, 1, 1)},
        "mfu": {"ours": _s(0.1, 0.1, 0.1), "hand": _s(0.12, 0.12, 0.12), "ours_no_checkpoints": _s(0.1, 0.1, 0.1)},
        "ratio_ours_over_hand": _s(0.8, 0.9, 0.85), "target": verdict(0.85, 0.85),
        "ratio_ours_without_checkpoints_over_hand": _s(0.95, 0.95, 0.95),
        "flops_per_token": 2e6, "matmul_peak": {"n": 512, "flops_per_s": 3e10}, "end_to_end_s_ours": _s(2, 2, 2),
    }
    ev = {
        "meta": meta, "n_prompts": 100, "sets": {"skills": 100}, "subsample_every": 1, "model": "m", "batch_size": 64,
        "max_new_tokens": 5, "repeats": 2, "seconds": {k: _s(1, 1) for k in ("harness", "one_at_a_time", "batched_no_cache")},
        "prompts_per_s": {k: _s(1, 1) for k in ("harness", "one_at_a_time", "batched_no_cache")},
        "speedup_over": {"one_at_a_time": _s(12, 14), "batched_no_cache": _s(3, 4)}, "target": verdict(13, 10),
        "mismatched_answers": {"one_at_a_time": 0, "batched_no_cache": 0}, "identical_answers": True,
        "harness_exact_match": 0.5,
    }
    rows = [{"scale": 1, "n": n, "space": sp, "method": m, "seconds": _s(0.001 * n), "peak_mib": _s(1.0 * n)}
            for n in (2, 4, 8, 16) for sp, m in (("ΔW", "ties"), ("ΔW", "apply"), ("peft", "cat"))]
    merge = {
        "meta": meta, "ns": [2, 4, 8, 16], "rank": 8, "target_modules": ["q_proj"], "repeats": 2, "memory_method": "x",
        "sizes": [{"scale": 1, "hidden_size": 128, "parameters": 100, "adapted_parameters": 50}], "rows": rows,
        "growth_in_n": {f"{sp}:{m}": {"time": growth([2, 4, 8, 16], [0.002, 0.004, 0.008, 0.016]),
                                      "memory": growth([2, 4, 8, 16], [2, 4, 8, 16])}
                        for sp, m in (("ΔW", "ties"), ("ΔW", "apply"), ("peft", "cat"))},
        "growth_in_model_size_at_n8": {}, "peft_distance_to_exact": [{"scale": 1, "n": 16, "type": "cat",
                                                                       "exact": "task_arithmetic", "distance": 1e-7}],
    }
    stage = {"stage": "synthesize", "wall_s": 9.0, "peak_rss_mib": 300.0, "peak_tree_mib": 400.0}
    pipeline = {
        "meta": meta, "profile": "default", "stages_declared": ["synthesize"], "stages_not_run": [], "total_s": 600.0,
        "stages": [stage], "max_process_rss_mib_wait4": 500.0, "memory_sampling_s": 0.1, "failed_stages": [],
        "target_total": verdict(600.0, 1200.0, higher_is_better=False), "noop_s": _s(3, 4, 5),
        "target_noop": verdict(5, 10, higher_is_better=False), "noop_ran": [],
        "rerun": {"param": "merge_route.density", "from": 0.3, "to": 0.5, "status_changed": ["merge_route"],
                  "ran": ["merge_route", "report"], "wall_s": 100.0, "expected": ["merge_route", "report"],
                  "only_expected": True, "all_expected_ran": True},
    }
    return {"training": training, "eval": ev, "merge": merge, "pipeline": pipeline}


def test_report_writes_the_table_and_figures(tmp_path):
    import json

    for part, r in _results().items():
        (tmp_path / f"{part}.json").write_text(json.dumps(r))
    made = report.write(tmp_path)
    assert made["parts"] == list(report.PARTS)
    text = (tmp_path / "summary.md").read_text()
    assert "Machine: Test CPU, 2 usable CPU cores" in text
    assert "**0.85 [0.80, 0.90]×**, target ≥ 0.85: **met**" in text
    assert "13.0 [12.0, 14.0]×" in text
    assert "| ΔW | ties | 2.0 / 2.0 | 4.0 / 4.0 | 8.0 / 8.0 | 16.0 / 16.0 | linear (N^1.00, R² 1.00) |" in text
    assert "| synthesize | 9.0 | 300 | 400 |" in text
    assert "ran merge_route, report" in text
    assert sorted(p.name for p in made["figures"]) == ["eval_speedup.png", "merge_scaling.png", "pipeline_stages.png"]
    assert all(p.stat().st_size > 1000 for p in made["figures"])
    block = report.readme_block(report.load(tmp_path))
    assert block.count("\n| ") == 7 and "| no-op `dvc repro` | 4.0 [3.0, 5.0] s | < 10 s | yes |" in block


def test_merge_growth_is_read_on_the_largest_model():
    """On the smallest model a merge's peak memory is a few MiB of allocator noise; the growth
    in N is fitted where the signal is (the largest model), and with model size at N = 8."""
    from bench.merge_cost import growth_tables

    def row(scale, n, mib, s):
        return {"scale": scale, "n": n, "space": "ΔW", "method": "ties", "seconds": {"min": s, "median": s},
                "peak_mib": {"median": mib}}

    noisy = {2: 5.0, 4: 8.4, 8: 14.0, 16: 9.0}  # scale 1: no clean trend
    rows = [row(1, n, noisy[n], 0.01 * n) for n in (2, 4, 8, 16)]
    rows += [row(4, n, 20.0 + 20.0 * n, 0.1 * n) for n in (2, 4, 8, 16)]  # a fixed cost plus 20 MiB per expert
    sizes = [{"scale": 1, "adapted_parameters": 1000}, {"scale": 4, "adapted_parameters": 16000}]
    by_n, by_size = growth_tables(rows, sizes)
    g = by_n["ΔW:ties"]
    assert g["model_scale"] == 4
    assert g["memory"]["verdict"] == "linear" and abs(g["memory"]["slope"] - 20.0) < 1e-9
    assert g["time"]["verdict"] == "linear"
    # N = 8: 0.08 s at 1,000 adapted weights, 0.8 s at 16,000: time ∝ size^0.83
    assert abs(by_size["ΔW:ties"]["exponent"] - math.log(10) / math.log(16)) < 1e-9
    assert growth_tables(rows[:4], sizes[:1])[1] == {}  # one model size: no growth with size


def test_a_merge_param_is_expected_to_rerun_stages_04_07_and_the_levels_scoring_only():
    from bench.pipeline import _target_stages

    assert _target_stages() == {"merge_route", "report", "level_score"}


def test_probe_classes_each_outcome():
    """bench.probe's verdicts: good only for a one-line, named, early stop; each way to fall short."""
    from bench.probe import classify

    assert classify(2, "error: params.yaml: experts.rank: bad value 0\n", ["experts.rank"], set(), set())[0] == "good"
    progress = "Executing:   5%|▍ | 1/22\n[IPKernelApp] WARNING | Kernel is running over TCP\n"
    assert classify(2, progress + "error: experts.rank\n", ["experts.rank"], set(), set())[0] == "good"
    assert classify(1, "Traceback (most recent call last):\n  ...\nValueError: experts.rank\n", ["experts.rank"], set(), set()) == (
        "partial", "traceback, 3 lines")
    assert classify(2, "error: experts.rank bad\n", ["experts.rank"], set(), {"datasets/x"}) == ("partial", "work done first")
    assert classify(2, "error: something else\n", ["experts.rank"], set(), set())[0] == "bad"
    assert classify(0, "", ["experts.rank"], set(), set()) == ("bad", "exit 0")
    assert classify(None, "", ["experts.rank"], set(), set())[0] == "bad"


def test_reference_merges_measures_how_far_a_merge_leaves_the_experts_span():
    """bench.reference_merges' span measure: 0 inside the experts' column space, 1 orthogonal to it."""
    import torch

    from bench.reference_merges import _outside_span

    e = torch.eye(4, dtype=torch.float64)
    experts = [torch.outer(e[0], e[1]), torch.outer(e[1], e[2])]       # columns span e0, e1
    assert _outside_span(torch.outer(e[0] + e[1], e[3]), experts) < 1e-12
    assert abs(_outside_span(torch.outer(e[2], e[0]), experts) - 1.0) < 1e-12
    assert abs(_outside_span(torch.outer(e[0] + e[2], e[0]), experts) - 2 ** -0.5) < 1e-12
