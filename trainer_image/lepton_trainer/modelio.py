"""A model directory: ``model.pt`` (a state dict) plus ``meta.json`` (how to rebuild it).

meta.json keys:
  arch          architecture name in :mod:`lepton_trainer.models`
  config        keyword arguments for that architecture
  dataset       dataset name in :mod:`lepton_trainer.data`
  input_shape   per-example input shape, e.g. [64]
  dtype         parameter dtype: float32, float16 or bfloat16
  quantization  absent, or the name of the quantization applied before saving
  metrics       free-form numbers (accuracy, step, ...)

Training writes a directory; compression reads one and writes another; the server
loads one. Loading uses ``weights_only=True``: a model directory never runs code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import models
from .contract import MODEL_FILE, MODEL_META_FILE

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(directory: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s state dict and ``meta`` into ``directory`` (created if needed).

    The state dict is written to a temporary name, fsynced and renamed, and meta.json
    last, so a reader that finds meta.json always finds a complete model.pt.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MODEL_FILE}.tmp"
    with open(tmp, "wb") as f:
        torch.save(model.state_dict(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MODEL_FILE)
    write_json_atomic(out / MODEL_META_FILE, meta)
    return out


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MODEL_META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: not a model directory") from None


def load_model(directory: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model described by meta.json and load its weights (eval mode)."""
    meta = read_meta(directory)
    model = models.build(meta["arch"], **meta.get("config", {}))
    quant = meta.get("quantization")
    if quant:
        from . import quantization  # the compression side owns quantized formats
        model = quantization.prepare_for_load(model, quant)
    else:
        model = model.to(DTYPES[meta.get("dtype", "float32")])
    state = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval(), meta


def size_bytes(directory: str | os.PathLike) -> int:
    return (Path(directory) / MODEL_FILE).stat().st_size
