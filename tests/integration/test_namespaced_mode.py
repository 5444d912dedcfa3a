"""An operator that watches named namespaces, on a control plane of its own (one kwok GPU
node of 4 GPUs), so the session's cluster-wide operator does not reconcile beside it.

GPUs that pods outside the watched namespaces hold are not free once the operator is asked
to read every namespace's pod requests (LEPTON_CLUSTER_GPU_USAGE, off by default): a gang
that does not fit waits instead of half-starting; when those GPUs are released, it starts.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import Kube, free_port
from waiting import started_cluster, wait_for, wait_healthy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ns_cluster(tmp_path_factory):
    c = started_cluster(tmp_path_factory.mktemp("ns-cluster"), gpu_node_count=1, gpus_per_node=4)
    yield c
    c.stop()


def test_gpus_used_outside_the_watched_namespaces_are_not_free(ns_cluster, tmp_path):
    c = ns_cluster
    team, other = c.create_namespace("team-a"), c.create_namespace("other")
    hog = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hog", "namespace": other},
           "spec": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                    "containers": [{"name": "c", "image": "busybox",
                                    "resources": {"limits": {"nvidia.com/gpu": "3"}}}]}}
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump(hog))
    wait_for("the other namespace's pod bound", lambda: json.loads(
        c.kubectl("get", "pod", "hog", "-n", other, "-o", "json"))["spec"].get("nodeName"), timeout=60)

    health = free_port()
    log = tmp_path / "operator.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "lepton_operator", "--namespace", team,
                                 "--metrics-port", str(free_port()), "--health-port", str(health)],
                                stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**c.env, "LEPTON_TRAINER_IMAGE": "lepton-trainer:test", "PYTHONUNBUFFERED": "1",
                                     "LEPTON_CLUSTER_GPU_USAGE": "true"})
    try:
        wait_healthy(proc, health, log)
        k = Kube(c, team)
        k.apply(k.manifest("gang", workers={"min": 2, "max": 2}))
        ready = k.wait_for("WaitingForCapacity", lambda: (cond := k.condition("gang", "Ready")).get("reason")
                           == "WaitingForCapacity" and cond, timeout=60)
        assert "1 fit now" in ready["message"], ready["message"]
        assert k.workers("gang") == []           # all or nothing: no half-started gang
        c.kubectl("delete", "pod", "hog", "-n", other, "--grace-period=0", "--force")
        k.wait_workers("gang", 2, timeout=60)
        k.wait_phase("gang", "Running")
        # Namespaced start: kopf lists nothing cluster-wide that a namespaced Role would refuse.
        # (a refusal reads "... is forbidden" / APIForbiddenError; a bare "403" also matches
        # log timestamps' milliseconds)
        assert "forbidden" not in log.read_text().lower(), log.read_text()[-3000:]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
