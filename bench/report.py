"""The benchmark table (``summary.md``), the figures, and the README block, from the part JSONs."""
from __future__ import annotations

import json
from pathlib import Path

from .stats import fmt_summary, verdict_text

PARTS = ("training", "eval", "merge", "pipeline")


def load(results: Path) -> dict:
    out = {}
    for part in PARTS:
        f = results / f"{part}.json"
        if f.exists():
            out[part] = json.loads(f.read_text())
    return out


def _machine_line(res: dict) -> str:
    seen = []
    for part, r in res.items():
        m = r.get("meta", {}).get("machine")
        if m:
            line = (f"{m['cpu']}, {m['usable_cpus']} usable CPU cores, {m['ram_gib']} GiB RAM"
                    f"{', GPU ' + m['gpu'] if m.get('gpu') else ', no GPU'}; Python {m['python']}, torch {m['torch']} "
                    f"({m['torch_threads']} threads)")
            if line not in seen:
                seen.append(line)
    return "; ".join(seen) or "unknown"


def _meta_line(r: dict) -> str:
    m = r.get("meta", {})
    mach = m.get("machine", {})
    quick = " (`--quick`)" if m.get("quick") else ""
    return (f"_{m.get('started', '?')}{quick}, {m.get('wall_s', 0):.0f} s; load average "
            f"{mach.get('load_avg_1m', '?')} → {m.get('load_avg_end', '?')} (1 min) on {mach.get('usable_cpus', '?')} cores_")


def training_md(r: dict) -> list[str]:
    t = r["tokens_per_s"]
    if "ours_no_checkpoints" not in t:  # a result from before the diagnostic variant existed
        return ["### 1. Training overhead", "", _meta_line(r), "",
                f"Ratio ours / hand loop: {fmt_summary(r['ratio_ours_over_hand'], '{:.2f}')}×, "
                f"{verdict_text(r['target'])} (older result; rerun `python -m bench training` for the full table).", ""]
    return [
        "### 1. Training overhead",
        "",
        _meta_line(r),
        "",
        f"{r['base']} ({r['base_parameters']:,} parameters), {r['data']}, batch {r['batch_size']}, LoRA rank "
        f"{r['lora_rank']} on {', '.join(r['target_modules'])}, {r['steps']} steps, {r['repeats']} repeats "
        "(median [min, max]):",
        "",
        "| path | tokens/s | train loop (s) | model FLOPs utilisation |",
        "|---|---|---|---|",
        f"| ours: `train_lora` (trl SFTTrainer + peft) | {fmt_summary(t['ours'], '{:,.0f}')} | "
        f"{fmt_summary(r['train_loop_s']['ours'], '{:.2f}')} | {fmt_summary(r['mfu']['ours'], '{:.2%}')} |",
        f"| hand-written PyTorch loop | {fmt_summary(t['hand'], '{:,.0f}')} | "
        f"{fmt_summary(r['train_loop_s']['hand'], '{:.2f}')} | {fmt_summary(r['mfu']['hand'], '{:.2%}')} |",
        f"| ours without its periodic checkpoints (diagnostic) | {fmt_summary(t['ours_no_checkpoints'], '{:,.0f}')} | "
        f"{fmt_summary(r['train_loop_s']['ours_no_checkpoints'], '{:.2f}')} | "
        f"{fmt_summary(r['mfu']['ours_no_checkpoints'], '{:.2%}')} |",
        "",
        f"Ratio ours / hand loop: **{fmt_summary(r['ratio_ours_over_hand'], '{:.2f}')}×**, "
        f"{verdict_text(r['target'])} (without the checkpoints, written every {r['save_steps']} steps as in stage 03: "
        f"{fmt_summary(r['ratio_ours_without_checkpoints_over_hand'], '{:.2f}')}×). A training step costs {r['flops_per_token'] / 1e6:.2f} MFLOP per token "
        f"(torch's FLOP counter); the measured fp32 matmul peak ({r['matmul_peak']['n']}² matmul) is "
        f"{r['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s. End to end (model load, tokenization, "
        f"checkpoints, saving) ours takes {fmt_summary(r['end_to_end_s_ours'], '{:.1f}')} s.",
        "",
    ]


