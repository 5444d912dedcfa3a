"""``python -m lepton_trainer.compress`` as a real subprocess on a trained MLP."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from lepton_trainer import compress, contract, data, modelio, models, quantization
from _models import PYTHON, env, train_mlp

pytestmark = pytest.mark.trainer

RESULT_KEYS = {"method", "backend", "bytes_before", "bytes_after", "ratio", "accuracy_before",
               "accuracy_after", "latency_p50_ms_batch1_before", "latency_p50_ms_batch1_after",
               "latency_p50_ms_batch32_before", "latency_p50_ms_batch32_after"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return train_mlp(tmp_path_factory.mktemp("teacher") / "model", hidden=256)


def run_compress(teacher, tmp_path, *args):
    art, term = tmp_path / "artifact", tmp_path / "termination-log"
    proc = subprocess.run([PYTHON, "-m", "lepton_trainer.compress", "--model-dir", str(teacher),
                           "--artifact-dir", str(art), "--termination-message-path", str(term), "--latency-iters", "20", *args],
                          env=env(), capture_output=True, text=True, timeout=300)
    return proc, art, term


def reloads_with_gate_accuracy(art, result):
    """Load the artifact and check it scores what the gate measured. Dynamic int8 kernels
    quantize activations at run time and may round one borderline example differently at
    another thread count, so for int8 the two must agree to within one held-out example;
    every other method must agree exactly."""
    model, meta = modelio.load_model(art)
    split = data.load_digits()
    tolerance = 1.5 / len(split.y_test) if result["method"] == "int8" else 1e-4
    assert models.accuracy(model, split.x_test, split.y_test) == pytest.approx(
        result["accuracy_after"], abs=tolerance)
    return model, meta


@pytest.mark.parametrize("method,args", [
    ("int8", []), ("int8", ["--backend", "torchao"]), ("fp16", []), ("bf16", []),
    ("prune", ["--sparsity", "0.6"]), ("distill", ["--student-hidden", "64", "--epochs", "20"]),
    ("none", []),
])
def test_each_method_writes_its_result_and_a_loadable_artifact(teacher, tmp_path, method, args):
    proc, art, term = run_compress(teacher, tmp_path, "--method", method, "--max-accuracy-drop", "0.05", *args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((art / contract.RESULT_FILE).read_text())
    term_text = term.read_text()
    assert len(term_text.encode()) < 4096 and json.loads(term_text) == result
    assert RESULT_KEYS <= result.keys() and result["method"] == method and result["passed"]
    assert result[contract.RESULT_ARTIFACT] == str(art)             # the directory it wrote, named
    assert result["bytes_after"] == modelio.size_bytes(art)
    assert result["bytes_before"] == modelio.size_bytes(teacher)
    assert result["accuracy_before"] - result["accuracy_after"] <= 0.05
    assert all(result[k] > 0 for k in RESULT_KEYS if k.startswith("latency"))

    model, meta = reloads_with_gate_accuracy(art, result)   # what the server will do, weights_only=True
    if method == "int8":
        assert result["ratio"] >= 3.0, result
        assert meta["quantization"] == quantization.quant_name(result["backend"])
    if method in ("fp16", "bf16"):
        assert meta["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[method]
        assert result["ratio"] > 1.9
    if method == "prune":
        assert compress.sparsity_of(model) == pytest.approx(0.6, abs=0.01)
    if method == "distill":
        assert meta["config"]["hidden"] == 64 and result["ratio"] > 5
    if method == "none":
        assert result["ratio"] == 1.0 and result["accuracy_after"] == result["accuracy_before"]


def test_int8_default_backend_is_the_cpu_default(teacher, tmp_path):
    proc, art, _ = run_compress(teacher, tmp_path, "--method", "int8")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((art / contract.RESULT_FILE).read_text())["backend"] == quantization.default_backend("cpu")


def test_gate_rejects_an_impossible_drop_and_writes_no_artifact(teacher, tmp_path):
    proc, art, term = run_compress(teacher, tmp_path, "--method", "prune", "--sparsity", "0.99",
                                   "--max-accuracy-drop", "0")
    assert proc.returncode == compress.GATE_FAILED_EXIT
    assert "accuracy gate failed" in proc.stderr and "maxAccuracyDrop 0.0" in proc.stderr
    assert not art.exists()
    result = json.loads(term.read_text())
    assert result["passed"] is False and result["accuracy_drop"] > 0


def test_settings_from_the_environment(teacher, tmp_path):
    e = env() | {contract.ENV_MODEL_DIR: str(teacher), contract.ENV_ARTIFACT_DIR: str(tmp_path / "a"),
                 contract.ENV_COMPRESSION_METHOD: "prune", contract.ENV_MAX_ACCURACY_DROP: "0.5",
                 contract.ENV_COMPRESSION_PARAMS: json.dumps({"sparsity": 0.3}),
                 compress.ENV_TERMINATION_MESSAGE_PATH: str(tmp_path / "term")}
    proc = subprocess.run([PYTHON, "-m", "lepton_trainer.compress"], env=e, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "term").read_text())
    assert result["method"] == "prune" and result["sparsity"] == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("args,message", [
    (["--method", "int8", "--max-accuracy-drop", "-0.1"], "must be a fraction"),
    (["--method", "prune", "--params", "[1]"], "must be a JSON object"),
    (["--method", "zip"], "invalid choice"),
])
def test_bad_arguments_are_rejected_with_a_reason(teacher, tmp_path, args, message):
    proc, art, _ = run_compress(teacher, tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert not art.exists()


def test_termination_message_stays_under_the_kubelet_limit(tmp_path):
    compress.write_termination_message(str(tmp_path / "t"), {"passed": False, "reason": "x" * 5000, "ratio": 2})
    text = (tmp_path / "t").read_text()
    assert len(text) < 4096 and json.loads(text) == {"passed": False, "ratio": 2}


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    import torch
    torch.manual_seed(0)
    split = data.load_digits()
    model = models.fit(models.build("transformer", in_features=64), split.x_train, split.y_train, 150)
    return modelio.save_model(tmp_path_factory.mktemp("tf") / "model", model, {
        "arch": "transformer", "config": {"in_features": 64}, "dataset": "digits",
        "input_shape": [64], "dtype": "float32"})


@pytest.mark.parametrize("backend", quantization.INT8_BACKENDS)
def test_int8_on_the_transformer(transformer, tmp_path, backend):
    proc, art, _ = run_compress(transformer, tmp_path, "--method", "int8", "--backend", backend,
                                "--max-accuracy-drop", "0.05")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((art / contract.RESULT_FILE).read_text())
    assert result["ratio"] > 1.3
    reloads_with_gate_accuracy(art, result)


# --- gates, structured pruning and auto ----------------------------------------------------

def _digits_eval(tmp_path, suffix: str):
    """The held-out digits as an evaluation file of the given type."""
    split = data.load_digits()
    x, y = split.x_test.numpy(), split.y_test.numpy()
    path = tmp_path / f"eval{suffix}"
    if suffix == ".npz":
        import numpy as np
        np.savez(path, input=x, labels=y)
    elif suffix == ".pt":
        import torch
        torch.save({"input": split.x_test, "labels": split.y_test}, path)
    elif suffix == ".safetensors":
        from safetensors.numpy import save_file
        save_file({"input": x, "labels": y}, str(path))
    else:
        path.write_text("\n".join(json.dumps({"input": row.tolist(), "labels": int(lab)})
                                  for row, lab in zip(x, y)))
    return path


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors", ".jsonl"])
def test_labelled_gate_from_a_data_file_passes_and_fails(teacher, tmp_path, suffix):
    path = _digits_eval(tmp_path, suffix)
    ok = compress.compress(teacher, tmp_path / "ok", "int8", None, {}, latency_iters=3,
                           evaluation={"type": "data", "path": str(path), "metric": "accuracy", "maxDrop": 0.05})
    assert ok["passed"] and ok["gate"]["rows"] == len(data.load_digits().y_test)
    assert ok["gate"]["before"] == pytest.approx(models.accuracy(modelio.load_model(teacher)[0],
                                                                 data.load_digits().x_test, data.load_digits().y_test))
    with pytest.raises(compress.GateFailed) as e:
        compress.compress(teacher, tmp_path / "bad", "prune", None, {"sparsity": 0.99}, latency_iters=3,
                          evaluation={"type": "data", "path": str(path), "metric": "top_k", "k": 2, "maxDrop": 0.0})
    assert e.value.result["passed"] is False and e.value.result["gate"]["metric"] == "top_k"
    assert "data gate failed" in e.value.result["reason"] and not (tmp_path / "bad").exists()


def test_mse_gate_on_targets(teacher, tmp_path):
    import numpy as np
    split = data.load_digits()
    with __import__("torch").no_grad():
        targets = modelio.load_model(teacher)[0](split.x_test).numpy()
    np.savez(tmp_path / "reg.npz", input=split.x_test.numpy(), targets=targets)
    ev = {"type": "data", "path": str(tmp_path / "reg.npz"), "metric": "mse", "maxDrop": 0.5, "output": "logits"}
    r = compress.compress(teacher, tmp_path / "a", "fp16", None, {}, latency_iters=3, evaluation=ev)
    assert r["passed"] and r["gate"]["before"] == 0.0 and 0.0 < r["gate"]["after"] < 0.5
    with pytest.raises(compress.GateFailed):
        compress.compress(teacher, tmp_path / "b", "prune", None, {"sparsity": 0.95}, latency_iters=3,
                          evaluation={**ev, "maxDrop": 0.01})


def test_fidelity_gate_passes_and_fails(teacher, tmp_path):
    ev = {"type": "fidelity", "metric": "top1_agreement", "threshold": 0.95, "samples": 200}
    r = compress.compress(teacher, tmp_path / "a", "bf16", None, {}, latency_iters=3, evaluation=ev)
    assert r["passed"] and r["gate"]["after"] >= 0.95 and r["gate"]["type"] == "fidelity"
    with pytest.raises(compress.GateFailed) as e:
        compress.compress(teacher, tmp_path / "b", "prune", None, {"sparsity": 0.99}, latency_iters=3,
                          evaluation={**ev, "metric": "cosine", "threshold": 0.99})
    assert "fidelity gate failed" in e.value.result["reason"] and e.value.result["gate"]["after"] < 0.99


@pytest.mark.parametrize("evaluation,message", [
    ({"type": "data", "metric": "accuracy"}, "needs 'path'"),
    ({"type": "fidelity", "metric": "accuracy"}, "fidelity gate metric"),
    ({"type": "fidelity", "threshold": 2}, "threshold must be"),
    ({"metric": "cosine", "bogus": 1}, "unknown evaluation fields"),
])
def test_bad_evaluation_is_rejected(evaluation, message):
    from lepton_trainer import gates
    with pytest.raises(gates.GateError, match=message):
        gates.parse(evaluation)


def test_structured_pruning_really_shrinks_and_unstructured_says_it_does_not(teacher, tmp_path):
    r = compress.compress(teacher, tmp_path / "s", "prune-structured", 0.05, {"amount": 0.5}, latency_iters=3)
    assert r["passed"] and r["hidden_after"] == r["hidden_before"] // 2
    assert r["ratio"] > 1.8 and r["bytes_after"] == modelio.size_bytes(tmp_path / "s")
    model, meta = modelio.load_model(tmp_path / "s")
    assert meta["config"]["hidden"] == 128
    u = compress.compress(teacher, tmp_path / "u", "prune", 0.05, {"sparsity": 0.5}, latency_iters=3)
    assert u["effective"] is False and u["ratio"] == 1.0 and "no size or latency gain" in u["reason"]


def _row(method, size, lat, passed=True, **extra):
    return {"method": method, "bytes": size, "latency_p50_ms_batch1": lat, "latency_p50_ms_batch32": lat * 10,
            "gate": {"passed": passed}, **extra}


def test_auto_chooses_from_the_table():
    rows = [_row("int8", 300, 2.0), _row("fp16", 200, 9.0), _row("bf16", 200, 5.0),
            _row("prune-structured", 100, 1.0, passed=False), _row("prune", 400, 0.5, effective=False)]
    best, why = compress.choose([dict(r) for r in rows], "size", None)
    assert best["method"] == "bf16" and "smallest" in why           # tie on size: the faster one
    best, _ = compress.choose([dict(r) for r in rows], "latency", None)
    assert best["method"] == "int8"                                 # the unstructured prune never counts
    best, _ = compress.choose([dict(r) for r in rows], "size", 4.0)
    assert best["method"] == "int8"                                 # bf16 misses the latency target
    table = [dict(r) for r in rows]
    best, why = compress.choose(table, "size", 1.5)
    assert best is None and "no candidate passed" in why
    assert {r["method"]: r["rejected"] for r in table}["prune-structured"] == "gate failed"
    best, _ = compress.choose([dict(r) for r in rows], "latency", None, latency_batch=32)
    assert best["method"] == "int8"


def test_auto_on_the_builtin_writes_the_whole_table(teacher, tmp_path):
    proc, art, term = run_compress(teacher, tmp_path, "--method", "auto", "--max-accuracy-drop", "0.03",
                                   "--params", json.dumps({"candidates": ["int8", "fp16", "prune-structured"],
                                                           "amount": 0.5}))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((art / contract.RESULT_FILE).read_text())
    table = {r["method"]: r for r in result["candidates"]}
    passing = {m: r for m, r in table.items() if "gate" in r and r["gate"]["passed"]}
    assert result["method"] == min(passing, key=lambda m: (passing[m]["bytes"], passing[m]["latency_p50_ms_batch1"]))
    # a candidate larger than one that already passed is sized, then neither gated nor timed
    assert all(r["skipped"].startswith("not gated or timed") and r["bytes"] > result["bytes_after"]
               for r in table.values() if "gate" not in r)
    assert result["requested_method"] == "auto" and result["passed"] and result["reason"].startswith("auto chose")
    assert json.loads(term.read_text())["method"] == result["method"]
    assert modelio.size_bytes(art) == result["bytes_after"]


def test_methods_that_do_not_apply_say_so(tmp_path):
    import torch
    d = tmp_path / "exp"
    d.mkdir()
    m = torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()
    torch.export.save(torch.export.export(m, (torch.zeros(2, 4),),
                                          dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},)),
                      str(d / "m.pt2"))
    with pytest.raises(compress.MethodUnavailable, match="prune-structured is not available for torch.export"):
        compress.compress(d, tmp_path / "a", "prune-structured", None, {}, latency_iters=2)
    r = compress.compress(d, tmp_path / "b", "none", None, {}, latency_iters=2)
    assert r["passed"] and r["format"] == "torch.export" and (tmp_path / "b" / "m.pt2").exists()


def test_auto_with_no_candidate_that_can_run_says_so_and_is_no_failed_gate(tmp_path):
    """Pruning and distillation have no implementation for a torch.export program: when every
    candidate is unavailable, no gate runs, and the program says so with exit 1 (compression
    failed, which the operator reports as CompressionFailed), not the failed gate's exit 3."""
    model = tmp_path / "exported"
    model.mkdir()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 3)).eval(), (torch.randn(2, 4),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(model / "model.pt2"))
    proc, art, term = run_compress(model, tmp_path, "--method", "auto", "--model-format", "torch.export",
                                   "--params", json.dumps({"candidates": ["prune-structured", "distill"]}))
    assert proc.returncode == contract.COMPRESS_EXIT_FAILED, proc.stderr
    result = json.loads(term.read_text())
    assert result["passed"] is False and "no compression candidate could run" in result["reason"]
    assert all(f"{m}: unavailable: {m} is not available for torch.export" in result["reason"]
               for m in ("prune-structured", "distill")) and not art.exists()
