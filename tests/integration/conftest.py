"""Fixtures for tests against the real local control plane (``cluster`` from tests/conftest.py).

- ``operator`` (session): applies ``crds/*.yaml`` and runs ``python -m lepton_operator``
  as a subprocess with the cluster's KUBECONFIG; yields an ``OperatorProcess``.
- ``namespace``: a fresh namespace per test, deleted afterwards.
- ``k``: a ``Kube`` helper bound to that namespace (kubectl wrappers and condition waits).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from exporter import Exporter
from waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




@dataclass
class OperatorProcess:
    proc: subprocess.Popen
    metrics_url: str
    health_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics().splitlines():
            m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total


@pytest.fixture
def exporter(cluster, namespace):
    """A real Prometheus exporter whose series the test sets, scraped by the cluster's Prometheus."""
    e = Exporter(cluster, f"exp-{namespace}", free_port(), namespace=namespace)
    yield e
    e.stop()


@pytest.fixture(scope="session")
def operator(cluster, tmp_path_factory):
    """The operator running against ``cluster`` with the repository's CRDs installed."""
    cluster.install_crds()
    metrics_port, health_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    env = {**cluster.env, "LEPTON_TRAINER_IMAGE": "lepton-trainer:test", "LEPTON_RESYNC_SECONDS": "30",
           "PYTHONUNBUFFERED": "1", "LEPTON_PROMETHEUS_URL": cluster.prometheus_url,
           "LEPTON_PROMETHEUS_TIMEOUT": "1", "LEPTON_PROGRESS_INTERVAL_SECONDS": "1", "LEPTON_STALL_SECONDS": "4"}
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lepton_operator", "--all-namespaces",
             "--metrics-port", str(metrics_port), "--health-port", str(health_port)],
            stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    op = OperatorProcess(proc, f"http://127.0.0.1:{metrics_port}/metrics",
                         f"http://127.0.0.1:{health_port}/healthz", log_path)

    def healthy():
        assert proc.poll() is None, f"operator exited:\n{op.log()[-4000:]}"
        try:
            with urllib.request.urlopen(op.health_url, timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    wait_for("the operator's liveness endpoint", healthy, timeout=60)
    yield op
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    print(f"operator log: {log_path}")


class Kube:
    """kubectl against the test cluster, bound to one namespace."""

    wait_for = staticmethod(wait_for)

    def __init__(self, cluster, namespace: str):
        self.cluster, self.ns = cluster, namespace

    def manifest(self, name: str, **spec: Any) -> dict:
        return lepton_job(name, self.ns, **spec)

    def bound_gpus(self) -> int:
        return bound_gpus(self.cluster)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.cluster.kubectl("-n", self.ns, *args, input=input, check=check)

    def run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        """kubectl that may fail (returns the completed process, stderr included)."""
        return subprocess.run(["kubectl", "--kubeconfig", self.cluster.kubeconfig, "-n", self.ns, *args],
                              input=input, capture_output=True, text=True, env=self.cluster.env)

    def apply(self, *objs: dict) -> str:
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))

    def get(self, kind: str, name: str) -> dict | None:
        out = self.kubectl("get", kind, name, "-o", "json", check=False)
        return json.loads(out) if out else None

    def list(self, kind: str, selector: str | None = None) -> list[dict]:
        args = ["get", kind, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.kubectl(*args))["items"]

    def job(self, name: str) -> dict | None:
        return self.get("leptonjob", name)

    def status(self, name: str) -> dict:
        return (self.job(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict:
        return next((c for c in self.status(name).get("conditions", []) if c["type"] == type_), {})

    def workers(self, job: str, live_only: bool = True) -> list[dict]:
        pods = self.list("pods", f"lepton.ai/job={job},lepton.ai/role=worker")
        if live_only:
            pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        return sorted(pods, key=lambda p: int(p["metadata"]["labels"]["lepton.ai/worker-index"]))

    def events(self, name: str) -> list[dict]:
        items = self.list("events")
        return [e for e in items if e["involvedObject"].get("name") == name]

    def wait_phase(self, name: str, phase: str, timeout: float = 120.0) -> dict:
        return wait_for(f"{self.ns}/{name} phase {phase}",
                        lambda: (s := self.status(name)).get("phase") == phase and s, timeout)

    def wait_workers(self, job: str, count: int, phase: str = "Running", timeout: float = 120.0) -> list[dict]:
        def check():
            pods = self.workers(job)
            ok = len(pods) == count and all(p["status"].get("phase") == phase for p in pods)
            return ok and pods
        return wait_for(f"{count} {phase} workers of {self.ns}/{job}", check, timeout)

    def pvc(self, name: str) -> None:
        """A PVC bound to a hostPath PV made for it (the local cluster has no provisioner)."""
        pv_name = f"{self.ns}-{name}"
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                     "hostPath": {"path": f"/tmp/lepton-pv/{pv_name}"},
                     "claimRef": {"namespace": self.ns, "name": name},
                     "persistentVolumeReclaimPolicy": "Delete"}}))
        self.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                    "metadata": {"name": name, "namespace": self.ns},
                    "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "",
                             "volumeName": pv_name, "resources": {"requests": {"storage": "1Gi"}}}})

    def kwok_exit(self, pod: str, code: int, reason: str | None = None) -> None:
        """Make a kwok pod's container terminate with ``code`` (see hack/kwok.yaml)."""
        args = ["annotate", "--overwrite", "pod", pod, f"kwok.lepton.ai/exit-code={code}"]
        if reason:
            args.append(f"kwok.lepton.ai/reason={reason}")
        self.kubectl(*args)


def lepton_job(name: str, namespace: str, **spec: Any) -> dict:
    """A LeptonJob manifest; keyword arguments are spec fields."""
    base = {"workers": {"min": 2, "max": 4, "replicas": 2}, "resources": {"gpus": 1}}
    base.update(spec)
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": base}


def bound_gpus(cluster) -> int:
    """GPUs requested by non-terminal pods, cluster-wide."""
    pods = json.loads(cluster.kubectl("get", "pods", "-A", "-o", "json"))["items"]
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")
               for c in p["spec"]["containers"])


@pytest.fixture
def namespace(cluster, operator, request):
    name = f"lj-{re.sub(r'[^a-z0-9]+', '-', request.node.name.lower())[:40].strip('-')}-{uuid.uuid4().hex[:5]}"
    cluster.create_namespace(name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
    # Release GPUs before the next test counts capacity.
    cluster.kubectl("delete", "pods", "--all", "-n", name, "--grace-period=0", "--force", check=False)


@pytest.fixture
def k(cluster, namespace) -> Kube:
    return Kube(cluster, namespace)


os.environ.setdefault("OMP_NUM_THREADS", "1")
