"""LeptonJob failure handling on the real control plane: restarts, backoffLimit, deadline,
suspend/resume, success + TTL, deletion, and every kind of bad input."""
import datetime
import json

import pytest

import localcluster

pytestmark = pytest.mark.integration


def uids(pods):
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}


def test_worker_failure_is_replaced_within_budget_and_disruptions_are_not_counted(k):
    k.apply(k.manifest("flaky", backoffLimit=2))
    before = uids(k.wait_workers("flaky", 2))
    k.wait_phase("flaky", "Running")

    k.kwok_exit("flaky-worker-1", 1)                    # a real failure of the workload
    k.wait_for("a counted restart", lambda: k.status("flaky").get("restarts", {}).get("counted") == 1)
    after = uids(k.wait_workers("flaky", 2))
    assert after["flaky-worker-1"] != before["flaky-worker-1"] and after["flaky-worker-0"] == before["flaky-worker-0"]
    k.wait_phase("flaky", "Running")
    assert any(e["type"] == "Warning" and e["reason"] == "WorkerFailed" and "exited with code 1" in e["message"]
               for e in k.events("flaky"))

    k.kwok_exit("flaky-worker-0", 143)                  # SIGTERM from outside: retryable
    k.wait_for("an uncounted restart", lambda: k.status("flaky")["restarts"]["uncounted"] == 1)
    k.kubectl("delete", "pod", "flaky-worker-1", "--wait=false")   # e.g. a drain: retryable
    k.wait_for("a second uncounted restart", lambda: k.status("flaky")["restarts"]["uncounted"] == 2)
    k.wait_workers("flaky", 2)
    status = k.wait_phase("flaky", "Running")
    assert status["restarts"] == {"counted": 1, "uncounted": 2}


def test_backoff_limit_fails_the_job_for_good(k):
    k.apply(k.manifest("doomed", backoffLimit=1, workers={"min": 1, "max": 2, "replicas": 1}))
    k.wait_workers("doomed", 1)
    k.kwok_exit("doomed-worker-0", 2)
    k.wait_for("a counted restart", lambda: k.status("doomed").get("restarts", {}).get("counted") == 1)
    pod = k.wait_workers("doomed", 1)[0]
    k.kwok_exit(pod["metadata"]["name"], 2)
    status = k.wait_phase("doomed", "Failed")
    assert status["restarts"]["counted"] == 2 and status.get("completionTime")
    ready, stalled = k.condition("doomed", "Ready"), k.condition("doomed", "Stalled")
    assert (ready["status"], ready["reason"]) == ("False", "BackoffLimitExceeded")
    assert stalled["status"] == "True"
    k.wait_for("the rendezvous pod to be removed", lambda: k.get("pod", "doomed-rdzv") is None)
    k.kubectl("scale", "lj/doomed", "--replicas=2")     # a terminal job stays terminal
    k.wait_for("generation 2 observed", lambda: k.status("doomed").get("observedGeneration") == 2)
    assert k.status("doomed")["phase"] == "Failed"
    assert [p for p in k.workers("doomed") if p["status"]["phase"] in ("Pending", "Running")] == []


def test_active_deadline_ends_the_job(k):
    k.apply(k.manifest("slow", activeDeadlineSeconds=3))
    k.wait_workers("slow", 2)
    k.wait_phase("slow", "Failed")
    assert k.condition("slow", "Ready")["reason"] == "DeadlineExceeded"
    k.wait_for("workers deleted", lambda: k.workers("slow") == [])


