"""The compression gate: labelled data with a metric, or fidelity to the original model.

The gate comes as a JSON object (``LEPTON_COMPRESSION_EVALUATION`` / ``--evaluation``):

  {"type": "data", "path": "/models/eval.npz", "metric": "accuracy" | "top_k" | "mse",
   "k": 5, "maxDrop": 0.01, "output": "logits"}
      Inputs and labels from a file on the volume. The compressed model passes when its
      metric is no worse than the original's by more than ``maxDrop`` (accuracy and
      top-k: absolute points; mse: absolute increase). ``maxDrop`` defaults to
      LEPTON_MAX_ACCURACY_DROP, else 0.01.

  {"type": "fidelity", "metric": "top1_agreement" | "cosine", "threshold": 0.99,
   "path": "/models/samples.jsonl", "samples": 64, "output": "sentence_embedding"}
      No labels: the compressed model's outputs are compared with the original's on
      sample inputs (the file's inputs, else ``samples`` generated ones: sentences for
      text models, seeded random tensors for the others). Passes when the mean
      agreement of the top-1 class, or the mean cosine similarity of the output rows,
      is at least ``threshold`` (default 0.99).

Data files hold one array per model input, named as the input (or ``inputs`` for a
one-input model), plus ``labels`` (class ids, accuracy/top-k) or ``targets`` (mse):
``.npz`` (loaded with ``allow_pickle=False``), ``.pt`` (``torch.load(weights_only=True)``,
a dict of tensors or lists), ``.safetensors``, or ``.jsonl`` (one JSON object per line
with the same keys, one row each; text inputs as strings).

``output`` picks the output that is scored; by default ``logits`` if the model has it,
else ``sentence_embedding``, else the first output.

Without an evaluation object a built-in model is gated on its own data set's held-out
split (accuracy, ``maxDrop`` = LEPTON_MAX_ACCURACY_DROP), any other model by fidelity
(cosine, 0.99).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from . import contract, modelio, v2

DATA_METRICS = contract.EVALUATION_METRICS["data"]
FIDELITY_METRICS = contract.EVALUATION_METRICS["fidelity"]
DEFAULT_MAX_DROP = 0.01
DEFAULT_THRESHOLD = 0.99
EVAL_BATCH = 64


class GateError(ValueError):
    """The evaluation object or its data file is invalid."""


@dataclasses.dataclass
class Gate:
    type: str                      # data | fidelity
    metric: str
    path: str | None = None
    k: int = 5
    max_drop: float | None = None
    threshold: float | None = None
    samples: int = 64
    output: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def json_object(obj: Any, error: type[ValueError] = GateError) -> dict:
    """The evaluation object as a dict, from a dict or its JSON (``error`` otherwise)."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except ValueError as e:
            raise error(f"evaluation must be a JSON object: {e}") from None
    if not isinstance(obj, dict):
        raise error("evaluation must be a JSON object")
    return obj


def parse(obj: Any, max_drop: float | None = None, builtin: bool = False) -> Gate:
    """The gate from the evaluation object (None: the default for the model's format)."""
    if obj in (None, "", {}):
        if builtin:
            return Gate("data", "accuracy", max_drop=max_drop)
        return Gate("fidelity", "cosine", threshold=DEFAULT_THRESHOLD)
    obj = json_object(obj)
    known = set(contract.EVALUATION_FIELDS)
    unknown = sorted(set(obj) - known)
    if unknown:
        raise GateError(f"unknown evaluation fields {unknown}; known: {sorted(known)}")
    kind = obj.get("type") or ("data" if obj.get("metric") in DATA_METRICS else "fidelity")
    if kind == "data":
        metric = obj.get("metric", "accuracy")
        if metric not in DATA_METRICS:
            raise GateError(f"data gate metric {metric!r}; known: {list(DATA_METRICS)}")
        if not obj.get("path") and not builtin:
            raise GateError("a data gate needs 'path', the data file on the volume")
        drop = obj.get("maxDrop", max_drop if max_drop is not None else DEFAULT_MAX_DROP)
        if not isinstance(drop, (int, float)) or drop < 0:
            raise GateError(f"maxDrop must be a number >= 0, got {drop!r}")
        gate = Gate("data", metric, path=str(obj["path"]) if obj.get("path") else None, k=int(obj.get("k", 5)), max_drop=float(drop),
                    output=obj.get("output"))
    elif kind == "fidelity":
        metric = obj.get("metric", "cosine")
        if metric not in FIDELITY_METRICS:
            raise GateError(f"fidelity gate metric {metric!r}; known: {list(FIDELITY_METRICS)}")
        threshold = obj.get("threshold", DEFAULT_THRESHOLD)
        if not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
            raise GateError(f"threshold must be a number in [-1, 1], got {threshold!r}")
        samples = obj.get("samples", 64)
        if type(samples) is not int or not 1 <= samples <= 100_000:
            raise GateError(f"samples must be an integer in [1, 100000], got {samples!r}")
        gate = Gate("fidelity", metric, path=obj.get("path"), threshold=float(threshold),
                    samples=samples, output=obj.get("output"))
    else:
        raise GateError(f"evaluation type {kind!r}; known: data, fidelity")
    if gate.k < 1:
        raise GateError("k must be >= 1")
    return gate


