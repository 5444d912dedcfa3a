"""A compression Job fails once, for a reason, and a disruption is no failure.

The Job controller of the local control plane applies the compression Job's
``podFailurePolicy``: a pod that exits with the program's verdict (3: the gate said no) or
its crash (1) fails the Job at once, without the retry ``backoffLimit`` would allow; a pod
evicted through the Eviction API (its ``DisruptionTarget`` condition) is replaced and
counts for nothing. kwok stops a deleted Job pod the way kubelet would (hack/kwok.yaml,
``pod-stop-on-delete``).
"""
from __future__ import annotations

import json

import pytest

from test_model_rollout import BAD, GOOD, model, mstatus, result_annotations

pytestmark = pytest.mark.integration


def compression_job(k, name: str) -> dict:
    jobs = k.wait_for(f"{name}'s compression Job", lambda: k.list("jobs", f"lepton.ai/model={name}"))
    assert len(jobs) == 1, [j["metadata"]["name"] for j in jobs]
    return jobs[0]


def job_pods(k, job: str) -> list[dict]:
    return k.list("pods", f"batch.kubernetes.io/job-name={job}")


def job_condition(k, job: str, type_: str) -> dict:
    conds = ((k.get("job", job) or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == type_ and c["status"] == "True"), {})


@pytest.mark.parametrize("code, annotations", [(3, result_annotations(BAD, code=3)),
                                               (1, {"kwok.lepton.ai/exit-code": "1"})],
                         ids=["gate-says-no", "crash"])
def test_a_compression_verdict_or_crash_ends_its_job_without_a_retry(k, code, annotations):
    name = f"once-{code}"
    k.pvc("models")
    k.apply(model(k, name, compression={"method": "prune", "maxAccuracyDrop": 0.02, "podAnnotations": annotations}))
    job = compression_job(k, name)["metadata"]["name"]
    failed = k.wait_for("the Job failed", lambda: job_condition(k, job, "Failed"), timeout=60)
    assert failed["reason"] == "PodFailurePolicy", failed
    assert len(job_pods(k, job)) == 1                 # backoffLimit 1 would have made a second pod
    k.wait_for("the revision failed", lambda: mstatus(k, name).get("phase") == "Failed")


def test_an_evicted_compression_pod_is_replaced_and_counts_for_nothing(k):
    k.pvc("models")
    runs = {"kwok.lepton.ai/exit-after": "15s", **result_annotations(GOOD)}
    k.apply(model(k, "evicted", compression={"method": "int8", "maxAccuracyDrop": 0.02, "podAnnotations": runs}))
    job = compression_job(k, "evicted")["metadata"]["name"]
    pod = k.wait_for("the compression pod running", lambda: next(
        (p for p in job_pods(k, job) if p["status"].get("phase") == "Running"), None), timeout=60)
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    k.kubectl("create", "--raw", f"/api/v1/namespaces/{k.ns}/pods/{name}/eviction", "-f", "-", input=json.dumps(
        {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": k.ns}}))
    k.wait_for("a replacement pod", lambda: any(p["metadata"]["uid"] != uid for p in job_pods(k, job)), timeout=60)
    status = (k.get("job", job) or {}).get("status") or {}
    assert not status.get("failed") and not job_condition(k, job, "Failed"), status
    s = k.wait_for("the model Ready", lambda: (s := mstatus(k, "evicted")).get("phase") == "Ready" and s, timeout=90)
    assert "failed" not in s.get("revisions", {}) and s["compression"]["state"] == "Succeeded", s
    assert not ((k.get("job", job) or {}).get("status") or {}).get("failed")
