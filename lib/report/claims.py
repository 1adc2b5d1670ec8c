"""The published claims the workbook tests, each with a verdict computed from this run's metrics.

One rule decides every verdict, so a reader can check it by eye:

* a claim is a comparison "A > B" (or "A < B") between two measured quantities, or between
  a measured quantity and the paper's threshold;
* each measured quantity carries a 95% interval [lo, hi] (a fixed threshold is its own
  interval);
* **held** when the two intervals do not overlap and the order is the claimed one;
  **did not hold** when they do not overlap and the order is the opposite one;
  **inconclusive** when they overlap, or when an input is null (the stage ran, but the data
  left it undefined);
  **not measured** when an input the claim needs is missing from this run (a stage or a
  method the profile left out; the row says which). That is no verdict about data, and is
  counted apart, so a profile that runs fewer methods does not pass for an inconclusive one.

Non-overlapping 95% intervals is a conservative test of a difference: it can call a real
effect inconclusive, but it does not call noise a result.

Every claim reads only the metrics JSON the stages wrote, keyed by the file's stem
(``metrics["merge_route"]`` is ``metrics/merge_route.json``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURED = "held", "did not hold", "inconclusive", "not measured"
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE, NOT_MEASURED)


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float

    @classmethod
    def point(cls, x: float) -> "Interval":
        return cls(x, x, x)

    @classmethod
    def of(cls, ci: dict) -> "Interval":
        """From the stages' CI dicts: {"mean", "lo", "hi"}; a null (not computable) value is missing."""
        if any(ci.get(k) is None for k in ("mean", "lo", "hi")):
            raise NullMetric(f"a value of {ci} (null: the stage could not compute it)")
        return cls(float(ci["mean"]), float(ci["lo"]), float(ci["hi"]))

    def __str__(self) -> str:
        if self.lo == self.hi == self.mean:
            return f"{self.mean:.3g}"
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def paired(ci: dict) -> Interval:
    """A difference paired over seeds (the stages' dicts carry ``n``, the seeds it is defined on).
    On one seed its "interval" is a point (lo = hi), which would make any non-zero value look
    certain: that is no interval, so NullMetric (the claim is inconclusive, and says why)."""
    if ci.get("n") is not None and ci["n"] < 2:
        raise NullMetric(f"a paired difference over seeds defined on {ci['n']} seed only ({ci.get('mean')}): no interval")
    return Interval.of(ci)


def verdict(a: Interval, b: Interval, claimed: str = ">") -> str:
    """The rule in the module docstring: claimed order of a and b, by interval overlap."""
    if claimed not in (">", "<"):
        raise ValueError(f"claimed must be '>' or '<', got {claimed!r}")
    if claimed == "<":
        a, b = b, a
    if a.lo > b.hi:
        return HELD
    if a.hi < b.lo:
        return NOT_HELD
    return INCONCLUSIVE


@dataclass(frozen=True)
class Outcome:
    measured: str
    verdict: str


class MissingMetric(KeyError):
    """A claim's input is not in this run's metrics (its stage did not run or wrote no such key)."""


class NullMetric(MissingMetric):
    """A claim's input is there but null: the stage ran and the data left it undefined (e.g. a
    normalised accuracy where every expert scored 0). A verdict about data: inconclusive."""


def _get(metrics: dict, *path: str):
    node = metrics
    for i, key in enumerate(path):
        if not isinstance(node, dict) or key not in node:
            where = "metrics/" + path[0] + ".json" + "".join(f"[{k!r}]" for k in path[1:i + 1])
            raise MissingMetric(where)
        node = node[key]
    return node


def _system(metrics: dict, name: str) -> Interval:
    """A stage-04 system's normalised accuracy with its interval: over seeds when the system
    was scored on several (``seeds``: two-stage bootstrap over seeds and prompts), else over
    the prompts of the one seed."""
    row = _get(metrics, "merge_route", "systems", name)
    if row.get("seeds"):
        return Interval.of(row["seeds"])
    return Interval.of({"mean": row.get("norm_acc"), "lo": row.get("norm_lo"), "hi": row.get("norm_hi")})


