"""NetworkPolicies of LeptonJob and LeptonModel: which the loops apply and delete
(``core.objects.policy_changes``), and the API calls a reconcile makes for them, against
a recording stand-in for ``kube.aio``."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from lepton_operator import config
from lepton_operator.constants import ANNOTATION_SPEC_HASH
from lepton_operator.core import kube
from lepton_operator.core.objects import NETWORK_POLICY_VERBS, POLICY_APPLY_TTL, policy_changes
from lepton_operator.job import fit
from lepton_operator.job import handlers as jh
from lepton_operator.job import objects as job_objects
from lepton_operator.job import state as js
from lepton_operator.job.spec import parse_job
from lepton_operator.model import handlers as mh
from lepton_operator.model import objects as model_objects
from lepton_operator.model.spec import parse_model

pytestmark = pytest.mark.unit
LOG = logging.getLogger("test")
JOB_OWNER = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob",
             "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1}}
MODEL_OWNER = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
               "metadata": {"name": "m", "namespace": "ns", "uid": "u"}}
PEERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def job_policies(**network_policy: Any) -> list[dict]:
    return job_objects.network_policies(JOB_OWNER, parse_job("j", {"networkPolicy": network_policy}, "img"))


def hashes(policies: list[dict]) -> dict[str, str]:
    """What the index shows for these policies: name -> spec hash."""
    return {p["metadata"]["name"]: p["metadata"]["annotations"][ANNOTATION_SPEC_HASH] for p in policies}


# --- the decision ---------------------------------------------------------------------

def test_missing_policies_are_applied_once_until_the_index_shows_them():
    desired, applied = job_policies(enabled=True), {}
    to_apply, to_delete = policy_changes(desired, {}, applied, now=100.0)
    assert [p["metadata"]["name"] for p in to_apply] == ["j-rdzv", "j-workers"] and to_delete == []
    assert policy_changes(desired, {}, applied, now=101.0) == ([], [])          # the index lags
    again, _ = policy_changes(desired, {}, applied, now=100.0 + POLICY_APPLY_TTL)  # gone for good
    assert len(again) == 2
    assert policy_changes(desired, hashes(desired), applied, now=200.0) == ([], []) and applied == {}


def test_a_changed_policy_is_applied_again_and_a_policy_no_longer_asked_for_is_deleted():
    old, new = job_policies(enabled=True), job_policies(enabled=True, ingressFrom=PEERS)
    to_apply, to_delete = policy_changes(new, hashes(old), {}, now=0.0)
    assert [p["metadata"]["name"] for p in to_apply] == ["j-workers"] and to_delete == []   # the store's is the same
    assert policy_changes(job_policies(enabled=False), hashes(old), {}, now=0.0) == ([], ["j-rdzv", "j-workers"])
    assert policy_changes([], {}, {}, now=0.0) == ([], [])


# --- the loops, against a recording API ---------------------------------------------------

class RecordingAPI:
    """Stands in for ``kube.aio``: records (function name, args), answers like the server."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    async def __call__(self, fn, *args, **_):
        self.calls.append((fn.__name__, args))
        return args[0] if fn.__name__ in ("create", "apply") else (True if fn.__name__ == "delete" else None)

    def policy_calls(self) -> list[tuple[str, str]]:
        out = []
        for name, args in self.calls:
            if name == "apply" and args[0]["kind"] == "NetworkPolicy":
                out.append(("apply", args[0]["metadata"]["name"]))
            elif name == "delete" and args[1] == "NetworkPolicy":
                out.append(("delete", args[2]))
        return out


# API calls of the operator's kube module -> the RBAC verbs they need on a NetworkPolicy
# (a server-side apply that creates the object needs create as well as patch).
VERBS = {"apply": {"patch", "create"}, "delete": {"delete"}}
INDEX_VERBS = {"list", "watch"}           # what a kopf index does


@pytest.fixture
def api(monkeypatch) -> RecordingAPI:
    fake = RecordingAPI()
    monkeypatch.setattr(kube, "aio", fake)
    return fake


def job_indices(policies: dict[str, str]) -> dict[str, Any]:
    node = fit.NodeView("n1", fit.Requests(cpu=64000, memory=2 ** 39, gpus=8), {"nvidia.com/gpu.present": "true"},
                        ({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},))
    workers = [js.PodView(name=f"j-worker-{i}", uid=f"uid-{i}", index=i, phase="Running", node="n1", ready=True)
               for i in range(2)]
    return {"lepton_nodes": {"n1": [node]}, "lepton_job_workers": {("ns", "j"): workers},
            "lepton_pod_requests": {"n1": [fit.Requests(gpus=1)] * 2},
            "lepton_job_services": {("ns", "j"): ["j-rdzv", "j-workers"]},
            "lepton_job_rdzv_pods": {("ns", "j"): [("j-rdzv", js.StoreView("2026-01-01T00:00:00Z", True, False))]},
            "lepton_job_network_policies": {("ns", "j"): list(policies.items())}}


