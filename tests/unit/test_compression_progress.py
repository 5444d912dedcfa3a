"""A compression Job's progress in the model's status: the program's progress lines parsed
from its pod's log, read only while the pod is Running and at most once per interval, and
shown in ``status.compression.progress`` and the Compressed condition without an event."""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from lepton_operator import config
from lepton_operator.core import kube
from lepton_operator.model import handlers as mh
from lepton_operator.model import progress
from lepton_operator.model import state as ms
from lepton_operator.model.spec import parse_model
from lepton_trainer import contract
from planning import plan_model

pytestmark = pytest.mark.unit
LOG = logging.getLogger("test")
SPEC = {"source": {"uri": "pvc://models/digits"}, "compression": {"method": "auto"}, "serving": {"replicas": 1}}
BODY = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u", "generation": 1}, "spec": SPEC}
SRC = ms.SourceState(uri="pvc://models/digits")


def line(**record: Any) -> str:
    return contract.PROGRESS_PREFIX + json.dumps(record)


STEP = {"candidate": 2, "of": 5, "method": "int8", "activity": "measuring latency at batch 32 (100 passes at most, 5 s)",
        "since": "2026-12-06T08:00:00Z"}


def test_the_last_well_formed_progress_line_wins():
    text = "\n".join([
        line(candidate=1, of=5, method="int8-static", activity="applying int8-static", since="t0"),
        "2026-12-06 08:00:00 INFO lepton_trainer.compress: candidate 2 of 5 (int8): applying int8",
        line(**STEP),
        'auto: {"method": "int8", "bytes": 5000000}',
        contract.PROGRESS_PREFIX + "{not json",                                # cut by limitBytes
        line(candidate=-1, of=5, method="x", activity="bad count"),
        line(candidate=3, of=5, method="fp16"),                                 # no activity
        "noise " + line(candidate=4, of=5, method="bf16", activity="inside another line"),
    ])
    assert progress.last(text) == STEP
    assert progress.last("nothing to see\n") is None and progress.last("") is None
    long = progress.record(line(candidate=0, of=0, activity="x" * 5000, method="m" * 500))
    assert len(long["activity"]) == progress.ACTIVITY_LIMIT and len(long["method"]) == 64 and long["since"] == ""


def test_a_progress_record_reads_as_one_line():
    assert progress.describe(STEP) == ("candidate 2 of 5 (int8): measuring latency at batch 32 (100 passes at most, "
                                       "5 s) (since 2026-12-06T08:00:00Z)")
    assert progress.describe({"candidate": 0, "of": 5, "method": "none", "activity": "measuring latency at batch 1",
                              "since": ""}) == "original model: measuring latency at batch 1"
    assert progress.describe({"candidate": 0, "of": 0, "method": "", "activity": "loading /models/m",
                              "since": "t"}) == "loading /models/m (since t)"
    assert progress.due(None, 5.0, 10.0) and not progress.due(0.0, 9.9, 10.0) and progress.due(0.0, 10.0, 10.0)


def test_the_plan_shows_progress_in_status_and_the_condition_without_an_event():
    s = parse_model("m", SPEC, "img")
    rev = s.revision(SRC.uri)
    running = ms.CompressionState("Running", None, progress=STEP)
    p = plan_model(s, "m", {}, SRC, rev, running, 1, {}, 0.0)
    assert p.status["phase"] == "Compressing" and p.reason == "Compressing"
    assert p.status["compression"] == {"revision": rev, "state": "Running", "progress": STEP}
    compressed = next(c for c in p.conditions if c[0] == "Compressed")
    assert compressed[1] == "False" and progress.describe(STEP) in compressed[3] and progress.describe(STEP) in p.message
    assert not p.events
    # Done: the result replaces the progress, and the Compressed event is posted once.
    done = ms.CompressionState("Succeeded", {"passed": True, "method": "int8", "ratio": 3.9})
    p2 = plan_model(s, "m", p.status, SRC, rev, done, 1, {}, 1.0)
    assert p2.status["compression"]["state"] == "Succeeded" and "progress" not in p2.status["compression"]
    assert [e[1] for e in p2.events].count("Compressed") == 1
    assert "Compressed" not in [e[1] for e in plan_model(s, "m", p2.status, SRC, rev, done, 1, {}, 2.0).events]
    # A pod waiting for the scheduler says why, not what it did last.
    pending = ms.CompressionState("Running", None, pending="its pod c is Pending (Unschedulable: 0/1 nodes)",
                                  progress=STEP)
    assert "Unschedulable" in plan_model(s, "m", {}, SRC, rev, pending, 1, {}, 0.0).message