def _score(row: dict) -> float | None:
    return row["seeds"].get("mean") if row.get("seeds") else row.get("norm_acc")


def best_system(systems: dict, *kinds: str) -> str | None:
    """The stage-04 system with the highest normalised accuracy among these kinds (its mean
    over seeds where it has one; only systems with seeds when any has), or None. Oracle routing is excluded (it is told the skill),
    and so are systems without a number."""
    rows = {n: r for n, r in systems.items()
            if r["kind"] in kinds and n != "route:oracle" and _score(r) is not None}
    if any(r.get("seeds") for r in rows.values()):  # compare on seeds: systems scored on one seed only drop out
        rows = {n: r for n, r in rows.items() if r.get("seeds")}
    return max(rows, key=lambda n: _score(rows[n])) if rows else None


def _seeds(metrics: dict, *names: str) -> str:
    """How many seeds the named systems' intervals are over: '3 seeds', or '1 seed, intervals over prompts'."""
    ns = sorted({(_get(metrics, "merge_route", "systems", n).get("seeds") or {}).get("n", 1) for n in names})
    return "1 seed, intervals over prompts" if ns == [1] else f"{ns[0]} seeds" if len(ns) == 1 else f"seeds: {ns}"


def _best(metrics: dict, *kinds: str) -> str:
    best = best_system(_get(metrics, "merge_route", "systems"), *kinds)
    if best is None:
        raise MissingMetric(f"metrics/merge_route.json: no system of kind {kinds}")
    return best


# ---- the claims -------------------------------------------------------------------------

def selma(m: dict) -> Outcome:
    best = _best(m, "merge", "peft_merge")
    a, b = _system(m, best), _system(m, "joint_total_steps")
    return Outcome(f"best merge ({best}) {a} vs joint LoRA at equal total steps {b} (normalised accuracy, "
                   f"{_seeds(m, best, 'joint_total_steps')})", verdict(a, b, ">"))


def routing_beats_joint(m: dict) -> Outcome:
    best = _best(m, "router")
    a, b = _system(m, best), _system(m, "joint_total_steps")
    return Outcome(f"best router ({best}) {a} vs joint LoRA at equal total steps {b} ({_seeds(m, best, 'joint_total_steps')})",
                   verdict(a, b, ">"))


def task_moe_families(m: dict) -> Outcome:
    r = _get(m, "merge_route", "router")
    if "family_mass" in r:
        # Router probability on wrong-skill experts: share that lands in the prompt's own family,
        # against the share expected if wrong experts were picked regardless of family.
        a, b = Interval.of(r["family_mass"]), Interval.point(float(r["family_mass"]["chance"]))
        return Outcome(f"router probability on other skills that stays in the prompt's family {a} "
                       f"vs {b} if spread regardless of family", verdict(a, b, ">"))
    share, chance, n = r["same_family_share"], r["chance_same_family"], r["misrouted"]
    return Outcome(f"{n} misrouted test prompts, {share:.0%} to the same family (chance {chance:.0%}); "
                   "too few to test", INCONCLUSIVE)


def ties_dare(m: dict) -> Outcome:
    """What the TIES and DARE papers claim is trimming, sign election and drop-and-rescale, not
    the scale λ: so both are compared with task arithmetic tuned on the same λ grid (not with
    the untuned plain average, which any λ-tuned merge beats)."""
    base = _system(m, "merge:task_arithmetic")
    parts, verdicts = [], []
    for name in ("merge:ties", "merge:dare_ties"):
        a = _system(m, name)
        parts.append(f"{name.split(':')[1]} {a}")
        verdicts.append(verdict(a, base, ">"))
    v = HELD if all(x == HELD for x in verdicts) else NOT_HELD if all(x == NOT_HELD for x in verdicts) \
        else INCONCLUSIVE
    return Outcome(", ".join(parts) + f" vs λ-tuned task arithmetic {base} (normalised accuracy, "
                   f"{_seeds(m, 'merge:ties', 'merge:dare_ties', 'merge:task_arithmetic')})", v)


