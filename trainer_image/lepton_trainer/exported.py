"""Compression of exported programs: torch.export (``.pt2``), ONNX and TorchScript.

Each method writes a candidate directory (the source's other files, such as
``signature.json``, plus the new program under the source's file name) and loads it
back through :func:`modelio.load`, the server's loader: what is gated and timed is what
would be served. Inputs and outputs keep the source's names and datatypes.

torch.export  int8         PT2E dynamic quantization (torchao ``prepare_pt2e`` / ``convert_pt2e``
                           with ``X86InductorQuantizer``, dynamic config: Linear weights int8,
                           activations quantized per batch); re-exported, int8 weights stored
              int8-static  the same flow, static config: activations calibrated on the gate's
                           inputs (convolutions and linear layers)
              fp16, bf16   parameters cast; floating inputs are cast on entry and floating
                           outputs back to float32 inside the program
ONNX          int8         ``onnxruntime.quantization.quantize_dynamic`` (int8 weights)
              int8-static  ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8
                           weights, uint8 activations calibrated on the gate's inputs)
              fp16         ``onnxruntime.transformers.float16.convert_float_to_float16`` with
                           float32 inputs and outputs kept
TorchScript   fp16, bf16   the archive's parameters cast; ``lepton.json`` records the dtype so
                           the loader casts floating inputs on entry and outputs back to float32

Every other pair raises :class:`Unavailable` with the reason (the CRD refuses those pairs
already; the table is ``contract.EXPORTED_FORMAT_METHODS``).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import contract, modelio

FORMATS = tuple(contract.EXPORTED_FORMAT_METHODS)
MODEL_SUFFIXES = (".pt2", ".onnx", ".pt")
CALIBRATION_ROWS = 64
CALIBRATION_BATCH = 16
REFUSALS = {
    "prune-structured": "structured pruning of an exported graph is not implemented: removing hidden units "
                        "rewrites the shape of every consumer in the graph; prune the model before exporting it",
    "prune": "unstructured pruning of an exported graph is not implemented (and stores its zeros densely: no "
             "size or speed gain); prune the model before exporting it",
    "distill": "distillation trains a student module; an exported graph has none: distill before exporting",
}
FORMAT_REFUSALS = {
    ("onnx", "bf16"): "onnxruntime's CPU provider has no bfloat16 kernels for most operators and no maintained "
                      "converter writes bfloat16 ONNX graphs; use fp16 or int8",
    ("torchscript", "int8"): "TorchScript programs cannot be quantized by a maintained flow (PT2E needs a "
                             "torch.export graph); export the model with torch.export or to ONNX for int8",
    ("torchscript", "int8-static"): "TorchScript programs cannot be quantized by a maintained flow (PT2E needs "
                                    "a torch.export graph); export the model with torch.export or to ONNX for int8",
}


class Unavailable(ValueError):
    """The method has no implementation for this exported format."""


def refusal(fmt: str, method: str) -> str | None:
    """Why ``method`` cannot apply to a program of format ``fmt`` (None: it can)."""
    if method in contract.EXPORTED_FORMAT_METHODS[fmt]:
        return None
    why = FORMAT_REFUSALS.get((fmt, method)) or REFUSALS.get(method) or "no implementation"
    return f"{method} is not available for {fmt} programs: {why}"


def _source_file(loaded: modelio.LoadedModel) -> Path:
    path = getattr(loaded, "path", None)
    if path is None:
        raise Unavailable(f"the {loaded.format} model does not say which file it was loaded from")
    return Path(path)


def _candidate_dir(source: Path, work: Path, method: str, whole_directory: bool) -> Path:
    """A fresh directory holding the source directory's files other than its program (only
    its signature.json when the model was named as a single file)."""
    out = work / method
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for p in source.parent.iterdir():
        if not whole_directory and p.name != modelio.SIGNATURE_FILE:
            continue
        if p.is_file() and p != source and p.suffix not in MODEL_SUFFIXES \
                and p.name not in (contract.RESULT_FILE, modelio.LEPTON_FILE):
            shutil.copy2(p, out / p.name)
    return out


def calibration_batches(loaded: modelio.LoadedModel, inputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Up to CALIBRATION_ROWS rows of the gate's inputs, in batches of CALIBRATION_BATCH."""
    rows = min(CALIBRATION_ROWS, len(next(iter(inputs.values()))))
    return [{k: v[i:i + CALIBRATION_BATCH] for k, v in inputs.items()} for i in range(0, rows, CALIBRATION_BATCH)]


