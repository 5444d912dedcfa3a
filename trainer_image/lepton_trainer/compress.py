"""``python -m lepton_trainer.compress``: compress a model directory behind an accuracy gate.

Methods:
  int8     dynamic int8 quantization of the Linear layers (backend: see quantization.py)
  fp16     parameters cast to float16
  bf16     parameters cast to bfloat16
  prune    global L1 magnitude pruning of all Linear weights to ``sparsity``, made
           permanent (the zeros are stored densely: the file keeps its size)
  distill  a smaller MLP student trained on the teacher's temperature-softened outputs
  none     the model unchanged (the result JSON still records its numbers)

Accuracy before and after is measured on the held-out split of the model's dataset. If
the drop exceeds ``--max-accuracy-drop`` the command exits with status 3, prints why,
and writes no artifact. Otherwise the artifact directory receives a model directory
(modelio) and ``result.json``; the same compact JSON goes to the termination-message
path, where the operator reads it. A failed gate writes its JSON (``passed: false``) to
the termination-message path only.

Every flag falls back to an environment variable (contract.py); method parameters also
come as a JSON object in LEPTON_COMPRESSION_PARAMS with keys ``sparsity``,
``studentHidden``, ``epochs``, ``temperature``, ``backend``.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as tprune

from . import contract, data, modelio, models, quantization

log = logging.getLogger("lepton_trainer.compress")

METHODS = ("int8", "fp16", "bf16", "prune", "distill", "none")
ENV_TERMINATION_MESSAGE_PATH = "LEPTON_TERMINATION_MESSAGE_PATH"
TERMINATION_MESSAGE_LIMIT = 4096   # the kubelet truncates termination messages at 4 KiB
GATE_FAILED_EXIT = 3


class GateFailed(Exception):
    def __init__(self, result: dict[str, Any]):
        self.result = result
        super().__init__(result["reason"])


# --- measurement -----------------------------------------------------------------------

def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.inference_mode()
def latency_p50_ms(model: nn.Module, example: torch.Tensor, batch: int, iters: int = 100,
                   warmup: int = 10) -> float:
    """Median wall time of one forward pass at ``batch`` rows, on CPU, in milliseconds."""
    model.eval()
    x = example[:1].repeat(batch, *([1] * (example.dim() - 1))).to(_dtype(model))
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
        soft = F.softmax(teacher(split.x_train.to(_dtype(teacher))).float() / temperature, dim=1)
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


# --- the command -------------------------------------------------------------------------

def compress(model_dir: Path, artifact_dir: Path, method: str, max_drop: float | None,
             params: dict, dataset: str | None = None, latency_iters: int = 100) -> dict:
    """Run one compression; returns the result dict or raises :class:`GateFailed`."""
    teacher, meta = modelio.load_model(model_dir)
    split = data.load(dataset or meta.get("dataset", "digits"))
    x, y = split.x_test, split.y_test
    acc_before = models.accuracy(teacher, x, y)
    before = {b: latency_p50_ms(teacher, x, b, latency_iters) for b in (1, 32)}
    bytes_before = modelio.size_bytes(model_dir)

    model, new_meta, extra = apply_method(method, copy.deepcopy(teacher), meta, split, params)
    acc_after = models.accuracy(model, x, y)
    after = {b: latency_p50_ms(model, x, b, latency_iters) for b in (1, 32)}
    bytes_after = state_dict_bytes(model)
    drop = acc_before - acc_after
    result = {
        "method": method, "backend": extra.pop("backend", None), "passed": True,
        "bytes_before": bytes_before, "bytes_after": bytes_after,
        "ratio": round(bytes_before / max(1, bytes_after), 3),
        "accuracy_before": round(acc_before, 4), "accuracy_after": round(acc_after, 4),
        "accuracy_drop": round(drop, 4), "max_accuracy_drop": max_drop,
        "latency_p50_ms_batch1_before": round(before[1], 4),
        "latency_p50_ms_batch1_after": round(after[1], 4),
        "latency_p50_ms_batch32_before": round(before[32], 4),
        "latency_p50_ms_batch32_after": round(after[32], 4),
        "dataset": new_meta.get("dataset", dataset), **extra,
    }
    if max_drop is not None and drop > max_drop:
        result.update(passed=False, reason=(
            f"accuracy gate failed: {method} drops held-out accuracy from {acc_before:.4f} to "
            f"{acc_after:.4f} (drop {drop:.4f} > maxAccuracyDrop {max_drop}); no artifact written"))
        raise GateFailed(result)
    new_meta.setdefault("metrics", {})
    new_meta["metrics"] = {**new_meta["metrics"], "accuracy": acc_after}
    new_meta["compression"] = {"method": method, "source": str(model_dir)}
    modelio.save_model(artifact_dir, model, new_meta)
    modelio.write_json_atomic(artifact_dir / contract.RESULT_FILE, result)
    return result


def write_termination_message(path: str, result: dict) -> None:
    text = json.dumps(result, separators=(",", ":"), sort_keys=True)
    if len(text.encode()) > TERMINATION_MESSAGE_LIMIT:   # keep it parseable: drop the prose
        text = json.dumps({k: v for k, v in result.items() if k != "reason"},
                          separators=(",", ":"), sort_keys=True)
    try:
        Path(path).write_text(text)
    except OSError as e:
        log.warning("cannot write the termination message to %s: %s", path, e)


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m lepton_trainer.compress", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=env(contract.ENV_MODEL_DIR), help="input model directory")
    p.add_argument("--artifact-dir", default=env(contract.ENV_ARTIFACT_DIR), help="output model directory")
    p.add_argument("--method", default=env(contract.ENV_COMPRESSION_METHOD, "none"), choices=METHODS)
    p.add_argument("--max-accuracy-drop", type=float, default=_env_float(contract.ENV_MAX_ACCURACY_DROP),
                   help="largest allowed absolute accuracy drop, a fraction (0.01 = one point)")
    p.add_argument("--params", default=env(contract.ENV_COMPRESSION_PARAMS, "{}"),
                   help="method parameters as a JSON object")
    p.add_argument("--backend", choices=quantization.INT8_BACKENDS, help="int8 backend (default per device)")
    p.add_argument("--sparsity", type=float, help="prune: fraction of Linear weights set to zero")
    p.add_argument("--student-hidden", type=int, help="distill: hidden width of the student MLP")
    p.add_argument("--epochs", type=int, help="distill: training epochs of the student")
    p.add_argument("--temperature", type=float, help="distill: softmax temperature")
    p.add_argument("--dataset", choices=sorted(data.DATASETS), help="default: the model's own dataset")
    p.add_argument("--latency-iters", type=int, default=100, help="timed forward passes per latency figure")
    p.add_argument("--termination-message-path",
                   default=env(ENV_TERMINATION_MESSAGE_PATH, contract.TERMINATION_MESSAGE_PATH))
    args = p.parse_args(argv)
    if not args.model_dir or not args.artifact_dir:
        p.error(f"--model-dir and --artifact-dir (or {contract.ENV_MODEL_DIR} and "
                f"{contract.ENV_ARTIFACT_DIR}) are required")
    if args.max_accuracy_drop is not None and not 0.0 <= args.max_accuracy_drop <= 1.0:
        p.error(f"--max-accuracy-drop must be a fraction in [0, 1], got {args.max_accuracy_drop}")
    try:
        params = json.loads(args.params)
        if not isinstance(params, dict):
            raise ValueError("not an object")
    except ValueError as e:
        p.error(f"--params / {contract.ENV_COMPRESSION_PARAMS} must be a JSON object: {e}")
    for key, value in (("backend", args.backend), ("sparsity", args.sparsity),
                       ("studentHidden", args.student_hidden), ("epochs", args.epochs),
                       ("temperature", args.temperature)):
        if value is not None:
            params[key] = value
    params.setdefault("studentHidden", params.pop("student_hidden", 64))
    args.params = params
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        result = compress(Path(args.model_dir), Path(args.artifact_dir), args.method,
                          args.max_accuracy_drop, args.params, args.dataset,
                          max(1, args.latency_iters))
    except GateFailed as e:
        log.error("%s", e)
        write_termination_message(args.termination_message_path, e.result)
        return GATE_FAILED_EXIT
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        log.error("compression failed: %s", e)
        write_termination_message(args.termination_message_path,
                                  {"method": args.method, "passed": False, "reason": str(e)[:2000]})
        return 1
    write_termination_message(args.termination_message_path, result)
    print(json.dumps(result, separators=(",", ":"), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
