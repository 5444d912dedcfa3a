"""LeptonModel on the real control plane: gated compression, canary steps judged by a real
Prometheus, automatic rollback, readiness that follows the pods, and bad input.

Pods are kwok's: the compression pod's result comes from the kwok.lepton.ai annotations
(hack/kwok.yaml) set through spec.compression.podAnnotations, and analysis series come
from a real exporter process that Prometheus scrapes.
"""
import json

import pytest


pytestmark = pytest.mark.integration

GOOD = {"passed": True, "accuracy_before": 0.97, "accuracy_after": 0.965, "bytes_before": 40000, "bytes_after": 10000,
        "ratio": 4.0, "latency_p50_ms_before": 0.2, "latency_p50_ms_after": 0.1}
# What the compression program writes when the gate says no (it exits with status 3).
BAD = {**GOOD, "accuracy_after": 0.80, "passed": False,
       "reason": "prune breaks the accuracy gate: accuracy 0.9700 -> 0.8000, drop 0.1700 > maxAccuracyDrop 0.02"}


def result_annotations(result: dict, code: int = 0) -> dict:
    return {"kwok.lepton.ai/exit-code": str(code), "kwok.lepton.ai/termination-message": json.dumps(result)}


def model(k, name, **spec):
    base = {"source": {"uri": "pvc://models/digits"}, "serving": {"replicas": 2},
            "compression": {"method": "int8", "maxAccuracyDrop": 0.02, "podAnnotations": result_annotations(GOOD)}}
    base.update(spec)
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
            "metadata": {"name": name, "namespace": k.ns}, "spec": base}


def mstatus(k, name):
    return (k.get("leptonmodel", name) or {}).get("status") or {}


def cond(k, name, type_):
    return next((c for c in mstatus(k, name).get("conditions", []) if c["type"] == type_), {})


def wait_phase(k, name, phase, timeout=90):
    return k.wait_for(f"{name} phase {phase}", lambda: (s := mstatus(k, name)).get("phase") == phase and s, timeout)


def deployments(k, name):
    return {d["metadata"]["labels"]["lepton.ai/revision"]: d
            for d in k.list("deployments", f"lepton.ai/model={name}")}


def test_gated_compression_pass_then_fail_keeps_serving(k):
    k.pvc("models")
    k.apply(model(k, "gate", rollout={"strategy": "replace"}))
    s = wait_phase(k, "gate", "Ready")
    stable = s["revisions"]["stable"]
    assert s["compression"]["state"] == "Succeeded" and s["compression"]["ratio"] == 4.0
    assert s["compression"]["accuracy_after"] == 0.965 and s["compression"]["revision"] == stable
    assert s["replicas"] == 2 and s["url"] == f"http://gate.{k.ns}.svc:8080"
    job = k.get("job", f"gate-compress-{stable}")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "lepton_trainer.compress"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["LEPTON_COMPRESSION_METHOD"] == "int8" and env["LEPTON_MAX_ACCURACY_DROP"] == "0.02"
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    dep = deployments(k, "gate")[stable]
    assert dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert cond(k, "gate", "Ready")["status"] == "True"

    # A new revision whose compression fails the gate: rejected with the numbers; the old one serves.
    k.apply(model(k, "gate", rollout={"strategy": "replace"},
                  compression={"method": "prune", "maxAccuracyDrop": 0.02,
                               "podAnnotations": result_annotations(BAD, code=3)}))
    s = k.wait_for("gate failure", lambda: (s := mstatus(k, "gate")).get("revisions", {}).get("failed") and s)
    ready = cond(k, "gate", "Ready")
    assert ready["status"] == "False" and ready["reason"] == "AccuracyGateFailed"
    assert "0.9700 -> 0.8000" in ready["message"] and "drop 0.1700 > maxAccuracyDrop 0.02" in ready["message"]
    assert f"revision {stable} keeps serving" in ready["message"]
    assert s["phase"] == "Degraded" and s["revisions"]["stable"] == stable
    assert cond(k, "gate", "Stalled")["status"] == "True"
    deps = deployments(k, "gate")
    assert list(deps) == [stable] and deps[stable]["status"].get("readyReplicas") == 2
    assert any(e["reason"] == "AccuracyGateFailed" and e["type"] == "Warning" for e in k.events("gate"))


