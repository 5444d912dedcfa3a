"""Model formats behind one loader, and the built-in model directory.

Formats (:data:`FORMATS`), detected from the directory by :func:`detect_format` or named:

  builtin       ``model.pt`` (a state dict) plus ``meta.json`` (how to rebuild it): the
                directory that training and compression write
  torch.export  one ``*.pt2`` file written by ``torch.export.save``
  torchscript   one ``*.pt`` TorchScript archive (``torch.jit.save``) plus
                ``signature.json`` naming its inputs (TorchScript records no shapes);
                ``lepton.json`` ``{"dtype": "float16"}`` marks an archive cast to that
                dtype (inputs are cast on entry, floating outputs back to float32)
  huggingface   a transformers directory: ``config.json`` plus ``*.safetensors``
                (and a tokenizer, which turns text inputs into BYTES)
  onnx          one ``*.onnx`` file, run by onnxruntime on CPU (its first dimension
                must be dynamic: the batch)

meta.json keys (builtin):
  arch          architecture name in :mod:`lepton_trainer.models`
  config        keyword arguments for that architecture
  dataset       dataset name in :mod:`lepton_trainer.data`
  input_shape   per-example input shape, e.g. [64]
  dtype         parameter dtype: float32, float16 or bfloat16
  quantization  absent, or the name of the quantization applied before saving
  metrics       free-form numbers (accuracy, step, ...)

What loading runs: builtin and compressed artifacts load tensors with
``weights_only=True`` and rebuild code that ships in this package; torch.export loads a
serialized graph of ATen operators (no Python from the directory); TorchScript runs the
TorchScript program stored in the archive (that is the format); Hugging Face loads
safetensors only, ``local_files_only=True`` and ``trust_remote_code=False``, so only
architectures built into transformers load; ONNX runs the graph's standard operators in
onnxruntime (no custom-operator libraries are registered). ``signature.json`` and
``lepton.json`` are plain JSON.

:func:`load` returns a :class:`LoadedModel`: named, typed, shaped inputs and outputs
(``v2.TensorSpec``, batch dimension first) and a batched ``forward``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import models, v2
from .contract import MODEL_FILE, MODEL_FORMATS, MODEL_META_FILE

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




# --- formats -------------------------------------------------------------------------------

FORMATS = MODEL_FORMATS
SIGNATURE_FILE = "signature.json"     # optional names/types/shapes of inputs and outputs
LEPTON_FILE = "lepton.json"           # how a compressed non-builtin artifact was made
HF_WEIGHTS = "model.safetensors"

TORCH_TO_V2 = {torch.float32: "FP32", torch.float16: "FP16", torch.bfloat16: "BF16",
               torch.float64: "FP64", torch.int64: "INT64", torch.int32: "INT32",
               torch.int16: "INT16", torch.int8: "INT8", torch.uint8: "UINT8", torch.bool: "BOOL"}
V2_TO_TORCH = {v: k for k, v in TORCH_TO_V2.items()}


class FormatError(ValueError):
    """The directory is not a model of a known format, or not a valid one."""


def _one(directory: Path, pattern: str) -> Path | None:
    found = sorted(directory.glob(pattern))
    if len(found) > 1:
        raise FormatError(f"{directory} holds several {pattern} files ({[p.name for p in found]}); "
                          f"keep one")
    return found[0] if found else None


def _is_torchscript(path: Path) -> bool:
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def detect_format(path: str | os.PathLike) -> str:
    """The format of a model directory (or of a single model file)."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".pt2":
            return "torch.export"
        if p.suffix == ".onnx":
            return "onnx"
        if _is_torchscript(p):
            return "torchscript"
        raise FormatError(f"{p} is neither a torch.export .pt2 file nor a TorchScript archive")
    if not p.is_dir():
        raise FileNotFoundError(f"{p} not found")
    if (p / MODEL_META_FILE).exists():
        return "builtin"
    if (p / "config.json").exists() and (any(p.glob("*.safetensors")) or (p / LEPTON_FILE).exists()):
        return "huggingface"
    if _one(p, "*.pt2"):
        return "torch.export"
    if _one(p, "*.onnx"):
        return "onnx"
    ts = [f for f in sorted(p.glob("*.pt")) if _is_torchscript(f)]
    if len(ts) == 1:
        return "torchscript"
    if (p / "config.json").exists():
        raise FormatError(f"{p} has config.json but no *.safetensors weights; only safetensors are "
                          f"loaded (pickled pytorch_model.bin files can run code)")
    raise FormatError(f"cannot tell the format of {p}: expected meta.json (builtin), a *.pt2 "
                      f"(torch.export), a TorchScript *.pt with signature.json, config.json "
                      f"with *.safetensors (huggingface), or a *.onnx file")