def _beats_every(m: dict, pairs: list[tuple[str, str]], what: str) -> Outcome:
    """Each (new, baseline) pair of stage-04 systems compared by :func:`verdict`. The claim "new
    beats each baseline" held when every comparison held; did not hold when any baseline is
    clearly above (one clear loss refutes "beats every one"); otherwise inconclusive."""
    verdicts, parts = [], []
    for new, base in pairs:
        a, b = _system(m, new), _system(m, base)
        v = verdict(a, b, ">")
        verdicts.append(v)
        parts.append(f"{new.split(':', 1)[1]} {a} vs {base.split(':', 1)[1]} {b}: {v}")
    v = NOT_HELD if NOT_HELD in verdicts else HELD if all(x == HELD for x in verdicts) else INCONCLUSIVE
    names = sorted({n for p in pairs for n in p})
    return Outcome(f"{'; '.join(parts)} ({what}, {_seeds(m, *names)})", v)


_NORM = "normalised accuracy, λ of each chosen on validation"


def tsv_m(m: dict) -> Outcome:
    return _beats_every(m, [("merge:tsv_m", "merge:task_arithmetic"), ("merge:tsv_m", "merge:ties")], _NORM)


def iso(m: dict) -> Outcome:
    return _beats_every(m, [(f"merge:{a}", f"merge:{b}") for a in ("iso_c", "iso_cts") for b in ("task_arithmetic", "ties")], _NORM)


def knots(m: dict) -> Outcome:
    """KnOTS' claim is about the alignment: each merge on the aligned coordinates against the
    same merge on the raw updates."""
    return _beats_every(m, [("merge:knots_ties", "merge:ties"), ("merge:knots_dare", "merge:dare_ties")], _NORM)


def cart(m: dict) -> Outcome:
    return _beats_every(m, [("merge:cart", "merge:task_arithmetic"), ("merge:cart", "merge:ties")], _NORM)


def della(m: dict) -> Outcome:
    return _beats_every(m, [("merge:della", "merge:dare_ties"), ("merge:della", "merge:ties")], _NORM)


def _recovery(m: dict, sparsity: float, kind: str = "graft") -> tuple[str, str, Interval]:
    """``(source, sparsity key, recovery)`` nearest ``sparsity``: on the full fine-tuning's update
    as the paper grafts, or on the LoRA experts' ΔW where the run has only those (a profile too
    large for full fine-tuning on its machine)."""
    sources = _get(m, "localize", "recovery")
    source = "full_ft" if "full_ft" in sources else "lora"
    table = _get(m, "localize", "recovery", source, kind)
    key = min(table, key=lambda s: abs(float(s) - sparsity))
    return source, key, Interval.of(table[key])


def localization_sparse(m: dict) -> Outcome:
    source, key, a = _recovery(m, 1e-4)
    of = "the fine-tuned accuracy" if source == "full_ft" else "the LoRA expert's accuracy (no full fine-tuning in this run)"
    return Outcome(f"graft of {float(key):.4%} of the parameters recovers {a} of {of} "
                   "(threshold 0.95)", verdict(a, Interval.point(0.95), ">"))


def localization_disjoint(m: dict) -> Outcome:
    """Nearly disjoint means: less overlap than chance. The measured mean Jaccard between the
    skills' masks (interval: bootstrap over skill pairs) against the Jaccard of random masks
    of the same sizes (interval: 95% range over random draws). A fixed threshold would not
    do: two random masks at 10% sparsity already overlap by p/(2-p) ≈ 0.053."""
    o = _get(m, "localize", "overlap")
    a = Interval.of(_get(m, "localize", "overlap", "jaccard"))
    b = Interval.of(_get(m, "localize", "overlap", "random_jaccard"))
    return Outcome(f"mean Jaccard overlap between skills' masks {a} vs random masks of the same sizes {b} "
                   f"at sparsity {o['sparsity']:.4%}", verdict(a, b, "<"))


