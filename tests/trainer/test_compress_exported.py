"""Compression of exported programs (torch.export, ONNX, TorchScript) with real torch,
torchao and onnxruntime: each implemented pair writes an artifact that the server's loader
loads, smaller than the source and within the fidelity gate; auto picks a real candidate and
lists the unavailable ones with their reasons; the exit status tells a failed gate from a
compression that could not be done."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from lepton_trainer import compress, contract, exported, modelio, v2

pytestmark = pytest.mark.trainer

IMPLEMENTED = [(fmt, m) for fmt, methods in contract.EXPORTED_FORMAT_METHODS.items()
               for m in methods if m not in ("none", "auto")]
SIGNATURE = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 8, 8]}],
             "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]}


class SmallNet(nn.Module):
    """A convolution, then an MLP: conv and linear layers for the quantizers to take."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.head = nn.Sequential(nn.Linear(16, 192), nn.ReLU(), nn.Linear(192, 192), nn.ReLU(),
                                  nn.Linear(192, 10))

    def forward(self, image):
        return self.head(self.features(image))


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """The same network as a torch.export program, an ONNX graph and a TorchScript archive."""
    torch.manual_seed(0)
    net = SmallNet().eval()
    x = torch.randn(2, 3, 8, 8)
    root = tmp_path_factory.mktemp("programs")
    for d in ("torch.export", "onnx", "torchscript"):
        (root / d).mkdir()
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(net, (x,), dynamic_shapes=({0: batch},)),
                      str(root / "torch.export" / "model.pt2"))
    torch.onnx.export(net, (x,), str(root / "onnx" / "model.onnx"), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    torch.jit.save(torch.jit.script(net), str(root / "torchscript" / "model.pt"))
    (root / "torchscript" / "signature.json").write_text(json.dumps(SIGNATURE))
    return root


def _run(source, art, method, params=None, **kw):
    return compress.compress(source, art, method, None, params or {}, latency_iters=3, latency_budget_s=1, **kw)


def _cosine(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).mean())


@pytest.mark.parametrize("fmt,method", IMPLEMENTED)
def test_each_implemented_pair_writes_a_smaller_artifact_the_loader_serves_within_the_gate(
        programs, tmp_path, fmt, method):
    source = programs / fmt
    result = _run(source, tmp_path / "art", method)
    assert result["passed"] and result["method"] == method and result["format"] == fmt
    assert result["gate"]["type"] == "fidelity" and result["gate"]["after"] >= 0.99
    assert result["bytes_after"] < result["bytes_before"] == modelio.size_bytes(source)
    original, art = modelio.load(source), modelio.load(tmp_path / "art")
    assert modelio.detect_format(tmp_path / "art") == fmt
    assert modelio.size_bytes(tmp_path / "art") == result["bytes_after"]
    assert [s.to_json() for s in art.inputs] == [s.to_json() for s in original.inputs]
    assert [s.to_json() for s in art.outputs] == [s.to_json() for s in original.outputs]
    x = original.sample(16, seed=7)
    name = original.outputs[0].name
    assert _cosine(original.run(x)[name], art.run(x)[name]) >= 0.99
    if method.startswith("int8"):
        assert result["activations"] == ("static" if method == "int8-static" else "dynamic")
        assert result.get("calibration_rows", 64) == 64


@pytest.mark.parametrize("fmt", ["torch.export", "onnx"])
def test_auto_on_an_exported_program_keeps_the_smallest_passing_candidate_and_lists_the_rest(
        programs, tmp_path, fmt, caplog, capsys):
    caplog.set_level(logging.INFO, logger="lepton_trainer.compress")
    result = _run(programs / fmt, tmp_path / "art", "auto")
    table = {r["method"]: r for r in result["candidates"]}
    assert list(table) == list(compress.AUTO_CANDIDATES_EXPORTED)
    implemented = set(contract.EXPORTED_FORMAT_METHODS[fmt]) - {"none", "auto"}
    assert {m for m, r in table.items() if "error" not in r} == implemented
    passing = {m: r for m, r in table.items() if "gate" in r and r["gate"]["passed"]}
    assert result["method"] == min(passing, key=lambda m: (passing[m]["bytes"], passing[m]["latency_p50_ms_batch1"]))
    assert result["passed"] and result["bytes_after"] < result["bytes_before"]
    for m, r in table.items():
        if m not in implemented:
            assert r["unavailable"] and r["error"].startswith(f"unavailable: {m} is not available for {fmt}")
        elif "gate" not in r:         # larger than a candidate that passed: not gated or timed
            assert r["bytes"] > result["bytes_after"] and r["skipped"].startswith("not gated or timed: larger than")
    assert "prune-structured" in table and "rewrites the shape" in table["prune-structured"]["error"]
    if fmt == "onnx":
        assert "bfloat16" in table["bf16"]["error"]
    lines = [r.getMessage() for r in caplog.records]
    n = len(compress.AUTO_CANDIDATES_EXPORTED)
    assert f"candidate 1 of {n} (int8-static): applying int8-static" in lines
    assert f"candidate 1 of {n} (int8-static): measuring latency at batch 32 (3 passes at most, 0.5 s)" in lines
    assert any(line.startswith(f"candidate {n} of {n} (prune-structured): unavailable") for line in lines)
    # The machine-readable twin of each line, which the operator shows in the model's status.
    records = [json.loads(line[len(contract.PROGRESS_PREFIX):]) for line in capsys.readouterr().out.splitlines()
               if line.startswith(contract.PROGRESS_PREFIX)]
    assert all(set(r) == set(contract.PROGRESS_FIELDS) for r in records)
    assert {"candidate": 1, "of": n, "method": "int8-static", "activity": "applying int8-static"}.items() <= \
        next(r for r in records if r["candidate"] == 1).items()
    assert [r["candidate"] for r in records[:-1]] == sorted(r["candidate"] for r in records[:-1])
    assert records[-1]["activity"].startswith("done in ") and records[0]["activity"].startswith("loading ")