def _specs(entries: Any, what: str) -> list[v2.TensorSpec]:
    if not isinstance(entries, list) or not entries:
        raise FormatError(f"{SIGNATURE_FILE}: {what!r} must be a non-empty list")
    out = []
    for e in entries:
        if (not isinstance(e, dict) or not isinstance(e.get("name"), str)
                or e.get("datatype") not in v2.DATATYPES or not isinstance(e.get("shape"), list)
                or not all(type(d) is int and (d == -1 or d > 0) for d in e["shape"]) or not e["shape"]
                or e["shape"][0] != -1):
            raise FormatError(f"{SIGNATURE_FILE}: each of {what!r} needs a name, a v2 datatype and a "
                              f"shape whose first (batch) dimension is -1; got {e!r}")
        out.append(v2.TensorSpec(e["name"], e["datatype"], tuple(e["shape"])))
    return out


def read_signature(directory: Path) -> dict[str, Any]:
    path = directory / SIGNATURE_FILE
    if not path.exists():
        return {}
    try:
        sig = json.loads(path.read_text())
    except ValueError as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(sig, dict):
        raise FormatError(f"{path} must hold a JSON object")
    return sig


def to_torch(arr: np.ndarray, datatype: str) -> torch.Tensor:
    if datatype == "BF16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_numpy(t: torch.Tensor, datatype: str) -> np.ndarray:
    t = t.detach().cpu()
    if datatype == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(V2_TO_TORCH[datatype]).numpy() if datatype in V2_TO_TORCH else t.numpy()