def apply(method: str, loaded: modelio.LoadedModel, inputs: dict[str, np.ndarray],
          work: Path, whole_directory: bool = True) -> tuple[modelio.LoadedModel, dict[str, Any], tuple]:
    """Compress an exported program; returns (candidate loaded by modelio, extra result
    fields, ("dir", candidate directory)). ``inputs``: the gate's inputs (calibration);
    ``whole_directory``: the model was named by its directory (not by its file), whose
    other files the artifact keeps."""
    why = refusal(loaded.format, method)
    if why:
        raise Unavailable(why)
    source = _source_file(loaded)
    out = _candidate_dir(source, work, method, whole_directory)
    target = out / source.name
    if loaded.format == "torch.export":
        if not (out / modelio.SIGNATURE_FILE).exists():   # a re-exported program names its inputs args_N
            modelio.write_json_atomic(out / modelio.SIGNATURE_FILE, {
                "inputs": [s.to_json() for s in loaded.inputs], "outputs": [s.to_json() for s in loaded.outputs]})
        extra = _torch_export(method, loaded, source, target, calibration_batches(loaded, inputs))
    elif loaded.format == "onnx":
        extra = _onnx(method, loaded, source, target, calibration_batches(loaded, inputs))
    else:
        extra = _torchscript(method, source, target, out)
    return modelio.load(out, loaded.format), extra, ("dir", out)


# --- torch.export ----------------------------------------------------------------------------

class _Cast(nn.Module):
    """Runs ``inner`` in ``dtype``: floating inputs cast on entry, floating outputs to float32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner, self.dtype = inner.to(dtype), dtype

    def forward(self, *args):
        out = self.inner(*[a.to(self.dtype) if a.is_floating_point() else a for a in args])
        return torch.utils._pytree.tree_map(
            lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """convert_pt2e leaves the float weights registered beside their int8 copies; the
    re-export would store both."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)


def _reexport(module: nn.Module, loaded: modelio.LoadedModel, target: Path) -> None:
    example = loaded.prepare(loaded.sample(2, seed=3))
    args = tuple(example[s.name] for s in loaded.inputs)
    dynamic = tuple({0: torch.export.Dim.DYNAMIC} for _ in args)
    if isinstance(module, _Cast):       # forward(*args): one entry, the tuple of the arguments
        dynamic = (dynamic,)
    program = torch.export.export(module, args, dynamic_shapes=dynamic)
    torch.export.save(program, str(target))


def _torch_export(method: str, loaded: modelio.LoadedModel, source: Path, target: Path,
                  calibration: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    module = torch.export.load(str(source)).module()
    if method in ("fp16", "bf16"):
        _reexport(_Cast(module, {"fp16": torch.float16, "bf16": torch.bfloat16}[method]), loaded, target)
        return {}
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError as e:
        raise Unavailable(f"{method} of a torch.export program needs torchao's PT2E flow "
                          f"(torchao.quantization.pt2e): {e}") from None
    dynamic = method == "int8"
    quantizer = xiq.X86InductorQuantizer().set_global(
        xiq.get_default_x86_inductor_quantization_config(is_dynamic=dynamic))
    prepared = prepare_pt2e(module, quantizer)
    with torch.no_grad():
        for batch in calibration:
            x = loaded.prepare(batch)
            prepared(*[x[s.name] for s in loaded.inputs])
    converted = convert_pt2e(prepared)
    weights = sum(1 for n in converted.graph.nodes if "dequantize_per_channel" in str(n.target))
    if not weights:
        takes = ("dynamic quantization takes Linear layers; try int8-static" if dynamic
                 else "it takes convolutions and Linear layers")
        raise Unavailable(f"{method}: the X86 Inductor quantizer found no layer to quantize in this program ({takes})")
    _drop_unused_attributes(converted)
    _reexport(converted, loaded, target)
    return {"quantizer": "X86InductorQuantizer", "activations": "dynamic" if dynamic else "static",
            "quantized_weights": weights, **({} if dynamic else {"calibration_rows": _rows(calibration)})}


def _rows(calibration: list[dict[str, np.ndarray]]) -> int:
    return sum(len(next(iter(b.values()))) for b in calibration)


# --- ONNX ---------------------------------------------------------------------------------------

def _onnx(method: str, loaded: modelio.LoadedModel, source: Path, target: Path,
          calibration: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    import onnx
    from onnxruntime import quantization as q
    if method == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))
        return {"converter": "onnxruntime.transformers.float16"}
    # The graph goes to onnxruntime in memory: given a path, it writes its shape-inferred copy
    # next to the source, whose directory the compression pod may not write.
    graph = onnx.load(str(source))
    if method == "int8":
        q.quantize_dynamic(graph, str(target), weight_type=q.QuantType.QInt8)
        return {"quantizer": "onnxruntime.quantization.quantize_dynamic", "activations": "dynamic"}

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{s.name: loaded.prepare(b)[s.name].numpy() for s in loaded.inputs}
                                 for b in calibration])

        def get_next(self):
            return next(self.batches, None)
    q.quantize_static(graph, str(target), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      weight_type=q.QuantType.QInt8, activation_type=q.QuantType.QUInt8)
    return {"quantizer": "onnxruntime.quantization.quantize_static", "activations": "static",
            "calibration_rows": _rows(calibration)}


# --- TorchScript ----------------------------------------------------------------------------------

def _torchscript(method: str, source: Path, target: Path, out: Path) -> dict[str, Any]:
    dtype = {"fp16": "float16", "bf16": "bfloat16"}[method]
    program = torch.jit.load(str(source), map_location="cpu").to(modelio.DTYPES[dtype])
    torch.jit.save(program, str(target))
    modelio.write_json_atomic(out / modelio.LEPTON_FILE, {"format": "torchscript", "dtype": dtype})
    return {}
