"""int8 dynamic quantization of the Linear layers, with two interchangeable backends.

``fbgemm``  ``torch.ao.quantization.quantize_dynamic``: int8 weights, activations
            quantized per batch at run time, executed by fbgemm's CPU kernels. The API is
            deprecated upstream but its eager-mode CPU kernels are the fastest measured.
``torchao`` ``torchao.quantization.quantize_`` with ``Int8DynamicActivationInt8WeightConfig``:
            maintained, tensor-subclass based; in eager mode on CPU it is several times
            slower than fp32 (bench/results/compression.json), it pays off on CUDA or
            under ``torch.compile``.

``DEFAULT_INT8_BACKEND`` keeps the faster one per device, from bench/compression.py
(512-wide MLP, one thread): on CPU fbgemm wins, about 1.7x faster than fp32 at batch 32;
torchao eager is about 3x slower than fp32, and only matches fbgemm under
``torch.compile`` after a 40-second compile per process. fbgemm has no CUDA kernels,
so CUDA uses torchao.

A quantized model directory stores the quantized state dict and
``meta["quantization"] = "int8-dynamic:<backend>"``; :func:`prepare_for_load`
turns a freshly built fp32 model into the same structure so that state dict loads with
``weights_only=True``.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

INT8_BACKENDS = ("fbgemm", "torchao")
DEFAULT_INT8_BACKEND = {"cpu": "fbgemm", "cuda": "torchao"}
PREFIX = "int8-dynamic:"


def default_backend(device: str = "cpu") -> str:
    return DEFAULT_INT8_BACKEND.get(torch.device(device).type, "fbgemm")


def quant_name(backend: str) -> str:
    return PREFIX + backend


def quantize_int8(model: nn.Module, backend: str) -> nn.Module:
    """Return an int8 dynamically quantized copy-or-in-place version of an fp32 ``model``."""
    model = model.float().eval()
    if backend == "fbgemm":
        if any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules()):
            # The encoder's inference fast path reads ``linear.weight`` as a tensor; in a
            # dynamically quantized Linear it is a method, so that path is switched off.
            torch.backends.mha.set_fastpath_enabled(False)
        if "fbgemm" in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = "fbgemm"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
            warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
            # per-channel weight scales: on the MiniLM sentence encoder they keep a mean
            # cosine similarity of 0.976 to fp32 where one scale per tensor keeps 0.951
            return torch.ao.quantization.quantize_dynamic(
                model, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
    if backend == "torchao":
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError as e:
            raise RuntimeError(f"int8 backend 'torchao' needs the torchao package: {e}") from e
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        return model
    raise ValueError(f"unknown int8 backend {backend!r}; known: {list(INT8_BACKENDS)}")


def prepare_for_load(model: nn.Module, name: str) -> nn.Module:
    """Give a fresh fp32 ``model`` the structure of a saved quantized one (``name`` as in meta)."""
    if not name.startswith(PREFIX):
        raise ValueError(f"unknown quantization {name!r}; expected {PREFIX}<backend>")
    return quantize_int8(model, name[len(PREFIX):])