def test_auto_measure_all_gates_and_times_every_candidate(programs, tmp_path):
    result = _run(programs / "torch.export", tmp_path / "art", "auto",
                  {"candidates": ["int8-static", "fp16"], "measureAll": True})
    rows = result["candidates"]
    assert [r["method"] for r in rows] == ["int8-static", "fp16"]
    assert all("gate" in r and "latency_p50_ms_batch32" in r and "skipped" not in r for r in rows)
    assert result["method"] == min(rows, key=lambda r: (r["bytes"], r["latency_p50_ms_batch1"]))["method"]


@pytest.mark.parametrize("fmt, method", [p for p in IMPLEMENTED if p[0] == "onnx"])
def test_compression_never_writes_into_the_source_directory(programs, tmp_path, fmt, method):
    """The compression pod may not write the source's directory (the user's files on the
    volume): no file is created there, not even for a moment (the directory's mtime moves
    when one is created or removed)."""
    source = tmp_path / "source"
    shutil.copytree(programs / fmt, source)
    before = source.stat().st_mtime_ns
    _run(source, tmp_path / "art", method)
    assert source.stat().st_mtime_ns == before and sorted(p.name for p in source.iterdir()) == \
        sorted(p.name for p in (programs / fmt).iterdir())


def test_torchscript_refuses_int8_with_the_reason(programs, tmp_path):
    with pytest.raises(compress.MethodUnavailable, match="int8 is not available for torchscript programs: "
                                                         "TorchScript programs cannot be quantized"):
        _run(programs / "torchscript", tmp_path / "art", "int8")
    assert exported.refusal("onnx", "bf16").startswith("bf16 is not available for onnx programs")
    assert exported.refusal("torch.export", "bf16") is None and not (tmp_path / "art").exists()


def _main(source, tmp_path, *args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    term = tmp_path / "term"
    code = compress.main(["--model-dir", str(source), "--artifact-dir", str(tmp_path / "art"),
                          "--termination-message-path", str(term), "--latency-iters", "3",
                          "--latency-budget", "1", *args])
    return code, json.loads(term.read_text())


def test_a_failed_gate_exits_3_and_a_rejection_without_a_failed_gate_exits_1(programs, tmp_path):
    source = programs / "onnx"
    code, result = _main(source, tmp_path / "a", "--method", "auto",
                         "--evaluation", json.dumps({"type": "fidelity", "threshold": 1.0}),
                         "--params", json.dumps({"candidates": ["int8", "bf16"]}))
    assert code == contract.COMPRESS_EXIT_GATE_FAILED and result["passed"] is False
    assert "int8: gate failed" in result["reason"] and "bf16: unavailable" in result["reason"]
    code, result = _main(source, tmp_path / "b", "--method", "auto",
                         "--params", json.dumps({"candidates": ["int8"], "latencyTargetMs": 1e-9}))
    assert code == contract.COMPRESS_EXIT_FAILED and result["passed"] is False
    assert "latencyTargetMs" in result["reason"] and "gate failed" not in result["reason"]
    assert not (tmp_path / "a" / "art").exists() and not (tmp_path / "b" / "art").exists()


class _Counting(modelio.LoadedModel):
    """A model whose forward pass takes 20 ms and is counted."""

    def __init__(self):
        self.inputs = [v2.TensorSpec("x", "FP32", (-1, 2))]
        self.calls = 0

    def forward(self, batch):
        import time
        self.calls += 1
        time.sleep(0.02)
        return {"y": batch["x"]}


def test_latency_stops_at_its_budget_or_its_pass_count():
    m = _Counting()
    compress.latency(m, 1, iters=1000, warmup=5, budget_s=0.2)
    assert compress.MIN_TIMED_PASSES + 1 <= m.calls < 1000
    m = _Counting()
    compress.latency(m, 1, iters=4, warmup=1, budget_s=600)
    assert m.calls == 1 + 4
