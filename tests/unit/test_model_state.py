"""The pure LeptonModel rollout planner: first deploy, gate, canary steps, analysis, rollback."""

import json

import pytest

from lepton_operator.model import state as ms
from lepton_operator.model.state import read_result
from lepton_operator.model.spec import Check, parse_model
from lepton_operator.scaling.prometheus import QueryResult, no_data, query_error
from planning import plan_model

pytestmark = pytest.mark.unit

SRC = ms.SourceState(uri="pvc://models/digits")
T0 = 1_800_000_000.0


def spec(**over):
    base = {"source": {"uri": "pvc://models/digits"}, "compression": {"method": "none"}}
    return parse_model("m", {**base, **over}, "img")


def ready(n):
    return ms.DeploymentView(n, n, n, True)


def plan(s, prev, deps, now=T0, total=4, **kw):
    return plan_model(s, "m", prev, SRC, s.revision(SRC.uri), kw.pop("comp", None), total, deps, now, **kw)


def test_first_deploy_then_ready_only_when_pods_are_ready():
    s = spec()
    rev = s.revision(SRC.uri)
    p = plan(s, {}, {})
    assert p.status["revisions"] == {"stable": rev, "stableURI": "pvc://models/digits", "stableMethod": "none"}
    assert p.replicas == {rev: 4} and p.status["phase"] == "Deploying" and not p.ready
    p = plan(s, p.status, {rev: ms.DeploymentView(4, 3, 4, True)})
    assert not p.ready and p.reason == "PodsNotReady" and "3/4 serving pods" in p.message
    p = plan(s, p.status, {rev: ready(4)})
    assert p.ready and p.status["phase"] == "Ready"
    # A crash after being Ready: Degraded, not Ready.
    p = plan(s, p.status, {rev: ms.DeploymentView(4, 2, 4, True)})
    assert not p.ready and p.status["phase"] == "Degraded"


def test_a_ready_model_scaled_down_stays_ready_while_its_deployment_shrinks():
    """An autoscaler lowering the replicas: the Deployment still runs more ready pods than
    wanted until it is patched, and the model stays Ready (never Degraded, never "2/1 ready")."""
    s = spec()
    rev = s.revision(SRC.uri)
    p = plan(s, plan(s, {}, {}, total=2).status, {rev: ready(2)}, total=2)
    assert p.ready and p.status["phase"] == "Ready"
    p = plan(s, p.status, {rev: ready(2)}, total=1)
    assert p.replicas[rev] == 1
    assert p.ready and p.status["phase"] == "Ready", (p.reason, p.message)


def test_the_compression_programs_verdict_stands():
    old = spec()
    prev = plan(old, {}, {}).status
    stable = old.revision(SRC.uri)
    s = spec(compression={"method": "int8", "maxAccuracyDrop": 0.00834})
    new = s.revision(SRC.uri)
    # 348/360 before, 345/360 after: a drop of 0.008333 <= 0.00834. The program passed it; so does the plan.
    passed = ms.CompressionState("Succeeded", {"passed": True, "accuracy_before": 348 / 360,
                                               "accuracy_after": 345 / 360, "reason": "gate passed"})
    p = plan(s, prev, {stable: ready(4)}, comp=passed)
    assert p.status["revisions"]["canary"] == new and p.status["compression"]["state"] == "Succeeded"
    # A failed gate (its own exit status) is rejected with the program's reason; the old revision serves.
    gate = ms.CompressionState("Failed", {"passed": False, "reason": "int8 breaks the gate: accuracy 0.95 -> 0.90"},
                               gate_failed=True)
    p = plan(s, prev, {stable: ready(4)}, comp=gate)
    assert p.reason == "AccuracyGateFailed" and p.stalled and not p.ready
    assert p.message.startswith("int8 breaks the gate: accuracy 0.95 -> 0.90; revision")
    assert p.status["phase"] == "Degraded" and p.replicas == {stable: 4}
    assert p.status["revisions"]["failed"] == new and p.status["compression"]["state"] == "Failed"
    # A crash is not a gate failure, whatever its text says.
    crash = ms.CompressionState("Failed", {"passed": False, "reason": "FileNotFoundError: gate.npz"})
    assert plan(s, prev, {stable: ready(4)}, comp=crash).reason == "CompressionFailed"
    # Numbers that look bad do not override a pass; passed: false is never served.
    looks_bad = ms.CompressionState("Succeeded", {"passed": True, "accuracy_before": 0.95, "accuracy_after": 0.5})
    assert plan(s, prev, {stable: ready(4)}, comp=looks_bad).status["revisions"]["canary"] == new
    refused = ms.CompressionState("Succeeded", {"passed": False, "reason": "no candidate passed"})
    assert plan(s, prev, {stable: ready(4)}, comp=refused).reason == "AccuracyGateFailed"


