"""The pure LeptonModel rollout planner: first deploy, gate, canary steps, analysis, rollback."""

import pytest

from lepton_operator.model import state as ms
from lepton_operator.model.state import read_result
from lepton_operator.model.spec import Check, parse_model
from lepton_operator.scaling.prometheus import QueryResult

pytestmark = pytest.mark.unit

SRC = ms.SourceState(uri="pvc://models/digits")
T0 = 1_800_000_000.0


def spec(**over):
    base = {"source": {"uri": "pvc://models/digits"}, "compression": {"method": "none"}}
    return parse_model("m", {**base, **over}, "img")


def ready(n):
    return ms.DeploymentView(n, n, n, True)


def plan(s, prev, deps, now=T0, total=4, **kw):
    return ms.plan(s, "m", prev, SRC, s.revision(SRC.uri), kw.pop("comp", None), total, deps, now, **kw)


def test_first_deploy_then_ready_only_when_pods_are_ready():
    s = spec()
    rev = s.revision(SRC.uri)
    p = plan(s, {}, {})
    assert p.status["revisions"] == {"stable": rev, "stableURI": "pvc://models/digits"}
    assert p.replicas == {rev: 4} and p.status["phase"] == "Deploying" and not p.ready
    p = plan(s, p.status, {rev: ms.DeploymentView(4, 3, 4, True)})
    assert not p.ready and p.reason == "PodsNotReady" and "3/4 serving pods" in p.message
    p = plan(s, p.status, {rev: ready(4)})
    assert p.ready and p.status["phase"] == "Ready"
    # A crash after being Ready: Degraded, not Ready.
    p = plan(s, p.status, {rev: ms.DeploymentView(4, 2, 4, True)})
    assert not p.ready and p.status["phase"] == "Degraded"


def test_gate_failure_keeps_the_stable_revision():
    old = spec()
    prev = plan(old, {}, {}).status
    stable = old.revision(SRC.uri)
    s = spec(compression={"method": "int8", "maxAccuracyDrop": 0.01})
    comp = ms.CompressionState("Failed", {"accuracy_before": 0.95, "accuracy_after": 0.90})
    p = plan(s, prev, {stable: ready(4)}, comp=comp)
    assert p.reason == "AccuracyGateFailed" and p.stalled and not p.ready
    assert "0.9500 -> 0.9000, drop 0.0500 > maxAccuracyDrop 0.01" in p.message
    assert p.status["phase"] == "Degraded" and p.replicas == {stable: 4}
    assert p.status["revisions"]["failed"] == s.revision(SRC.uri)
    assert p.status["compression"]["state"] == "Failed"
    # A succeeded Job whose numbers break the gate is rejected too.
    comp = ms.CompressionState("Succeeded", {"accuracy_before": 0.95, "accuracy_after": 0.90})
    assert plan(s, prev, {stable: ready(4)}, comp=comp).reason == "AccuracyGateFailed"


def test_compressing_then_compressed():
    s = spec(compression={"method": "int8"})
    p = plan(s, {}, {}, comp=ms.CompressionState("Running", None))
    assert p.status["phase"] == "Compressing" and p.replicas == {}
    p = plan(s, {}, {}, comp=ms.CompressionState("Succeeded", {"ratio": 3.9}))
    rev = s.revision(SRC.uri)
    assert p.status["compression"] == {"ratio": 3.9, "revision": rev, "state": "Succeeded"}
    assert p.model_dirs[rev].path == f"lepton-models/m/{rev}"


def canary_setup(analysis=()):
    old = spec()
    stable = old.revision(SRC.uri)
    prev = plan(old, {}, {stable: ready(4)}).status
    s = spec(serving={"image": "img2"}, rollout={"steps": [{"weight": 25}, {"weight": 50, "pauseSeconds": 30}],
                                                 "analysis": list(analysis)})
    return s, prev, stable, s.revision(SRC.uri)


def test_canary_steps_split_pause_and_promote():
    s, prev, a, b = canary_setup()
    p = plan(s, prev, {a: ready(4)})
    assert p.status["revisions"]["canary"] == b and p.status["revisions"]["canaryWeight"] == 25
    assert p.replicas == {a: 3, b: 1} and p.status["phase"] == "Progressing"
    p = plan(s, p.status, {a: ready(3), b: ready(1)}, now=T0 + 1)
    assert p.status["revisions"]["canaryStep"] == 1 and p.replicas == {a: 2, b: 2}
    p = plan(s, p.status, {a: ready(2), b: ready(2)}, now=T0 + 2)
    assert p.status["phase"] == "Progressing" and 25 <= p.requeue_after <= 30   # pausing
    p = plan(s, p.status, {a: ready(2), b: ready(2)}, now=T0 + 40)
    assert p.status["revisions"] == {"stable": b, "stableURI": "pvc://models/digits"}
    assert p.replicas == {b: 4} and a in p.delete
    assert any(e[1] == "Promoted" for e in p.events)


