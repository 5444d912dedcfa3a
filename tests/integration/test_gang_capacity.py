"""All or nothing beyond GPUs: a gang of workers that ask for no GPU but for cpu and memory
starts only when its first ``min`` workers fit, each on a node that has room for all of
its requests.

The test's kwok nodes carry a label and a taint of their own (the job selects and
tolerates them), so no other test's pod lands on them and no other job counts them. The
job's ``capacity.mode`` is ``observed`` (the cluster is fixed): were the operator to
reconcile before its watch shows the first node, ``provision`` would rightly create the
gang as Pending pods, the demand for a cluster autoscaler (tests/integration/test_job_failures.py).
"""
from __future__ import annotations

import json

import pytest
import yaml

import localcluster

pytestmark = pytest.mark.integration


def pool_node(name: str, pool: str) -> dict:
    node = localcluster.cpu_node(name, cpu="6", memory="64Gi")
    node["metadata"]["labels"]["lepton.ai/test-pool"] = pool
    node["spec"] = {"taints": [{"key": "lepton.ai/test-pool", "value": pool, "effect": "NoSchedule"}]}
    return node


def test_a_cpu_gang_that_fits_once_starts_no_worker_until_a_node_is_added(k, cluster, operator):
    pool = f"cpugang-{k.ns[-5:]}"
    first, second = f"kwok-{pool}-0", f"kwok-{pool}-1"
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool_node(first, pool)))
    try:
        k.wait_for("the first node Ready", lambda: node_ready(cluster, first))
        k.apply(k.manifest("cpugang", workers={"min": 2, "max": 2}, resources={"gpus": 0, "cpu": "4", "memory": "8Gi"},
                           nodeSelector={"lepton.ai/test-pool": pool}, capacity={"mode": "observed"},
                           tolerations=[{"key": "lepton.ai/test-pool", "operator": "Exists", "effect": "NoSchedule"}]))
        # (until the operator's watch shows the node, the message says no node fits: 0 fit now)
        ready = k.wait_for("WaitingForCapacity, 1 fit", lambda: (c := k.condition("cpugang", "Ready")).get("reason")
                           == "WaitingForCapacity" and "1 fit now" in c["message"] and c, timeout=60)
        assert ready["message"].startswith(
            f"waiting for capacity: 2 workers need 4 CPU, 8Gi memory each; 1 fit now (node {first}: 6 CPU, "
            "64Gi memory free)"), ready["message"]
        assert k.workers("cpugang") == [] and k.status("cpugang")["phase"] == "Pending"   # none, not 1 of 2
        assert any(e["reason"] == "WaitingForCapacity" for e in k.events("cpugang"))
        k.wait_for("the info log line", lambda: "2 workers need 4 CPU, 8Gi memory each" in operator.log())

        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool_node(second, pool)))
        pods = k.wait_workers("cpugang", 2, timeout=120)
        assert sorted(p["spec"]["nodeName"] for p in pods) == [first, second]    # 4 + 4 CPU: one per node
        status = k.wait_phase("cpugang", "Running")
        assert "waitingForCapacitySince" not in status
    finally:
        k.kubectl("delete", "lj", "cpugang", "--wait=true", check=False)
        cluster.kubectl("delete", "node", first, second, "--wait=false", "--ignore-not-found")


def node_ready(cluster, name: str) -> bool:
    out = cluster.kubectl("get", "node", name, "-o", "json", check=False)
    conditions = (json.loads(out).get("status") or {}).get("conditions") or () if out else ()
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_a_waiting_gang_starts_when_another_pod_leaves_the_node(k, cluster, operator):
    """The capacity held by a pod that is not a job's (a model's server, a user's pod) is
    given back the moment that pod is deleted: the waiting job is woken by the pod's
    deletion, not by its next resync (30 s here; the gang must start well before it)."""
    pool = f"cpufree-{k.ns[-5:]}"
    node = f"kwok-{pool}-0"
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pool_node(node, pool)))
    try:
        k.wait_for("the node Ready", lambda: node_ready(cluster, node))
        k.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "squatter", "namespace": k.ns},
                 "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox",
                                                            "resources": {"requests": {"cpu": "4"}}}],
                          "tolerations": [{"key": "lepton.ai/test-pool", "operator": "Exists"}]}})
        k.apply(k.manifest("cpufree", workers={"min": 2, "max": 2}, resources={"gpus": 0, "cpu": "2", "memory": "1Gi"},
                           nodeSelector={"lepton.ai/test-pool": pool}, capacity={"mode": "observed"},
                           tolerations=[{"key": "lepton.ai/test-pool", "operator": "Exists", "effect": "NoSchedule"}]))
        k.wait_for("WaitingForCapacity, 1 fit", lambda: (c := k.condition("cpufree", "Ready")).get("reason")
                   == "WaitingForCapacity" and "1 fit now" in c["message"], timeout=60)
        assert k.workers("cpufree") == []
        k.kubectl("delete", "pod", "squatter", "--grace-period=0", "--force")
        pods = k.wait_workers("cpufree", 2, timeout=25)
        assert {p["spec"]["nodeName"] for p in pods} == {node}
    finally:
        k.kubectl("delete", "lj", "cpufree", "--wait=true", check=False)
        cluster.kubectl("delete", "node", node, "--wait=false", "--ignore-not-found")