def test_suspend_deletes_workers_keeps_job_and_checkpoints_then_resumes(k):
    k.pvc("ckpt")
    k.apply(k.manifest("pausable", checkpoint={"claimName": "ckpt"}))
    k.wait_workers("pausable", 2)
    k.kubectl("patch", "lj", "pausable", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    k.wait_phase("pausable", "Suspended")
    k.wait_for("workers deleted", lambda: k.workers("pausable") == [])
    k.wait_for("rendezvous pod deleted: a suspended job runs nothing", lambda: k.get("pod", "pausable-rdzv") is None)
    assert k.get("pvc", "ckpt") and k.get("service", "pausable-rdzv")
    assert k.condition("pausable", "Reconciling")["status"] == "False"
    k.kubectl("patch", "lj", "pausable", "--type=merge", "-p", '{"spec":{"suspend":false}}')
    k.wait_workers("pausable", 2)
    k.wait_phase("pausable", "Running")
    assert k.get("pod", "pausable-rdzv")
    assert any(e["reason"] == "Resumed" for e in k.events("pausable"))


def test_a_job_created_suspended_runs_nothing(k):
    k.apply(k.manifest("dormant", suspend=True))
    k.wait_phase("dormant", "Suspended")
    assert k.get("pod", "dormant-rdzv") is None and k.workers("dormant") == []


def test_success_sets_output_then_ttl_deletes_job_and_children_but_not_the_pvc(k):
    k.pvc("ckpt")
    k.apply(k.manifest("done", ttlSecondsAfterFinished=2, checkpoint={"claimName": "ckpt", "subPath": "run"}))
    for pod in k.wait_workers("done", 2):
        k.kwok_exit(pod["metadata"]["name"], 0)
    status = k.wait_phase("done", "Succeeded")
    assert status["outputURI"] == "pvc://ckpt/run/output" and status["completionTime"]
    assert k.condition("done", "Ready")["status"] == "True"
    k.wait_for("the job deleted by its TTL", lambda: k.job("done") is None)
    k.wait_for("children garbage-collected",
               lambda: not k.list("pods", "lepton.ai/job=done") and not k.list("services", "lepton.ai/job=done"))
    assert k.get("pvc", "ckpt") is not None


def test_deleting_a_job_removes_pods_services_and_the_stores_token_never_the_pvc(k):
    k.pvc("ckpt")
    k.apply(k.manifest("gone", checkpoint={"claimName": "ckpt"}))
    k.wait_workers("gone", 2)
    assert k.get("secret", "gone-rdzv") is not None
    k.kubectl("delete", "lj", "gone")
    k.wait_for("children garbage-collected",
               lambda: not k.list("pods", "lepton.ai/job=gone") and not k.list("services", "lepton.ai/job=gone")
               and k.get("secret", "gone-rdzv") is None)
    assert k.get("pvc", "ckpt") is not None


@pytest.mark.parametrize("name, spec, message", [
    ("minmax", {"workers": {"min": 3, "max": 2}}, "workers.min must be less than or equal to workers.max"),
    ("reps", {"workers": {"min": 1, "max": 2, "replicas": 3}}, "workers.replicas must be between workers.min and workers.max"),
    ("zero", {"workers": {"min": 0, "max": 1}}, "should be greater than or equal to 1"),
    ("both", {"command": ["train.py"], "module": "m"}, "set either command (a script run by torchrun) or module"),
    ("x" * 53, {}, "metadata.name must be at most 52 characters"),
    ("with.dot", {}, "metadata.name must not contain dots"),
    ("gpus", {"resources": {"gpus": -1}}, "should be greater than or equal to 0"),
    ("policy", {"imagePullPolicy": "Sometimes"}, "supported values"),
    ("selector", {"nodeSelector": {"bad key!": "v"}}, "nodeSelector keys must be label keys"),
    ("tolerate", {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
     "value must be empty when operator is Exists"),
    ("priv", {"securityContext": {"privileged": True, "allowPrivilegeEscalation": False}},
     "allowPrivilegeEscalation false cannot go with privileged true"),
    ("ft", {"faultTolerance": "perEpoch"}, 'spec.faultTolerance: Unsupported value: "perEpoch"'),
])
def test_schema_rejects_bad_specs_at_apply_time(k, name, spec, message):
    manifest = k.manifest(name, **spec)
    result = k.run("apply", "-f", "-", input=__import__("yaml").safe_dump(manifest))
    assert result.returncode != 0
    assert message in result.stderr
    assert k.job(name) is None


def test_fault_tolerance_cannot_change_once_the_job_exists(k):
    """The rendezvous pod runs a c10d store or a Lighthouse: switching would strand the workers."""
    k.apply(k.manifest("ftfixed", suspend=True))
    for spec in ({"faultTolerance": "perStep"}, {"faultTolerance": "restart"}):
        result = k.run("apply", "-f", "-", input=__import__("yaml").safe_dump(k.manifest("ftfixed", suspend=True, **spec)))
        if spec["faultTolerance"] == "restart":   # unset means restart: naming it changes nothing
            assert result.returncode == 0, result.stderr
        else:
            assert result.returncode != 0 and "faultTolerance cannot change once the job exists" in result.stderr
    assert k.job("ftfixed")["spec"]["faultTolerance"] == "restart"


def test_missing_pvc_is_invalid_spec_until_it_exists(k):
    k.apply(k.manifest("nopvc", checkpoint={"claimName": "absent"}))
    ready = k.wait_for("InvalidSpec", lambda: (c := k.condition("nopvc", "Ready")).get("reason") == "InvalidSpec" and c)
    assert ready["status"] == "False" and "PersistentVolumeClaim 'absent' does not exist" in ready["message"]
    assert k.condition("nopvc", "Stalled")["status"] == "True"
    assert any(e["type"] == "Warning" and e["reason"] == "InvalidSpec" for e in k.events("nopvc"))
    assert k.workers("nopvc") == []
    k.pvc("absent")
    k.kubectl("annotate", "lj", "nopvc", "example.com/poke=1")   # any change re-checks at once
    k.wait_phase("nopvc", "Running")
    assert k.condition("nopvc", "Stalled")["status"] == "False"


def test_a_worker_pod_the_api_server_refuses_is_invalid_spec_not_a_retry_loop(k, operator):
    """``affinity`` goes to the Pod API as the user wrote it (core/v1 Affinity has more
    rules than the CRD copies). A worker pod the API server refuses (422) is reported
    InvalidSpec with the server's message, which names the field, plus one Warning event;
    the job then waits for a spec change instead of sending the same pod again."""
    refused = lambda: operator.metric("lepton_operator_api_requests_total", verb="POST", code="422")  # noqa: E731
    before = refused()
    bad = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}
    k.apply(k.manifest("refused", affinity=bad))
    ready = k.wait_for("InvalidSpec", lambda: (c := k.condition("refused", "Ready")).get("reason") == "InvalidSpec" and c)
    assert ready["status"] == "False"
    assert "the API server refuses Pod refused-worker-0" in ready["message"], ready["message"]
    assert "nodeSelectorTerms" in ready["message"], ready["message"]
    assert k.condition("refused", "Stalled")["status"] == "True"
    assert k.status("refused")["phase"] == "Pending" and k.workers("refused") == []
    after = refused()
    assert after > before
    # Any event that wakes the loop without a new generation sends nothing.
    k.kubectl("annotate", "lj", "refused", "example.com/poke=1")
    k.kubectl("patch", "lj", "refused", "--type=json", "-p", '[{"op": "remove", "path": "/spec/affinity"}]')
    k.wait_phase("refused", "Running")
    assert refused() == after
    assert k.condition("refused", "Stalled")["status"] == "False"
    assert len([e for e in k.events("refused") if e["reason"] == "InvalidSpec"]) == 1


def test_gpu_request_no_node_can_satisfy_is_invalid_spec_on_a_fixed_pool(k, cluster):
    """capacity.mode observed: the cluster is what it is, so such a worker is a bad spec."""
    fixed = {"mode": "observed"}
    k.apply(k.manifest("huge", resources={"gpus": cluster.gpus_per_node + 1}, capacity=fixed))
    ready = k.wait_for("InvalidSpec", lambda: (c := k.condition("huge", "Ready")).get("reason") == "InvalidSpec" and c)
    assert "no node can ever run a worker" in ready["message"]
    k.apply(k.manifest("picky", nodeSelector={"gpu-type": "h100"}, capacity=fixed))
    ready = k.wait_for("InvalidSpec", lambda: (c := k.condition("picky", "Ready")).get("reason") == "InvalidSpec" and c)
    assert "largest node that matches nodeSelector" in ready["message"]
    assert k.workers("huge") == [] and k.workers("picky") == []
    # Fixing the spec clears the condition.
    k.apply(k.manifest("huge", resources={"gpus": 1}, capacity=fixed))
    k.wait_phase("huge", "Running")
    assert k.condition("huge", "Ready")["status"] == "True"


def test_a_gpu_pool_that_scales_from_zero_gets_pending_pods_then_runs(k, cluster):
    """provision (default): the pool the workers select has no node yet. The gang's Pending
    pods are the demand; the test plays the cluster autoscaler and adds a node once it sees
    them. (kwok's node stands in for a provisioned machine: it runs nothing, which is not
    the point here: the demand and the scheduling are.)"""
    pool = f"pool-{k.ns[-5:]}"
    k.apply(k.manifest("zero", nodeSelector={"lepton.ai/test-pool": pool}, workers={"min": 2, "max": 3, "replicas": 3}))
    pods = k.wait_workers("zero", 2, phase="Pending")
    assert all(not p["spec"].get("nodeName") for p in pods)
    ready = k.wait_for("WaitingForCapacity", lambda: (c := k.condition("zero", "Ready")).get("reason")
                       == "WaitingForCapacity" and c, timeout=30)
    assert "ask the cluster autoscaler for nodes" in ready["message"] and k.status("zero")["phase"] == "Pending"
    assert len(k.workers("zero")) == 2                  # min, not replicas: nothing beyond min is provisioned
    assert any(e["reason"] == "WaitingForCapacity" for e in k.events("zero"))
    node = localcluster.gpu_node(f"kwok-{pool}", cluster.gpus_per_node)
    node["metadata"]["labels"]["lepton.ai/test-pool"] = pool
    k.apply(node)
    try:
        k.wait_workers("zero", 3, timeout=120)
        status = k.wait_phase("zero", "Running")
        assert "waitingForCapacitySince" not in status
    finally:
        k.kubectl("delete", "lj", "zero", "--wait=true")
        cluster.kubectl("delete", "node", f"kwok-{pool}", "--wait=false")


def set_request_condition(k, name, type_, message):
    """Set a condition on a ProvisioningRequest's status, as the cluster autoscaler would."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    cond = {"type": type_, "status": "True", "reason": type_, "message": message, "lastTransitionTime": now}
    k.kubectl("patch", "provisioningrequest", name, "--subresource=status", "--type=merge",
              "-p", json.dumps({"status": {"conditions": [cond]}}))


def test_provisioning_request_mode_asks_for_the_gang_and_creates_pods_only_once_provisioned(k, cluster):
    """capacity.mode provisioningRequest: the gang is asked of the cluster autoscaler as one
    ProvisioningRequest (autoscaling.x-k8s.io/v1, registered by the local control plane),
    whose PodTemplate is the worker's. No pod exists until it is Provisioned; a Failed one
    is shown, then asked again; once Provisioned, the gang is created consuming it, and the
    request is given back when every worker is on a node. No cluster autoscaler runs here:
    the test sets the conditions one would, and adds the node it would have provisioned
    (kwok's, which runs nothing: the point is the order of requests, pods and scheduling)."""
    pool = f"dws-{k.ns[-5:]}"
    request = "dws-capacity"
    k.apply(k.manifest("dws", nodeSelector={"lepton.ai/test-pool": pool}, workers={"min": 2, "max": 2},
                       capacity={"mode": "provisioningRequest", "parameters": {"maxRunDurationSeconds": "3600"}}))
    pr = k.wait_for("the ProvisioningRequest", lambda: k.get("provisioningrequest", request), timeout=30)
    assert pr["spec"]["provisioningClassName"] == "best-effort-atomic-scale-up.autoscaling.x-k8s.io"
    assert pr["spec"]["podSets"] == [{"podTemplateRef": {"name": request}, "count": 2}]
    assert pr["spec"]["parameters"] == {"maxRunDurationSeconds": "3600"}
    assert pr["metadata"]["ownerReferences"][0]["name"] == "dws"
    template = k.get("podtemplate", request)["template"]
    assert template["spec"]["nodeSelector"] == {"lepton.ai/test-pool": pool}
    assert template["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The first message says "asking"; once the operator sees its request, the message names it.
    ready = k.wait_for("WaitingForCapacity naming the request", lambda: (c := k.condition("dws", "Ready")).get(
        "reason") == "WaitingForCapacity" and f"ProvisioningRequest {request} " in c.get("message", "") and c,
        timeout=30)
    assert "asks the cluster autoscaler for 2 worker(s)" in ready["message"] and k.workers("dws") == []
    assert k.status("dws")["capacityRequest"] == {"name": request, "state": "Pending", "count": 2}

    # The autoscaler cannot provision: the job says so, creates nothing, and asks again.
    set_request_condition(k, request, "Failed", "no capacity in any zone")
    k.wait_for("the failure in the status", lambda: k.status("dws").get("capacityRequest", {}).get("state") == "Failed")
    assert "no capacity in any zone" in k.condition("dws", "Ready")["message"] and k.workers("dws") == []
    first = pr["metadata"]["uid"]
    pr = k.wait_for("a new ProvisioningRequest",
                    lambda: (p := k.get("provisioningrequest", request)) and p["metadata"]["uid"] != first and p,
                    timeout=90)
    assert k.workers("dws") == []

    # Provisioned: the gang is created at once, consuming the request (before any node of
    # the pool shows: the pods wait for it as they would for a node still registering).
    node = localcluster.gpu_node(f"kwok-{pool}", cluster.gpus_per_node)
    node["metadata"]["labels"]["lepton.ai/test-pool"] = pool
    try:
        set_request_condition(k, request, "Provisioned", "provisioned for 2 pods")
        pods = k.wait_workers("dws", 2, phase="Pending", timeout=60)
        assert all(p["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/consume-provisioning-request"]
                   == request for p in pods)
        assert k.get("provisioningrequest", request) is not None    # held until the pods are on nodes
        k.apply(node)
        k.wait_phase("dws", "Running")
        k.wait_for("the request given back", lambda: k.get("provisioningrequest", request) is None
                   and k.get("podtemplate", request) is None, timeout=30)
        assert "capacityRequest" not in k.status("dws")
    finally:
        k.kubectl("delete", "lj", "dws", "--wait=true")
        cluster.kubectl("delete", "node", f"kwok-{pool}", "--wait=false")


def test_a_failed_workers_cause_reaches_the_condition_and_the_event(k):
    """The trainer writes its exception to /dev/termination-log (tests/trainer) and a worker
    without one gives the tail of its log (FallbackToLogsOnError): what the container said
    is in the failure's event and in the Ready condition of the job it failed, not only
    "exited with code 1"."""
    k.apply(k.manifest("cause", backoffLimit=0, workers={"min": 1, "max": 1, "replicas": 1}))
    name = k.wait_workers("cause", 1)[0]["metadata"]["name"]
    k.kubectl("annotate", "--overwrite", "pod", name,            # one patch: the message is there when it exits
              "kwok.lepton.ai/termination-message=ModuleNotFoundError: No module named 'mytrainer'",
              "kwok.lepton.ai/exit-code=1")
    k.wait_phase("cause", "Failed")
    ready = k.condition("cause", "Ready")
    assert ready["reason"] == "BackoffLimitExceeded" and "No module named 'mytrainer'" in ready["message"], ready
    assert any(e["type"] == "Warning" and e["reason"] == "WorkerFailed" and "No module named 'mytrainer'"
               in e["message"] for e in k.events("cause"))