def test_a_compression_job_that_completes_without_a_verdict_promotes_nothing(k):
    """The compression pod exits 0 and writes no result (as when it ran on a node that runs
    nothing): the Job is Complete, but the revision is a failure and the stable one serves."""
    k.pvc("models")
    k.apply(model(k, "silent", compression={"method": "none"}))
    stable = wait_phase(k, "silent", "Ready")["revisions"]["stable"]
    k.apply(model(k, "silent", compression={"method": "int8", "podAnnotations": {"kwok.lepton.ai/exit-code": "0"}}))
    s = k.wait_for("no verdict", lambda: (s := mstatus(k, "silent")).get("revisions", {}).get("failed") and s)
    assert s["revisions"]["stable"] == stable and "canary" not in s["revisions"]
    assert s["revisions"]["failedReason"] == "CompressionFailed" and "without a verdict" in s["revisions"]["failedMessage"]
    assert s["compression"]["state"] == "Failed"
    assert list(deployments(k, "silent")) == [stable]
    assert f"revision {stable} keeps serving" in cond(k, "silent", "Ready")["message"]


def test_a_compression_pod_that_cannot_be_scheduled_says_why(k):
    """The scheduler's reason is in the Compressed condition and a Warning event; plain
    progress (compressing, waiting for the source) is a Normal event."""
    k.pvc("models")
    k.apply(model(k, "big", compression={"method": "int8", "resources": {"cpu": "5000", "memory": "1Gi"},
                                         "podAnnotations": result_annotations(GOOD)}))
    c = k.wait_for("pending reason", lambda: (c := cond(k, "big", "Compressed")).get("reason")
                   == "CompressionPodPending" and "Insufficient cpu" in c["message"] and c)
    assert "is Pending (Unschedulable: " in c["message"] and mstatus(k, "big")["phase"] == "Compressing"
    events = k.wait_for("pending event", lambda: [e for e in k.events("big") if e["reason"] == "CompressionPodPending"
                                                  and e["message"].startswith("Compressed=False")])
    assert events[0]["type"] == "Warning" and "is Pending (Unschedulable: " in events[0]["message"]
    assert all(e["type"] == "Normal" for e in k.events("big") if e["reason"] == "Compressing")
    # A new revision supersedes it: the Pending Job is deleted, so it never writes an artifact.
    pending = mstatus(k, "big")["revisions"]
    pending_jobs = [j["metadata"]["name"] for j in k.list("jobs", "lepton.ai/model=big")]
    assert len(pending_jobs) == 1
    k.apply(model(k, "big", compression={"method": "fp16", "podAnnotations": result_annotations(GOOD)}))
    wait_phase(k, "big", "Ready")
    k.wait_for("superseded Job deleted", lambda: pending_jobs[0] not in
               [j["metadata"]["name"] for j in k.list("jobs", "lepton.ai/model=big")])
    assert any(e["reason"] == "CompressionSuperseded" for e in k.events("big")), pending
    # A Job that compresses at once: Compressing is news, not a warning.
    k.apply(model(k, "quick"))
    wait_phase(k, "quick", "Ready")
    compressing = [e for e in k.events("quick") if e["reason"] == "Compressing"]
    assert compressing and all(e["type"] == "Normal" for e in compressing)


def test_canary_steps_to_stable_then_bad_canary_rolled_back(k, exporter):
    k.pvc("models")
    analysis = [{"name": "error-rate", "query": 'max(test_error_ratio{rev="${revision}"})', "max": 0.1}]
    spec = dict(serving={"replicas": 3},
                rollout={"steps": [{"weight": 34, "pauseSeconds": 1}, {"weight": 67, "pauseSeconds": 1}],
                         "analysis": analysis})
    k.apply(model(k, "can", **spec))
    first = wait_phase(k, "can", "Ready")["revisions"]["stable"]

    # Revision 2: held at step 1 while its analysis has no data; the replica ratio is the weight.
    spec2 = {**spec, "compression": {"method": "fp16", "podAnnotations": result_annotations(GOOD)}}
    k.apply(model(k, "can", **spec2))
    s = k.wait_for("analysis waiting for data",
                   lambda: (s := mstatus(k, "can")).get("revisions", {}).get("canary") and
                   cond(k, "can", "Ready").get("reason") == "AnalysisNoData" and s)
    second = s["revisions"]["canary"]
    assert s["phase"] == "Progressing" and s["revisions"]["canaryWeight"] == 34
    deps = deployments(k, "can")
    assert deps[first]["spec"]["replicas"] == 2 and deps[second]["spec"]["replicas"] == 1
    svc = k.get("service", "can")
    assert svc["spec"]["selector"] == {"lepton.ai/model": "can", "lepton.ai/role": "serving"}

    exporter.set("test_error_ratio", 0.01, rev=second)
    s = k.wait_for("promotion", lambda: (s := mstatus(k, "can")).get("revisions", {}).get("stable") == second
                   and s.get("phase") == "Ready" and s)
    assert "canary" not in s["revisions"]
    assert all(a["passed"] for a in s["analysis"]) and s["analysis"][0]["value"] == 0.01
    msgs = [e["message"] for e in k.events("can")]
    assert any("step 2/2, weight 67%" in m for m in msgs) and any(f"revision {second} promoted" in m for m in msgs)
    k.wait_for("old revision removed", lambda: list(deployments(k, "can")) == [second])

    # Revision 3 has a bad error rate: rolled back, the reason names the query and its value.
    k.apply(model(k, "can", **{**spec, "compression": {"method": "bf16",
                                                       "podAnnotations": result_annotations(GOOD)}}))
    third = k.wait_for("third canary", lambda: mstatus(k, "can").get("revisions", {}).get("canary"))
    exporter.set("test_error_ratio", 0.5, rev=third)
    s = k.wait_for("rollback", lambda: (s := mstatus(k, "can")).get("revisions", {}).get("failed") == third
                   and s.get("phase") == "Degraded" and s)
    ready = cond(k, "can", "Ready")
    assert ready["reason"] == "AnalysisFailed" and "'error-rate' = 0.5, must be <= 0.1" in ready["message"]
    assert s["revisions"]["stable"] == second and s["revisions"]["failedReason"] == "AnalysisFailed"
    deps = deployments(k, "can")
    assert deps[third]["spec"]["replicas"] == 0 and deps[second]["spec"]["replicas"] == 3
    warn = [e for e in k.events("can") if e["type"] == "Warning" and e["reason"] == "RolledBack"]
    assert warn and "error-rate" in warn[0]["message"] and "0.5" in warn[0]["message"]


