"""``python -m lepton_trainer.compress``: compress a model behind a gate, or let ``auto`` choose.

A language model (``--task`` / ``LEPTON_TASK`` ``text-generation``) is handed over to
:mod:`lepton_trainer.llm.compress` (weight-only int8/int4, casts, the perplexity gate).

Methods (any format with a torch module: builtin and Hugging Face; exported programs,
torch.export, TorchScript and ONNX, take the methods of ``contract.EXPORTED_FORMAT_METHODS``,
implemented in :mod:`exported`: PT2E and onnxruntime quantization, casts):
  int8              dynamic int8 quantization of the Linear layers (backend: quantization.py)
  int8-static       exported programs only: int8 with activations calibrated on the gate's inputs
  fp16, bf16        parameters cast to float16 / bfloat16
  prune-structured  removes the weakest hidden units (L2 norm of their weights) of every
                    MLP hidden layer, or of every transformer feed-forward block: the
                    matrices shrink, so do the file and the latency (``amount``, 0.25)
  prune             unstructured global L1 magnitude pruning to ``sparsity``: the zeros
                    are stored densely and run through dense kernels, so it brings no
                    size or speed gain; the result says so (``effective: false``)
  distill           a smaller student trained on the teacher's outputs: for a builtin
                    model an MLP of ``studentHidden`` units on its data set; for a Hugging
                    Face model the student of ``student`` ({layers: N}: N of the teacher's
                    own layers, evenly spaced; or {path: dir}: a student directory), trained
                    on the inputs of the ``data`` file to match the gated output
  none              the model unchanged (the result still records its numbers)
  auto              tries ``candidates`` (default int8, fp16, bf16, prune-structured; for an
                    exported program int8-static first; one that cannot apply is listed as
                    unavailable with its reason), measures size, gate metric and latency
                    (at most ``--latency-iters`` passes within ``--latency-budget`` seconds
                    per model) of each on this machine (a candidate already larger, or for
                    ``objective: latency`` slower, than one that passed is not measured
                    further and says so, ``skipped``, unless ``measureAll``), and
                    keeps the smallest (``objective: size``) or the fastest (``latency``)
                    that passes the gate and the optional ``latencyTargetMs`` (p50 at
                    ``latencyBatch`` rows, default 1); the whole table goes into the result

The gate is :mod:`gates`: labelled data with a metric, or fidelity to the original
(``LEPTON_COMPRESSION_EVALUATION``). If the gate fails, the command exits with status 3,
prints why, and writes no artifact; if nothing could be compressed, or ``auto`` rejected
every candidate without a failed gate, it exits 1 with the reason. Each phase (loading,
the gate's reference, each candidate's apply, gate and latency) is one flushed log line, followed
by its machine-readable twin on stdout (``contract.PROGRESS_PREFIX`` and a JSON object: candidate
k of n, method, activity, since) that the operator shows in the model's status. Otherwise the artifact directory receives a model
of the same format and ``result.json``; the same compact JSON goes to the
termination-message path, where the operator reads it. A failed gate writes its JSON
(``passed: false``) to the termination-message path only. ``passed`` and ``reason`` are
the verdict: the operator reports them and never re-derives them.

Every flag falls back to an environment variable (contract.py); method parameters also
come as a JSON object in LEPTON_COMPRESSION_PARAMS with keys ``sparsity``, ``amount``,
``studentHidden``, ``student``, ``data``, ``epochs``, ``lr``, ``batchSize``, ``temperature``,
``backend``, and for ``auto``:
``candidates``, ``objective``, ``latencyTargetMs``, ``latencyBatch``, ``measureAll``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as tprune

from . import contract, data, exported, gates, modelio, models, quantization

log = logging.getLogger("lepton_trainer.compress")

METHODS = contract.COMPRESSION_METHODS
AUTO_CANDIDATES = ("int8", "fp16", "bf16", "prune-structured")
AUTO_CANDIDATES_EXPORTED = ("int8-static", "int8", "fp16", "bf16", "prune-structured")   # likely smallest first
OBJECTIVES = contract.AUTO_OBJECTIVES
ENV_TERMINATION_MESSAGE_PATH = "LEPTON_TERMINATION_MESSAGE_PATH"
TERMINATION_MESSAGE_LIMIT = 4096   # the kubelet truncates termination messages at 4 KiB
GATE_FAILED_EXIT = contract.COMPRESS_EXIT_GATE_FAILED


class GateFailed(Exception):
    """No artifact: a gate ran and failed (``gate_failed``), or every candidate that ran was
    rejected for another reason (a latency target, no gain)."""

    def __init__(self, result: dict[str, Any], gate_failed: bool = True):
        self.result, self.gate_failed = result, gate_failed
        super().__init__(result["reason"])


class MethodUnavailable(ValueError):
    """The method cannot apply to this model (format or architecture)."""


# --- measurement -----------------------------------------------------------------------

@torch.inference_mode()
def latency_p50_ms(model: nn.Module, example: torch.Tensor, batch: int, iters: int = 100,
                   warmup: int = 10) -> float:
    """Median wall time of one forward pass at ``batch`` rows, on CPU, in milliseconds."""
    model.eval()
    x = example[:1].repeat(batch, *([1] * (example.dim() - 1))).to(models.param_dtype(model))
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1000.0 * times[len(times) // 2]


def state_dict_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


# --- methods -----------------------------------------------------------------------------

def prune_global(model: nn.Module, sparsity: float) -> nn.Module:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    params = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
    for module, name in params:
        tprune.remove(module, name)
    return model


def sparsity_of(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(1, total)


def distill(teacher: nn.Module, split: data.Split, hidden: int, epochs: int,
            temperature: float, alpha: float = 0.7, seed: int = 0) -> tuple[nn.Module, dict]:
    """Train an MLP student on ``alpha`` * KL(teacher/T || student/T) * T^2 + (1-alpha) * CE."""
    torch.manual_seed(seed)
    config = {"in_features": split.num_features, "hidden": hidden, "layers": 1,
              "num_classes": split.num_classes}
    student = models.build("mlp", **config)
    teacher.eval()
    with torch.no_grad():
        soft = F.softmax(teacher(split.x_train.to(models.param_dtype(teacher))).float() / temperature, dim=1)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        student.train()
        for idx in torch.randperm(len(split.x_train), generator=gen).split(64):
            logits = student(split.x_train[idx])
            kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft[idx],
                          reduction="batchmean") * temperature ** 2
            loss = alpha * kd + (1 - alpha) * F.cross_entropy(logits, split.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return student.eval(), config


def apply_method(method: str, model: nn.Module, meta: dict, split: data.Split,
                 params: dict) -> tuple[nn.Module, dict, dict]:
    """Compress ``model``; returns (model, meta for its directory, extra result fields)."""
    meta = copy.deepcopy(meta)
    meta.pop("quantization", None)
    extra: dict[str, Any] = {}
    if method == "int8":
        backend = params.get("backend") or quantization.default_backend("cpu")
        model = quantization.quantize_int8(model, backend)
        meta.update(dtype="float32", quantization=quantization.quant_name(backend))
        extra["backend"] = backend
    elif method in ("fp16", "bf16"):
        meta["dtype"] = {"fp16": "float16", "bf16": "bfloat16"}[method]
        model = model.to(modelio.DTYPES[meta["dtype"]])
    elif method == "prune":
        model = prune_global(model, float(params.get("sparsity", 0.5)))
        extra["sparsity"] = round(sparsity_of(model), 4)
    elif method == "distill":
        model, config = distill(model, split, int(params.get("studentHidden", 64)),
                                int(params.get("epochs", 30)), float(params.get("temperature", 4.0)))
        meta.update(arch="mlp", config=config, dtype="float32")
        extra["student"] = config
    elif method != "none":
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    return model, meta, extra


# --- distillation of a Hugging Face model ---------------------------------------------------

def _layer_list(module: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, list) of the transformer's stack of layers: the outermost
    ModuleList with ``config.num_hidden_layers`` entries (``encoder.layer`` for BERT)."""
    n = getattr(module.config, "num_hidden_layers", None)
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and n and len(m) == n:
            parent_name, _, attr = name.rpartition(".")
            return module.get_submodule(parent_name) if parent_name else module, attr, m
    raise MethodUnavailable("distill with student.layers needs a transformer with a stack of "
                            "config.num_hidden_layers layers; name a student directory in student.path")