def eval_md(r: dict) -> list[str]:
    s, pps = r["seconds"], r["prompts_per_s"]
    names = {"harness": "our harness (batched, KV cache)", "one_at_a_time": "`generate` one prompt at a time",
             "batched_no_cache": "batched, no KV cache"}
    lines = [
        "### 2. Evaluation speed",
        "",
        _meta_line(r),
        "",
        f"{r['n_prompts']:,} test prompts ({', '.join(f'{k} {v}' for k, v in r['sets'].items())}"
        f"{', every ' + str(r['subsample_every']) + 'th' if r['subsample_every'] > 1 else ''}), {r['model']}, "
        f"batch {r['batch_size']}, up to {r['max_new_tokens']} new tokens, {r['repeats']} repeats:",
        "",
        "| path | seconds | prompts/s | our harness is faster by |",
        "|---|---|---|---|",
    ]
    for k, label in names.items():
        sp = "–" if k == "harness" else f"{fmt_summary(r['speedup_over'][k], '{:.1f}')}×"
        lines.append(f"| {label} | {fmt_summary(s[k], '{:.2f}')} | {fmt_summary(pps[k], '{:,.0f}')} | {sp} |")
    mism = ", ".join(f"{k}: {v}" for k, v in r["mismatched_answers"].items())
    lines += ["", f"Speed-up over one at a time: {verdict_text(r['target'], '{:.1f}', '×')}. Answers "
              f"{'identical' if r['identical_answers'] else 'NOT identical'} across the paths (mismatches: {mism}); "
              f"the harness's exact match on these prompts is {r['harness_exact_match']:.3f}.", ""]
    return lines


def _growth_txt(g: dict | None) -> str:
    if not g:
        return "–"
    if "exponent" not in g:
        return g["verdict"]
    return f"{g['verdict']} (N^{g['exponent']:.2f}, R² {g['r2']:.2f})"


def _largest(r: dict) -> int:
    """The model scale the merge table, figure and growth in N use (see ``merge_cost.growth_tables``)."""
    return max(s["scale"] for s in r["sizes"])


def merge_md(r: dict) -> list[str]:
    scale = _largest(r)
    rows = [x for x in r["rows"] if x["scale"] == scale]
    size = next(s for s in r["sizes"] if s["scale"] == scale)
    methods = list(dict.fromkeys((x["space"], x["method"]) for x in rows))
    head = ("| space | method | " + " | ".join(f"N={n}: ms / MiB" for n in r["ns"])
            + " | growth in N: time | growth in N: memory |")
    lines = [
        "### 3. Merging cost and scaling",
        "",
        _meta_line(r),
        "",
        f"Synthetic rank-{r['rank']} experts on {len(r['target_modules'])} module types of the largest model "
        f"measured (hidden {size['hidden_size']}, {size['parameters']:,} parameters, {size['adapted_parameters']:,} in adapted weights); median time "
        f"over {r['repeats']} repeats (3 for a call over 2 s) and peak extra resident memory ({r['memory_method']}) "
        "over 2 calls (1 for a call over 2 s); growth in time is fitted on the fastest repeat. `extract`: exact "
        "ΔW of N experts; ΔW methods: `lib.merge.task_vectors.merge_task_vectors`; `apply`: adding a merge to a copy of the "
        "base; peft: `add_weighted_adapter` from the model holding the N adapters.",
        "",
        head,
        "|---|---|" + "---|" * len(r["ns"]) + "---|---|",
    ]
    for space, method in methods:
        cells = []
        for n in r["ns"]:
            x = next((x for x in rows if x["n"] == n and x["space"] == space and x["method"] == method), None)
            cells.append("–" if x is None else f"{1000 * x['seconds']['median']:.1f} / {x['peak_mib']['median']:.1f}")
        g = r["growth_in_n"].get(f"{space}:{method}", {})
        lines.append(f"| {space} | {method} | " + " | ".join(cells) + f" | {_growth_txt(g.get('time'))} | "
                     f"{_growth_txt(g.get('memory'))} |")
    verdicts = [v["time"]["verdict"] for k, v in r["growth_in_n"].items() if not k.endswith(":apply")]
    mem = [v["memory"]["verdict"] for k, v in r["growth_in_n"].items() if not k.endswith(":apply")]
    lines += ["", f"Growth with N over {len(verdicts)} merge steps (`apply` excluded: it adds one merged ΔW, "
              "whatever N): time " + ", ".join(f"{verdicts.count(v)} {v}" for v in sorted(set(verdicts)))
              + "; peak memory " + ", ".join(f"{mem.count(v)} {v}" for v in sorted(set(mem)))
              + ". (`linear`: a line fits, R² ≥ 0.95, exponent ≤ 1.2; `flat`: max/min < 1.5, a cost that does "
              "not depend on N at these sizes; `irregular`: neither, usually timer noise on millisecond calls.)"]
    if r.get("growth_in_model_size_at_n8"):
        sizes = ", ".join(f"{s['adapted_parameters']:,}" for s in r["sizes"])
        ks = {k: v["exponent"] for k, v in r["growth_in_model_size_at_n8"].items()}
        lines += [f"Against model size (adapted weights {sizes}; N = 8), time grows as size^k with k from "
                  f"{min(ks.values()):.2f} to {max(ks.values()):.2f} (median over methods "
                  f"{sorted(ks.values())[len(ks) // 2]:.2f})."]
    d = r.get("peft_distance_to_exact", [])
    if d:
        at = max(x["n"] for x in d)
        lines += [f"peft's merge against the exact ΔW merge of the same weights (relative Frobenius distance, N={at}): "
                  + ", ".join(f"`{x['type']}` {x['distance']:.3g} (vs {x['exact']})" for x in d
                              if x["n"] == at and x.get("scale", 1) == scale) + "."]
    return lines + [""]