# --- data ------------------------------------------------------------------------------------

def _read(path: Path) -> dict[str, Any]:
    suffix = path.suffix
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    if suffix == ".pt":
        import torch
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise GateError(f"{path} must hold a dict of tensors or lists")
        return {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in obj.items()}
    if suffix == ".safetensors":
        from safetensors.numpy import load_file
        return load_file(str(path))
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not rows or not all(isinstance(r, dict) for r in rows):
            raise GateError(f"{path}: every line must be a JSON object")
        return {k: [r.get(k) for r in rows] for k in rows[0]}
    raise GateError(f"{path}: unknown data file type {suffix!r}; use .npz, .pt, .safetensors or .jsonl")


def load_data(path: str | Path, model: modelio.LoadedModel) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs by model input name, extra arrays such as labels/targets) from a data file."""
    p = Path(path)
    if not p.exists():
        raise GateError(f"evaluation data {p} not found")
    raw = _read(p)
    inputs = {}
    for spec in model.inputs:
        key = spec.name if spec.name in raw else ("inputs" if len(model.inputs) == 1 and "inputs" in raw else None)
        if key is None:
            raise GateError(f"{p} has no array {spec.name!r} (keys: {sorted(raw)})")
        value = raw[key]
        if spec.datatype == "BYTES":
            arr = np.empty(len(value), dtype=object)
            arr[:] = [v.encode() if isinstance(v, str) else bytes(v) for v in list(value)]
        else:
            arr = np.asarray(value)
            if spec.datatype == "BF16":
                arr = v2.float32_to_bf16(arr.astype(np.float32))
            else:
                arr = arr.astype(v2.NUMPY[spec.datatype])
        if not v2.shape_matches(list(arr.shape), spec):
            raise GateError(f"{p}: {spec.name!r} has shape {list(arr.shape)}; the model takes {list(spec.shape)}")
        inputs[spec.name] = arr
    rows = {len(a) for a in inputs.values()}
    if len(rows) != 1 or 0 in rows:
        raise GateError(f"{p}: the inputs must have the same non-zero number of rows, got {sorted(rows)}")
    extra = {k: np.asarray(raw[k]) for k in ("labels", "targets") if k in raw}
    return inputs, extra


def sample_inputs(model: modelio.LoadedModel, gate: Gate) -> dict[str, np.ndarray]:
    if gate.path:
        return load_data(gate.path, model)[0]
    return model.sample(gate.samples, seed=1)


# --- scoring ---------------------------------------------------------------------------------

def pick_output(model: modelio.LoadedModel, gate: Gate) -> str:
    names = [o.name for o in model.outputs]
    if gate.output:
        if gate.output not in names:
            raise GateError(f"evaluation output {gate.output!r} is not an output of the model: {names}")
        return gate.output
    for preferred in ("logits", "sentence_embedding"):
        if preferred in names:
            return preferred
    fixed = [o.name for o in model.outputs if list(o.shape[1:]).count(-1) == 0]
    return (fixed or names)[0]


def outputs(model: modelio.LoadedModel, inputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    n = len(next(iter(inputs.values())))
    parts = [model.run({k: v[i:i + EVAL_BATCH] for k, v in inputs.items()})[name] for i in range(0, n, EVAL_BATCH)]
    if len({p.shape[1:] for p in parts}) > 1:
        raise GateError(f"output {name!r} changes shape between batches (a padded sequence); "
                        f"score another output")
    return np.concatenate(parts).astype(np.float64)


def data_metric(metric: str, out: np.ndarray, extra: dict[str, np.ndarray], k: int) -> float:
    if metric in ("accuracy", "top_k"):
        if "labels" not in extra:
            raise GateError(f"metric {metric} needs 'labels' in the data file")
        labels = extra["labels"].astype(np.int64).reshape(-1)
        logits = out.reshape(len(out), -1)
        if len(labels) != len(logits):
            raise GateError(f"{len(labels)} labels for {len(logits)} input rows")
        if metric == "accuracy":
            return float((logits.argmax(1) == labels).mean())
        top = np.argsort(-logits, axis=1)[:, :k]
        return float((top == labels[:, None]).any(1).mean())
    if "targets" not in extra:
        raise GateError("metric mse needs 'targets' in the data file")
    targets = extra["targets"].astype(np.float64)
    if targets.size != out.size:
        raise GateError(f"targets have {targets.size} values; the output has {out.size}")
    return float(((out.reshape(-1) - targets.reshape(-1)) ** 2).mean())


def fidelity(metric: str, ref: np.ndarray, got: np.ndarray) -> float:
    a, b = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    if metric == "top1_agreement":
        return float((a.argmax(1) == b.argmax(1)).mean())
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-12)
    return float(cos.mean())


class Evaluator:
    """Scores candidates against the original on fixed inputs (computed once)."""

    def __init__(self, gate: Gate, original: modelio.LoadedModel,
                 data: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None):
        """``data``: in-memory (inputs, labels) for a data gate without a file (built-ins)."""
        self.gate, self.original = gate, original
        self.output = pick_output(original, gate)
        if gate.type == "data":
            self.inputs, self.extra = data if data is not None else load_data(gate.path, original)
            self.before = data_metric(gate.metric, outputs(original, self.inputs, self.output), self.extra, gate.k)
        else:
            self.inputs, self.extra = sample_inputs(original, gate), {}
            self.reference = outputs(original, self.inputs, self.output)
            self.before = 1.0

    def score(self, candidate: modelio.LoadedModel) -> dict[str, Any]:
        g = self.gate
        got = outputs(candidate, self.inputs, self.output)
        if g.type == "data":
            after = data_metric(g.metric, got, self.extra, g.k)
            worse = (after - self.before) if g.metric == "mse" else (self.before - after)
            # a built-in model without maxAccuracyDrop is measured but not limited
            passed = bool(np.isfinite(after)) and (g.max_drop is None or worse <= g.max_drop + 1e-12)
            return {"type": "data", "metric": g.metric, "output": self.output, "before": round(self.before, 6),
                    "after": round(after, 6), "drop": round(worse, 6), "max_drop": g.max_drop,
                    "rows": len(got), "passed": passed}
        value = fidelity(g.metric, self.reference, got)
        passed = bool(np.isfinite(value)) and value >= g.threshold
        return {"type": "fidelity", "metric": g.metric, "output": self.output, "before": 1.0,
                "after": round(value, 6), "threshold": g.threshold, "rows": len(got), "passed": passed}


def describe(score: dict[str, Any]) -> str:
    if score["type"] == "data":
        return (f"{score['metric']} {score['before']:.4f} -> {score['after']:.4f} on {score['rows']} "
                f"labelled rows ({'increase' if score['metric'] == 'mse' else 'drop'} {score['drop']:.4f}, "
                f"allowed {'any' if score['max_drop'] is None else format(score['max_drop'], 'g')})")
    return (f"{score['metric']} vs the original {score['after']:.4f} on {score['rows']} sample inputs "
            f"of {score['output']!r} (threshold {score['threshold']:g})")
