"""Loading causal LMs: any local or hub model by name, safetensors only, no remote code by default."""
from __future__ import annotations

import os
from pathlib import Path

import torch


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names it and the fix."""


def pick_device() -> tuple[torch.device, torch.dtype]:
    """CUDA with bf16 where available, else CPU with fp32: the same params run on both."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.device("cpu"), torch.float32


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, key: str | None = None):
    """The tokenizer at a local path or hub id. ``key``: the params key that named it
    (``model.base``, ``synthesize.teacher.model``), put first in any error."""
    from transformers import AutoTokenizer

    where = f"{key}: " if key else ""
    check_local(name_or_path, key)
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(where + _explain(name_or_path, "tokenizer", e)) from None
    if tok.pad_token is None:
        # Batched generation needs a pad token; reusing EOS is the usual choice and is
        # safe because padded positions are masked out.
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    return tok


def load_causal_lm(name_or_path: str | Path, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
                   key: str | None = None):
    """``(model, tokenizer)`` for any causal LM by local path or hub id (safetensors weights only).
    ``key``: the params key that named it, put first in any error."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(name_or_path, trust_remote_code, key)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(name_or_path), trust_remote_code=trust_remote_code, use_safetensors=True, dtype=dtype
        )
    except Exception as e:
        where = f"{key}: " if key else ""
        raise ModelLoadError(where + (_weights_problem(name_or_path) or _explain(name_or_path, "model", e))) from None
    model.eval()
    return model, tok


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _weights_problem(name_or_path) -> str | None:
    """After a failed load from a local directory: the weights file at fault, named, or None.

    Only safetensors are loaded (a pickle can run code when unpickled), so a directory with
    only pickle weights is refused by name, and a truncated or corrupt ``*.safetensors``
    file is named with its header error."""
    path = Path(str(name_or_path))
    if not path.is_dir():
        return None
    safes = sorted(path.glob("*.safetensors"))
    if not safes:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            return (f"{path}: only pickle weights ({', '.join(pickles)}), no *.safetensors; this project loads "
                    "safetensors only, since unpickling can run code. Convert once, where you trust the file: "
                    "load it and save_pretrained(dir, safe_serialization=True)")
        return None
    for f in safes:
        problem = safetensors_problem(f)
        if problem:
            return problem
    return None


def safetensors_problem(file: str | Path) -> str | None:
    """Why ``file`` is not a readable safetensors file (named, with its header error), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            list(handle.keys())
    except Exception as e:  # safetensors raises its own error type for a bad header
        return (f"{file}: not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or corrupt: "
                "write it again (rerun the stage that made it, e.g. dvc repro) or fetch it again")
    return None


class AdapterError(RuntimeError):
    """An adapter directory that is missing, unsafe, unreadable or does not fit the base model."""


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter_files(path: str | Path) -> None:
    """The one safe way in for an adapter directory, used by every stage before peft loads it:
    a safetensors weights file must be there (peft would unpickle an ``adapter_model.bin``) and
    readable (a truncated file is named as such, not reported as a rank mismatch)."""
    path = Path(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        others = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
        found = f" (found {', '.join(others)}: pickle files, which can run code when loaded)" if others else ""
        raise AdapterError(f"{path}: no {ADAPTER_WEIGHTS}{found}; only safetensors adapters are loaded. "
                           "Save adapters with save_pretrained (safetensors is its default)")
    problem = safetensors_problem(path / ADAPTER_WEIGHTS)
    if problem:
        raise AdapterError(problem)


def check_local(name_or_path, key: str | None = None, local: bool = False) -> None:
    """ModelLoadError at once when ``name_or_path`` is a local path that does not exist: it is
    never looked up on a hub (no lookups, no retries). ``key``: the params key that named it.
    ``local``: the path is the project's own (``models/base``), never a hub id, though it may
    look like one."""
    missing = (f"{name_or_path}: no such local directory" if local and not Path(name_or_path).expanduser().exists()
               else missing_local(name_or_path))
    if missing:
        where = f"{key}: " if key else ""
        hint = "" if key else "; the stage that writes it has not run (for models/base: dvc repro base)"
        raise ModelLoadError(f"{where}{missing} (a local path, so it is not looked up on the hub){hint}")


def missing_local(name_or_path) -> str | None:
    """Why ``name_or_path`` is a local path that does not exist (so it is never looked up on a
    hub), or None: it starts with ``.``, ``~`` or ``/``, has more than one ``/``, or its first
    part is an existing local directory (``models/base`` while ``models/`` exists)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return None
    first = Path(text.split("/", 1)[0])
    if text.startswith((".", "~", "/")) or text.count("/") > 1 or ("/" in text and first.is_dir()):
        return f"{text}: no such local directory"
    return None


def _explain(name_or_path, what: str, err: Exception) -> str:
    text = str(name_or_path)
    if Path(text).exists():
        where = "local directory"
    elif missing_local(text):
        where = "no such local directory"
    else:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        where = ("hub id (no local directory by that name); the hub is off: set SKILL_EXPERTS_ONLINE=1 to let "
                 "the project download it") if offline else "hub id (no local directory by that name)"
    return (
        f"cannot load {what} from {str(name_or_path)!r} ({where}): {type(err).__name__}: {err}. "
        "Give a directory written by save_pretrained with safetensors weights, or a hub id this machine can reach; "
        "set trust_remote_code: true only for a model you trust."
    )


def load_on_device(name_or_path: str | Path, trust_remote_code: bool = False):
    """``load_causal_lm`` in the dtype ``pick_device`` chooses, moved to that device. Only for
    the project's own models (``models/base``, a level's base...): a path that does not exist is
    a stage that has not run, never a hub id (``models/base`` would look like one)."""
    check_local(name_or_path, local=True)
    device, dtype = pick_device()
    model, tok = load_causal_lm(name_or_path, trust_remote_code, dtype=dtype)
    return model.to(device), tok