def _name_outputs(out: Any, names: list[str] | None) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        flat = {"output": out}
    elif isinstance(out, dict):
        flat = {str(k): v for k, v in out.items() if isinstance(v, torch.Tensor)}
    elif isinstance(out, (tuple, list)):
        flat = {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    else:
        raise FormatError(f"the model returned {type(out).__name__}; expected tensors")
    if names:
        if len(names) != len(flat):
            raise FormatError(f"{SIGNATURE_FILE} names {len(names)} outputs; the model returns {len(flat)}")
        flat = dict(zip(names, flat.values()))
    return flat


class LoadedModel:
    """A model with a v2 signature. ``prepare`` turns request tensors into model tensors
    (per request, e.g. tokenizing text); ``forward`` runs a batch of prepared tensors
    (concatenated along dimension 0) and returns every output; ``module`` is the torch
    module that compression works on, when the format has one."""

    format: str = ""
    platform: str = "pytorch"
    inputs: list[v2.TensorSpec]
    outputs: list[v2.TensorSpec]
    module: nn.Module | None = None
    meta: dict[str, Any]

    def prepare(self, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {s.name: to_torch(tensors[s.name], s.datatype) for s in self.inputs}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sample(self, rows: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """Request tensors for a warm-up or a fidelity check (random within the signature)."""
        g = np.random.default_rng(seed)
        out = {}
        for s in self.inputs:
            shape = [rows] + [d if d != -1 else 8 for d in s.shape[1:]]
            if s.datatype == "BYTES":
                out[s.name] = np.array([t.encode() for t in sample_texts(rows, seed)],
                                       dtype=object).reshape(shape)
            elif s.datatype == "BOOL":
                out[s.name] = g.random(shape) > 0.5
            elif s.datatype.startswith(("INT", "UINT")):
                out[s.name] = g.integers(0, 2, shape).astype(v2.NUMPY[s.datatype])
            elif s.datatype == "BF16":
                out[s.name] = v2.float32_to_bf16(g.standard_normal(shape).astype(np.float32))
            else:
                out[s.name] = g.standard_normal(shape).astype(v2.NUMPY[s.datatype])
        return out

    # dynamic batching hooks: which prepared requests may share a forward pass, how they
    # are joined, and how one request's rows of the batched outputs are cut back
    def batch_key(self, x: dict[str, torch.Tensor]) -> Any:
        return tuple((k, t.dtype, tuple(t.shape[1:])) for k, t in sorted(x.items()))

    def collate(self, xs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}

    def uncollate(self, out: dict[str, torch.Tensor], x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return out

    def run(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """prepare + forward + conversion to the output datatypes, in one call."""
        with torch.inference_mode():
            out = self.forward(self.prepare(tensors))
        return {s.name: to_numpy(out[s.name], s.datatype) for s in self.outputs}

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "quantization": self.meta.get("quantization"),
                "dtype": self.meta.get("dtype", "float32")}


_TEXTS = ("The quick brown fox jumps over the lazy dog.", "A man is eating food.",
          "Inference servers batch requests to use the hardware well.",
          "It is raining in the city tonight.", "Quantization stores weights in eight bits.",
          "Two children play football in the park.", "The stock market fell sharply today.",
          "She plays the violin beautifully.", "How do I reset my password?",
          "Kubernetes schedules pods onto nodes.", "A cat sleeps on the warm windowsill.",
          "The recipe needs two cups of flour.")


def sample_texts(n: int, seed: int = 0) -> list[str]:
    """Deterministic sample sentences for text models without gate data."""
    return [_TEXTS[(seed + i) % len(_TEXTS)] + ("" if i < len(_TEXTS) else f" ({i})") for i in range(n)]


class BuiltinModel(LoadedModel):
    """meta.json + model.pt: one FP32 input ``input``; ``logits``, ``probabilities`` and
    ``predicted_class`` outputs."""
    format = "builtin"

    def __init__(self, directory: Path):
        self.module, self.meta = load_model(directory)
        shape = list(self.meta.get("input_shape") or [self.meta["config"]["in_features"]])
        self.inputs = [v2.TensorSpec("input", "FP32", (-1, *shape))]
        classes = int(self.forward({"input": torch.zeros(1, *shape)})["logits"].shape[1])
        self.outputs = [v2.TensorSpec("logits", "FP32", (-1, classes)),
                        v2.TensorSpec("probabilities", "FP32", (-1, classes)),
                        v2.TensorSpec("predicted_class", "INT64", (-1,))]

    @torch.inference_mode()
    def forward(self, batch):
        logits = self.module(batch["input"].to(models.param_dtype(self.module))).float()
        return {"logits": logits, "probabilities": torch.softmax(logits, dim=1),
                "predicted_class": logits.argmax(dim=1)}

    def describe(self):
        return {**super().describe(), "arch": self.meta.get("arch")}


class _GraphModel(LoadedModel):
    """Shared by torch.export and TorchScript: positional tensor inputs, tensor outputs."""
    output_names: list[str] | None = None

    def _probe_outputs(self) -> list[v2.TensorSpec]:
        out = self.forward(self.prepare(self.sample(1)))
        out2 = self.forward(self.prepare(self.sample(2)))
        specs = []
        for name, t in out.items():
            if t.dtype not in TORCH_TO_V2:
                raise FormatError(f"output {name!r} has dtype {t.dtype}, which has no v2 datatype")
            if t.dim() == 0 or out2[name].shape[0] != 2:
                raise FormatError(f"output {name!r} has no batch dimension (shape {list(t.shape)} "
                                  f"for one row); every output must be batched along dimension 0")
            specs.append(v2.TensorSpec(name, TORCH_TO_V2[t.dtype], (-1, *t.shape[1:])))
        return specs

    @torch.inference_mode()
    def forward(self, batch):
        out = self.callable(*[batch[s.name] for s in self.inputs])
        return _name_outputs(out, self.output_names)


def _uses_pt2e_operators(path: Path) -> bool:
    """Whether a .pt2 archive's graph calls quantized_decomposed operators (PT2E int8)."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any(b"quantized_decomposed" in z.read(n) for n in z.namelist()
                       if "/models/" in n and n.endswith(".json"))
    except (zipfile.BadZipFile, OSError):
        return False


class ExportedModel(_GraphModel):
    format = "torch.export"

    def __init__(self, path: Path, signature: dict[str, Any]):
        if _uses_pt2e_operators(path):
            try:    # registers the quantized_decomposed operators of int8 (PT2E) programs
                import torchao.quantization.pt2e  # noqa: F401
            except ImportError as e:
                raise FormatError(f"{path.name} is an int8 (PT2E) program; loading it needs torchao: {e}") from None
        ep = torch.export.load(str(path))
        self.meta, self.path = {"file": path.name}, path
        user_inputs = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        specs = []
        for s in user_inputs:
            val = nodes[s.arg.name].meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dtype not in TORCH_TO_V2:
                raise FormatError(f"input {s.arg.name!r} of {path.name} is not a tensor of a v2 datatype")
            shape = tuple(d if isinstance(d, int) else -1 for d in val.shape)
            specs.append(v2.TensorSpec(s.arg.name, TORCH_TO_V2[val.dtype], (-1, *shape[1:])))
        self.inputs = _specs(signature["inputs"], "inputs") if "inputs" in signature else specs
        self.callable = ep.module()
        self.output_names = [o["name"] for o in signature["outputs"]] if "outputs" in signature else None
        self.outputs = self._probe_outputs()


class TorchScriptModel(_GraphModel):
    format = "torchscript"
    platform = "pytorch_libtorch"

    def __init__(self, path: Path, signature: dict[str, Any]):
        if "inputs" not in signature:
            raise FormatError(f"TorchScript {path.name} needs {SIGNATURE_FILE} beside it declaring its "
                              f"inputs (name, datatype, shape): a TorchScript archive records no shapes")
        lepton = path.parent / LEPTON_FILE
        self.meta = {**(json.loads(lepton.read_text()) if lepton.exists() else {}), "file": path.name}
        self.path = path
        self.dtype = DTYPES[self.meta.get("dtype", "float32")]
        self.inputs = _specs(signature["inputs"], "inputs")
        self.callable = torch.jit.load(str(path), map_location="cpu").eval()
        self.output_names = [o["name"] for o in signature["outputs"]] if "outputs" in signature else None
        self.outputs = self._probe_outputs()

    @torch.inference_mode()
    def forward(self, batch):
        """A program cast to float16 / bfloat16 (``lepton.json`` ``dtype``) takes floating
        inputs in that dtype and answers float32, as its signature says."""
        if self.dtype == torch.float32:
            return super().forward(batch)
        out = super().forward({k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()})
        return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


class HuggingFaceModel(LoadedModel):
    """A transformers directory. With a tokenizer, the input is ``text`` (BYTES, one string
    per row) and the server tokenizes; without one, the tokenizer's outputs are the inputs.
    Outputs are the model's own (``last_hidden_state``, ``pooler_output``, ``logits``...),
    plus ``sentence_embedding`` when the directory is a sentence-transformers model whose
    pooling is mean or CLS (``modules.json``, ``1_Pooling/config.json``; plain JSON)."""
    format = "huggingface"
    platform = "pytorch"

    def __init__(self, directory: Path, module: nn.Module | None = None):
        from transformers import AutoConfig, AutoTokenizer
        self.directory = directory
        self.meta = json.loads((directory / LEPTON_FILE).read_text()) if (directory / LEPTON_FILE).exists() else {}
        config = AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        self.module = module if module is not None else load_hf_module(directory, config, self.meta)
        self.module.eval()
        self.tokenizer = None
        if any((directory / f).exists() for f in TOKENIZER_FILES):
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True,
                                                           trust_remote_code=False)
        self.max_length = _hf_max_length(directory, config, self.tokenizer)
        self.pooling, self.normalize = _st_pooling(directory)
        if self.tokenizer is not None:
            self.inputs = [v2.TensorSpec("text", "BYTES", (-1,))]
        else:
            self.inputs = [v2.TensorSpec("input_ids", "INT64", (-1, -1)),
                           v2.TensorSpec("attention_mask", "INT64", (-1, -1))]
        out = self.forward(self.prepare(self.sample(1)))
        self.outputs = []
        for name, t in out.items():
            shape = (-1, -1, *t.shape[2:]) if t.dim() >= 3 else (-1, *t.shape[1:])
            self.outputs.append(v2.TensorSpec(name, "FP32", shape))

    def prepare(self, tensors):
        if self.tokenizer is None:
            return super().prepare(tensors)
        texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
                 for t in tensors["text"].reshape(-1)]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return dict(enc)

    def batch_key(self, x):
        if self.tokenizer is None:
            return super().batch_key(x)
        return ("tokens", tuple(sorted(x)))          # any lengths: collate pads

    def collate(self, xs):
        if self.tokenizer is None or len({x["input_ids"].shape[1] for x in xs}) == 1:
            return super().collate(xs)
        length = max(x["input_ids"].shape[1] for x in xs)
        pad_id = self.tokenizer.pad_token_id or 0
        side = self.tokenizer.padding_side

        def pad(t, value):
            extra = length - t.shape[1]
            if not extra:
                return t
            fill = torch.full((t.shape[0], extra), value, dtype=t.dtype)
            return torch.cat([t, fill] if side == "right" else [fill, t], dim=1)
        return {k: torch.cat([pad(x[k], pad_id if k == "input_ids" else 0) for x in xs]) for k in xs[0]}

    def uncollate(self, out, x):
        if self.tokenizer is None:
            return out
        n = x["input_ids"].shape[1]
        keep = (lambda t: t[:, :n]) if self.tokenizer.padding_side == "right" else (lambda t: t[:, -n:])
        return {k: (keep(v) if v.dim() >= 3 else v) for k, v in out.items()}

    @torch.inference_mode()
    def forward(self, batch):
        return self.outputs_of(self.module, batch)

    def outputs_of(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``module``'s named outputs for a prepared batch, differentiable (distillation
        trains a student through it)."""
        out = module(**batch)
        result = {k: v.float() for k, v in out.items() if isinstance(v, torch.Tensor) and v.dim() >= 2}
        if self.pooling and "last_hidden_state" in result:
            result["sentence_embedding"] = pool(result["last_hidden_state"], batch["attention_mask"],
                                                self.pooling, self.normalize)
        return result

    def describe(self):
        return {**super().describe(), "arch": (getattr(self.module.config, "architectures", None) or [None])[0]}


ONNX_TO_V2 = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
              "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(int16)": "INT16",
              "tensor(int8)": "INT8", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
              "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL"}


class OnnxModel(LoadedModel):
    """An ONNX graph in onnxruntime (CPU); names, types and shapes from the graph."""
    format = "onnx"
    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, signature: dict[str, Any]):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise FormatError(f"ONNX models need the onnxruntime package: {e}") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3     # errors only: graph-optimizer notes (unused initializers) are no news
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.meta, self.path = {"file": path.name}, path

        def specs(nodes, what):
            out = []
            for n in nodes:
                if n.type not in ONNX_TO_V2:
                    raise FormatError(f"{what} {n.name!r} of {path.name} has type {n.type}, which the "
                                      f"server does not carry")
                shape = [d if isinstance(d, int) else -1 for d in n.shape]
                if not shape or shape[0] != -1:
                    raise FormatError(f"{what} {n.name!r} of {path.name} has shape {n.shape}: its first "
                                      f"dimension must be dynamic (the batch) for the server to batch it")
                out.append(v2.TensorSpec(n.name, ONNX_TO_V2[n.type], tuple(shape)))
            return out
        self.inputs = _specs(signature["inputs"], "inputs") if "inputs" in signature else \
            specs(self.session.get_inputs(), "input")
        self.outputs = specs(self.session.get_outputs(), "output")
        self._names = [o.name for o in self.session.get_outputs()]

    def forward(self, batch):
        feeds = {s.name: batch[s.name].numpy() for s in self.inputs}
        return {n: torch.from_numpy(np.asarray(v)) for n, v in zip(self._names, self.session.run(None, feeds))}


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """sentence-transformers' Pooling (mean or cls) and Normalize, with the same arithmetic."""
    if mode == "cls":
        emb = hidden[:, 0]
    else:
        m = mask.unsqueeze(-1).expand(hidden.size()).to(hidden.dtype)
        emb = torch.sum(hidden * m, 1) / torch.clamp(m.sum(1), min=1e-9)
    return torch.nn.functional.normalize(emb, p=2, dim=1) if normalize else emb


def _st_pooling(directory: Path) -> tuple[str | None, bool]:
    modules_path = directory / "modules.json"
    if not modules_path.exists():
        return None, False
    try:
        modules = json.loads(modules_path.read_text())
        types = {m.get("type", ""): m.get("path", "") for m in modules}
        pooling_dir = next((p for t, p in types.items() if t.endswith("models.Pooling")), None)
        if pooling_dir is None:
            return None, False
        cfg = json.loads((directory / pooling_dir / "config.json").read_text())
    except (ValueError, OSError, AttributeError):
        return None, False
    modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    mode = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}.get(modes[0]) if len(modes) == 1 else None
    return mode, any(t.endswith("models.Normalize") for t in types)


def _hf_max_length(directory: Path, config: Any, tokenizer: Any) -> int:
    limit = int(getattr(config, "max_position_embeddings", 512) or 512)
    st = directory / "sentence_bert_config.json"
    if st.exists():
        try:
            return min(limit, int(json.loads(st.read_text())["max_seq_length"]))
        except (ValueError, KeyError, TypeError):
            pass
    if tokenizer is not None and 0 < getattr(tokenizer, "model_max_length", 0) < 100_000:
        return min(limit, int(tokenizer.model_max_length))
    return limit


def _hf_auto_class(config: Any):
    import transformers
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return transformers.AutoModelForSequenceClassification
    if arch.endswith("ForTokenClassification"):
        return transformers.AutoModelForTokenClassification
    return transformers.AutoModel


def load_hf_module(directory: Path, config: Any = None, lepton: dict | None = None) -> nn.Module:
    """The transformers module of a directory: safetensors weights, or (for an int8
    artifact) the model built from config.json, quantized, and its state dict loaded
    with ``weights_only=True``."""
    from transformers import AutoConfig
    config = config or AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
    cls = _hf_auto_class(config)
    lepton = lepton or {}
    if lepton.get("quantization"):
        from . import quantization
        model = cls.from_config(config)
        model = quantization.prepare_for_load(model.eval(), lepton["quantization"])
        model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
        return model.eval()
    return cls.from_pretrained(directory, local_files_only=True, trust_remote_code=False,
                               use_safetensors=True).eval()


def load(path: str | os.PathLike, fmt: str | None = None) -> LoadedModel:
    """Load any supported model directory (or single model file) as a :class:`LoadedModel`."""
    p = Path(path)
    fmt = fmt or detect_format(p)
    if fmt not in FORMATS:
        raise FormatError(f"unknown model format {fmt!r}; known: {list(FORMATS)}")
    directory = p if p.is_dir() else p.parent
    signature = read_signature(directory)
    if fmt == "builtin":
        return BuiltinModel(directory)
    if fmt == "huggingface":
        return HuggingFaceModel(directory)
    if fmt == "onnx":
        f = p if p.is_file() else _one(p, "*.onnx")
        if f is None:
            raise FormatError(f"no *.onnx file in {p}")
        return OnnxModel(f, signature)
    if fmt == "torch.export":
        f = p if p.is_file() else _one(p, "*.pt2")
        if f is None:
            raise FormatError(f"no *.pt2 file in {p}")
        return ExportedModel(f, signature)
    f = p if p.is_file() else next((x for x in sorted(p.glob("*.pt")) if _is_torchscript(x)), None)
    if f is None:
        raise FormatError(f"no TorchScript *.pt archive in {p}")
    return TorchScriptModel(f, signature)


def size_bytes(path: str | os.PathLike) -> int:
    """Bytes of a model: its weight files (a built-in model.pt, or every file of another format)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if (p / MODEL_META_FILE).exists():
        return (p / MODEL_FILE).stat().st_size
    weights = [f for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".pt", ".pt2", ".bin", ".onnx")]
    return sum(f.stat().st_size for f in weights)