def pipeline_md(r: dict) -> list[str]:
    lines = [
        "### 4–5. Pipeline wall time and memory",
        "",
        _meta_line(r),
        "",
        f"`dvc repro` of the {r['profile']} profile in a scratch copy ({len(r['stages_declared'])} stages"
        f"{'; not run: ' + ', '.join(r['stages_not_run']) if r['stages_not_run'] else ''}). Memory: largest "
        f"single process / whole process tree under dvc, sampled every {r['memory_sampling_s']} s.",
        "",
        "| stage | wall time (s) | peak RSS, largest process (MiB) | peak RSS, all processes (MiB) |",
        "|---|---|---|---|",
    ]
    for s in r["stages"]:
        rss = "–" if s["peak_rss_mib"] is None else f"{s['peak_rss_mib']:.0f}"
        tree = "–" if s["peak_tree_mib"] is None else f"{s['peak_tree_mib']:.0f}"
        lines.append(f"| {s['stage']} | {s['wall_s']:.1f} | {rss} | {tree} |")
    if r.get("failed_stages"):
        lines += ["", f"**`dvc repro` failed in stage(s) {', '.join(r['failed_stages'])}** (their rows time "
                  f"the failed attempt) after {r['total_s']:.0f} s in all; not run: "
                  f"{', '.join(r['stages_not_run']) or 'none'}. The no-op repro and the rerun after a merge "
                  "parameter are not measured on a failed pipeline.", ""]
        for name in r["failed_stages"]:
            shown = r.get("errors", {}).get(name) or (r.get("error_tail") or [])[-15:]
            lines += [f"Last lines of `{name}`:", "", "```", *shown, "```", ""]
        return lines
    total = f"**{r['total_s'] / 60:.1f} min** ({r['total_s']:.0f} s)"
    tv = r.get("target_total")
    lines += [f"| **whole `dvc repro`** | {r['total_s']:.0f} | {r['max_process_rss_mib_wait4']:.0f} (exact, wait4) | |", ""]
    rr = r["rerun"]
    lines += [
        f"Whole study: {total}" + (f", {verdict_text(tv, '{:.0f}', ' s')}" if tv else
                                    " (smoke profile; the ≤ 20 min target is for the default profile)") + ".",
        f"No-op `dvc repro`: {fmt_summary(r['noop_s'], '{:.1f}')} s over {r['noop_s']['n']} runs, "
        f"{verdict_text(r['target_noop'], '{:.0f}', ' s')} (max)"
        f"{'; stages run: ' + ', '.join(r['noop_ran']) if r['noop_ran'] else '; no stage ran'}.",
        f"After `{rr['param']}` {rr['from']} → {rr['to']}: `dvc status` lists {', '.join(rr['status_changed']) or 'nothing'}; "
        f"`dvc repro` ran {', '.join(rr['ran']) or 'nothing'} in {rr['wall_s']:.0f} s "
        f"(expected only {', '.join(rr['expected'])}: "
        f"{'yes' if rr['only_expected'] else 'NO'}{'' if rr['all_expected_ran'] else '; not every expected stage ran'}).",
        "",
    ]
    return lines


