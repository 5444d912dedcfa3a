"""Pods go where they belong: a pod that asks for no GPU (the rendezvous store, the
inference server, the compression Job) never lands on a GPU node, even when the node
without GPUs is full; each role can be placed by the spec.

The local control plane's nodes are kwok's: the real scheduler places the pods, but
nothing runs in them. That a store placed this way serves its workers is shown on the
real node (tests/real), where the real node is the only node without GPUs.
"""
from __future__ import annotations

import pytest

from test_model_rollout import GOOD, model, mstatus, result_annotations

pytestmark = pytest.mark.integration
CPU_NODE = "kwok-cpu-0"


def node_of(k, pod: str) -> str | None:
    return ((k.get("pod", pod) or {}).get("spec") or {}).get("nodeName")


def unschedulable(k, pod: str) -> str:
    conds = ((k.get("pod", pod) or {}).get("status") or {}).get("conditions") or []
    c = next((c for c in conds if c["type"] == "PodScheduled"), {})
    return c.get("message", "") if c.get("status") == "False" else ""


def test_cpu_only_pods_wait_for_the_cpu_node_rather_than_take_a_gpu_node(k):
    k.pvc("models")
    k.cluster.kubectl("cordon", CPU_NODE)               # the node without GPUs is full
    try:
        k.apply(k.manifest("placed"))
        k.apply(model(k, "placed", compression={"method": "none"}))
        k.apply(model(k, "placedc", compression={"method": "int8", "podAnnotations": result_annotations(GOOD)}))
        why = k.wait_for("the store waits", lambda: unschedulable(k, "placed-rdzv"))
        assert node_of(k, "placed-rdzv") is None and "untolerated taint" in why, why
        pods = k.wait_for("serving pods", lambda: k.list("pods", "lepton.ai/model=placed,lepton.ai/role=serving"))
        name = pods[0]["metadata"]["name"]
        assert k.wait_for("the server waits", lambda: unschedulable(k, name))
        assert all(p["spec"].get("nodeName") is None for p in
                   k.list("pods", "lepton.ai/model=placed,lepton.ai/role=serving"))
        assert mstatus(k, "placed").get("phase") != "Ready"
        compressing = k.wait_for("the compression pod", lambda: k.list("pods", "lepton.ai/model=placedc"))
        name = compressing[0]["metadata"]["name"]      # (first, maybe, on its claim's binding)
        assert k.wait_for("the compression pod to wait on the GPU nodes' taint",
                          lambda: "untolerated taint" in unschedulable(k, name))
    finally:
        k.cluster.kubectl("uncordon", CPU_NODE)
    assert k.wait_for("the store on the CPU node", lambda: node_of(k, "placed-rdzv")) == CPU_NODE
    k.wait_for("model Ready", lambda: mstatus(k, "placed").get("phase") == "Ready", timeout=120)
    assert {p["spec"]["nodeName"] for p in k.list("pods", "lepton.ai/model=placed,lepton.ai/role=serving")} == {CPU_NODE}
    assert all(node_of(k, p["metadata"]["name"]).startswith("kwok-gpu-") for p in k.workers("placed"))
    k.wait_for("the compressed model Ready", lambda: mstatus(k, "placedc").get("phase") == "Ready", timeout=120)
    assert {p["spec"]["nodeName"] for p in k.list("pods", "lepton.ai/model=placedc")} == {CPU_NODE}


def test_each_role_is_placed_by_its_spec(k):
    """spec.rendezvous and serving.nodeSelector/tolerations place the pods on GPU nodes when
    asked (say, a cluster of GPU nodes only)."""
    gpu = {"nodeSelector": {"nvidia.com/gpu.present": "true"},
           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
           "affinity": {"nodeAffinity": {}}}
    k.pvc("models")
    k.apply(k.manifest("onpool", rendezvous=gpu))
    assert k.wait_for("store placed", lambda: node_of(k, "onpool-rdzv")).startswith("kwok-gpu-")
    k.apply(model(k, "onpool", compression={"method": "none"}, serving={"replicas": 1, **gpu}))
    k.wait_for("model Ready", lambda: mstatus(k, "onpool").get("phase") == "Ready", timeout=120)
    pods = k.list("pods", "lepton.ai/model=onpool,lepton.ai/role=serving")
    assert pods and all(p["spec"]["nodeName"].startswith("kwok-gpu-") for p in pods)