def test_compressing_then_compressed():
    s = spec(compression={"method": "int8"})
    p = plan(s, {}, {}, comp=ms.CompressionState("Running", None))
    assert p.status["phase"] == "Compressing" and p.replicas == {}
    p = plan(s, {}, {}, comp=ms.CompressionState("Succeeded", {"passed": True, "ratio": 3.9}))
    rev = s.revision(SRC.uri)
    assert p.status["compression"] == {"passed": True, "ratio": 3.9, "revision": rev, "state": "Succeeded"}
    assert p.model_dirs[rev].path == f"lepton-models/m/{rev}"


def canary_setup(analysis=(), **rollout):
    old = spec()
    stable = old.revision(SRC.uri)
    prev = plan(old, {}, {stable: ready(4)}).status
    s = spec(serving={"image": "img2"}, rollout={"steps": [{"weight": 25}, {"weight": 50, "pauseSeconds": 30}],
                                                 "analysis": list(analysis), **rollout})
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
    # Promoted: the new stable surges to 4 while the old one keeps its 2 ready pods ...
    assert p.status["revisions"] == {"stable": b, "stableURI": "pvc://models/digits", "stableMethod": "none",
                                     "retiring": a}
    assert p.replicas == {a: 2, b: 4} and a not in p.delete
    assert any(e[1] == "Promoted" for e in p.events)
    p = plan(s, p.status, {a: ready(2), b: ms.DeploymentView(4, 3, 4, True)}, now=T0 + 41)
    assert p.replicas == {a: 2, b: 4} and a not in p.delete                   # ... until all 4 are ready
    p = plan(s, p.status, {a: ready(2), b: ready(4)}, now=T0 + 42)
    assert p.status["revisions"] == {"stable": b, "stableURI": "pvc://models/digits", "stableMethod": "none"}
    assert p.replicas == {b: 4} and a in p.delete and p.status["phase"] == "Ready"


def at_analysis(checks, **rollout):
    """A canary at step 1 whose pods became ready at T0 + 1 (no pause): analysis is due."""
    s, prev, a, b = canary_setup(checks, **rollout)
    p = plan(s, prev, {a: ready(4)})
    p = plan(s, p.status, {a: ready(3), b: ready(1)}, now=T0 + 1)
    return s, p.status, a, b


def test_analysis_failure_rolls_back_and_no_data_waits():
    chk = {"name": "err", "query": "sum(e{r=\"${revision}\"})", "max": 0.1}
    s, status, a, b = at_analysis([chk])
    check = s.rollout.analysis[0]
    assert ms.analysis_due(s, status, b, T0 + 1) == [check]
    deps = {a: ready(3), b: ready(1)}
    waiting = plan(s, status, deps, now=T0 + 1, analysis=[(check, no_data("q", "empty result"))])
    assert waiting.reason == "AnalysisNoData" and waiting.status["revisions"]["canary"] == b
    rec = waiting.status["analysis"][0]
    assert (rec["inconclusive"], rec["verdict"], rec["passed"]) == (1, "Inconclusive", False)
    assert ms.analysis_due(s, waiting.status, b, T0 + 5) == []            # every intervalSeconds (10)
    assert ms.analysis_due(s, waiting.status, b, T0 + 11) == [check]
    bad = plan(s, status, deps, now=T0 + 1, analysis=[(check, QueryResult("q", (0.4,)))])
    assert bad.replicas == {a: 4, b: 0} and bad.status["revisions"]["failed"] == b
    assert bad.status["phase"] == "RollingBack" and bad.reason == "AnalysisFailed"
    assert "'err' = 0.4, must be <= 0.1" in bad.message
    rec = bad.status["analysis"][0]
    assert (rec["failed"], rec["verdict"], rec["value"], rec["passed"]) == (1, "Failed", 0.4, False)
    after = plan(s, bad.status, {a: ready(4), b: ms.DeploymentView(0, 0, 0, True)}, now=T0 + 5)
    assert after.status["phase"] == "Degraded" and after.replicas == {a: 4, b: 0} and not after.delete


