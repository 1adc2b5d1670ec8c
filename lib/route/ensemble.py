"""Output ensembling: the average of the experts' next-token distributions, decoded greedily."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lib.core.sft_data import eval_mode
from lib.core.evaluation import _check_adapter_names, _is_peft
from lib.route.common import Tensor, _ModelWrapper, _check_names, _position_ids


# --------------------------------------------------------------------------- output ensemble


class LogitEnsemble(_ModelWrapper):
    """Greedy decoding from the average of the experts' next-token probabilities.

    Each expert is one adapter of the peft model (``"__base__"`` = the base model), run on
    the whole batch with peft's ``adapter_names=[expert] * batch`` (no adapter switching,
    so nothing about the wrapped model changes) and its own KV cache. At every step
    ``p = mean_i softmax(logits_i)``, the next token is ``argmax p``, and ``log p`` is
    returned as that step's logits, so the harness's confidence is the ensemble's
    probability of its own answer. Left padding gets the positions ``cumsum(mask) - 1``
    that transformers' ``generate`` uses; rows that produced an EOS emit ``pad_token_id``;
    decoding stops when every row has stopped or after ``max_new_tokens``.

    Hand-written because ``generate`` runs one model. Greedy only: sampling, beams,
    repetition penalties and the like are refused rather than silently ignored.
    """

    def __init__(self, model, names: Sequence[str]):
        super().__init__()
        self.names = _check_names(names)
        _check_adapter_names(model, self.names)
        self.model = model
        self.training = model.training  # mirror the model's mode (see SoftMixture)

    def _expert_step(self, name: str, ids: Tensor, mask: Tensor, pos: Tensor, cache) -> tuple[Tensor, Any]:
        extra: dict[str, Any] = {}
        if _is_peft(self.model):
            extra["adapter_names"] = [name] * ids.shape[0]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, return_dict=True, **extra)
        return out.logits[:, -1].float(), out.past_key_values

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 do_sample: bool = False, num_beams: int = 1, repetition_penalty: float | None = None,
                 no_repeat_ngram_size: int | None = None, min_length: int | None = None, **ignored):
        """``GenerateDecoderOnlyOutput(sequences=prompt + new tokens, logits=(log p per step, ...))``.

        ``ignored`` takes the harness's flags that need no action here (``use_cache``,
        ``output_logits``, ``return_dict_in_generate``...).
        """
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        if do_sample or num_beams != 1 or repetition_penalty not in (None, 1.0) \
                or no_repeat_ngram_size not in (None, 0) or min_length not in (None, 0):
            raise ValueError("LogitEnsemble decodes greedily only (do_sample=False, num_beams=1, no repetition "
                             "penalty, no_repeat_ngram_size=0, min_length=0)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if eos_token_id is None:
            eos_token_id = getattr(self.generation_config, "eos_token_id", None)
        eos_list = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        if pad_token_id is None:
            if not eos_list:
                raise ValueError("LogitEnsemble.generate needs pad_token_id or an eos_token_id to pad finished rows")
            pad_token_id = eos_list[0]
        device = input_ids.device
        eos = torch.tensor(eos_list, dtype=torch.long, device=device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        pos = _position_ids(mask)
        ids = input_ids
        caches: list[Any] = [None] * len(self.names)
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
        new_tokens, step_logits = [], []
        with torch.inference_mode(), eval_mode(self.model):
            for _ in range(max_new_tokens):
                probs = None
                for e, name in enumerate(self.names):
                    logits, caches[e] = self._expert_step(name, ids, mask, pos, caches[e])
                    p = torch.softmax(logits, dim=-1)
                    probs = p if probs is None else probs + p
                logp = (probs / len(self.names)).log()
                nxt = torch.where(unfinished, logp.argmax(-1), torch.full_like(unfinished, pad_token_id, dtype=torch.long))
                new_tokens.append(nxt)
                step_logits.append(logp)
                unfinished = unfinished & ~torch.isin(nxt, eos)
                if not unfinished.any():
                    break
                ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = mask.sum(-1, keepdim=True) - 1
        sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
        return GenerateDecoderOnlyOutput(sequences=sequences, logits=tuple(step_logits))
