"""Loading causal LMs: any local or hub model by name, safetensors only, no remote code by default."""
from __future__ import annotations

from pathlib import Path

import torch


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names it and the fix."""


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 where available, else CPU with fp32: the same params run on both."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(_explain(name_or_path, "tokenizer", e)) from None
    if tok.pad_token is None:
        # Batched generation needs a pad token; reusing EOS is the usual choice and is
        # safe because padded positions are masked out.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    return tok


def load_causal_lm(name_or_path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` for any causal LM by local path or hub id (safetensors weights only)."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(name_or_path, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), trust_remote_code=trust_remote_code, use_safetensors=True, dtype=dtype
        )
    except Exception as e:
        raise ModelLoadError(_explain(name_or_path, "model", e)) from None
    model.eval()
    return model, tok


def _explain(name_or_path, what: str, err: Exception) -> str:
    text = str(name_or_path)
    if Path(text).exists():
        where = "local directory"
    elif text.startswith((".", "~", "/")) or text.count("/") > 1:
        where = "no such local directory; check model.base in params.yaml"
    else:
        where = "hub id (no local directory by that name)"
    return (
        f"cannot load {what} from {str(name_or_path)!r} ({where}): {type(err).__name__}: {err}. "
        "Give a directory written by save_pretrained with safetensors weights, or a hub id this machine can reach; "
        "set trust_remote_code: true only for a model you trust."
    )


def load_on_device(name_or_path: str | Path, trust_remote_code: bool = False):
    """``load_causal_lm`` in the dtype ``pick_device`` chooses, moved to that device."""
    device, dtype = pick_device()
    model, tok = load_causal_lm(name_or_path, trust_remote_code, dtype=dtype)
    return model.to(device), tok