@pytest.mark.parametrize("values, verdict, worst", [
    ((float("inf"),), "Failed", float("inf")),     # histogram_quantile's +Inf breaks a max bound
    ((0.01, 0.5), "Failed", 0.5),                   # two pods: the worst one decides
    ((0.01, 0.02), "Successful", 0.02),
    ((float("-inf"),), "Successful", float("-inf")),
])
def test_every_series_is_judged_and_infinity_is_a_number(values, verdict, worst):
    check = Check("p95", "q", max=0.1)
    assert check.judge(QueryResult("q", values)) == (verdict, worst)
    s, status, a, b = at_analysis([{"name": "p95", "query": "q", "max": 0.1}])
    p = plan(s, status, {a: ready(3), b: ready(1)}, now=T0 + 1, analysis=[(s.rollout.analysis[0], QueryResult("q", values))])
    json.dumps(p.status, allow_nan=False)       # status must be valid JSON: ±Inf is written as a string
    if verdict == "Failed":
        assert f"'p95' = {p.status['analysis'][0]['value'] if worst == float('inf') else '0.5'}," in p.message
    assert check.judge(no_data("q", "empty")) == ("Inconclusive", None)
    assert check.judge(query_error("q", "bad_data: parse error")) == ("Error", None)


def test_inconclusive_and_error_limits_end_the_rollout():
    chk = {"name": "err", "query": "q", "max": 0.1, "inconclusiveLimit": 1, "consecutiveErrorLimit": 2}
    s, status, a, b = at_analysis([chk])
    check, deps = s.rollout.analysis[0], {a: ready(3), b: ready(1)}
    p = plan(s, status, deps, now=T0 + 1, analysis=[(check, no_data("q", "empty"))])
    assert p.status["revisions"].get("canary") == b                      # 1 inconclusive: tolerated
    p = plan(s, p.status, deps, now=T0 + 11, analysis=[(check, no_data("q", "empty"))])
    assert p.reason == "AnalysisInconclusive" and p.status["revisions"]["failed"] == b
    assert "had no value 2 times (inconclusiveLimit 1)" in p.message
    # Errors in a row: a success in between starts the count again.
    p = status
    for t, result in ((1, query_error("q", "bad_data")), (11, query_error("q", "bad_data")),
                      (21, QueryResult("q", (0.01,)))):
        p = plan(s, p, deps, now=T0 + t, analysis=[(check, result)]).status
    assert p["revisions"]["canaryStep"] == 1 and "failed" not in p["revisions"]      # step passed
    p = status
    for t in (1, 11, 21):
        out = plan(s, p, deps, now=T0 + t, analysis=[(check, query_error("q", "bad_data: parse error"))])
        p = out.status
    assert out.reason == "AnalysisError" and "failed 3 times in a row" in out.message
    assert "bad_data: parse error" in out.message


def test_count_measurements_every_interval():
    s, status, a, b = at_analysis([{"name": "e", "query": "q", "max": 1, "count": 2, "intervalSeconds": 5}])
    check, deps = s.rollout.analysis[0], {a: ready(3), b: ready(1)}
    p = plan(s, status, deps, now=T0 + 1, analysis=[(check, QueryResult("q", (0.5,)))])
    assert p.status["revisions"]["canaryStep"] == 0 and "1/2 measurements" in p.message
    assert 4 <= p.requeue_after <= 5
    p = plan(s, p.status, deps, now=T0 + 6, analysis=[(check, QueryResult("q", (0.5,)))])
    assert p.status["revisions"]["canaryStep"] == 1                       # passed: next step


def test_the_deadline_covers_the_analysis():
    s, status, a, b = at_analysis([{"name": "e", "query": "q", "max": 1, "inconclusiveLimit": 1000}])
    check, deps = s.rollout.analysis[0], {a: ready(3), b: ready(1)}
    p = plan(s, status, deps, now=T0 + 590, analysis=[(check, no_data("q", "empty"))])
    assert p.reason == "AnalysisNoData"
    p = plan(s, p.status, deps, now=T0 + 602)
    assert p.reason == "ProgressDeadlineExceeded" and p.status["revisions"]["failed"] == b
    assert p.replicas[b] == 0 and any(e[1] == "RolledBack" for e in p.events)