class API:
    """Records (function name, args); the source claim exists; writes succeed; the
    compression pod's log is ``self.log``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.status: dict[str, Any] = {}
        self.log = ""

    async def __call__(self, fn, *args, **_):
        self.calls.append((fn.__name__, args))
        if fn.__name__ == "pod_log":
            return self.log
        if fn.__name__ == "get":
            return {"kind": args[1]}
        if fn.__name__ == "patch_status":
            self.status.update(args[4])
        return args[0] if fn.__name__ in ("create", "apply") else True

    def reads(self) -> list[tuple]:
        return [args for name, args in self.calls if name == "pod_log"]


@pytest.fixture
def api(monkeypatch) -> API:
    fake = API()
    monkeypatch.setattr(kube, "aio", fake)
    return fake


def indices(rev: str, phase: str) -> dict[str, Any]:
    labels = {"lepton.ai/model": "m", "lepton.ai/role": "compression", "lepton.ai/revision": rev}
    return {"lepton_model_compression_jobs": {("ns", "m"): [{"name": f"m-compress-{rev}", "revision": rev,
                                                             "status": {"conditions": []}}]},
            "lepton_model_compression_pods": {("ns", "m"): [{
                "metadata": {"name": "m-compress-pod", "creationTimestamp": "2026-12-06T08:00:00Z", "labels": labels},
                "status": {"phase": phase, "containerStatuses": [], "conditions": []}}]}}


def test_the_log_is_read_only_while_the_pod_runs_and_at_most_once_per_interval(api, monkeypatch):
    monkeypatch.setattr(config, "get", lambda: config.Settings(compression_progress_seconds=3600.0))
    runtime, memory = mh.new_runtime(), mh.observe.new_memory({})
    asyncio.run(mh.reconcile(BODY, memory, {}, runtime, LOG))      # creates the compression Job
    job = next(args[0] for name, args in api.calls if name == "create" and args[0]["kind"] == "Job")
    rev = job["metadata"]["labels"]["lepton.ai/revision"]
    asyncio.run(mh.reconcile(BODY, memory, indices(rev, "Pending"), runtime, LOG))
    assert api.reads() == []                                        # nothing runs yet: no read
    api.log = "\n".join(["loading", line(**STEP), "auto: {}"])
    asyncio.run(mh.reconcile(BODY, memory, indices(rev, "Running"), runtime, LOG))
    assert api.reads() == [("m-compress-pod", "ns", "compress", progress.TAIL_LINES, progress.LIMIT_BYTES)]
    assert api.status["compression"]["progress"] == STEP and api.status["phase"] == "Compressing"
    writes = len([n for n, _ in api.calls if n == "patch_status"])
    api.log = line(**{**STEP, "activity": "gating"})
    asyncio.run(mh.reconcile(BODY, memory, indices(rev, "Running"), runtime, LOG))
    assert len(api.reads()) == 1                                    # within the interval: no new read, no write
    assert len([n for n, _ in api.calls if n == "patch_status"]) == writes
    assert not [args for n, args in api.calls if n == "emit_event" and "gating" in str(args)]
    monkeypatch.setattr(config, "get", lambda: config.Settings(compression_progress_seconds=1e-9))
    asyncio.run(mh.reconcile(BODY, memory, indices(rev, "Running"), runtime, LOG))
    assert len(api.reads()) == 2 and api.status["compression"]["progress"]["activity"] == "gating"
    api.log = "a log without progress lines"                         # the last record read stays
    asyncio.run(mh.reconcile(BODY, memory, indices(rev, "Running"), runtime, LOG))
    assert api.status["compression"]["progress"]["activity"] == "gating"
    asyncio.run(mh.reconcile(BODY, memory, indices(rev, "Succeeded"), runtime, LOG))
    assert len(api.reads()) == 3                                    # the pod is done: no read