def localization_similarity(m: dict) -> Outcome:
    c = _get(m, "localize", "overlap", "corr_with_behaviour")
    a = Interval.of({"mean": c.get("r"), "lo": c.get("lo"), "hi": c.get("hi")})
    return Outcome(f"correlation of mask overlap with behavioural similarity {a} ({c.get('method', '')})",
                   verdict(a, Interval.point(0.0), ">"))


def grafting_calibration(m: dict) -> Outcome:
    c = _get(m, "localize", "calibration")
    a, b = Interval.of(c["ece_grafted"]), Interval.of(c["ece_finetuned"])
    return Outcome(f"ECE grafted {a} vs fine-tuned {b} ({c['relative_reduction']:.0%} less)", verdict(a, b, "<"))


def sequential_forgets(m: dict) -> Outcome:
    a = Interval.of(_get(m, "continual", "strategies", "sequential_lora", "BWT"))
    return Outcome(f"BWT of sequential LoRA fine-tuning {a}", verdict(a, Interval.point(0.0), "<"))


def replay_reduces(m: dict) -> Outcome:
    s = _get(m, "continual", "strategies")
    a, b = Interval.of(_get(m, "continual", "strategies", "replay", "BWT")), Interval.of(s["sequential_lora"]["BWT"])
    return Outcome(f"BWT with replay {a} vs sequential {b}", verdict(a, b, ">"))


def stability_gap(m: dict) -> Outcome:
    g = _get(m, "continual", "stability_gap", "replay")
    depth, rec = Interval.of(g["depth"]), Interval.of(g["recovery"])
    zero = Interval.point(0.0)
    both = {verdict(depth, zero, ">"), verdict(rec, zero, ">")}
    v = NOT_HELD if NOT_HELD in both else HELD if both == {HELD} else INCONCLUSIVE
    return Outcome(f"with replay, accuracy on earlier skills drops by {depth} just after a task switch "
                   f"and recovers by {rec} before the task ends", v)


TEACHER_MARGIN = 0.05
"""How much accuracy teacher-written data may lose against programmatic data and still "teach the
skill as well": SELMA reports its auto-generated data on a par with human-written data, a
non-inferiority claim, so the rule is the paired difference's interval against -0.05."""


def teacher_data(m: dict) -> Outcome:
    t = _get(m, "teacher_data")
    if "skipped" in t:
        raise MissingMetric(f"metrics/teacher_data.json (skipped: {t['skipped']})")
    d, acc = paired(t["difference"]), t["accuracy"]
    a, b = Interval.of(acc["teacher"]), Interval.of(acc["programmatic"])
    return Outcome(f"experts on teacher-written prompts {a} vs on programmatic prompts {b} (mean accuracy over "
                   f"{', '.join(t['skills'])}); paired difference {d} over {t['difference'].get('n')} seeds, against "
                   f"-{TEACHER_MARGIN}",
                   verdict(d, Interval.point(-TEACHER_MARGIN), ">"))


def _combine(verdicts: list[str]) -> str:
    """Every comparison must hold; one clear opposite refutes; otherwise inconclusive."""
    return NOT_HELD if NOT_HELD in verdicts else HELD if verdicts and all(v == HELD for v in verdicts) else INCONCLUSIVE


def alp_gmm_masters_more(m: dict) -> Outcome:
    by = _get(m, "curricula", "teachers", "by_fraction")
    parts, verdicts = [], []
    for f, e in sorted(by.items(), key=lambda kv: float(kv[0])):
        if float(f) == 0 or "alp_gmm_minus_random" not in e:
            continue
        d = paired(e["alp_gmm_minus_random"])
        verdicts.append(verdict(d, Interval.point(0.0), ">"))
        parts.append(f"unlearnable {float(e['unlearnable_area']):.2f} of the space: ALP-GMM {Interval.of(e['mastered']['alp_gmm'])} "
                     f"vs Random {Interval.of(e['mastered']['random'])}, paired difference {d}")
    if not parts:
        raise MissingMetric("metrics/curricula.json['teachers']: no unlearnable fraction > 0 with alp_gmm and random")
    return Outcome("; ".join(parts) + " (mastered share of the task space at the end, seeds)", _combine(verdicts))