def test_on_inconclusive_pause_waits_for_a_person():
    s, status, a, b = at_analysis([{"name": "e", "query": "q", "max": 1, "inconclusiveLimit": 0}],
                                  onInconclusive="pause")
    check, deps = s.rollout.analysis[0], {a: ready(3), b: ready(1)}
    p = plan(s, status, deps, now=T0 + 1, analysis=[(check, no_data("q", "empty"))], namespace="ml")
    assert p.status["phase"] == "Paused" and p.reason == "AnalysisInconclusive"
    assert not p.ready and not p.stalled and p.outcome.settled
    assert f"kubectl annotate --overwrite lm/m -n ml lepton.ai/resume={b}" in p.message
    assert p.status["revisions"]["canary"] == b and p.replicas == {a: 3, b: 1}
    assert any(e[0] == "Warning" and e[1] == "AnalysisInconclusive" for e in p.events)
    later = plan(s, p.status, deps, now=T0 + 10_000)                      # no deadline while paused
    assert later.status["phase"] == "Paused" and ms.analysis_due(s, later.status, b, T0 + 10_000) == []
    resumed = plan(s, later.status, deps, now=T0 + 10_001, decision="resume")
    assert resumed.status["revisions"]["canaryStep"] == 1 and "pausedReason" not in resumed.status["revisions"]
    aborted = plan(s, later.status, deps, now=T0 + 10_001, decision="abort")
    assert aborted.reason == "Aborted" and aborted.status["revisions"]["failed"] == b


def test_min_requests_guard():
    s, status, a, b = at_analysis([{"name": "e", "query": "q", "max": 1}], minRequests=100)
    check, deps = s.rollout.analysis[0], {a: ready(3), b: ready(1)}
    p = plan(s, status, deps, now=T0 + 1, traffic=5)
    assert p.reason == "WaitingForTraffic" and "5 of 100 requests" in p.message and "analysis" not in p.status
    p = plan(s, status, deps, now=T0 + 1, traffic=150, analysis=[(check, QueryResult("q", (0.5,)))])
    assert p.status["revisions"]["canaryStep"] == 1


def test_a_source_that_goes_away_leaves_the_serving_revision_ready():
    s = spec()
    rev = s.revision(SRC.uri)
    p = plan(s, {}, {})
    p = plan(s, p.status, {rev: ready(4)})
    assert p.ready and ("SourceAvailable", "True") == p.conditions[0][:2]
    gone = ms.SourceState(None, "SourceNotFound", "LeptonJob 'j' not found")
    p = plan_model(s, "m", p.status, gone, None, None, 4, {rev: ready(4)}, T0)
    assert p.ready and p.status["phase"] == "Ready"
    assert ("SourceAvailable", "False", "SourceNotFound") == p.conditions[0][:3]
    assert f"revision {rev} keeps serving" in p.conditions[0][3]
    # Without a serving revision the model waits for its source.
    p = plan_model(s, "m", {}, gone, None, None, 4, {}, T0)
    assert not p.ready and p.status["phase"] == "Pending" and p.reason == "SourceNotFound"


def test_a_new_run_of_the_source_job_is_a_new_revision():
    s = spec()
    assert s.revision("pvc://c/o", "uid-1@t1") != s.revision("pvc://c/o", "uid-2@t2")
    assert s.revision("pvc://c/o", "") == s.revision("pvc://c/o")
    job = {"metadata": {"uid": "uid-1"}, "status": {"phase": "Succeeded", "outputURI": "pvc://c/o",
                                                     "completionTime": "t1"}}
    assert ms.source_from_job("j", "ns", job).identity == "uid-1@t1"


def test_kubectl_scale_raises_the_autoscaler_floor():
    s = spec(autoscaling={"target": 1, "minReplicas": 2, "maxReplicas": 8}, serving={"replicas": 5})
    assert s.floor == 5
    assert spec(autoscaling={"target": 1, "minReplicas": 2}).floor == 2


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
    assert st.state == "Failed" and not st.gate_failed and ms.verdict(st)[0] == "CompressionFailed"
    gate_pod = {"metadata": {"creationTimestamp": "1"}, "status": {"containerStatuses": [
        {"state": {"terminated": {"exitCode": 3, "message": '{"passed": false, "reason": "gate says no"}'}}}]}}
    st = ms.compression_state({"status": {}}, [gate_pod])
    assert st.gate_failed and ms.verdict(st) == ("AccuracyGateFailed", "gate says no")
    assert ms.compression_state({"status": {}}, [], read_result).state == "Running"
    assert ms.compression_state(job_failed, [], read_result).result == {"message": "BackoffLimitExceeded"}
    failed_job = {"status": {"phase": "Failed", "conditions": [
        {"type": "Ready", "status": "False", "reason": "BackoffLimitExceeded", "message": "2 worker failures"}]}}
    assert "(BackoffLimitExceeded: 2 worker failures)" in ms.source_from_job("j", "ns", failed_job).message
    assert Check("x", "q", max=1.0).failed(1.5)