def student_from_layers(teacher: nn.Module, layers: int) -> tuple[nn.Module, list[int]]:
    """A copy of ``teacher`` that keeps ``layers`` of its transformer layers, evenly spaced
    from the first to the last (embeddings, pooler and heads unchanged): the student's
    starting point, as DistilBERT starts from every other layer of BERT."""
    student = copy.deepcopy(teacher)
    parent, attr, stack = _layer_list(student)
    n = len(stack)
    if not 1 <= layers < n:
        raise ValueError(f"student.layers must be between 1 and {n - 1} (the teacher has {n} layers), got {layers}")
    keep = [round(i * (n - 1) / (layers - 1)) for i in range(layers)] if layers > 1 else [n - 1]
    setattr(parent, attr, nn.ModuleList([stack[i] for i in keep]))
    student.config.num_hidden_layers = layers
    return student, keep


def _distill_loss(name: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    """KL divergence of the softened distributions for ``logits``; for any other output
    (embeddings, hidden states) the mean squared error plus one minus the cosine similarity
    of its rows, over real tokens only for per-token outputs."""
    if name == "logits":
        return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.softmax(teacher / temperature, dim=-1),
                        reduction="batchmean") * temperature ** 2
    if student.dim() == 3 and mask is not None:
        keep = mask.bool()
        student, teacher = student[keep], teacher[keep]
    student, teacher = student.reshape(len(student), -1), teacher.reshape(len(teacher), -1)
    return F.mse_loss(student, teacher) + (1 - F.cosine_similarity(student, teacher, dim=1)).mean()


