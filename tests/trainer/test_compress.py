"""``python -m lepton_trainer.compress`` as a real subprocess on a trained MLP."""
from __future__ import annotations

import json
import subprocess

import pytest

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
