"""Load a causal language model and its tokenizer from a path.

Accepted paths:

  * a Hugging Face directory: ``config.json``, the tokenizer files and ``*.safetensors``;
  * a ``.gguf`` file, or a directory holding exactly one ``.gguf`` file (and no
    ``config.json``): transformers reads it (``gguf_file=``, with the ``gguf`` package)
    and dequantizes its tensors into a torch model;
  * a directory that :mod:`lepton_trainer.llm.compress` wrote: a Hugging Face directory
    whose ``config.json`` may carry a ``quantization_config`` (torchao weight-only
    int8 / int4), which ``from_pretrained`` applies while loading.

Loading is local only (``local_files_only=True``) and runs no code from the directory
(``trust_remote_code=False``): only architectures built into transformers load.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

GGUF_SUFFIX = ".gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _gguf_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(GGUF_SUFFIX))


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file ``path`` names: itself, or the one ``.gguf`` of a directory without
    ``config.json``; None for anything else. A directory with several raises ValueError."""
    p = Path(path)
    if p.is_file():
        return p if p.name.lower().endswith(GGUF_SUFFIX) else None
    if not p.is_dir() or (p / "config.json").exists():
        return None
    found = _gguf_files(p)
    if len(found) > 1:
        raise ValueError(f"{p} holds {len(found)} .gguf files ({', '.join(f.name for f in found)}); "
                         "name one file, or keep exactly one in the directory")
    return found[0] if found else None


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a GGUF model: a ``.gguf`` file or a directory holding one (and no
    ``config.json``)."""
    try:
        return gguf_file(path) is not None
    except ValueError:
        return True


def _dtype(dtype: Any) -> Any:
    if dtype is None:
        return "auto"
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)} or 'auto'")
        return DTYPES[dtype]
    return dtype


def load(path: str | os.PathLike, *, dtype: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the causal language model at ``path``, in eval mode.

    ``dtype``: None or "auto" keeps the checkpoint's own dtype (float32 for GGUF, whose
    tensors are dequantized); a torch dtype or its name ("bfloat16") casts on load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no language model at {p}")
    common = {"local_files_only": True, "trust_remote_code": False}
    gguf = gguf_file(p)
    if gguf is not None:
        directory, extra = gguf.parent, {"gguf_file": gguf.name}
    elif p.is_dir() and (p / "config.json").exists():
        directory, extra = p, {}
    else:
        raise FileNotFoundError(f"{p} is neither a Hugging Face directory (config.json) nor a .gguf file "
                                "or a directory holding one")
    tokenizer = AutoTokenizer.from_pretrained(directory, **common, **extra)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=_dtype(dtype), **common, **extra)
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def plain(model: Any) -> Any:
    """``model`` as a plain Hugging Face model that ``save_pretrained`` writes: a model read
    from GGUF with its weights dequantized (transformers does that unless GGUF matmul kernels
    are installed) drops its GGUF loading state; one whose weights stay packed in GGUF blocks
    cannot be written and raises ValueError."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if config is None or getattr(config, "quant_method", None) != "gguf":
        return model
    if getattr(quantizer, "packed_modules", None):
        raise ValueError("this GGUF model keeps its weights packed (GGUF kernels are installed); "
                         "load it with dequantized weights to compress it")
    quantizer.remove_quantization_config(model)
    return model
