"""The student every curriculum of stage 07 trains: the stage-02 base with a fresh LoRA.

One recipe (``curricula.student``: rank, alpha, learning rate, batch) for the teachers,
Auto-CEI and Skill-it, so their step budgets compare; the LoRA targets the experts' modules.
"""
from __future__ import annotations

from pathlib import Path
import torch

from lib.core.evaluation import exact_match, generate
from lib.core.modeling import load_causal_lm
from lib.core.sft_data import collate, encode


def load_student(root: str | Path, recipe, target_modules, seed: int):
    """``(peft model, tokenizer)``: ``models/base`` with a LoRA initialised from ``seed``."""
    from peft import LoraConfig, get_peft_model

    from lib.core.training import check_target_modules

    model, tok = load_causal_lm(Path(root) / "models" / "base")
    cfg = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=check_target_modules(model, list(target_modules)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, cfg), tok


class Optimizer:
    """AdamW at a constant learning rate with gradient clipping: the teachers decide how long
    training goes on a region, so no schedule may decay the rate behind their back."""

    def __init__(self, model, lr: float, max_grad_norm: float = 1.0):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.max_grad_norm = max_grad_norm

    def step(self, tok, prompts, answers) -> float:
        """One step on the completion loss of ``answers`` given ``prompts``; the loss."""
        self.model.train()
        batch = collate(encode(tok, prompts, answers), tok.pad_token_id, next(self.model.parameters()).device)
        loss = self.model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"curricula: the student's loss became {float(loss)}; lower curricula.student.lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.eval()
        return float(loss.detach())


def greedy_correct(model, tok, prompts, answers, max_new_tokens: int) -> list[int]:
    """1 where the greedy answer equals the reference (the harness's exact match), else 0."""
    gens = generate(model, tok, list(prompts), max_new_tokens=max_new_tokens, batch_size=max(1, len(prompts)),
                    progress=False)
    return [int(exact_match(g.text, a)) for g, a in zip(gens, answers)]


@torch.inference_mode()
def sample_answers(model, tok, prompts, k: int, max_new_tokens: int, temperature: float, seed: int,
                   batch_size: int = 256) -> list[list[str]]:
    """``k`` sampled continuations (temperature ``temperature``, no top-k/top-p) per prompt, up to
    EOS, decoded as the harness decodes greedy answers and stripped of the leading space (they are
    training targets); left-padded as the harness pads."""
    from lib.core.evaluation import _eos_ids, _left_pad

    eos = _eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    encoded = tok(list(prompts))["input_ids"]
    out: list[list[str]] = []
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for s in range(0, len(encoded), max(1, batch_size // k)):
            ids, mask = _left_pad(encoded[s:s + max(1, batch_size // k)], pad, device)
            seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                                  top_p=1.0, num_return_sequences=k, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                  pad_token_id=pad)[:, ids.shape[1]:]
            texts = []
            for row in seqs.tolist():
                cut = next((i for i, t in enumerate(row) if t in eos), len(row))
                # Stripped: the model writes " " + answer, and a training row adds that space itself.
                texts.append(tok.decode(row[:cut], skip_special_tokens=True).strip())
            out += [texts[i * k:(i + 1) * k] for i in range(len(texts) // k)]
    return out
