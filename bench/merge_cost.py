"""Part 3, merging cost and scaling: time and peak memory to merge N = 2, 4, 8, 16 experts.

The default profile has 8 experts, so the experts here are synthetic: N random LoRA
adapters (peft, ``init_lora_weights=False``) of the default rank, alpha and target modules
on a scratch Llama of the default size (and, without ``--quick``, on 2× and 4× wider
ones, for the growth with model size). A merge's cost depends on the shapes, not on the
values, so this measures what merging trained experts costs.

Per model size, N and method, side by side in one process:

* ``extract``: the exact task vectors ``ΔW_i = s_i B_i A_i`` of N experts (``lib.merge.task_vectors.task_vectors``);
* every ΔW merge method of ``lib.merge.task_vectors`` (``merge_task_vectors``: weight-update space);
* ``apply``: adding the merged ΔW to a copy of the base (``apply_merged``; the same for every method);
* peft's ``add_weighted_adapter`` (``lib.merge.adapter_space.peft_merge``) for the combination
  types of ``merge_route.peft_merges``, from the model holding the N adapters (adapter space),
  with the relative Frobenius distance of its ΔW to the exact merge of the same weights.

Time: median [min, max] over repeats; a call under 20 ms is repeated within a repeat and
averaged. Peak memory, measured in a second pass after all timing: the process's peak
resident memory during one call above what it held before (Linux: the kernel's
high-water mark, reset before each call), with glibc told to give every block of 64 KiB
or more its own mmap, so that tensors freed earlier cannot hide in reused heap pages.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

from . import common
from .common import PeakRSS
from .stats import growth, summarize
from lib.merge.methods import MERGE_METHODS

NS = (2, 4, 8, 16)


def growth_tables(rows_list: list[dict], sizes: list[dict]) -> tuple[dict, dict]:
    """How time and memory grow with N (on the largest model measured: on the smallest, peak
    memory is a few MiB and the allocator's noise is as large as the signal), and how time
    grows with the model's adapted parameters at N = 8. Time: the fastest repeat (noise from
    other processes only ever adds time); memory: the median."""
    largest = max(s["scale"] for s in sizes)
    growth_n = {}
    for space, method in dict.fromkeys((r["space"], r["method"]) for r in rows_list):
        pts = sorted((r["n"], r["seconds"]["min"], r["peak_mib"]["median"]) for r in rows_list
                     if r["scale"] == largest and r["space"] == space and r["method"] == method)
        ns = [x[0] for x in pts]
        mem = [x[2] for x in pts]
        growth_n[f"{space}:{method}"] = {
            "time": growth(ns, [max(x[1], 1e-9) for x in pts]),
            "memory": growth(ns, [max(x, 1e-3) for x in mem]) if max(mem) >= 0.5 else {"verdict": "below 0.5 MiB"},
            "model_scale": largest,
        }
    growth_size = {}
    if len(sizes) > 1:
        for space, method in dict.fromkeys((r["space"], r["method"]) for r in rows_list):
            pts = sorted((next(s["adapted_parameters"] for s in sizes if s["scale"] == r["scale"]), r["seconds"]["min"])
                         for r in rows_list if r["n"] == 8 and r["space"] == space and r["method"] == method)
            growth_size[f"{space}:{method}"] = growth([x[0] for x in pts], [max(x[1], 1e-9) for x in pts])
    return growth_n, growth_size


def _model(hidden: int, inter: int, layers: int, heads: int, seed: int = 0):
    from lib.core.config import ModelParams, make as make_params
    from lib.core.tokenization import build_char_tokenizer
    from lib.core.training import build_scratch_model

    tok = build_char_tokenizer()
    m = make_params(ModelParams, hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads, seed=seed)
    return build_scratch_model(tok, m).eval()


def _with_experts(base, e, n: int):
    """A peft model on a copy of ``base`` holding ``n`` random LoRA experts e0..e{n-1}."""
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=e.rank, lora_alpha=e.alpha, target_modules=list(e.target_modules), lora_dropout=0.0,
                     task_type="CAUSAL_LM", init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), cfg, adapter_name="e0")
    for i in range(1, n):
        torch.manual_seed(i)
        model.add_adapter(f"e{i}", cfg)
    with torch.no_grad():  # small updates, like trained experts (random B at peft's init scale is large)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.mul_(0.01)
    return model.eval()


def time_call(fn, cleanup=None, repeats: int = 5, min_s: float = 0.02, max_inner: int = 20,
              slow_s: float = 2.0, slow_repeats: int = 3) -> list[float]:
    """Seconds per call of ``fn``, one value per repeat. A call shorter than ``min_s`` is
    repeated within each repeat (at most ``max_inner`` times) and averaged, so millisecond
    merges are not timer noise; one longer than ``slow_s`` (the SVD-based merges of 16 experts
    on the 4× model take 10–20 s) gets ``slow_repeats`` repeats, its first call included.
    ``cleanup(result)`` runs outside the timed region."""
    def once() -> float:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        if cleanup:
            cleanup(out)
        return dt

    first = once()
    if first > slow_s:  # a call of seconds is not timer noise: fewer repeats (the first counts as one)
        return [first] + [once() for _ in range(min(repeats, slow_repeats) - 1)]
    inner = max(1, min(max_inner, math.ceil(min_s / max(first, 1e-6))))
    return [sum(once() for _ in range(inner)) / inner for _ in range(repeats)]


def peak_call(fn, cleanup=None) -> float:
    """Peak resident memory (MiB) one call of ``fn`` needs above what the process held before."""
    with PeakRSS() as mem:
        out = fn()
    if cleanup:
        cleanup(out)
    del out
    return mem.delta_mib


def _adapted_params(model, targets) -> int:
    import torch

    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets)


def _cases(base, holder, n: int, mr, methods, peft_types):
    """(space, method, fn, cleanup) for every measurement at one model size and N."""
    from lib.merge import task_vectors as merging
    from lib.merge.adapter_space import peft_merge

    names = [f"e{i}" for i in range(n)]
    tvs = merging.task_vectors(holder, names)
    out = [("ΔW", "extract", lambda: merging.task_vectors(holder, names), None)]
    for method in methods:
        weights = None if method == "linear" else [1.0 / n] * n
        out.append(("ΔW", method, lambda method=method, weights=weights: merging.merge_task_vectors(
            tvs, method, weights=weights, seed=mr.seed, **merging.method_kwargs(method, mr)), None))
    merged = merging.merge_task_vectors(tvs, "task_arithmetic", weights=[1.0 / n] * n)
    out.append(("ΔW", "apply", lambda: merging.apply_merged(base, merged), None))
    for ctype in peft_types:
        kw = {}
        if ctype.split("_svd")[0] in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
            kw["density"] = mr.density
        if ctype.endswith("svd"):
            kw["svd_rank"] = mr.svd_rank
        out.append(("peft", ctype, lambda ctype=ctype, kw=kw: peft_merge(
            holder, names, ctype, weights=[1.0 / n] * n, new_name=f"m_{ctype}_{time.monotonic_ns()}", seed=mr.seed, **kw),
            holder.delete_adapter))
    return tvs, out


def run(quick: bool = False, root: Path = common.REPO) -> dict:
    from tqdm.auto import tqdm

    from lib.core import config
    from lib.merge import task_vectors as merging
    from lib.merge.adapter_space import distance_to_exact, peft_merge

    p = common.params(root)
    m, e = p["model"], p["experts"]
    raw = config.read_params(root / "params.yaml")
    mr = config.validate_section("merge_route", raw["merge_route"])
    repeats = 3 if quick else 5
    scales = (1,) if quick else (1, 2, 4)
    methods = list(MERGE_METHODS.names())
    peft_types = list(mr.peft_merges)
    sizes, models = [], {}
    for scale in scales:
        base = _model(m.hidden_size * scale, m.intermediate_size * scale, m.num_layers, m.num_heads)
        sizes.append({"scale": scale, "hidden_size": m.hidden_size * scale,
                      "parameters": sum(x.numel() for x in base.parameters()),
                      "adapted_parameters": _adapted_params(base, e.target_modules)})
        models[scale] = (base, _with_experts(base, e, max(NS)))
    rows: dict[tuple, dict] = {}
    distances = []
    # Pass 1: time (the allocator as it is by default).
    for scale in scales:
        base, holder = models[scale]
        for n in tqdm(NS, desc=f"merge time, hidden {m.hidden_size * scale}"):
            tvs, cases = _cases(base, holder, n, mr, methods, peft_types)
            for space, method, fn, cleanup in cases:
                rows[(scale, n, space, method)] = {"scale": scale, "n": n, "space": space, "method": method,
                                                   "seconds": summarize(time_call(fn, cleanup, repeats))}
            for ctype, ref in (("linear", "task_arithmetic"), ("cat", "task_arithmetic"), ("svd", "task_arithmetic"),
                               ("ties", "ties")):
                if ctype not in peft_types:
                    continue
                exact = merging.merge_task_vectors(tvs, ref, weights=[1.0 / n] * n, **merging.method_kwargs(ref, mr))
                kw = {"density": mr.density} if ctype == "ties" else {"svd_rank": mr.svd_rank} if ctype == "svd" else {}
                name = peft_merge(holder, [f"e{i}" for i in range(n)], ctype, weights=[1.0 / n] * n, new_name=f"d_{ctype}", **kw)
                distances.append({"scale": scale, "n": n, "type": ctype, "exact": ref,
                                  "distance": distance_to_exact(holder, name, exact)})
                holder.delete_adapter(name)
            del tvs, cases
    # Pass 2: peak memory, with every block of 64 KiB or more in its own mmap so the RSS sees it.
    exact_rss = common.exact_rss_mode()
    for scale in scales:
        base, holder = models[scale]
        for n in tqdm(NS, desc=f"merge memory, hidden {m.hidden_size * scale}"):
            tvs, cases = _cases(base, holder, n, mr, methods, peft_types)
            for space, method, fn, cleanup in cases:
                slow = rows[(scale, n, space, method)]["seconds"]["min"] > 2.0  # one pass is enough for a call of seconds
                rows[(scale, n, space, method)]["peak_mib"] = summarize([peak_call(fn, cleanup) for _ in range(1 if slow else 2)])
            del tvs, cases
    rows_list = list(rows.values())
    growth_n, growth_size = growth_tables(rows_list, sizes)
    return {
        "what": "time and peak memory to merge N LoRA experts, exact ΔW merges vs peft add_weighted_adapter",
        "ns": list(NS), "sizes": sizes, "repeats": repeats, "rank": e.rank, "target_modules": list(e.target_modules),
        "density": mr.density, "svd_rank": mr.svd_rank, "rows": rows_list, "growth_in_n": growth_n,
        "growth_in_model_size_at_n8": growth_size, "peft_distance_to_exact": distances,
        "memory_method": ("VmHWM reset, 64 KiB mmap threshold" if exact_rss else "VmHWM reset")
        if common._reset_peak() else "1 ms RSS polling",
    }
