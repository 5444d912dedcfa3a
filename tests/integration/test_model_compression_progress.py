"""A compression Job's progress shows in the LeptonModel's status while it runs, on the real
control plane: the operator reads the tail of the compression pod's log through the API
server (``pods/log``) and puts the last progress line in ``status.compression.progress``
and the Compressed condition's message; once the Job is done, the result replaces it.

The pod is kwok's (hack/kwok.yaml: it runs until ``kwok.lepton.ai/exit-after``, then exits
with the result its annotations give). Its log is what the compression program itself
printed: ``python -m lepton_trainer.compress --method auto`` runs here on a small model,
and kwok serves its output as the pod's container log (a kwok ``Logs`` object naming the
file, in the container runtime's log format), to the API server as a kubelet would.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lepton_trainer import contract, data, modelio, models

pytestmark = pytest.mark.integration

RESULT = {"passed": True, "method": "int8", "requested_method": "auto", "reason": "auto chose int8",
          "bytes_before": 40000, "bytes_after": 10000, "ratio": 4.0}


def _small_model(directory: Path) -> Path:
    split = data.load_digits()
    config = {"in_features": split.num_features, "hidden": 32, "layers": 1, "num_classes": split.num_classes}
    torch.manual_seed(0)
    model = models.fit(models.build("mlp", **config), split.x_train, split.y_train, 50)
    return modelio.save_model(directory, model, {"arch": "mlp", "config": config, "dataset": "digits",
                                                 "input_shape": [split.num_features], "dtype": "float32"})


def _program_output(tmp: Path) -> list[str]:
    """The lines ``python -m lepton_trainer.compress --method auto`` prints (stdout and stderr)."""
    model = _small_model(tmp / "model")
    proc = subprocess.run([sys.executable, "-m", "lepton_trainer.compress", "--model-dir", str(model),
                           "--artifact-dir", str(tmp / "artifact"), "--method", "auto", "--latency-iters", "3",
                           "--latency-budget", "0.2", "--termination-message-path", str(tmp / "result")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout
    return proc.stdout.splitlines()


def _records(lines: list[str]) -> list[dict]:
    return [json.loads(x[len(contract.PROGRESS_PREFIX):]) for x in lines if x.startswith(contract.PROGRESS_PREFIX)]


def _write_cri_log(path: Path, lines: list[str]) -> None:
    """``lines`` as the container runtime writes a container's log (what kubelets serve)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{stamp} stdout F {x}\n" for x in lines))
    tmp.chmod(0o644)
    tmp.replace(path)


def _status(k, name: str) -> dict:
    return (k.get("leptonmodel", name) or {}).get("status") or {}


def _compressed_message(st: dict) -> str:
    return next((c for c in st.get("conditions", []) if c["type"] == "Compressed"), {}).get("message", "")


def test_a_running_compression_jobs_progress_shows_in_status(k, tmp_path):
    lines = _program_output(tmp_path)
    records = _records(lines)
    second = next(i for i, x in enumerate(lines) if x.startswith(contract.PROGRESS_PREFIX)
                  and json.loads(x[len(contract.PROGRESS_PREFIX):])["candidate"] == 2)
    early, late = records[:len(_records(lines[:second]))], records
    assert early[-1]["candidate"] == 1 and late[-1]["activity"].startswith("done in ")

    k.pvc("models")
    k.apply({"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel", "metadata": {"name": "prog", "namespace": k.ns},
             "spec": {"source": {"uri": "pvc://models/digits"}, "serving": {"replicas": 1},
                      "compression": {"method": "auto", "podAnnotations": {
                          "kwok.lepton.ai/exit-after": "90s", "kwok.lepton.ai/exit-code": "0",
                          "kwok.lepton.ai/termination-message": json.dumps(RESULT)}}}})
    pod = k.wait_for("the compression pod Running", lambda: next(
        (p["metadata"]["name"] for p in k.list("pods", "lepton.ai/model=prog,lepton.ai/role=compression")
         if p["status"].get("phase") == "Running"), None), timeout=60)
    assert "progress" not in (_status(k, "prog").get("compression") or {})       # no log yet: nothing shown
    log = tmp_path / "compress.log"
    _write_cri_log(log, lines[:second])
    k.apply({"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "Logs", "metadata": {"name": pod, "namespace": k.ns},
             "spec": {"logs": [{"containers": ["compress"], "logsFile": str(log)}]}})

    st = k.wait_for("candidate 1's last step in status", lambda: (
        s := _status(k, "prog")).get("compression", {}).get("progress") == early[-1] and s, timeout=40)
    assert st["phase"] == "Compressing" and st["compression"]["state"] == "Running"
    n = early[-1]["of"]
    assert f"candidate 1 of {n} ({early[-1]['method']}): {early[-1]['activity']}" in _compressed_message(st)

    _write_cri_log(log, lines)                     # the program goes on: the status follows
    st = k.wait_for("the program's last step in status", lambda: (
        s := _status(k, "prog")).get("compression", {}).get("progress") == late[-1] and s, timeout=40)
    assert late[-1]["activity"] in _compressed_message(st)
    messages = [e["message"] for e in k.events("prog")]
    assert not [m for m in messages if early[-1]["activity"] in m or late[-1]["activity"] in m], messages

    st = k.wait_for("the result in status", lambda: (
        s := _status(k, "prog")).get("compression", {}).get("state") == "Succeeded" and s, timeout=120)
    assert "progress" not in st["compression"] and st["compression"]["method"] == "int8"
