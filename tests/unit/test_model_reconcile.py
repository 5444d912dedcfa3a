"""One LeptonModel reconcile (``model.handlers.reconcile``: observe, plan, execute) against a
recording stand-in for ``kube.aio`` and indices given as kopf would: the writes it makes
while the model converges, and none once it is steady.

The stand-in cannot show the API server's answers to these writes nor the watch that
feeds the indices; tests/integration (a real API server and controller-manager) and
bench/models.py (the operator's requests read from the API server's audit log) do."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from lepton_operator.core import kube
from lepton_operator.model import handlers as mh

pytestmark = pytest.mark.unit
LOG = logging.getLogger("test")
BODY = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {"source": {"uri": "pvc://models/digits"}, "compression": {"method": "none"},
                 "serving": {"replicas": 2}}}


class API:
    """Records (function name, args); the source claim exists; writes succeed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.status: dict[str, Any] = {}

    async def __call__(self, fn, *args, **_):
        self.calls.append((fn.__name__, args))
        if fn.__name__ == "get":
            return {"kind": args[1]}
        if fn.__name__ == "patch_status":
            self.status.update(args[4])
        return args[0] if fn.__name__ in ("create", "apply") else True


def deployment(name: str, revision: str, replicas: int, ready: int) -> dict[str, Any]:
    return {"metadata": {"name": name, "generation": 1,
                         "labels": {"lepton.ai/model": "m", "lepton.ai/revision": revision}},
            "spec": {"replicas": replicas},
            "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": replicas}}


@pytest.fixture
def api(monkeypatch) -> API:
    fake = API()
    monkeypatch.setattr(kube, "aio", fake)
    return fake


SOURCE_JOB = {("ns", "train"): [{"metadata": {"uid": "j1"},
                                 "status": {"phase": "Succeeded", "outputURI": "pvc://models/out",
                                            "completionTime": "2026-01-01T00:00:00Z"}}]}


@pytest.mark.parametrize("source", [{"uri": "pvc://models/digits"}, {"jobRef": {"name": "train"}}])
def test_a_steady_model_makes_no_api_request(api, source):
    """Its source job comes from an index, like its Deployments: a steady reconcile reads
    nothing from the API server and writes nothing."""
    body = {**BODY, "spec": {**BODY["spec"], "source": source}}
    runtime, memory = mh.new_runtime(), mh.observe.new_memory({})
    jobs = {"lepton_model_source_jobs": SOURCE_JOB}
    asyncio.run(mh.reconcile(body, memory, jobs, runtime, LOG))
    created = [args[0] for name, args in api.calls if name == "create" and args[0]["kind"] == "Deployment"]
    assert len(created) == 1 and created[0]["spec"]["replicas"] == 2
    revision = created[0]["metadata"]["labels"]["lepton.ai/revision"]
    shown = {**jobs, "lepton_model_deployments": {
        ("ns", "m"): [deployment(created[0]["metadata"]["name"], revision, 2, 2)]}}

    api.calls.clear()
    asyncio.run(mh.reconcile(body, memory, shown, runtime, LOG))    # its pods are ready: Ready
    assert [name for name, _ in api.calls if name not in ("emit_event", "create")] == ["patch_status"]
    assert memory.status["phase"] == "Ready"

    api.calls.clear()
    asyncio.run(mh.reconcile(body, memory, shown, runtime, LOG))    # nothing changed
    assert api.calls == []

    # A restarted operator looks up the claim and applies its Service and template once.
    restarted = mh.observe.new_memory(memory.status)
    asyncio.run(mh.reconcile(body, restarted, shown, runtime, LOG))
    assert sorted(name for name, _ in api.calls) == ["apply", "apply", "get"]
    api.calls.clear()
    asyncio.run(mh.reconcile(body, restarted, shown, runtime, LOG))
    assert api.calls == []