def auto_cei_precision(m: dict) -> Outcome:
    a = _get(m, "curricula", "auto_cei")
    parts, verdicts = [], []
    for b in ("sft", "ei"):
        d = paired(a.get("precision_minus", {}).get(b, {}))
        verdicts.append(verdict(d, Interval.point(0.0), ">"))
        parts.append(f"precision − {b} {d}")
    bound = paired(a["refusal_minus_sft_error"])
    over = verdict(bound, Interval.point(0.0), "<") == NOT_HELD  # refuses clearly more than SFT gets wrong
    v = NOT_HELD if over else _combine(verdicts)
    prec = Interval.of(a["methods"]["auto_cei"]["precision"])
    return Outcome(f"Auto-CEI precision {prec}; {'; '.join(parts)}; refusal rate − SFT's error rate {bound} "
                   f"(the bound: at most what SFT gets wrong{'; exceeded' if over else ''}) (seeds, paired)", v)


def auto_cei_limit(m: dict) -> Outcome:
    a = _get(m, "curricula", "auto_cei")
    d = paired(a["refusal_beyond_minus_within"])  # seeds with no digit count on one side of the limit drop out
    what = f"refusal rate on digit counts where SFT scores < {a['limit_accuracy']:g} minus where it scores more: {d}"
    return Outcome(f"{what} (seeds)", verdict(d, Interval.point(0.0), ">"))


def skill_it_sooner(m: dict) -> Outcome:
    s = _get(m, "curricula", "skill_it")
    d = paired(s["skill_it_minus_uniform"])
    st = s["steps_to_target"]
    return Outcome(f"steps until every skill's validation loss ≤ {s['target_loss']:g}: Skill-it {Interval.of(st['skill_it'])} "
                   f"vs uniform {Interval.of(st['uniform'])}, paired difference {d} (budget {s['budget']}; reached "
                   f"{s['reached']['skill_it']} and {s['reached']['uniform']} of the seeds)", verdict(d, Interval.point(0.0), "<"))


@dataclass(frozen=True)
class Claim:
    key: str
    source: str
    claim: str
    reported: str
    compute: Callable[[dict], Outcome]