def test_analysis_failure_rolls_back_and_no_data_waits():
    chk = {"name": "err", "query": "sum(e{r=\"${revision}\"})", "max": 0.1}
    s, prev, a, b = canary_setup([chk])
    p = plan(s, prev, {a: ready(4)})
    p = plan(s, p.status, {a: ready(3), b: ready(1)}, now=T0 + 1)
    assert p.analyze == b
    check = s.rollout.analysis[0]
    waiting = plan(s, p.status, {a: ready(3), b: ready(1)}, now=T0 + 1,
                   analysis=[(check, QueryResult("q", None, "empty result"))])
    assert waiting.reason == "AnalysisNoData" and waiting.status["revisions"]["canary"] == b
    bad = plan(s, p.status, {a: ready(3), b: ready(1)}, now=T0 + 1,
               analysis=[(check, QueryResult("q", 0.4))])
    assert bad.replicas == {a: 4, b: 0} and bad.status["revisions"]["failed"] == b
    assert bad.status["phase"] == "RollingBack" and bad.reason == "AnalysisFailed"
    assert "'err' = 0.4, must be <= 0.1" in bad.message
    assert bad.status["analysis"][0] == {"name": "err", "query": "q", "value": 0.4, "threshold": "<= 0.1",
                                         "passed": False}
    after = plan(s, bad.status, {a: ready(4), b: ms.DeploymentView(0, 0, 0, True)}, now=T0 + 5)
    assert after.status["phase"] == "Degraded" and after.replicas == {a: 4, b: 0} and not after.delete


def test_canary_pods_never_ready_roll_back_after_the_deadline():
    s, prev, a, b = canary_setup()
    p = plan(s, prev, {a: ready(4)})
    stuck = {a: ready(3), b: ms.DeploymentView(1, 0, 1, True)}
    assert plan(s, p.status, stuck, now=T0 + 100).status["revisions"].get("canary") == b
    p = plan(s, p.status, stuck, now=T0 + 601)
    assert p.status["revisions"]["failedReason"] == "PodsNotReady" and p.replicas[b] == 0


def test_sources_and_compression_states():
    assert ms.source_from_job("j", "ns", None).reason == "SourceNotFound"
    assert ms.source_from_job("j", "ns", {"status": {"phase": "Running"}}).reason == "WaitingForSource"
    assert ms.source_from_job("j", "ns", {"status": {"phase": "Failed"}}).stalled
    assert ms.source_from_job("j", "ns", {"status": {"phase": "Succeeded"}}).reason == "SourceFailed"
    assert ms.source_from_job("j", "ns", {"status": {"phase": "Succeeded", "outputURI": "pvc://c/o"}}).uri == "pvc://c/o"
    pod = {"metadata": {"creationTimestamp": "1"}, "status": {"containerStatuses": [
        {"state": {"terminated": {"exitCode": 1, "message": '{"message": "accuracy gate failed"}'}}}]}}
    job_failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "BackoffLimitExceeded"}]}}
    st = ms.compression_state(job_failed, [pod], read_result)
    assert st.state == "Failed" and ms.gate_verdict(st.result, 0.01)[0] == "AccuracyGateFailed"
    assert ms.compression_state({"status": {}}, [], read_result).state == "Running"
    assert ms.compression_state(job_failed, [], read_result).result == {"message": "BackoffLimitExceeded"}
    assert ms.gate_verdict({"message": "out of memory"}, 0.01) is None
    assert ms.gate_verdict({"passed": False, "reason": "model.pt not found"}, 0.01) is None
    trainer_gate = {"passed": False, "accuracy_before": 0.9, "accuracy_after": 0.5, "max_accuracy_drop": 0.05,
                    "reason": "accuracy gate failed: int8 drops held-out accuracy"}
    assert "drop 0.4000 > maxAccuracyDrop 0.05" in ms.gate_verdict(trainer_gate, None)[1]
    assert Check("x", "q", max=1.0).failed(1.5)
