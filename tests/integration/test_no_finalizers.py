"""LeptonJobs and LeptonModels carry no finalizer, so the operator's absence never blocks
a deletion, on a real control plane.

- A LeptonJob and a LeptonModel the operator reconciles carry no finalizer.
- The finalizer an older release's kopf daemons put on objects is removed once, and a
  finalizer of another controller stays; an object deleted while it carried the old
  finalizer and no operator ran is gone once the operator starts.
- With the operator stopped, the objects stay and their children keep running; deleting
  the objects and their namespace completes (the namespace is gone): nothing stays
  Terminating.

These tests start and stop their own operator processes, so they run on a control plane of
their own, where the session's operator (the ``operator`` fixture) cannot act beside them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from waiting import started_cluster, wait_for, wait_healthy

import localcluster

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
LEGACY = ["lepton.ai/finalizer", "kopf.zalando.org/KopfFinalizerMarker"]   # what older releases' kopf put
FOREIGN = "example.com/keep"                                                 # another controller's


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory):
    c = started_cluster(tmp_path_factory.mktemp("finalizer-cluster"), gpu_node_count=1)
    yield c
    c.stop()


@pytest.fixture
def start_operator(own_cluster, tmp_path):
    """Starts the operator against ``own_cluster`` (at most one per test); stops it at the end."""
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        health, log_path = localcluster.free_port(), tmp_path / f"operator-{len(procs)}.log"
        env = {**own_cluster.env, "LEPTON_TRAINER_IMAGE": "lepton-trainer:test", "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lepton_operator", "--all-namespaces", "--metrics-port", "0",
                 "--health-port", str(health)], stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        procs.append(proc)
        wait_healthy(proc, health, log_path)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def job(name: str, namespace: str, finalizers: list[str] | None = None) -> dict:
    meta = {"name": name, "namespace": namespace, **({"finalizers": finalizers} if finalizers else {})}
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob", "metadata": meta,
            "spec": {"workers": {"min": 1, "max": 1, "replicas": 1}, "resources": {"gpus": 1}}}


def model(name: str, namespace: str, source_job: str, finalizers: list[str] | None = None) -> dict:
    meta = {"name": name, "namespace": namespace, **({"finalizers": finalizers} if finalizers else {})}
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel", "metadata": meta,
            "spec": {"source": {"jobRef": {"name": source_job}}, "compression": {"method": "none"}}}


def get(c, namespace: str, *what: str) -> dict | None:
    out = c.kubectl("-n", namespace, "get", *what, "-o", "json", check=False)
    return json.loads(out) if out else None


def finalizers(c, namespace: str, kind: str, name: str) -> list[str] | None:
    """The object's finalizers ([] for none); None when it does not exist."""
    obj = get(c, namespace, kind, name)
    return None if obj is None else list(obj["metadata"].get("finalizers") or [])


def reconciled(c, namespace: str, kind: str, name: str) -> dict | None:
    """The object once its loop has written a status for its current generation."""
    obj = get(c, namespace, kind, name)
    status = (obj or {}).get("status") or {}
    return obj if obj and status.get("observedGeneration") == obj["metadata"]["generation"] else None


def live_workers(c, namespace: str, name: str) -> list[dict]:
    pods = (get(c, namespace, "pods", "-l", f"lepton.ai/job={name},lepton.ai/role=worker") or {}).get("items", [])
    return [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]


def test_reconciled_objects_carry_no_finalizer(own_cluster, start_operator):
    c = own_cluster
    ns = c.create_namespace("no-finalizer")
    start_operator()
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([job("train", ns), model("serve", ns, "train")]))
    wait_for("train's worker Running", lambda: len(live_workers(c, ns, "train")) == 1, timeout=90)
    for kind, name in (("leptonjob", "train"), ("leptonmodel", "serve")):
        obj = wait_for(f"{kind} {name} reconciled", lambda: reconciled(c, ns, kind, name), timeout=60)
        assert obj["metadata"].get("finalizers") in (None, []), obj["metadata"]


def test_an_older_release_finalizer_is_removed_and_another_kept(own_cluster, start_operator):
    c = own_cluster
    ns = c.create_namespace("old-finalizer")
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        job("old", ns, [*LEGACY, FOREIGN]), model("oldm", ns, "old", LEGACY), job("stuck", ns, LEGACY)]))
    # Deleted while no operator runs: the old finalizer holds it Terminating.
    c.kubectl("-n", ns, "delete", "leptonjob", "stuck", "--wait=false")
    assert get(c, ns, "leptonjob", "stuck")["metadata"].get("deletionTimestamp")
    start_operator()
    wait_for("old's legacy finalizers removed", lambda: finalizers(c, ns, "leptonjob", "old") == [FOREIGN],
             timeout=60)
    wait_for("oldm's legacy finalizers removed", lambda: finalizers(c, ns, "leptonmodel", "oldm") == [],
             timeout=60)
    wait_for("the deleted job gone", lambda: finalizers(c, ns, "leptonjob", "stuck") is None, timeout=60)
    wait_for("old reconciled", lambda: reconciled(c, ns, "leptonjob", "old"), timeout=60)
    assert finalizers(c, ns, "leptonjob", "old") == [FOREIGN]
    c.kubectl("-n", ns, "patch", "leptonjob", "old", "--type=merge", "-p", '{"metadata": {"finalizers": null}}')


def test_deleting_after_the_operator_stopped_completes(own_cluster, start_operator):
    c = own_cluster
    ns = c.create_namespace("operator-gone")
    proc = start_operator()
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([job("train", ns), model("serve", ns, "train")]))
    workers = wait_for("train's worker Running", lambda: live_workers(c, ns, "train"), timeout=90)
    wait_for("serve reconciled", lambda: reconciled(c, ns, "leptonmodel", "serve"), timeout=60)
    proc.terminate()
    assert proc.wait(timeout=30) == 0

    # The operator is gone: the objects stay, their children keep running.
    assert [p["metadata"]["uid"] for p in live_workers(c, ns, "train")] == [p["metadata"]["uid"] for p in workers]
    assert get(c, ns, "leptonmodel", "serve") is not None
    c.kubectl("delete", "namespace", ns, "--wait=false")
    wait_for(f"namespace {ns} gone", lambda: get(c, "default", "namespace", ns) is None, timeout=180)
    assert get(c, "default", "namespace", ns) is None