def reconcile_job(network_policy: dict, shown: dict[str, str], memory: jh.JobMemory | None = None) -> jh.JobMemory:
    status = {"phase": "Running", "restarts": {"counted": 0, "uncounted": 0}, "startTime": "2026-01-01T11:00:00Z"}
    body = {**JOB_OWNER, "spec": {"workers": {"min": 2, "max": 2, "replicas": 2}, "resources": {"gpus": 1},
                                  "networkPolicy": network_policy}, "status": status}
    memory = memory or jh.observe.new_memory(dict(status))
    asyncio.run(jh.reconcile(body, memory, job_indices(shown), jh.new_runtime(), LOG))
    return memory


def reconcile_model(spec: dict, shown: dict[str, str], memory=None):
    """One reconcile of the model ``spec`` whose index shows the policies ``shown``."""
    body = {**MODEL_OWNER, "spec": spec, "status": {}}
    memory = memory or mh.observe.new_memory({})
    indices = {"lepton_model_network_policies": {("ns", "m"): list(shown.items())}}
    asyncio.run(mh.reconcile(body, memory, indices, mh.new_runtime(), LOG))
    return memory


def test_a_job_loop_applies_its_policies_leaves_them_alone_once_seen_and_deletes_them_when_turned_off(api):
    memory = reconcile_job({"enabled": True}, {})
    assert api.policy_calls() == [("apply", "j-rdzv"), ("apply", "j-workers")]
    applied = [args[0] for name, args in api.calls if name == "apply"]
    assert all(p["metadata"]["ownerReferences"][0]["uid"] == "u" for p in applied)

    api.calls.clear()
    reconcile_job({"enabled": True}, hashes(applied), memory)
    assert api.policy_calls() == []                                     # a steady reconcile writes nothing

    api.calls.clear()
    reconcile_job({"enabled": False}, hashes(applied), memory)
    assert api.policy_calls() == [("delete", "j-rdzv"), ("delete", "j-workers")]


def test_a_job_made_before_policies_were_on_by_default_gets_them_on_its_next_reconcile(api):
    """A job whose stored spec has no ``networkPolicy`` (made before the CRD defaulted
    ``enabled`` to true, or by a server that did not apply the default): its next
    reconcile applies both policies; an explicit ``enabled: false`` makes no policy call."""
    reconcile_job({}, {})
    assert api.policy_calls() == [("apply", "j-rdzv"), ("apply", "j-workers")]
    api.calls.clear()
    reconcile_job({"enabled": False}, {})
    assert api.policy_calls() == []


def test_a_job_loop_opens_the_report_port_to_the_operators_pods_only(api):
    """The operator's namespace and pod labels come from its settings (the chart's)."""
    before = config.get()
    config.configure(config.from_env({"POD_NAMESPACE": "lepton-system",
                                      "LEPTON_OPERATOR_POD_LABELS": "app.kubernetes.io/name=lepton-operator"}))
    try:
        reconcile_job({}, {})
    finally:
        config.configure(before)
    rdzv = next(args[0] for name, args in api.calls if name == "apply" and args[0]["metadata"]["name"] == "j-rdzv")
    assert rdzv["spec"]["ingress"][1]["from"] == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "lepton-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "lepton-operator"}}}]


def test_a_model_loop_applies_and_deletes_its_policies(api):
    raw = {"source": {"uri": "pvc://c/p"}, "networkPolicy": {"enabled": True}}
    memory = reconcile_model(raw, {})
    assert api.policy_calls() == [("apply", "m-serving"), ("apply", "m-compression")]
    shown = hashes(model_objects.network_policies(MODEL_OWNER, parse_model("m", raw, "img")))

    api.calls.clear()
    reconcile_model(raw, shown, memory)
    assert api.policy_calls() == []

    api.calls.clear()
    reconcile_model({"source": {"uri": "pvc://c/p"}}, shown, memory)
    assert sorted(api.policy_calls()) == [("delete", "m-compression"), ("delete", "m-serving")]


def test_the_loops_use_only_the_declared_verbs(api):
    """``NETWORK_POLICY_VERBS`` (what the chart grants) covers the calls the loops make."""
    memory = reconcile_job({"enabled": True}, {})
    reconcile_job({"enabled": False}, hashes(job_policies(enabled=True)), memory)
    used = INDEX_VERBS.union(*(VERBS[verb] for verb, _ in api.policy_calls()))
    assert used == set(NETWORK_POLICY_VERBS)


def test_the_indices_key_policies_by_owner_with_their_hash():
    ann = {ANNOTATION_SPEC_HASH: "abc"}
    assert jh.lepton_job_network_policies(namespace="ns", labels={"lepton.ai/job": "j"}, name="j-rdzv",
                                          annotations=ann) == {("ns", "j"): ("j-rdzv", "abc")}
    assert mh.lepton_model_network_policies(namespace="ns", labels={"lepton.ai/model": "m"}, name="m-serving",
                                            annotations={}) == {("ns", "m"): ("m-serving", "")}
