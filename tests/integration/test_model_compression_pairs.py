"""``kubectl apply`` of a LeptonModel refuses a pair of source format and compression method
that has no implementation, naming both fields, and accepts exactly the implemented pairs;
the parser agrees on every pair (for an API server without CEL)."""
from __future__ import annotations

import subprocess
import uuid

import pytest
import yaml

from lepton_operator.core.fields import InvalidSpec
from lepton_operator.model.spec import parse_model
from lepton_trainer import contract

pytestmark = pytest.mark.integration

FORMATS = ("builtin", "huggingface", "torch.export", "onnx", "torchscript")
METHODS = tuple(m for m in contract.COMPRESSION_METHODS)


def _model(fmt: str, method: str) -> dict:
    name = f"pair-{uuid.uuid4().hex[:8]}"
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel", "metadata": {"name": name},
            "spec": {"source": {"uri": "pvc://models/m", "format": fmt}, "compression": {"method": method}}}


@pytest.fixture(scope="module")
def apply_dry_run(cluster):
    cluster.install_crds()
    namespace = cluster.create_namespace(f"pairs-{uuid.uuid4().hex[:6]}")

    def run(obj: dict) -> subprocess.CompletedProcess:
        return subprocess.run(["kubectl", "--kubeconfig", cluster.kubeconfig, "-n", namespace, "apply",
                               "--dry-run=server", "-f", "-"], input=yaml.safe_dump(obj),
                              capture_output=True, text=True, env=cluster.env)
    from waiting import wait_for
    wait_for("the LeptonModel resource to be served",
             lambda: run(_model("builtin", "none")).returncode == 0, timeout=60)
    yield run
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _parser_accepts(obj: dict) -> bool:
    try:
        parse_model(obj["metadata"]["name"], obj["spec"], "img")
    except InvalidSpec:
        return False
    return True


def test_every_format_and_method_pair_is_accepted_exactly_when_implemented(apply_dry_run):
    accepted = set()
    for fmt in FORMATS:
        for method in METHODS:
            obj = _model(fmt, method)
            proc = apply_dry_run(obj)
            if proc.returncode == 0:
                accepted.add((fmt, method))
            else:
                assert "spec.compression.method" in proc.stderr and f"spec.source.format {fmt}" in proc.stderr, \
                    proc.stderr
                assert f"spec.compression.method {method} has no implementation" in proc.stderr, proc.stderr
            assert _parser_accepts(obj) == (proc.returncode == 0), (fmt, method, proc.stderr)
    implemented = {(f, m) for f, ms in contract.EXPORTED_FORMAT_METHODS.items() for m in ms}
    implemented |= {(f, m) for f in ("builtin", "huggingface") for m in METHODS if m != "int8-static"}
    assert accepted == implemented