def test_not_ready_while_serving_pods_crash_loop(k):
    k.pvc("models")
    k.apply(model(k, "crash", compression={"method": "none"},
                  serving={"replicas": 2, "podAnnotations": {"kwok.lepton.ai/crash-loop": "true"}}))
    s = k.wait_for("deploying with pods not ready",
                   lambda: (s := mstatus(k, "crash")).get("phase") == "Deploying" and
                   cond(k, "crash", "Ready").get("reason") == "PodsNotReady" and s)
    pods = k.list("pods", "lepton.ai/model=crash")
    assert len(pods) == 2 and "Job" not in json.dumps([p["metadata"].get("ownerReferences") for p in pods])
    assert cond(k, "crash", "Ready")["status"] == "False" and "0/2 serving pods" in cond(k, "crash", "Ready")["message"]
    assert not k.list("jobs")   # method none: no compression Job


def test_missing_sources_are_reported_and_awaited(k):
    k.apply(model(k, "fromjob", source={"jobRef": {"name": "nosuchjob"}}))
    k.apply(model(k, "nopvc", source={"uri": "pvc://nosuchclaim/m"}))
    for name, text in (("fromjob", "LeptonJob 'nosuchjob' not found"),
                       ("nopvc", "PersistentVolumeClaim 'nosuchclaim' of pvc://nosuchclaim/m not found")):
        k.wait_for(f"{name} SourceNotFound", lambda: cond(k, name, "Ready").get("reason") == "SourceNotFound")
        assert text in cond(k, name, "Ready")["message"]
        assert mstatus(k, name)["phase"] == "Pending"
    assert not k.list("jobs") and not k.list("deployments")
    k.pvc("nosuchclaim")     # the claim appears: the model goes on
    k.wait_for("nopvc compressing", lambda: mstatus(k, "nopvc").get("phase") in ("Compressing", "Deploying", "Ready"),
               timeout=90)


@pytest.mark.parametrize("spec,message", [
    ({"compression": {"method": "int4"}}, 'Unsupported value: "int4"'),
    ({"rollout": {"steps": [{"weight": 50}, {"weight": 20}]}}, "rollout.steps weights must strictly increase"),
    ({"source": {}}, "source must set exactly one of jobRef"),
    ({"source": {"jobRef": {}}}, "spec.source.jobRef.name: Required value"),
    ({"rollout": {"analysis": [{"name": "e", "query": "", "max": 1}]}}, "spec.rollout.analysis[0].query"),
    ({"autoscaling": {"metric": "query", "query": " ", "target": 1}},
     "autoscaling.query must be a non-empty PromQL query"),
    ({"compression": {"method": "distill", "params": {"student": {"layers": 3, "path": "s"}}}},
     "compression.params.student must set exactly one of layers or path"),
    ({"compression": {"method": "distill", "params": {"student": {"layers": 3}, "data": "../d.jsonl"}}},
     "compression.params.data must be relative to the source claim"),
    ({"compression": {"method": "distill", "params": {"student": {"layers": 0}}}},
     "spec.compression.params.student.layers: Invalid value: 0"),
    ({"source": {"uri": "pvc://models/m", "format": "onnx"}, "compression": {"method": "prune"}},
     "spec.compression.method prune has no implementation for spec.source.format onnx"),
])
def test_bad_input_is_rejected(k, spec, message):
    out = k.run("apply", "-f", "-", input=json.dumps(model(k, "bad", **spec)))
    assert out.returncode != 0 and message in out.stderr, out.stderr
