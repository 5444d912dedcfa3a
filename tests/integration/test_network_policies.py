"""spec.networkPolicy on the real control plane: the operator creates the policies owned
by the resource (a job's by default: a job without ``networkPolicy``, such as one stored
before that default, gets them too), restores one deleted by hand,
applies a changed ingressFrom, and deletes them when the field turns off."""
import json

import pytest

pytestmark = pytest.mark.integration
PROMETHEUS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def policies(k, selector: str) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in k.list("networkpolicies", selector)
            if not p["metadata"].get("deletionTimestamp")}


def wait_policies(k, selector: str, names: set[str], timeout: float = 60.0) -> dict[str, dict]:
    """Wait until exactly ``names`` exist; returns them by name."""
    found: dict[str, dict] = {}

    def exactly() -> bool:
        nonlocal found
        found = policies(k, selector)
        return found.keys() == names

    k.wait_for(f"NetworkPolicies {sorted(names)} for {selector}", exactly, timeout)
    return found


def test_a_jobs_policies_follow_its_spec(k):
    k.apply(k.manifest("fenced"))                                   # no networkPolicy: on by default
    assert "networkPolicy" not in k.job("fenced")["spec"]
    found = wait_policies(k, "lepton.ai/job=fenced", {"fenced-rdzv", "fenced-workers"})
    uid = k.job("fenced")["metadata"]["uid"]
    for policy in found.values():
        (ref,) = policy["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["uid"], ref["controller"]) == ("LeptonJob", uid, True)
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert found["fenced-workers"]["spec"]["ingress"][1] == {"ports": [{"port": 9400, "protocol": "TCP"}]}

    k.kubectl("delete", "networkpolicy", "fenced-rdzv")             # restored by the operator
    wait_policies(k, "lepton.ai/job=fenced", {"fenced-rdzv", "fenced-workers"})

    k.kubectl("patch", "lj", "fenced", "--type=merge", "-p",
              json.dumps({"spec": {"networkPolicy": {"ingressFrom": PROMETHEUS}}}))
    k.wait_for("ingressFrom on the metrics port",
               lambda: policies(k, "lepton.ai/job=fenced")["fenced-workers"]["spec"]["ingress"][1].get("from")
               == PROMETHEUS, 60)

    k.kubectl("patch", "lj", "fenced", "--type=merge", "-p", '{"spec": {"networkPolicy": {"enabled": false}}}')
    wait_policies(k, "lepton.ai/job=fenced", set())
    assert [p["metadata"]["name"] for p in k.workers("fenced")] == ["fenced-worker-0", "fenced-worker-1"]


def test_a_models_policies_follow_its_spec(k):
    k.apply({"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
             "metadata": {"name": "fenced", "namespace": k.ns},
             "spec": {"source": {"uri": "pvc://missing/model"},
                      "networkPolicy": {"enabled": True, "ingressFrom": PROMETHEUS}}})
    found = wait_policies(k, "lepton.ai/model=fenced", {"fenced-serving", "fenced-compression"})
    assert found["fenced-serving"]["spec"]["ingress"] == [
        {"from": PROMETHEUS, "ports": [{"port": 8080, "protocol": "TCP"}, {"port": 8081, "protocol": "TCP"}]}]
    assert found["fenced-compression"]["spec"].get("ingress", []) == []
    k.kubectl("patch", "lm", "fenced", "--type=merge", "-p", '{"spec": {"networkPolicy": {"enabled": false}}}')
    wait_policies(k, "lepton.ai/model=fenced", set())