def test_a_new_canary_is_judged_on_its_own_measurements():
    """The records of the last rollout (passed, or failed) never judge the next canary."""
    s, status, a, b = at_analysis([{"name": "e", "query": "q", "max": 0.1}])
    check, deps = s.rollout.analysis[0], {a: ready(3), b: ready(1)}
    failed = plan(s, status, deps, now=T0 + 1, analysis=[(check, QueryResult("q", (0.5,)))])
    assert failed.status["revisions"]["failed"] == b and failed.status["analysis"][0]["failed"] == 1
    nxt = spec(serving={"image": "img3"}, rollout={"steps": [{"weight": 25}, {"weight": 50, "pauseSeconds": 30}],
                                                   "analysis": [{"name": "e", "query": "q", "max": 0.1}]})
    c = nxt.revision(SRC.uri)
    p = plan(nxt, failed.status, {a: ready(4)}, now=T0 + 2)
    assert p.status["revisions"]["canary"] == c and "analysis" not in p.status
    p = plan(nxt, p.status, {a: ready(3), c: ready(1)}, now=T0 + 3)
    assert p.status["revisions"]["canaryStep"] == 0 and p.analyze == c      # waits for its own measurement


def test_only_a_verdict_that_passed_promotes_and_the_stable_revision_keeps_serving():
    """A compression Job that completes without a verdict (its pod wrote no result), a
    result without ``passed``, and a result naming another artifact directory all fail
    the revision; the stable one keeps serving."""
    old = spec()
    prev = plan(old, {}, {}).status
    stable = old.revision(SRC.uri)
    s = spec(compression={"method": "int8"})
    new = s.revision(SRC.uri)
    silent = ms.compression_state({"status": {"conditions": [{"type": "Complete", "status": "True"}]}},
                                  [{"metadata": {"name": "c"}, "status": {"phase": "Succeeded", "containerStatuses": [
                                      {"state": {"terminated": {"exitCode": 0}}}]}}])
    assert silent.state == "Failed" and "without a verdict" in silent.result["message"]
    elsewhere = ms.CompressionState("Succeeded", {"passed": True, "artifact": "/models/somewhere/else"})
    for comp in (silent, ms.CompressionState("Succeeded", {"ratio": 3.9}), elsewhere):
        p = plan(s, prev, {stable: ready(4)}, comp=comp)
        assert p.status["revisions"]["stable"] == stable and "canary" not in p.status["revisions"]
        assert p.status["revisions"]["failed"] == new and p.status["revisions"]["failedReason"] == "CompressionFailed"
        assert p.replicas == {stable: 4} and p.status["compression"]["state"] == "Failed"
    named = ms.CompressionState("Succeeded", {"passed": True, "artifact": f"/models/lepton-models/m/{new}"})
    assert plan(s, prev, {stable: ready(4)}, comp=named).status["revisions"]["canary"] == new


def test_a_compression_pod_the_scheduler_cannot_place_says_why():
    pod = {"metadata": {"name": "m-compress-r-x", "creationTimestamp": "2026-01-01T00:00:00Z"},
           "status": {"phase": "Pending", "conditions": [
               {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient cpu."}]}}
    comp = ms.compression_state({"status": {}}, [pod])
    assert comp.state == "Running" and "Insufficient cpu" in comp.pending
    s = spec(compression={"method": "int8"})
    p = plan(s, {}, {}, comp=comp)
    assert p.status["phase"] == "Compressing" and p.reason == "CompressionPodPending"
    assert "is Pending (Unschedulable: 0/3 nodes are available: 3 Insufficient cpu.)" in p.message
    scheduled = {**pod, "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}}
    assert ms.compression_state({"status": {}}, [scheduled]).pending == ""


def test_the_canarys_traffic_count_is_whole_and_never_goes_back_within_its_step():
    s, status, a, b = at_analysis([{"name": "e", "query": "q", "max": 1}], minRequests=1000)
    deps = {a: ready(3), b: ready(1)}
    p = plan(s, status, deps, now=T0 + 1, traffic=138.214)
    assert "138 of 1000 requests" in p.message and p.status["revisions"]["stepRequests"] == 138
    p = plan(s, p.status, deps, now=T0 + 2, traffic=136.071)         # increase() extrapolated lower
    assert "138 of 1000 requests" in p.message
    p = plan(s, p.status, deps, now=T0 + 3, traffic=140.9)
    assert "140 of 1000 requests" in p.message


def test_a_compression_job_past_its_deadline_fails_the_revision_with_the_reason():
    s = spec(compression={"method": "int8", "activeDeadlineSeconds": 600})
    job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
                                      "message": "Job was active longer than specified deadline"}]}}
    comp = ms.compression_state(job, [])
    assert comp.state == "Failed" and ms.verdict(comp)[0] == "CompressionFailed"
    assert "active longer than specified deadline" in ms.verdict(comp)[1]
    assert s.compression.active_deadline_seconds == 600
