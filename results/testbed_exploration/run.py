"""One mergeability config end to end: data -> base -> 8 experts -> TA/TIES merges -> results.csv row.

    PYTHONPATH=. python results/testbed_exploration/run.py '{"frac": 0.7, "sep": " =", "echo": 0.8, "echo_answer": "name", ...}'

Not part of the repo's lib: the exploration driver of issue 15 that produced results.csv and
logs/ here (one config per row; the experts' corpus replay is done here by concatenating
corpus rows, not yet an experts param). Appends to results.csv beside it; caches in cache/ (ignored).
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

import pandas as pd  # noqa: E402
from datasets import Dataset, DatasetDict, concatenate_datasets  # noqa: E402

from lib import skills as skill_lib  # noqa: E402
from lib.core import data as core_data, training  # noqa: E402
from lib.core.config import ExpertsParams, ModelParams, SkillsParams, SynthesizeParams, make  # noqa: E402
from lib.core.evaluation import evaluate  # noqa: E402
from lib.core.modeling import load_on_device  # noqa: E402
from lib.experts.adapters import load_with_adapters  # noqa: E402
from lib.experts.base import prepare_base  # noqa: E402
from lib.merge.task_vectors import apply_merged, merge_task_vectors, task_vectors  # noqa: E402
from lib.synth import datasets as synth  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RESULTS = HERE / "results.csv"

DEFAULTS = dict(
    # base / corpus
    frac=0.5, sep=" ->", form="reversed", alias_skills=None, echo=0.0, echo_answer="input", corpus_size=20000, pretrain_steps=800,
    hidden=128, inter=256, layers=2, heads=4, base_lr=0.003, base_bs=64,
    # experts
    rank=8, alpha=16, lr=3e-3, steps=800, stop_loss=0.01, targets="all", replay=0.0, bs=32, n_train=2000, eseed=0,
    # eval
    n_test=100, n_val=50, ta_grid=[0.125, 0.25, 0.4, 0.6, 0.8, 1.0], ties_grid=[0.5, 1.0, 1.5, 2.0, 3.0],
    density=0.3, note="",
)
TARGETS = {
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "qv": ["q_proj", "v_proj"],
}


def key(cfg: dict, names: list[str]) -> str:
    # knobs added later hash only when set, so earlier caches stay valid
    later = {"echo": 0.0, "echo_answer": "input", "eseed": 0}
    d = {k: cfg[k] for k in names if not (k in later and cfg[k] == later[k])}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def wellformed(pred: str, answer: str) -> bool:
    pred = pred.strip()
    if not pred:
        return False
    if answer in ("even", "odd"):
        return pred in ("even", "odd")
    if answer.isdigit():
        return pred.isdigit()
    return bool(re.fullmatch(r"[A-Za-z]+", pred))


def per_skill(res) -> dict[str, float]:
    return res.examples.groupby("skill")["correct"].mean().to_dict()


def main(cfg: dict) -> dict:
    t0 = time.perf_counter()
    cfg = {**DEFAULTS, **cfg}
    skills = make(SkillsParams)
    syn = make(SynthesizeParams, n_train=cfg["n_train"], n_val=cfg["n_val"], n_test=cfg["n_test"],
               corpus_size=cfg["corpus_size"], corpus_skill_fraction=cfg["frac"], alias_separator=cfg["sep"],
               alias_form=cfg["form"], echo_fraction=cfg["echo"], echo_answer=cfg["echo_answer"])
    names = skills.train

    # ---- data (skill splits do not depend on the corpus knobs)
    splits = {s: synth.skill_splits(s, skills, syn) for s in names}
    corpus = synth.corpus(skills, syn, cfg["alias_skills"])
    test = concatenate_datasets([splits[s]["test"] for s in names])
    val = concatenate_datasets([splits[s]["validation"] for s in names])
    # alias prompts of the test inputs: does the base know the skill in its other form?
    alias_rows = {"prompt": [], "answer": [], "skill": []}
    for s in names:
        sk = skill_lib.get_skill(s)
        for p in splits[s]["test"]["prompt"][:50]:
            x = sk.parse(p)
            alias_rows["prompt"].append(f"{synth.alias(s, cfg['form'])} {x}{cfg['sep']}")
            alias_rows["answer"].append(sk.apply(x))
            alias_rows["skill"].append(s)
    alias_ds = Dataset.from_dict(alias_rows)

    # ---- base (cached by its knobs)
    bkey = key(cfg, ["frac", "sep", "form", "alias_skills", "echo", "echo_answer", "corpus_size", "pretrain_steps", "hidden", "inter",
                     "layers", "heads", "base_lr", "base_bs"])
    base_dir = CACHE / f"base_{bkey}"
    tb = time.perf_counter()
    if not (base_dir / "config.json").exists():
        cdir = CACHE / f"corpus_{bkey}"
        core_data.save(corpus, cdir)
        m = make(ModelParams, hidden_size=cfg["hidden"], intermediate_size=cfg["inter"], num_layers=cfg["layers"],
                 num_heads=cfg["heads"], pretrain_steps=cfg["pretrain_steps"], lr=cfg["base_lr"],
                 batch_size=cfg["base_bs"])
        info, _ = prepare_base(m, cdir, base_dir, progress=False)
        print("base", info, flush=True)
    base_s = time.perf_counter() - tb
    base, tok = load_on_device(base_dir)
    base.eval()
    rb = evaluate(base, tok, test, progress=False, batch_size=256)
    base_acc = per_skill(rb)
    wf = rb.examples.assign(wf=[wellformed(p, a) for p, a in zip(rb.examples.prediction, rb.examples.answer)])
    base_wf = wf.groupby("skill")["wf"].mean().to_dict()
    # the designed default for an unknown command: echo the input, or the command word
    # (a prefix of it when the generation budget, set by the answer's length, cuts it)
    def is_echo(prompt: str, pred: str) -> bool:
        pred = pred.strip()
        name, x = prompt.split(" ")[:2]
        return bool(pred) and (pred == x or name.startswith(pred))
    base_echo = sum(is_echo(p, q) for p, q in zip(rb.examples.prompt, rb.examples.prediction)) / len(rb.examples)
    ra = evaluate(base, tok, alias_ds, progress=False, batch_size=256)
    alias_acc = per_skill(ra)
    print("base study acc", {k: round(v, 3) for k, v in base_acc.items()})
    print("base wellformed", {k: round(v, 2) for k, v in base_wf.items()})
    print("base alias acc", {k: round(v, 3) for k, v in alias_acc.items()})
    print(rb.examples.groupby("skill").head(2)[["prompt", "answer", "prediction"]].to_string(), flush=True)

    # ---- experts
    ekey = key(cfg, ["rank", "alpha", "lr", "steps", "stop_loss", "targets", "replay", "bs", "n_train", "eseed"]) + "_" + bkey
    e = make(ExpertsParams, rank=cfg["rank"], alpha=cfg["alpha"], lr=cfg["lr"], steps=cfg["steps"],
             stop_loss=cfg["stop_loss"], target_modules=TARGETS[cfg["targets"]], batch_size=cfg["bs"], seed=cfg["eseed"])
    replay_pool = Dataset.from_dict(synth.corpus_rows(corpus["train"]["text"]))
    dirs, steps_run = {}, {}
    te = time.perf_counter()
    for i, s in enumerate(names):
        out = CACHE / f"exp_{ekey}" / s
        dirs[s] = out
        if (out / "adapter_config.json").exists():
            steps_run[s] = json.loads((out / "train_info.json").read_text())["steps_run"]
            continue
        train = splits[s]["train"].select_columns(["prompt", "answer"])
        if cfg["replay"] > 0:
            n_rep = int(round(len(train) * cfg["replay"] / (1 - cfg["replay"])))
            rep = replay_pool.shuffle(seed=100 + i + 1000 * cfg["eseed"]).select(range(min(n_rep, len(replay_pool))))
            train = concatenate_datasets([train, rep]).shuffle(seed=i + 1000 * cfg["eseed"])
        info = training.train_lora(base_dir, train, e, e.steps, e.seed, out, progress=False)
        steps_run[s] = info["steps_run"]
    experts_s = time.perf_counter() - te
    print("steps", steps_run, flush=True)

    model, _ = load_with_adapters(base_dir, dirs)
    rexp = evaluate(model, tok, test, adapter_names=list(test["skill"]), progress=False, batch_size=256)
    own = per_skill(rexp)
    # locality: each expert on the alias prompts (mean over all skills' alias prompts)
    loc = {}
    for s in names:
        r = evaluate(model, tok, alias_ds, adapter_names=[s] * len(alias_ds), progress=False, batch_size=256)
        loc[s] = r.accuracy
    print("expert own", {k: round(v, 3) for k, v in own.items()})
    print("expert alias-acc (locality)", {k: round(v, 3) for k, v in loc.items()}, flush=True)

    # ---- merges
    tm = time.perf_counter()
    tvs = task_vectors(base, dirs)
    del model

    def norm(acc: dict) -> float:
        return sum(acc[s] / own[s] for s in names) / len(names)

    out = {}
    for method, grid, kw in (("ta", cfg["ta_grid"], {}), ("ties", cfg["ties_grid"], {"density": cfg["density"]})):
        merged = merge_task_vectors(tvs, "task_arithmetic" if method == "ta" else "ties", **kw)
        curve = []
        for lam in grid:
            mm = apply_merged(base, merged, lam).eval()
            acc = per_skill(evaluate(mm, tok, val, progress=False, batch_size=256))
            curve.append((lam, sum(acc.values()) / len(acc)))
        lam = max(curve, key=lambda c: c[1])[0]
        mm = apply_merged(base, merged, lam).eval()
        acc = per_skill(evaluate(mm, tok, test, progress=False, batch_size=256))
        out[method] = (norm(acc), lam, acc)
        if method == "ta":
            ex = evaluate(mm, tok, test, progress=False, batch_size=256).examples
            print(ex.groupby("skill").head(3)[["prompt", "answer", "prediction"]].to_string(), flush=True)
        print(method, "val curve", [(l, round(a, 3)) for l, a in curve], "chosen", lam, "test norm", round(norm(acc), 3),
              {k: round(v, 2) for k, v in acc.items()}, flush=True)
    merge_s = time.perf_counter() - tm

    row = {k: (json.dumps(v) if isinstance(v, (list, dict)) or v is None else v) for k, v in cfg.items()
           if k not in ("ta_grid", "ties_grid")}
    row.update(
        params=training.count_parameters(base),
        base_max=max(base_acc.values()), base_argmax=max(base_acc, key=base_acc.get), base_wf_min=min(base_wf.values()), base_echo=base_echo,
        base_alias_mean=sum(alias_acc.values()) / len(alias_acc), base_alias_min=min(alias_acc.values()),
        exp_own_min=min(own.values()), exp_own_median=float(pd.Series(own).median()),
        exp_alias_mean=sum(loc.values()) / len(loc), steps_mean=sum(steps_run.values()) / len(steps_run),
        ta_norm=out["ta"][0], ta_lam=out["ta"][1], ties_norm=out["ties"][0], ties_lam=out["ties"][1],
        ta_per_skill=json.dumps({k: round(v, 2) for k, v in out["ta"][2].items()}),
        base_s=round(base_s), experts_s=round(experts_s), merge_s=round(merge_s), wall_s=round(time.perf_counter() - t0),
    )
    df = pd.DataFrame([row])
    if RESULTS.exists():  # columns added over time: rewrite the whole table
        df = pd.concat([pd.read_csv(RESULTS), df], ignore_index=True)
    df.to_csv(RESULTS, index=False)
    print(json.dumps({k: row[k] for k in ("base_max", "base_argmax", "base_alias_mean", "exp_own_min", "exp_alias_mean",
                                          "ta_norm", "ta_lam", "ties_norm", "ties_lam", "wall_s")}))
    return row


if __name__ == "__main__":
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