CAPTIONS = {
    "eval_speedup.png": "How many times faster our batched KV-cache harness answers the test prompts than "
                        "one-at-a-time `generate` and than batches without the KV cache (bars: median, whiskers: "
                        "min and max over repeats; dashed: the 10× target).",
    "merge_scaling.png": "Time and peak extra memory of each merge step against the number of experts merged, "
                         "log-log, with a line proportional to N through task arithmetic's N = 16 point for "
                         "reference (parallel to it means linear growth).",
    "pipeline_stages.png": "Wall time and peak resident memory (largest process, and the outline for all "
                           "processes) of every stage of one `dvc repro`.",
}


def summary_md(res: dict, figures: list[Path] = ()) -> str:
    lines = ["# Benchmarks", "", f"Machine: {_machine_line(res)}.", "",
             "Every figure is measured side by side in one run of `python -m bench` (`make bench`); "
             "median [min, max] over repeats. Regenerate with `make bench`; `--quick` is a short check "
             "on smaller inputs (its numbers are not the study's).", ""]
    for part, fn in (("training", training_md), ("eval", eval_md), ("merge", merge_md), ("pipeline", pipeline_md)):
        if part in res:
            lines += fn(res[part])
    if figures:
        lines += ["### Figures", "", "(PNG files next to this one; not committed, `make bench` redraws them.)", ""]
        for f in figures:
            lines += [f"![{f.stem}]({f.name})", "", CAPTIONS.get(f.name, f.stem), ""]
    return "\n".join(lines).rstrip() + "\n"


