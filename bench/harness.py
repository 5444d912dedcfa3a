"""What the operator benchmarks share: the local control plane with a real Prometheus, the
operator as a subprocess, a test exporter, and a PersistentVolumeClaim for model sources.

    with harness.Bench("bench-rollout") as b:
        b.exporter.set("series", 1.0, label="x")
        b.apply([...objects...])
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kubernetes
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "hack"), str(ROOT / "tests" / "integration")]
import localcluster  # noqa: E402
from exporter import Exporter  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(check, timeout=60.0, every=0.05):
    """(monotonic time, value) of the first truthy ``check()``; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return time.monotonic(), value
        time.sleep(every)
    raise TimeoutError("condition not reached")


class Bench:
    """The control plane, the operator and an exporter, in namespace ``ns``, with a claim
    ``models`` bound to a hostPath volume."""

    def __init__(self, ns: str):
        self.ns = ns
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{ns}-"))
        self.cluster = self.op = self.exporter = None

    def __enter__(self) -> "Bench":
        self.cluster = c = localcluster.Cluster(self.tmp / "cluster").start()
        for crd in sorted((ROOT / "crds").glob("*.yaml")):
            c.kubectl("apply", "--server-side", "-f", str(crd))
        c.kubectl("wait", "--for=condition=Established", "crd/leptonmodels.lepton.ai", "crd/leptonjobs.lepton.ai")
        c.create_namespace(self.ns)
        env = {**c.env, "LEPTON_PROMETHEUS_URL": c.prometheus_url,
               "LEPTON_PROMETHEUS_TIMEOUT": "1", "LEPTON_TRAINER_IMAGE": "lepton-trainer:bench",
               "PYTHONUNBUFFERED": "1"}
        log = open(self.tmp / "operator.log", "wb")
        self.op = subprocess.Popen([sys.executable, "-m", "lepton_operator", "--all-namespaces",
                                    "--metrics-port", str(free_port()), "--health-port", str(free_port())],
                                   env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.exporter = Exporter(c, "bench", free_port(), namespace=self.ns)
        self.apply([
            {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{self.ns}-models"},
             "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                      "hostPath": {"path": str(self.tmp / "pv")}, "claimRef": {"namespace": self.ns, "name": "models"}}},
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "models", "namespace": self.ns},
             "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": f"{self.ns}-models",
                      "resources": {"requests": {"storage": "1Gi"}}}}])
        self.apps = kubernetes.client.AppsV1Api(c.api_client())
        self.core = kubernetes.client.CoreV1Api(c.api_client())
        self.custom = kubernetes.client.CustomObjectsApi(c.api_client())
        return self

    def apply(self, objects: list[dict]) -> None:
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects))

    def model_status(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object("lepton.ai", "v1alpha1", self.ns, "leptonmodels",
                                                        name).get("status") or {}

    def machine(self) -> dict:
        import platform
        return {"cpus": os.cpu_count(), "python": platform.python_version()}

    def __exit__(self, *exc) -> None:
        if self.exporter:
            self.exporter.stop()
        if self.op:
            self.op.terminate()
            self.op.wait(timeout=20)
        if self.cluster:
            self.cluster.stop()
