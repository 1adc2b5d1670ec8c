"""Notebook 07's tables, from :func:`lib.curricula.study.summarize`'s metrics."""
from __future__ import annotations

import pandas as pd
from IPython.display import Markdown

from lib.curricula.space import AddSpace


def _ci(ci: dict, fmt: str = ".3f") -> str:
    if not ci or ci.get("mean") is None:
        return "–"
    if ci["lo"] == ci["hi"]:
        return f"{ci['mean']:{fmt}}"
    return f"{ci['mean']:{fmt}} [{ci['lo']:{fmt}}, {ci['hi']:{fmt}}]"


def design_table(C) -> pd.DataFrame:
    """What each part runs, with its budget."""
    T, R, S = C.teachers, C.auto_cei, C.skill_it
    rows = [{"part": "teachers", "runs": f"{len(T.names)} teachers × {len(T.unlearnable_fractions)} fractions × {len(C.seeds)} seeds",
             "budget per run": f"{T.steps} steps × {T.tasks_per_step * T.prompts_per_task} prompts",
             "space": f"add, 1-{T.max_digits} digits × carries: {len(AddSpace(T.max_digits).cells)} cells"},
            {"part": "Auto-CEI", "runs": f"4 methods × {len(C.seeds)} seeds",
             "budget per run": f"SFT {R.sft_steps} steps, then {R.ft_steps} per round (EI {R.rounds}, Auto-CEI ≤ {R.max_rounds})",
             "space": f"add with a scratchpad, 1-{R.max_digits} digits"},
            {"part": "Skill-it", "runs": f"2 methods × {len(C.seeds)} seeds (+ the graph)",
             "budget per run": f"{S.steps} steps, mixture updated every {S.round_steps}", "space": ", ".join(S.skills)}]
    return pd.DataFrame(rows)


def teachers_table(metrics: dict) -> pd.DataFrame:
    """Final mastered share per teacher (rows) and unlearnable fraction (columns), and the share
    of each teacher's tasks that fell in learnable cells."""
    by = metrics["teachers"]["by_fraction"]
    rows = []
    for t in next(iter(by.values()))["mastered"]:
        row = {"teacher": t}
        for f, e in by.items():
            row[f"mastered, unlearnable {e['unlearnable_area']:.2f}"] = _ci(e["mastered"][t])
            row[f"tasks in learnable cells, {e['unlearnable_area']:.2f}"] = round(e["learnable_share_of_tasks"][t], 3)
        rows.append(row)
    out = pd.DataFrame(rows).set_index("teacher")
    diff = {f"mastered, unlearnable {e['unlearnable_area']:.2f}": _ci(e.get("alp_gmm_minus_random", {})) for e in by.values()}
    out.loc["ALP-GMM − Random (paired)"] = pd.Series(diff)
    return out.fillna("")


def refusal_table(metrics: dict) -> pd.DataFrame:
    a = metrics["auto_cei"]
    rows = [{"method": m, **{k: _ci(v[k]) for k in ("accuracy", "precision", "refusal_rate")}} for m, v in a["methods"].items()]
    for b, d in a.get("precision_minus", {}).items():
        rows.append({"method": f"Auto-CEI − {b} (paired)", "precision": _ci(d)})
    rows.append({"method": "Auto-CEI refusal − SFT error rate", "refusal_rate": _ci(a.get("refusal_minus_sft_error", {}))})
    rows.append({"method": "Auto-CEI refusal beyond − within the SFT limit", "refusal_rate": _ci(a.get("refusal_beyond_minus_within", {}))})
    return pd.DataFrame(rows).set_index("method").fillna("")


def c1_table(results) -> pd.DataFrame:
    rows = []
    for r in results:
        if r["kind"] == "refusal":
            a = r["auto_cei"]
            rows.append({"seed": r["seed"], "c1 start": round(a["c1_start"], 3), "step": round(a["c1_step"], 3),
                         "c2": round(a["c2"], 3), "c1 chosen": round(a["c1_best"], 3),
                         "climb (c1: objective)": ", ".join(f"{c['c1']:.2f}: {c['objective']:.2f}" for c in a["climb"])})
    return pd.DataFrame(rows)


def graph_table(metrics: dict) -> pd.DataFrame:
    s = metrics["skill_it"]
    return pd.DataFrame(s["graph"], index=[f"train {k}" for k in s["skills"]], columns=s["skills"]).round(2)


def skill_it_table(metrics: dict) -> pd.DataFrame:
    s = metrics["skill_it"]
    rows = [{"method": m, "steps to target": _ci(ci, ".0f"), "per seed": s["steps_to_target_per_seed"][m],
             "seeds reaching it": s["reached"][m]} for m, ci in s["steps_to_target"].items()]
    rows.append({"method": "Skill-it − uniform (paired)", "steps to target": _ci(s["skill_it_minus_uniform"], ".0f")})
    return pd.DataFrame(rows).set_index("method").fillna("")


def findings(metrics: dict) -> Markdown:
    """The three comparisons in words (the verdicts are the report's)."""
    by = metrics["teachers"]["by_fraction"]
    lines = [f"- **Teachers**, unlearnable {e['unlearnable_area']:.2f} of the space: ALP-GMM − Random mastered share "
             f"{_ci(e.get('alp_gmm_minus_random', {}))}." for e in by.values()]
    a = metrics["auto_cei"]
    lines.append(f"- **Auto-CEI**: precision {_ci(a['methods']['auto_cei']['precision'])} at refusal rate "
                 f"{_ci(a['methods']['auto_cei']['refusal_rate'])}; minus SFT {_ci(a['precision_minus']['sft'])}, minus "
                 f"expert iteration {_ci(a['precision_minus']['ei'])}; refusal beyond − within the SFT model's limit "
                 f"{_ci(a['refusal_beyond_minus_within'])}.")
    s = metrics["skill_it"]
    lines.append(f"- **Skill-it**: steps to loss ≤ {s['target_loss']:g}: {_ci(s['steps_to_target']['skill_it'], '.0f')} against "
                 f"uniform {_ci(s['steps_to_target']['uniform'], '.0f')} (paired difference {_ci(s['skill_it_minus_uniform'], '.0f')}).")
    return Markdown("\n".join(lines))