def readme_block(res: dict) -> str:
    """The compact table the README shows (one line per target)."""
    metas = [r.get("meta", {}) for r in res.values()]
    loads = [x for m in metas for x in (m.get("machine", {}).get("load_avg_1m"), m.get("load_avg_end")) if x is not None]
    busy = f"; 1-minute load average {min(loads):.1f}–{max(loads):.1f} during the run" if loads else ""
    when = min((m["started"] for m in metas if "started" in m), default="?")
    lines = [f"Measured on: {_machine_line(res)}{busy}; started {when}.", "",
             "| benchmark | measured (median [min, max]) | target | met |", "|---|---|---|---|"]
    if "training" in res:
        r = res["training"]
        lines.append(f"| training: `train_lora` tokens/s ÷ hand-written loop | {fmt_summary(r['ratio_ours_over_hand'], '{:.2f}')}× "
                     f"(MFU {r['mfu']['ours']['median']:.2%}) | ≥ 0.85× | {'yes' if r['target']['met'] else 'no'} |")
    if "eval" in res:
        r = res["eval"]
        lines.append(f"| evaluation: harness speed-up over one-at-a-time `generate` ({r['n_prompts']:,} prompts) | "
                     f"{fmt_summary(r['speedup_over']['one_at_a_time'], '{:.1f}')}× (no-cache batch: "
                     f"{r['speedup_over']['batched_no_cache']['median']:.1f}×), answers "
                     f"{'identical' if r['identical_answers'] else 'differ'} | ≥ 10× | {'yes' if r['target']['met'] else 'no'} |")
    if "merge" in res:
        r = res["merge"]
        v = [x["time"]["verdict"] for k, x in r["growth_in_n"].items() if not k.endswith(":apply")]
        m = [x["memory"]["verdict"] for k, x in r["growth_in_n"].items() if not k.endswith(":apply")]
        lines.append(f"| merging: growth in N = {', '.join(map(str, r['ns']))} over {len(v)} merge methods | time: "
                     + ", ".join(f"{v.count(x)} {x}" for x in sorted(set(v))) + "; peak memory: "
                     + ", ".join(f"{m.count(x)} {x}" for x in sorted(set(m))) + " | linear (or flat) | "
                     f"{'yes' if all(x in ('linear', 'flat') for x in v) else 'no'} |")
    if "pipeline" in res and res["pipeline"].get("failed_stages"):
        r = res["pipeline"]
        lines.append(f"| whole `dvc repro`, {r['profile']} profile | failed in {', '.join(r['failed_stages'])} "
                     f"({r['total_s'] / 60:.1f} min) | ≤ 20 min | no |")
    elif "pipeline" in res:
        r = res["pipeline"]
        tv = r.get("target_total")
        lines.append(f"| whole `dvc repro`, {r['profile']} profile | {r['total_s'] / 60:.1f} min | ≤ 20 min | "
                     f"{('yes' if tv['met'] else 'no') if tv else 'n/a (smoke)'} |")
        lines.append(f"| no-op `dvc repro` | {fmt_summary(r['noop_s'], '{:.1f}')} s | < 10 s | {'yes' if r['target_noop']['met'] else 'no'} |")
        rr = r["rerun"]
        lines.append(f"| rerun after `{rr['param']}` | ran {', '.join(rr['ran'])} ({rr['wall_s']:.0f} s) | only "
                     f"{', '.join(rr['expected'])} | {'yes' if rr['only_expected'] else 'no'} |")
    quick = any(r.get("meta", {}).get("quick") for r in res.values())
    if quick:
        lines += ["", "_From a `--quick` run (smaller inputs, smoke pipeline)._"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def figures(res: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    made = []
    if "eval" in res:
        r = res["eval"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = ["one_at_a_time", "batched_no_cache"]
        med = [r["speedup_over"][k]["median"] for k in names]
        err = [[m - r["speedup_over"][k]["min"] for k, m in zip(names, med)],
               [r["speedup_over"][k]["max"] - m for k, m in zip(names, med)]]
        ax.barh(["one prompt at a time", "batched, no KV cache"], med, xerr=err, color=sns.color_palette()[:2])
        ax.axvline(10, ls="--", c="k", lw=1, label="target 10× (vs one at a time)")
        ax.set_xlabel("our harness is faster by (×)")
        ax.set_title(f"Evaluation speed-up, {r['n_prompts']:,} prompts")
        ax.legend(loc="lower right", fontsize=8)
        made.append(_save(fig, out / "eval_speedup.png"))
    if "merge" in res:
        r = res["merge"]
        scale = _largest(r)
        rows = [x for x in r["rows"] if x["scale"] == scale and x["method"] != "apply"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        series = list(dict.fromkeys((x["space"], x["method"]) for x in rows))
        colors = dict(zip(series, sns.color_palette("tab20", len(series))))
        for ax, key, label in ((axes[0], "seconds", "time (s)"), (axes[1], "peak_mib", "peak extra memory (MiB)")):
            for (space, method) in series:
                pts = sorted((x["n"], x[key]["median"]) for x in rows if x["space"] == space and x["method"] == method)
                ys = [max(y, 1e-3 if key == "peak_mib" else 1e-6) for _, y in pts]
                ax.plot([n for n, _ in pts], ys, marker="o", ls="-" if space == "ΔW" else ":",
                        color=colors[(space, method)], label=f"{space} {method}")
            ns = r["ns"]
            ref = [x[key]["median"] for x in rows if x["space"] == "ΔW" and x["method"] == "task_arithmetic"]
            y0 = max(max(ref) if ref else 1e-3, 1e-3) / ns[-1]
            ax.plot(ns, [y0 * n for n in ns], c="k", lw=2, alpha=0.4, label="∝ N (linear)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("experts merged (N)")
            ax.set_ylabel(label)
        axes[1].legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.02, 1))
        fig.suptitle(f"Merge cost against N (hidden {next(s['hidden_size'] for s in r['sizes'] if s['scale'] == scale)}, log-log)")
        made.append(_save(fig, out / "merge_scaling.png"))
    if "pipeline" in res:
        r = res["pipeline"]
        st = r["stages"]
        fig, axes = plt.subplots(1, 2, figsize=(11, max(3, 0.28 * len(st) + 1)), sharey=True)
        names = [s["stage"] for s in st]
        failed = set(r.get("failed_stages") or [])
        axes[0].barh(names, [s["wall_s"] for s in st],
                     color=["tab:red" if s["stage"] in failed else sns.color_palette()[0] for s in st])
        axes[0].set_xlabel("wall time (s)" + (" (red: failed)" if failed else ""))
        axes[0].invert_yaxis()
        axes[1].barh(names, [s["peak_rss_mib"] or 0 for s in st], color=sns.color_palette()[1], label="largest process")
        axes[1].barh(names, [s["peak_tree_mib"] or 0 for s in st], color="none", edgecolor="k", label="all processes")
        axes[1].set_xlabel("peak resident memory (MiB)")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"dvc repro, {r['profile']} profile: {r['total_s'] / 60:.1f} min in all"
                     + (f" (FAILED: {', '.join(r['failed_stages'])})" if r.get("failed_stages") else ""))
        made.append(_save(fig, out / "pipeline_stages.png"))
    return made


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write(results: Path) -> dict:
    res = load(results)
    figs = figures(res, results)
    (results / "summary.md").write_text(summary_md(res, figs))
    return {"summary": results / "summary.md", "figures": figs, "parts": list(res)}