def distill_hf(loaded: modelio.LoadedModel, params: dict, output: str) -> tuple[nn.Module, dict]:
    """Train a student of a Hugging Face model on the teacher's ``output`` (the gated output).

    ``params.student`` is ``{"layers": N}`` (the teacher's own layers, N of them, as the
    starting point) or ``{"path": dir}`` (a Hugging Face directory whose model reads the
    teacher's tokenizer and answers ``output`` in the same shape). ``params.data`` is a
    file of training inputs, in the gate's formats (labels are not needed: the teacher
    labels them). ``epochs`` (3), ``lr`` (1e-4), ``batchSize`` (16) and, for logits,
    ``temperature`` (2) tune the training."""
    spec, path = params.get("student"), params.get("data")
    if not isinstance(spec, dict) or ("layers" in spec) == ("path" in spec):
        raise MethodUnavailable("distill of a Hugging Face model needs params.student: "
                                "{layers: N} (keep N of the teacher's layers) or {path: a student directory}")
    if not path:
        raise MethodUnavailable("distill of a Hugging Face model needs params.data: a file of training inputs "
                                "(.npz, .pt, .safetensors or .jsonl, as the gate's files)")
    epochs, lr = int(params.get("epochs", 3)), float(params.get("lr", 1e-4))
    batch_size, temperature = int(params.get("batchSize", 16)), float(params.get("temperature", 2.0))
    if epochs < 0 or batch_size < 1 or lr <= 0 or temperature <= 0:
        raise ValueError(f"distill needs epochs >= 0, batchSize >= 1, lr > 0 and temperature > 0; got "
                         f"{epochs}, {batch_size}, {lr}, {temperature}")
    if "layers" in spec:
        student, kept = student_from_layers(loaded.module, int(spec["layers"]))
        extra: dict[str, Any] = {"student": {"layers": len(kept), "from_teacher_layers": kept,
                                             "teacher_layers": loaded.module.config.num_hidden_layers}}
    else:
        directory = Path(spec["path"])
        if not (directory / "config.json").exists():
            raise FileNotFoundError(f"student.path {directory} is not a Hugging Face directory (no config.json)")
        student = modelio.load_hf_module(directory)
        extra = {"student": {"path": str(directory)}}
    inputs, _ = gates.load_data(path, loaded)
    rows = len(next(iter(inputs.values())))
    batches = []
    for i in range(0, rows, batch_size):
        batch = loaded.prepare({k: v[i:i + batch_size] for k, v in inputs.items()})
        with torch.no_grad():
            target = loaded.outputs_of(loaded.module, batch)[output]
        batches.append((batch, target))
    with torch.no_grad():
        got = loaded.outputs_of(student.eval(), batches[0][0])
    if output not in got or got[output].shape != batches[0][1].shape:
        raise ValueError(f"the student's {output!r} has shape {list(got[output].shape) if output in got else None}; "
                         f"the teacher's has {list(batches[0][1].shape)}")
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(epochs):
        total = 0.0
        for j in torch.randperm(len(batches), generator=gen).tolist():
            batch, target = batches[j]
            loss = _distill_loss(output, loaded.outputs_of(student, batch)[output], target,
                                 batch.get("attention_mask"), temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(target)
        losses.append(round(total / rows, 6))
    extra.update(train_rows=rows, epochs=epochs, loss_per_epoch=losses)
    return student.eval(), extra


# --- structured pruning ----------------------------------------------------------------------

def _keep(importance: torch.Tensor, amount: float) -> torch.Tensor:
    k = max(1, int(round(len(importance) * (1.0 - amount))))
    return torch.sort(torch.topk(importance, k).indices).values


def _shrink_pair(first: nn.Linear, second: nn.Linear, amount: float) -> tuple[nn.Linear, nn.Linear, int]:
    """Keep the strongest hidden units between ``first`` (in -> hidden) and ``second``
    (hidden -> out); importance = |row of first| * |column of second| (L2)."""
    importance = first.weight.detach().float().norm(dim=1) * second.weight.detach().float().norm(dim=0)
    idx = _keep(importance, amount)
    a = nn.Linear(first.in_features, len(idx), bias=first.bias is not None).to(first.weight.dtype)
    b = nn.Linear(len(idx), second.out_features, bias=second.bias is not None).to(second.weight.dtype)
    with torch.no_grad():
        a.weight.copy_(first.weight[idx])
        if first.bias is not None:
            a.bias.copy_(first.bias[idx])
        b.weight.copy_(second.weight[:, idx])
        if second.bias is not None:
            b.bias.copy_(second.bias)
    return a, b, len(idx)


def prune_structured_mlp(model: models.MLP, config: dict, amount: float) -> tuple[nn.Module, dict]:
    """A narrower built-in MLP: every hidden layer keeps the same number of units."""
    linears = [m for m in model.net if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise MethodUnavailable("prune-structured needs at least one hidden layer")
    hidden = max(1, int(round(config["hidden"] * (1.0 - amount))))
    new = models.build("mlp", **{**config, "hidden": hidden})
    new_linears = [m for m in new.net if isinstance(m, nn.Linear)]
    keep_in = torch.arange(linears[0].in_features)
    for i, (old, dst) in enumerate(zip(linears, new_linears)):
        if i < len(linears) - 1:
            nxt = linears[i + 1]
            importance = old.weight.detach()[:, keep_in].float().norm(dim=1) * nxt.weight.detach().float().norm(dim=0)
            keep_out = torch.sort(torch.topk(importance, hidden).indices).values
        else:
            keep_out = torch.arange(old.out_features)
        with torch.no_grad():
            dst.weight.copy_(old.weight[keep_out][:, keep_in])
            dst.bias.copy_(old.bias[keep_out])
        keep_in = keep_out
    return new.eval(), {**config, "hidden": hidden}


def prune_structured_hf(module: nn.Module, amount: float) -> tuple[nn.Module, int]:
    """Narrower feed-forward blocks in a BERT-style transformers model
    (``*.intermediate.dense`` -> ``*.output.dense`` in each layer); config.intermediate_size
    follows, so the result saves and loads as an ordinary transformers directory."""
    pairs = []
    for name, mod in module.named_modules():
        inter = getattr(getattr(mod, "intermediate", None), "dense", None)
        out = getattr(getattr(mod, "output", None), "dense", None)
        if isinstance(inter, nn.Linear) and isinstance(out, nn.Linear) and out.in_features == inter.out_features:
            pairs.append(mod)
    if not pairs:
        raise MethodUnavailable("prune-structured knows BERT-style feed-forward blocks "
                                "(layer.intermediate.dense -> layer.output.dense); this model has none")
    width = None
    for layer in pairs:
        a, b, width = _shrink_pair(layer.intermediate.dense, layer.output.dense, amount)
        layer.intermediate.dense, layer.output.dense = a, b
    module.config.intermediate_size = width
    return module.eval(), width


def finetune(model: nn.Module, split: data.Split, epochs: int, seed: int = 0) -> nn.Module:
    """A few epochs of plain training on the built-in data set (recovers pruned accuracy)."""
    if epochs <= 0:
        return model
    return models.fit(model.train(), split.x_train, split.y_train,
                      steps=epochs * max(1, len(split.x_train) // 64), seed=seed)


# --- methods on a loaded model ------------------------------------------------------------------

def _hf_copy(loaded: modelio.LoadedModel, module: nn.Module) -> modelio.LoadedModel:
    c = copy.copy(loaded)
    c.module = module
    return c


def apply(method: str, loaded: modelio.LoadedModel, params: dict,
          split: data.Split | None, output: str | None = None) -> tuple[modelio.LoadedModel, dict, Any]:
    """Compress a loaded model; returns (candidate, extra result fields, how to save it).
    ``output`` is the output the gate scores (what a Hugging Face student learns)."""
    if method == "none" and loaded.format != "builtin":
        return loaded, {}, ("copy",)
    if method == "int8-static" and loaded.format not in exported.FORMATS:
        raise MethodUnavailable(f"int8-static (calibrated activations) is implemented for torch.export and ONNX "
                                f"programs; a {loaded.format} model takes int8 (dynamic)")
    if loaded.format == "builtin":
        meta = loaded.meta
        if method == "prune-structured":
            if meta["arch"] != "mlp":
                raise MethodUnavailable(f"prune-structured supports the mlp architecture, not {meta['arch']!r}")
            amount = float(params.get("amount", 0.25))
            if not 0.0 <= amount < 1.0:
                raise ValueError(f"amount must be in [0, 1), got {amount}")
            module, config = prune_structured_mlp(copy.deepcopy(loaded.module), meta["config"], amount)
            if split is not None:
                module = finetune(module, split, int(params.get("epochs", 3))).eval()
            new_meta = {**copy.deepcopy(meta), "config": config, "dtype": "float32"}
            new_meta.pop("quantization", None)
            extra = {"hidden_before": meta["config"]["hidden"], "hidden_after": config["hidden"], "amount": amount}
        else:
            if method == "distill" and split is None:
                raise MethodUnavailable("distill needs the model's built-in data set")
            module, new_meta, extra = apply_method(method, copy.deepcopy(loaded.module), meta, split, params)
        cand = copy.copy(loaded)
        cand.module, cand.meta = module.eval(), new_meta
        return cand, extra, ("builtin", module, new_meta)
    if loaded.format == "huggingface":
        # The methods that change weights in place get a copy; distill builds its own student.
        module = loaded.module if method == "distill" else copy.deepcopy(loaded.module)
        extra: dict[str, Any] = {}
        lepton: dict[str, Any] = {"format": "huggingface"}
        if method == "int8":
            backend = params.get("backend") or quantization.default_backend("cpu")
            module = quantization.quantize_int8(module, backend)
            lepton["quantization"] = quantization.quant_name(backend)
            extra["backend"] = backend
        elif method in ("fp16", "bf16"):
            module = module.to({"fp16": torch.float16, "bf16": torch.bfloat16}[method])
            lepton["dtype"] = {"fp16": "float16", "bf16": "bfloat16"}[method]
        elif method == "prune-structured":
            amount = float(params.get("amount", 0.25))
            if not 0.0 <= amount < 1.0:
                raise ValueError(f"amount must be in [0, 1), got {amount}")
            before = module.config.intermediate_size
            module, width = prune_structured_hf(module, amount)
            extra = {"intermediate_before": before, "intermediate_after": width, "amount": amount}
        elif method == "prune":
            module = prune_global(module, float(params.get("sparsity", 0.5)))
            extra["sparsity"] = round(sparsity_of(module), 4)
        elif method == "distill":
            module, extra = distill_hf(loaded, params, output or gates.pick_output(loaded, gates.Gate("fidelity", "cosine")))
        else:
            raise MethodUnavailable(f"{method} is not available for Hugging Face models "
                                    f"(int8, fp16, bf16, prune-structured, prune, distill, none are)")
        cand = _hf_copy(loaded, module.eval())
        cand.meta = {**lepton}
        return cand, extra, ("huggingface", module, lepton)
    raise MethodUnavailable(f"{method} is not available for {loaded.format} models: their graphs have "
                            f"no modules to rewrite; use 'none', or compress the model before exporting it")


HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pt2", ".h5", ".msgpack", ".onnx", ".ckpt")


def save(how: tuple, source: Path, artifact: Path) -> None:
    """Write the artifact directory (a model of the source's format)."""
    tmp = artifact.with_name(f".{artifact.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if how[0] == "builtin":
        modelio.save_model(artifact, how[1], how[2])
        return
    if how[0] == "dir":
        shutil.copytree(how[1], tmp)
    elif how[0] == "copy":
        if source.is_file():
            tmp.mkdir(parents=True)
            shutil.copy2(source, tmp / source.name)
        else:
            shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(contract.RESULT_FILE))
    else:
        _, module, lepton = how
        shutil.copytree(source, tmp, ignore=lambda d, names: [
            n for n in names if n.endswith(HF_WEIGHT_SUFFIXES) or n in (modelio.LEPTON_FILE, contract.RESULT_FILE)])
        if lepton.get("quantization"):
            module.config.save_pretrained(tmp)
            with open(tmp / contract.MODEL_FILE, "wb") as f:
                torch.save(module.state_dict(), f)
        else:
            module.save_pretrained(tmp, safe_serialization=True)
        modelio.write_json_atomic(tmp / modelio.LEPTON_FILE, lepton)
    if artifact.exists():
        # the artifact directory may be a mount point: fill it instead of replacing it
        for p in tmp.iterdir():
            dst = artifact / p.name
            if dst.is_dir():
                shutil.rmtree(dst)
            os.replace(p, dst)
        tmp.rmdir()
    else:
        os.replace(tmp, artifact)


def model_bytes(how: tuple, source: Path) -> int:
    if how[0] == "copy":
        return modelio.size_bytes(source)
    if how[0] == "dir":
        return modelio.size_bytes(how[1])
    if how[0] == "builtin":
        return state_dict_bytes(how[1])
    _, module, lepton = how
    if lepton.get("quantization"):
        return state_dict_bytes(module)
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


MIN_TIMED_PASSES = 1


def latency(loaded: modelio.LoadedModel, batch: int, iters: int, warmup: int = 5,
            budget_s: float | None = None, stats: dict | None = None) -> float:
    """Median wall time of one forward pass at ``batch`` rows (prepared inputs), in ms:
    ``iters`` timed passes at most, and no new pass once ``budget_s`` seconds (warm-up
    included, a quarter of it at most) are spent, after one warm-up pass and
    MIN_TIMED_PASSES timed ones. ``stats["passes"]`` receives the timed passes run."""
    x = loaded.prepare(loaded.sample(batch, seed=2))
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(warmup):
            loaded.forward(x)
            if budget_s is not None and time.perf_counter() - start > budget_s / 4:
                break
        times: list[float] = []
        while len(times) < iters:
            if budget_s is not None and len(times) >= MIN_TIMED_PASSES and time.perf_counter() - start > budget_s:
                break
            t0 = time.perf_counter()
            loaded.forward(x)
            times.append(time.perf_counter() - t0)
    if stats is not None:
        stats["passes"] = len(times)
    times.sort()
    return 1000.0 * times[len(times) // 2]


@dataclasses.dataclass(frozen=True)
class Step:
    """Which model a progress line is about: candidate ``candidate`` of ``of`` applying
    ``method``; candidate 0 is the original model (``of``: the candidates to come, 0 while
    they are not known)."""
    candidate: int = 0
    of: int = 0
    method: str = ""

    def __str__(self) -> str:
        return f"candidate {self.candidate} of {self.of} ({self.method})" if self.candidate else "original"


def progress(activity: str, step: Step | None = None) -> None:
    """One line per phase of the compression Job, flushed at once (the pod's log): the
    human one (``step: activity``), then the machine-readable one the operator shows in
    status (``contract.PROGRESS_PREFIX`` and a JSON object of ``contract.PROGRESS_FIELDS``)."""
    log.info("%s", activity if step is None else f"{step}: {activity}")
    for handler in logging.getLogger().handlers:
        handler.flush()
    step = step or Step()
    since = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    record = {"candidate": step.candidate, "of": step.of, "method": step.method, "activity": activity,
              "since": since}
    sys.stdout.write(contract.PROGRESS_PREFIX + json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


# --- the command -------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What every measurement of one compression shares."""
    loaded: modelio.LoadedModel
    params: dict
    split: Any
    evaluator: gates.Evaluator
    source: Path
    iters: int
    budget_s: float
    work: Path

    def latencies(self, model: modelio.LoadedModel, step: Step) -> dict[Any, Any]:
        """p50 ms at batch 1 and 32, and under "passes" the timed passes each took."""
        out: dict[Any, Any] = {"passes": {}}
        for b in (1, 32):
            progress(f"measuring latency at batch {b} ({self.iters} passes at most, {self.budget_s / 2:.3g} s)",
                     step)
            stats: dict[str, int] = {}
            out[b] = latency(model, b, self.iters, budget_s=self.budget_s / 2, stats=stats)
            out["passes"][f"batch{b}"] = stats["passes"]
        return out


def _apply_any(method: str, run: Run) -> tuple[modelio.LoadedModel, dict, Any]:
    if run.loaded.format in exported.FORMATS and method != "none":
        try:
            return exported.apply(method, run.loaded, run.evaluator.inputs, run.work, run.source.is_dir())
        except exported.Unavailable as e:
            raise MethodUnavailable(str(e)) from None
    return apply(method, run.loaded, run.params, run.split, run.evaluator.output)


def _cannot_win(row: dict[str, Any], rivals: list[dict[str, Any]], params: dict) -> str | None:
    """Why ``row`` (measured so far) cannot beat the best candidate that already passed:
    larger under ``objective: size``, slower under ``objective: latency``; None if it can."""
    objective, target = params.get("objective", "size"), params.get("latencyTargetMs")
    batch = int(params.get("latencyBatch", 1))
    best, _ = choose(copy.deepcopy(rivals), objective, float(target) if target is not None else None, batch)
    if best is None:
        return None
    if objective == "size" and best["bytes"] < row["bytes"]:
        return f"not gated or timed: larger than {best['method']} ({best['bytes']} bytes), which passed"
    key = f"latency_p50_ms_batch{batch}"
    if objective == "latency" and key in row and best[key] < row[key]:
        return f"not gated: slower at batch {batch} than {best['method']} ({best[key]} ms), which passed"
    return None


def _measure(method: str, run: Run, step: Step | None = None,
             rivals: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Apply, size, time and gate one method. With ``rivals`` (auto), what cannot beat the
    best of them is not measured further, and the row says why (``skipped``)."""
    step = step or Step(1, 1, method)
    progress(f"applying {method}", step)
    cand, extra, how = _apply_any(method, run)
    row: dict[str, Any] = {"method": method, "bytes": model_bytes(how, run.source), **extra}
    for phase in ("size", "latency", "gate"):
        skip = _cannot_win(row, rivals, run.params) if rivals else None
        if skip:
            progress(skip, step)
            return {"row": {**row, "skipped": skip}, "how": how}
        if phase == "latency":
            lat = run.latencies(cand, step)
            row.update(latency_p50_ms_batch1=round(lat[1], 4), latency_p50_ms_batch32=round(lat[32], 4),
                       latency_passes=lat["passes"])
        elif phase == "gate":
            progress(f"gating ({run.evaluator.gate.type} {run.evaluator.gate.metric} on "
                     f"{len(next(iter(run.evaluator.inputs.values())))} rows)", step)
            row["gate"] = run.evaluator.score(cand)
    if method == "prune":
        row["effective"] = False
        row["note"] = ("unstructured sparsity is stored densely and runs through dense kernels: "
                       "no size or latency gain")
    return {"row": row, "how": how}


def _gate_reason(method: str, score: dict) -> str:
    if score["type"] == "data" and score["metric"] == "accuracy":
        return (f"accuracy gate failed: {method} drops accuracy from {score['before']:.4f} to "
                f"{score['after']:.4f} (drop {score['drop']:.4f} > maxAccuracyDrop {score['max_drop']})")
    return f"{score['type']} gate failed: {method}: {gates.describe(score)}"


def choose(rows: list[dict[str, Any]], objective: str, latency_target_ms: float | None,
           latency_batch: int = 1) -> tuple[dict[str, Any] | None, str]:
    """The best row that passes the gate (and the latency target): smallest bytes, or lowest
    latency at ``latency_batch``; ties go to the other measure. Pure: the tests drive it."""
    key_lat = f"latency_p50_ms_batch{latency_batch}"
    ok = []
    for r in rows:
        if r.get("error"):
            r["rejected"] = r["error"]
        elif r.get("skipped"):
            r["rejected"] = r["skipped"]
        elif not r["gate"]["passed"]:
            r["rejected"] = "gate failed"
        elif r.get("effective") is False:
            r["rejected"] = "no size or latency gain (unstructured sparsity)"
        elif latency_target_ms is not None and r[key_lat] > latency_target_ms:
            r["rejected"] = f"p50 {r[key_lat]:.3f} ms > latencyTargetMs {latency_target_ms:g}"
        else:
            ok.append(r)
    if not ok:
        return None, "no candidate passed: " + "; ".join(f"{r['method']}: {r['rejected']}" for r in rows)
    if objective == "size":
        best = min(ok, key=lambda r: (r["bytes"], r[key_lat]))
        why = f"smallest passing candidate ({best['bytes']} bytes)"
    else:
        best = min(ok, key=lambda r: (r[key_lat], r["bytes"]))
        why = f"fastest passing candidate (p50 {best[key_lat]:.3f} ms at batch {latency_batch})"
    return best, f"auto chose {best['method']}: {why}"


def compress(model_dir: Path, artifact_dir: Path, method: str, max_drop: float | None,
             params: dict, dataset: str | None = None, latency_iters: int = 100,
             evaluation: Any = None, model_format: str | None = None,
             latency_budget_s: float = contract.COMPRESSION_LATENCY_BUDGET_SECONDS) -> dict:
    """Run one compression (or ``auto``); returns the result dict or raises :class:`GateFailed`.
    Latency figures take ``latency_iters`` timed passes at most and ``latency_budget_s``
    seconds per model measured (both batch sizes together)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    if latency_budget_s <= 0:
        raise ValueError(f"the latency budget must be > 0 seconds, got {latency_budget_s}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lepton-compress-") as work:
        result = _compress(Path(model_dir), Path(artifact_dir), method, max_drop, params, dataset,
                           latency_iters, evaluation, model_format, latency_budget_s, Path(work), started)
    progress(f"done in {time.perf_counter() - started:.1f} s: {result['reason']}")
    return result


def _auto(run: Run, candidates: list[str]) -> dict[str, dict[str, Any]]:
    """Measure every candidate; one that cannot apply is listed as unavailable with its
    reason, one that raises while it runs as failed with the error."""
    bad = [c for c in candidates if c not in METHODS or c == "auto"]
    if bad:
        raise ValueError(f"unknown auto candidates {bad}; known: {[m for m in METHODS if m != 'auto']}")
    measured = {}
    for k, c in enumerate(candidates, 1):
        step = Step(k, len(candidates), c)
        rivals = None if run.params.get("measureAll") else [m["row"] for m in measured.values()]
        try:
            measured[c] = _measure(c, run, step, rivals)
        except MethodUnavailable as e:
            measured[c] = {"row": {"method": c, "error": f"unavailable: {e}", "unavailable": True}, "how": None}
        except (RuntimeError, ValueError, TypeError, AssertionError, OSError) as e:   # the library's own refusals
            measured[c] = {"row": {"method": c, "error": f"failed: {type(e).__name__}: {str(e)[:300]}"},
                           "how": None}
        row = measured[c]["row"]
        if "gate" in row or "error" in row:
            progress(row["error"] if "error" in row else
                     f"{row['bytes']} bytes, gate {'passed' if row['gate']['passed'] else 'failed'} "
                     f"({row['gate']['after']}), p50 {row['latency_p50_ms_batch1']} ms at batch 1", step)
        log.info("auto: %s", json.dumps(row, sort_keys=True))
    if all(m["how"] is None for m in measured.values()):
        # nothing was measured, so no gate ran: that is no failed gate
        raise MethodUnavailable("no compression candidate could run on this model: " + "; ".join(
            f"{c}: {m['row']['error']}" for c, m in measured.items()))
    return measured


def _compress(model_dir: Path, artifact_dir: Path, method: str, max_drop: float | None,
              params: dict, dataset: str | None, latency_iters: int, evaluation: Any,
              model_format: str | None, budget_s: float, work: Path, started: float) -> dict:
    progress(f"loading {model_dir}")
    loaded = modelio.load(model_dir, model_format)
    builtin = loaded.format == "builtin"
    gate = gates.parse(evaluation, max_drop, builtin=builtin)
    split, gate_data = None, None
    if builtin:
        split = data.load(dataset or loaded.meta.get("dataset", "digits"))
        if gate.type == "data" and gate.path is None:
            gate_data = ({"input": split.x_test.numpy()}, {"labels": split.y_test.numpy()})
    progress(f"computing the {gate.type} gate's reference ({gate.metric}) on the original {loaded.format} model")
    evaluator = gates.Evaluator(gate, loaded, gate_data)
    run = Run(loaded, params, split, evaluator, model_dir, latency_iters, budget_s, work)
    bytes_before = modelio.size_bytes(model_dir)
    candidates = list(params.get("candidates") or (
        AUTO_CANDIDATES_EXPORTED if loaded.format in exported.FORMATS else AUTO_CANDIDATES))
    before = run.latencies(loaded, Step(0, len(candidates) if method == "auto" else 1, "none"))

    objective = params.get("objective", "size")
    target = params.get("latencyTargetMs")
    latency_batch = int(params.get("latencyBatch", 1))
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if latency_batch not in (1, 32):
        raise ValueError(f"latencyBatch must be 1 or 32, got {latency_batch}")
    if method == "auto":
        measured = _auto(run, candidates)
        rows = [m["row"] for m in measured.values()]
        best, why = choose(rows, objective, float(target) if target is not None else None, latency_batch)
        for r in rows:
            r["chosen"] = best is not None and r is best
        chosen = measured[best["method"]] if best else None
    else:
        chosen = _measure(method, run)
        rows, best, why = None, chosen["row"], ""

    row = best or {}
    score = row.get("gate") or {}
    result: dict[str, Any] = {
        "method": row.get("method", method), "requested_method": method, "format": loaded.format,
        "backend": row.get("backend"), "passed": best is not None and bool(score.get("passed")),
        "bytes_before": bytes_before, "bytes_after": row.get("bytes"),
        "ratio": round(bytes_before / max(1, row["bytes"]), 3) if row.get("bytes") else None,
        "gate": score or gate.to_json(),
        "latency_p50_ms_batch1_before": round(before[1], 4),
        "latency_p50_ms_batch1_after": row.get("latency_p50_ms_batch1"),
        "latency_p50_ms_batch32_before": round(before[32], 4),
        "latency_p50_ms_batch32_after": row.get("latency_p50_ms_batch32"),
        "latency_passes_before": before["passes"], "latency_passes_after": row.get("latency_passes"),
        **{k: v for k, v in row.items() if k not in ("method", "bytes", "gate", "backend", "chosen")
           and not k.startswith("latency_")},
    }
    if builtin:
        result["dataset"] = (dataset or loaded.meta.get("dataset")) if gate.path is None else None
    if score.get("metric") == "accuracy":
        result.update(accuracy_before=round(score["before"], 4), accuracy_after=round(score["after"], 4),
                      accuracy_drop=round(score["drop"], 4), max_accuracy_drop=score["max_drop"])
    if method == "auto":
        result.update(candidates=rows, objective=objective, latency_target_ms=target,
                      latency_batch=latency_batch)
    result["seconds"] = round(time.perf_counter() - started, 2)
    if best is None:
        result.update(passed=False, reason=f"{why}; no artifact written")
        raise GateFailed(result, gate_failed=any(r.get("gate", {}).get("passed") is False for r in rows))
    if not score["passed"]:
        result["reason"] = _gate_reason(row["method"], score) + "; no artifact written"
        raise GateFailed(result)
    result["reason"] = (f"{why}; " if why else "") + f"gate passed: {gates.describe(score)}"
    if row.get("effective") is False:
        result["reason"] += "; " + row["note"]
    how = chosen["how"]
    if how[0] == "builtin":
        meta = how[2]
        meta.setdefault("metrics", {})
        if score.get("metric") == "accuracy":
            meta["metrics"] = {**meta["metrics"], "accuracy": score["after"]}
        meta["compression"] = {"method": row["method"], "source": str(model_dir)}
    save(how, model_dir, artifact_dir)
    if not any(p.name != contract.RESULT_FILE for p in artifact_dir.iterdir()):
        raise RuntimeError(f"the artifact directory {artifact_dir} holds no model after saving it")
    result[contract.RESULT_ARTIFACT] = str(artifact_dir)
    modelio.write_json_atomic(artifact_dir / contract.RESULT_FILE, result)
    return result


def write_termination_message(path: str, result: dict) -> None:
    """The compact result for the kubelet (4 KiB): the auto table loses its per-row gate
    details first, then the table, then the prose."""
    def text(r):
        return json.dumps(r, separators=(",", ":"), sort_keys=True)
    attempt = result
    if len(text(attempt).encode()) > TERMINATION_MESSAGE_LIMIT and attempt.get("candidates"):
        attempt = {**attempt, "candidates": [
            {k: v for k, v in r.items() if k in ("method", "bytes", "latency_p50_ms_batch1", "chosen",
                                                 "rejected", "error")} | (
                {"gate_after": r["gate"]["after"], "gate_passed": r["gate"]["passed"]} if "gate" in r else {})
            for r in attempt["candidates"]]}
    if len(text(attempt).encode()) > TERMINATION_MESSAGE_LIMIT:
        attempt = {k: v for k, v in attempt.items() if k != "candidates"}
    if len(text(attempt).encode()) > TERMINATION_MESSAGE_LIMIT:   # keep it parseable: drop the prose
        attempt = {k: v for k, v in attempt.items() if k != "reason"}
    try:
        Path(path).write_text(text(attempt))
    except OSError as e:
        log.warning("cannot write the termination message to %s: %s", path, e)


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m lepton_trainer.compress", description=__doc__.split("\n")[0])
    p.add_argument("--task", default=env(contract.ENV_TASK) or contract.TASK_PREDICT, choices=contract.TASKS,
                   help="text-generation hands over to lepton_trainer.llm.compress (a language model)")
    p.add_argument("--model-dir", default=env(contract.ENV_MODEL_DIR), help="input model directory")
    p.add_argument("--model-format", default=env(contract.ENV_MODEL_FORMAT) or None, choices=modelio.FORMATS,
                   help="default: detected from the directory")
    p.add_argument("--artifact-dir", default=env(contract.ENV_ARTIFACT_DIR), help="output model directory")
    p.add_argument("--method", default=env(contract.ENV_COMPRESSION_METHOD, "none"), choices=METHODS)
    p.add_argument("--max-accuracy-drop", type=float, default=_env_float(contract.ENV_MAX_ACCURACY_DROP),
                   help="largest allowed absolute accuracy drop, a fraction (0.01 = one point)")
    p.add_argument("--evaluation", default=env(contract.ENV_COMPRESSION_EVALUATION) or None,
                   help="the gate as a JSON object (see gates.py)")
    p.add_argument("--params", default=env(contract.ENV_COMPRESSION_PARAMS, "{}"),
                   help="method parameters as a JSON object")
    p.add_argument("--backend", choices=quantization.INT8_BACKENDS, help="int8 backend (default per device)")
    p.add_argument("--sparsity", type=float, help="prune: fraction of Linear weights set to zero")
    p.add_argument("--amount", type=float, help="prune-structured: fraction of hidden units removed")
    p.add_argument("--student-hidden", type=int, help="distill: hidden width of the student MLP")
    p.add_argument("--epochs", type=int, help="distill / prune-structured (builtin): training epochs")
    p.add_argument("--temperature", type=float, help="distill: softmax temperature")
    p.add_argument("--objective", choices=OBJECTIVES, help="auto: keep the smallest or the fastest")
    p.add_argument("--dataset", choices=sorted(data.DATASETS), help="default: the model's own dataset")
    p.add_argument("--latency-iters", type=int, default=100, help="timed forward passes per latency figure, at most")
    p.add_argument("--latency-budget", type=float,
                   default=_env_float(contract.ENV_COMPRESSION_LATENCY_BUDGET)
                   or contract.COMPRESSION_LATENCY_BUDGET_SECONDS,
                   help="seconds of latency measurement per model measured (both batch sizes)")
    p.add_argument("--termination-message-path",
                   default=env(ENV_TERMINATION_MESSAGE_PATH, contract.TERMINATION_MESSAGE_PATH))
    args = p.parse_args(argv)
    if not args.model_dir or not args.artifact_dir:
        p.error(f"--model-dir and --artifact-dir (or {contract.ENV_MODEL_DIR} and "
                f"{contract.ENV_ARTIFACT_DIR}) are required")
    if not args.latency_budget > 0:
        p.error(f"--latency-budget / {contract.ENV_COMPRESSION_LATENCY_BUDGET} must be > 0 seconds")
    if args.max_accuracy_drop is not None and not 0.0 <= args.max_accuracy_drop <= 1.0:
        p.error(f"--max-accuracy-drop must be a fraction in [0, 1], got {args.max_accuracy_drop}")
    try:
        params = json.loads(args.params)
        if not isinstance(params, dict):
            raise ValueError("not an object")
    except ValueError as e:
        p.error(f"--params / {contract.ENV_COMPRESSION_PARAMS} must be a JSON object: {e}")
    try:
        gates.parse(args.evaluation, args.max_accuracy_drop, builtin=True)
    except gates.GateError as e:
        p.error(f"--evaluation / {contract.ENV_COMPRESSION_EVALUATION}: {e}")
    for key, value in (("backend", args.backend), ("sparsity", args.sparsity), ("amount", args.amount),
                       ("studentHidden", args.student_hidden), ("epochs", args.epochs),
                       ("temperature", args.temperature), ("objective", args.objective)):
        if value is not None:
            params[key] = value
    params.setdefault("studentHidden", params.pop("student_hidden", 64))
    args.params = params
    return args


def task_of(argv: list[str] | None) -> str:
    """``--task`` of the command line, else ``LEPTON_TASK``, else predict."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--task", default=os.environ.get(contract.ENV_TASK) or contract.TASK_PREDICT)
    task = p.parse_known_args(argv)[0].task
    if task not in contract.TASKS:
        raise SystemExit(f"--task / {contract.ENV_TASK} must be one of {list(contract.TASKS)}, got {task!r}")
    return task


def main(argv: list[str] | None = None) -> int:
    if task_of(argv) == contract.TASK_TEXT_GENERATION:   # a language model: lepton_trainer.llm
        from .llm import compress as llm_compress
        return llm_compress.main(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        result = compress(Path(args.model_dir), Path(args.artifact_dir), args.method,
                          args.max_accuracy_drop, args.params, args.dataset,
                          max(1, args.latency_iters), args.evaluation, args.model_format, args.latency_budget)
    except GateFailed as e:
        log.error("%s", e)
        write_termination_message(args.termination_message_path, e.result)
        return GATE_FAILED_EXIT if e.gate_failed else contract.COMPRESS_EXIT_FAILED
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        log.error("compression failed: %s", e)
        write_termination_message(args.termination_message_path,
                                  {"method": args.method, "passed": False, "reason": str(e)[:2000]})
        return contract.COMPRESS_EXIT_FAILED
    write_termination_message(args.termination_message_path, result)
    print(json.dumps(result, separators=(",", ":"), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