CLAIMS: list[Claim] = [
    Claim("selma", "SELMA (Li et al., 2024)", "skill experts + merging beat joint multi-skill training",
          "merged LoRA experts beat one LoRA trained on all skills (knowledge conflict)", selma),
    Claim("routing", "SELMA / task-level MoE", "skill experts + routing beat joint multi-skill training",
          "routing to per-skill experts avoids interference", routing_beats_joint),
    Claim("task_moe", "Task-level MoE (Kudugunta et al., 2021)", "learned routes rediscover the skill families",
          "task-routed experts group related tasks", task_moe_families),
    Claim("ties_dare", "TIES (Yadav et al., 2023); DARE (Yu et al., 2024)",
          "trimming and sign election reduce interference (against λ-tuned task arithmetic)",
          "TIES and DARE-TIES merges score above task arithmetic", ties_dare),
    Claim("tsv_m", "TSV-M (Gargiulo et al., 2025)", "decorrelated task singular vectors merge better than task arithmetic and TIES",
          "TSV-M above task arithmetic and TIES on 8, 14 and 20 vision tasks", tsv_m),
    Claim("iso", "Iso-C / Iso-CTS (Marczak et al., 2025)", "a flat (isotropic) merged spectrum merges better than task arithmetic and TIES",
          "Iso-C and Iso-CTS above task arithmetic and TIES on 8, 14 and 20 vision tasks", iso),
    Claim("knots", "KnOTS (Stoica et al., 2025)", "aligning LoRA updates in one SVD basis makes TIES and DARE merge better",
          "KnOTS-TIES and KnOTS-DARE above TIES and DARE-TIES on the raw LoRA updates", knots),
    Claim("cart", "CART (Choi et al., 2024)", "centred, low-rank task vectors merge better than task arithmetic and TIES",
          "CART above task arithmetic and TIES on 8, 14 and 20 vision tasks", cart),
    Claim("della", "DELLA (Deep et al., 2024)", "magnitude-ranked drop merges better than DARE's uniform drop and TIES",
          "DELLA above DARE-TIES and TIES", della),
    Claim("teacher_data", "SELMA (Li et al., 2024)", "prompts the model writes for itself teach the skill as well as programmatic ones",
          "experts on auto-generated data perform on a par with those on human-written data", teacher_data),
    Claim("loc_sparse", "Skill localization (Panigrahi et al., 2023)", "about 0.01% of parameters carry the skill",
          "grafting ~0.01% of parameters recovers >95% of the fine-tuned accuracy", localization_sparse),
    Claim("loc_disjoint", "Skill localization (Panigrahi et al., 2023)", "different skills' regions are nearly disjoint (less overlap than random regions)",
          "little overlap between tasks' grafting regions", localization_disjoint),
    Claim("loc_similarity", "Skill localization (Panigrahi et al., 2023)", "region overlap tracks skill similarity",
          "similar tasks share more of their regions", localization_similarity),
    Claim("loc_calibration", "Skill localization (Panigrahi et al., 2023)", "grafting improves calibration",
          "40-90% less calibration error after grafting", grafting_calibration),
    Claim("cl_forgets", "Continual learning (e.g. De Lange et al., 2021)", "sequential fine-tuning forgets",
          "backward transfer BWT < 0", sequential_forgets),
    Claim("cl_replay", "Experience replay (e.g. Chaudhry et al., 2019)", "replay reduces forgetting",
          "BWT with replay above sequential fine-tuning", replay_reduces),
    Claim("stability_gap", "Stability gap (De Lange et al., 2023)", "a stability gap appears under per-step evaluation",
          "earlier tasks' accuracy drops right after a switch, then recovers", stability_gap),
    Claim("alp_gmm", "ALP-GMM (Portelas et al., 2019)", "a learning-progress teacher masters more of the task space than random tasks when part of it is unlearnable",
          "ALP-GMM masters more than Random, and degrades less as the unfeasible share grows", alp_gmm_masters_more),
    Claim("auto_cei", "Auto-CEI (Zhao et al., 2025)", "expert iteration with a refusal curriculum answers more precisely at a bounded refusal rate",
          "higher precision than SFT and expert iteration, refusing a reasonable share", auto_cei_precision),
    Claim("auto_cei_limit", "Auto-CEI (Zhao et al., 2025)", "its refusals fall beyond the model's limit",
          "refusals concentrate on the problems the model cannot solve", auto_cei_limit),
    Claim("skill_it", "Skill-it! (Chen et al., 2023)", "a skills-graph mixture reaches the target loss sooner than uniform mixing",
          "Skill-it reaches a given validation loss in fewer steps than uniform sampling", skill_it_sooner),
]


def evaluate_claims(metrics: dict) -> list[dict]:
    """One row per claim: source, what was reported, what this run measured, the verdict."""
    rows = []
    for c in CLAIMS:
        try:
            out = c.compute(metrics)
        except NullMetric as e:
            out = Outcome(f"not computable in this run: {e.args[0]}", INCONCLUSIVE)
        except MissingMetric as e:
            out = Outcome(f"not measured in this run: {e.args[0]} is missing", NOT_MEASURED)
        rows.append({"claim": c.claim, "source": c.source, "reported": c.reported,
                     "measured": out.measured, "verdict": out.verdict, "key": c.key})
    return rows
