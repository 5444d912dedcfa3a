"""The LeptonJob state machine: sizing, gang creation, failures, deadlines, suspend, TTL."""
import datetime as dt

import pytest

from lepton_operator.job import state as js
from lepton_operator.constants import COND_READY, COND_STALLED
from lepton_operator.job.spec import parse_job
from planning import plan_job

pytestmark = pytest.mark.unit
NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
META = {"name": "j", "namespace": "ns", "uid": "u", "generation": 2}


def spec(**kw):
    base = {"workers": {"min": 2, "max": 4, "replicas": 4}, "resources": {"gpus": 1}}
    base.update(kw)
    return parse_job("j", base, "img")


def pod(i, phase="Running", uid=None, ready=True, node="n1", **kw):
    return js.PodView(name=f"j-worker-{i}", uid=uid or f"uid-{i}", index=i, phase=phase,
                      node=node if phase != "Pending" else None, ready=ready and phase == "Running", **kw)


def cond(plan, type_):
    return next(c for c in plan.status["conditions"] if c["type"] == type_)


def test_gang_creates_nothing_until_min_fits():
    plan = plan_job(META, spec(), {}, [], free_slots=1, now=NOW)
    assert plan.create == [] and plan.status["phase"] == "Pending"
    assert cond(plan, COND_READY)["reason"] == "WaitingForCapacity"
    plan = plan_job(META, spec(), {}, [], free_slots=2, now=NOW)
    assert plan.create == [0, 1]                        # min at once, capacity-limited beyond
    assert plan.status["startTime"] == "2026-01-01T12:00:00Z"


def test_scale_up_limited_by_capacity_and_reported():
    prev = {"phase": "Running"}
    plan = plan_job(META, spec(), prev, [pod(0), pod(1)], free_slots=1, now=NOW)
    assert plan.create == [2]
    plan = plan_job(META, spec(), prev, [pod(0), pod(1), pod(2)], free_slots=0, now=NOW)
    assert plan.create == [] and plan.status["phase"] == "Running"
    assert "1 more wait for capacity" in cond(plan, COND_READY)["message"]
    assert plan.status["workers"] == {"desired": 4, "scheduled": 3, "running": 3, "ready": 3}


def test_scale_down_deletes_highest_indices():
    s = spec(workers={"min": 1, "max": 4, "replicas": 2})
    plan = plan_job(META, s, {"phase": "Running"}, [pod(i) for i in range(4)], free_slots=0, now=NOW)
    assert plan.delete == ["j-worker-3", "j-worker-2"] and plan.create == []
    assert plan.status["phase"] == "Scaling" and plan.status["replicas"] == 2


def test_all_running_is_ready():
    plan = plan_job(META, spec(), {"phase": "Scaling"}, [pod(i) for i in range(4)], 0, NOW)
    assert plan.status["phase"] == "Running" and cond(plan, COND_READY)["status"] == "True"
    assert plan.status["observedGeneration"] == 2 and plan.status["workersReady"] == "4/4"
    assert plan.events and plan.events[0][1] == "Running"


def test_counted_failure_is_replaced_within_budget_and_not_counted_twice():
    failed = pod(1, "Failed", message="container worker exited with code 1")
    prev = {"phase": "Running", "startTime": "2026-01-01T11:00:00Z"}
    plan = plan_job(META, spec(), prev, [pod(0), failed, pod(2), pod(3)], 1, NOW)
    assert plan.status["restarts"] == {"counted": 1, "uncounted": 0}
    assert plan.delete == ["j-worker-1"] and plan.create == [1]
    assert plan.status["phase"] == "Restarting" and plan.counted_uids == {"uid-1"}
    assert any(e[0] == "Warning" and e[1] == "WorkerFailed" for e in plan.events)
    again = plan_job(META, spec(), plan.status, [pod(0), failed, pod(2), pod(3)], 1, NOW,
                        handled_uids={"uid-1"})
    assert again.status["restarts"]["counted"] == 1


def test_template_change_replaces_the_whole_group_without_counting_a_restart():
    s = spec(workers={"min": 2, "max": 2, "replicas": 2})
    prev = {"phase": "Running", "restarts": {"counted": 0, "uncounted": 0}}
    old = [pod(0, template="aaa", generation=1), pod(1, template="aaa", generation=1)]
    same = plan_job(META, s, prev, old, 4, NOW, template="aaa")
    assert same.delete == [] and same.status["phase"] == "Running"
    plan = plan_job(META, s, prev, old, 4, NOW, template="bbb")
    assert plan.delete == ["j-worker-0", "j-worker-1"]
    assert plan.create == []                            # the names are free only once the old pods are gone
    assert plan.status["phase"] == "Restarting" and cond(plan, COND_READY)["reason"] == "TemplateChanged"
    assert plan.status["restarts"] == {"counted": 0, "uncounted": 0}
    assert any(e[1] == "TemplateChanged" and "aaa -> bbb" in e[2] for e in plan.events)
    going = [js.dataclasses.replace(p, deleting=True) for p in old]
    waiting = plan_job(META, s, plan.status, going, 2, NOW, template="bbb")
    assert waiting.create == [] and waiting.delete == []
    fresh = plan_job(META, s, waiting.status, [], 2, NOW, template="bbb")
    assert fresh.create == [0, 1]
    unknown = plan_job(META, s, prev, [pod(0), pod(1)], 4, NOW, template="bbb")
    assert unknown.delete == []                         # pods without a hash are left alone
    current = [pod(0, template="aaa", generation=2), pod(1, template="aaa", generation=2)]
    upgraded = plan_job(META, s, prev, current, 4, NOW, template="bbb")
    assert upgraded.delete == []                        # same generation: an operator upgrade, not a spec change


def test_retryable_failure_and_vanished_pods_are_uncounted():
    evicted = pod(0, "Failed", retryable=True, message="disrupted (Evicted)")
    plan = plan_job(META, spec(), {"phase": "Running"}, [evicted, pod(1)], 2, NOW, vanished=1)
    assert plan.status["restarts"] == {"counted": 0, "uncounted": 2}


def test_backoff_limit_fails_the_job_and_it_stays_failed():
    s = spec(backoffLimit=1)
    prev = {"phase": "Running", "restarts": {"counted": 1, "uncounted": 0}}
    plan = plan_job(META, s, prev, [pod(0, "Failed"), pod(1)], 4, NOW)
    assert plan.status["phase"] == "Failed" and plan.create == []
    assert plan.delete == ["j-worker-1"] and plan.delete_rendezvous   # failed pod kept for its logs
    assert cond(plan, COND_STALLED)["status"] == "True"
    assert cond(plan, COND_READY)["reason"] == "BackoffLimitExceeded"
    later = plan_job(META, s, plan.status, [], 4, NOW + dt.timedelta(hours=1))
    assert later.status["phase"] == "Failed" and later.create == []


def test_deadline():
    s = spec(activeDeadlineSeconds=60)
    prev = {"phase": "Running", "startTime": "2026-01-01T11:59:30Z"}
    plan = plan_job(META, s, prev, [pod(0), pod(1)], 0, NOW)
    assert plan.status["phase"] == "Running" and plan.requeue_after == pytest.approx(30)
    plan = plan_job(META, s, prev, [pod(0), pod(1)], 0, NOW + dt.timedelta(seconds=31))
    assert plan.status["phase"] == "Failed" and cond(plan, COND_READY)["reason"] == "DeadlineExceeded"


def test_suspend_deletes_workers_and_resume_recreates():
    prev = {"phase": "Running", "startTime": "2026-01-01T11:00:00Z"}
    plan = plan_job(META, spec(suspend=True), prev, [pod(0), pod(1)], 4, NOW)
    assert plan.status["phase"] == "Suspended" and plan.delete == ["j-worker-0", "j-worker-1"]
    assert "startTime" not in plan.status and plan.delete_rendezvous       # a suspended job runs nothing
    resumed = plan_job(META, spec(), plan.status, [], 4, NOW)
    assert resumed.create == [0, 1, 2, 3] and any(e[1] == "Resumed" for e in resumed.events)


def test_success_then_ttl():
    s = spec(ttlSecondsAfterFinished=30, checkpoint={"claimName": "c"})
    plan = plan_job(META, s, {"phase": "Running"}, [pod(0, "Succeeded"), pod(1, "Succeeded")], 4, NOW)
    assert plan.status["phase"] == "Succeeded" and plan.status["completionTime"] == "2026-01-01T12:00:00Z"
    assert plan.status["outputURI"] == "pvc://c/output" and plan.requeue_after == 30
    assert cond(plan, COND_READY)["status"] == "True"
    early = plan_job(META, s, plan.status, [], 4, NOW + dt.timedelta(seconds=10))
    assert not early.delete_job and early.requeue_after == pytest.approx(20)
    late = plan_job(META, s, plan.status, [], 4, NOW + dt.timedelta(seconds=30))
    assert late.delete_job


@pytest.mark.parametrize("status, retryable", [
    ({"reason": "Evicted", "message": "node low on memory"}, True),
    ({"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]}, True),
    ({"containerStatuses": [{"name": "worker", "state": {"terminated": {"exitCode": 143}}}]}, True),
    ({"containerStatuses": [{"name": "worker", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}, False),
    ({"containerStatuses": [{"name": "worker", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}, False),
    ({}, False),
])
def test_classify_failure(status, retryable):
    assert js.classify_failure(status)[0] is retryable


def test_pod_view_summarises_a_pod():
    body = {"metadata": {"name": "j-worker-1", "uid": "x", "labels": {"lepton.ai/worker-index": "1"}},
            "spec": {"nodeName": "n", "containers": [{"resources": {"limits": {"nvidia.com/gpu": "2"}}}]},
            "status": {"phase": "Failed", "reason": "Evicted"}}
    v = js.pod_view(body)
    assert (v.index, v.gpus, v.node, v.retryable, v.active) == (1, 2, "n", True, False)
    body["metadata"]["annotations"] = {"lepton.ai/spec-hash": "abc", "lepton.ai/generation": "3"}
    assert (js.pod_view(body).template, js.pod_view(body).generation) == ("abc", 3)


def test_restart_count_counts_replacements_not_failures():
    """RESTARTS (restartCount) counts workers really replaced; a failure that ends the job
    (backoffLimit 0) is a failure, not a restart."""
    failed = pod(1, "Failed", message="container worker exited with code 1")
    prev = {"phase": "Running", "startTime": "2026-01-01T11:00:00Z"}
    plan = plan_job(META, spec(), prev, [pod(0), failed, pod(2), pod(3)], 1, NOW)
    assert plan.status["restartCount"] == 1 and plan.status["workersReady"] == "3/4"
    ended = plan_job(META, spec(backoffLimit=0), prev, [pod(0), failed, pod(2), pod(3)], 1, NOW)
    assert ended.status["phase"] == "Failed" and ended.status["restartCount"] == 0
    assert ended.status["restarts"]["counted"] == 1 and ended.status["workersReady"] == "-"
    vanished = plan_job(META, spec(), prev, [pod(0), pod(2), pod(3)], 1, NOW, vanished=1)
    assert vanished.status["restartCount"] == 1 and vanished.status["restarts"]["uncounted"] == 1


def test_a_pool_at_zero_gets_the_gang_as_pending_pods():
    """provision (default): no node can hold a worker, so the gang at min is created as
    Pending pods, the demand a cluster autoscaler acts on; nothing beyond min."""
    plan = plan_job(META, spec(), {}, [], free_slots=0, now=NOW, no_node_fits=True)
    assert plan.create == [0, 1] and plan.status["phase"] == "Pending"
    ready = cond(plan, COND_READY)
    assert ready["reason"] == "WaitingForCapacity" and "ask the cluster autoscaler for nodes" in ready["message"]
    assert plan.status["waitingForCapacitySince"] == "2026-01-01T12:00:00Z"
    pending = [pod(0, "Pending"), pod(1, "Pending")]
    again = plan_job(META, spec(), plan.status, pending, free_slots=0, now=NOW, no_node_fits=True)
    assert again.create == [] and cond(again, COND_READY)["reason"] == "WaitingForCapacity"
    # Nodes appear: the pods run, the wait is over.
    up = plan_job(META, spec(), again.status, [pod(0), pod(1)], free_slots=2, now=NOW)
    assert up.create == [2, 3] and "waitingForCapacitySince" not in up.status
    # observed: a fixed pool; nothing is created (the handler reports the spec as invalid).
    fixed = plan_job(META, spec(capacity={"mode": "observed"}), {}, [], 0, NOW, no_node_fits=True)
    assert fixed.create == []
    # Nodes that exist but are busy: all or nothing, whatever the mode.
    busy = plan_job(META, spec(), {}, [], free_slots=1, now=NOW, no_node_fits=False)
    assert busy.create == [] and cond(busy, COND_READY)["reason"] == "WaitingForCapacity"


@pytest.mark.parametrize("on_timeout, phase", [("Fail", "Failed"), ("Suspend", "Suspended")])
def test_a_wait_for_capacity_ends_at_its_deadline(on_timeout, phase):
    s = spec(capacity={"timeoutSeconds": 600, "onTimeout": on_timeout})
    prev = {"phase": "Pending", "startTime": "2026-01-01T11:00:00Z", "waitingForCapacitySince": "2026-01-01T11:55:00Z"}
    pending = [pod(0, "Pending"), pod(1, "Pending")]
    waiting = plan_job(META, s, prev, pending, 0, NOW, no_node_fits=True)
    assert waiting.status["phase"] == "Pending" and waiting.requeue_after == 300
    late = {**prev, "waitingForCapacitySince": "2026-01-01T11:45:00Z"}
    ended = plan_job(META, s, late, pending, 0, NOW, no_node_fits=True)
    assert ended.status["phase"] == phase and cond(ended, COND_READY)["reason"] == "CapacityTimeout"
    assert sorted(ended.delete) == ["j-worker-0", "j-worker-1"] and ended.create == []
    assert any(e[1] == "CapacityTimeout" and e[0] == "Warning" for e in ended.events)
    if on_timeout == "Suspend":
        still = plan_job(META, s, ended.status, [], 0, NOW, no_node_fits=True)
        assert still.status["phase"] == "Suspended" and still.create == []
        retry = plan_job({**META, "generation": 3}, s, ended.status, [], 0, NOW, no_node_fits=True)
        assert retry.create == [0, 1] and "capacitySuspendedGeneration" not in retry.status


STARTED = "2026-01-01T11:00:00Z"


@pytest.mark.parametrize("store, finished, counted", [
    # the store the worker rendezvoused through is the same one, and up: its failure
    (js.StoreView("2026-01-01T10:59:00Z", True, False), "2026-01-01T11:59:59Z", 1),
    # the store is gone or going: every agent exits when it does
    (js.MISSING_STORE, "2026-01-01T11:59:59Z", 0),
    (js.StoreView("2026-01-01T10:59:00Z", True, True), "2026-01-01T11:59:59Z", 0),
    # a new store replaced the worker's own, just before the failure was seen
    (js.StoreView("2026-01-01T11:59:58Z", True, False), "2026-01-01T11:59:57Z", 0),
    # replaced, but the worker failed long after: its failure
    (js.StoreView("2026-01-01T11:30:00Z", True, False), "2026-01-01T11:59:59Z", 1),
])
def test_a_worker_that_failed_with_its_rendezvous_store_is_an_uncounted_restart(store, finished, counted):
    failed = pod(1, "Failed", message="container worker exited with code 1 (Error)",
                 started_at=STARTED, finished_at=finished)
    prev = {"phase": "Running", "startTime": STARTED}
    plan = plan_job(META, spec(), prev, [pod(0), failed, pod(2), pod(3)], 1, NOW, store=store)
    assert plan.status["restarts"] == {"counted": counted, "uncounted": 1 - counted}
    assert plan.delete == ["j-worker-1"] and plan.create == [1]
    message = next(m for _, reason, m in plan.events if reason in ("WorkerFailed", "WorkerDisrupted"))
    assert ("rendezvous store was lost" in message) == (counted == 0), message


def test_pod_view_reads_start_and_finish_times():
    view = js.pod_view({"metadata": {"name": "j-worker-0", "uid": "u0", "labels": {"lepton.ai/worker-index": "0"}},
                        "spec": {}, "status": {"phase": "Failed", "startTime": STARTED, "containerStatuses": [
                            {"name": "worker", "state": {"terminated": {"exitCode": 1,
                                                                        "finishedAt": "2026-01-01T11:05:00Z"}}}]}})
    assert (view.started_at, view.finished_at) == (STARTED, "2026-01-01T11:05:00Z")
    store = js.store_view({"metadata": {"creationTimestamp": STARTED},
                           "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    assert store == js.StoreView(STARTED, True, False)


def request(state="Pending", count=2, since="2026-01-01T11:59:50Z", **kw):
    return js.CapacityRequestView("j-capacity", count, state, since=since, **kw)


@pytest.mark.parametrize("free_slots, no_node_fits", [(0, True), (1, False)])
def test_provisioning_request_mode_asks_for_the_gang_before_any_pod(free_slots, no_node_fits):
    """Whether no node of the pool exists or the nodes are busy, the gang is asked for as a
    whole and no pod is created until the request is Provisioned."""
    pr = spec(capacity={"mode": "provisioningRequest"})
    plan = plan_job(META, pr, {}, [], free_slots, NOW, no_node_fits=no_node_fits)
    assert plan.request_capacity == 2 and plan.create == [] and not plan.delete_capacity_request
    assert cond(plan, COND_READY)["reason"] == "WaitingForCapacity"
    assert plan.status["capacityRequest"] == {"state": "Requesting", "count": 2}
    assert plan.status["waitingForCapacitySince"] == "2026-01-01T12:00:00Z"
    waiting = plan_job(META, pr, plan.status, [], free_slots, NOW, request=request())
    assert waiting.request_capacity == 0 and waiting.create == [] and not waiting.delete_capacity_request
    assert "ProvisioningRequest j-capacity" in cond(waiting, COND_READY)["message"]
    granted = plan_job(META, pr, plan.status, [], free_slots, NOW, request=request("Provisioned"))
    assert granted.create == [0, 1] and granted.consume == "j-capacity" and not granted.delete_capacity_request


def test_a_failed_request_shows_then_is_asked_again_and_a_consumed_one_is_given_back():
    pr = spec(capacity={"mode": "provisioningRequest"})
    failed = plan_job(META, pr, {}, [], 0, NOW, no_node_fits=True,
                         request=request("Failed", message="stockout"))
    assert not failed.delete_capacity_request and failed.requeue_after == pytest.approx(20)
    assert "Failed (stockout)" in cond(failed, COND_READY)["message"]
    assert failed.status["capacityRequest"]["state"] == "Failed"
    later = plan_job(META, pr, {}, [], 0, NOW, no_node_fits=True,
                        request=request("Failed", since="2026-01-01T11:59:00Z"))
    assert later.delete_capacity_request and later.create == []
    for stale in (request("Expired"), request("Pending", count=3)):
        assert plan_job(META, pr, {}, [], 0, NOW, no_node_fits=True, request=stale).delete_capacity_request
    # Created and not yet on nodes: kept; every worker on a node: given back.
    pending = [pod(0, "Pending"), pod(1, "Pending")]
    held = plan_job(META, pr, {}, pending, 0, NOW, request=request("Provisioned"))
    assert not held.delete_capacity_request and held.create == []
    bound = plan_job(META, pr, {}, [pod(0), pod(1)], 2, NOW, request=request("Provisioned"))
    assert bound.delete_capacity_request and "capacityRequest" not in bound.status
    done = plan_job(META, spec(capacity={"mode": "provisioningRequest"}, suspend=True), {}, [], 0, NOW,
                       request=request())
    assert done.delete_capacity_request


def test_capacity_request_fields_need_their_mode():
    with pytest.raises(js_spec_invalid()):
        spec(capacity={"provisioningClassName": "queued-provisioning.gke.io"})
    assert spec(capacity={"mode": "provisioningRequest", "provisioningClassName": "queued-provisioning.gke.io"}) \
        .capacity.provisioning_class == "queued-provisioning.gke.io"


def js_spec_invalid():
    from lepton_operator.core.fields import InvalidSpec
    return InvalidSpec


def test_a_failed_workers_message_carries_the_tail_of_its_termination_message():
    """The cause (the trainer's exception, or the tail of a script's log with
    FallbackToLogsOnError) is in the failure the job reports, not only the exit code."""
    log = "\n".join(f"line {i}" for i in range(300)) + "\nModuleNotFoundError: No module named 'mylib'"
    status = {"phase": "Failed", "containerStatuses": [
        {"name": "worker", "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": log}}}]}
    retryable, message = js.classify_failure(status)
    assert not retryable and message.startswith("container worker exited with code 1 (Error): ")
    assert message.endswith("ModuleNotFoundError: No module named 'mylib'") and len(message) < 1100


@pytest.mark.parametrize("cause", [
    "torch.distributed.elastic.rendezvous.api.RendezvousConnectionError: The connection to the C10d store has failed.",
    "RuntimeError: failed to connect to http://ft-rdzv:29400 within timeout of 60s",
    "torch.distributed.DistNetworkError: The client socket has timed out while trying to connect to (ft-rdzv, 29400).",
])
def test_a_worker_that_could_not_reach_its_store_is_not_counted(cause):
    """The store on a node that runs nothing, or a Lighthouse gone: every worker fails with
    the same connection error. That is no failure of the workload: an uncounted restart."""
    failed = pod(1, "Failed", message=f"container worker exited with code 1 (Error): {cause}")
    plan = plan_job(META, spec(backoffLimit=0), {"phase": "Running"}, [pod(0), failed], 4, NOW)
    assert plan.status["phase"] != "Failed"
    assert plan.status["restarts"] == {"counted": 0, "uncounted": 1}
    assert any(e[1] == "WorkerDisrupted" and "unreachable" in e[2] for e in plan.events)
    plain = pod(1, "Failed", message="container worker exited with code 1 (Error): ValueError: bad batch")
    assert plan_job(META, spec(backoffLimit=0), {"phase": "Running"}, [pod(0), plain], 4, NOW).status["phase"] == "Failed"


@pytest.mark.parametrize("store", [js.StoreView("2026-01-01T11:00:00Z", True, True), js.MISSING_STORE,
                                   js.StoreView("2026-01-01T11:59:00Z", False, False),
                                   js.StoreView("2026-01-01T11:59:00Z", True, False)],
                         ids=["going", "gone", "replaced, not ready", "replaced, ready"])
def test_replica_groups_stay_through_a_lost_lighthouse_and_rejoin_its_replacement_in_place(store):
    """perStep: groups whose Lighthouse goes keep running; their managers ask again about
    once a second (TORCHFT_QUORUM_RETRIES, see test_job_builders) and join the new one in
    place (tests/trainer, tests/real). Nothing is deleted or counted while the job steps."""
    s = spec(faultTolerance="perStep", workers={"min": 2, "max": 2, "replicas": 2})
    old = [pod(i, started_at="2026-01-01T11:00:00Z") for i in range(2)]
    plan = plan_job(META, s, {"phase": "Running"}, old, 4, NOW, store=store)
    assert plan.delete == [] and plan.create == []
    assert plan.status["restarts"] == {"counted": 0, "uncounted": 0}


def test_replica_groups_that_joined_a_replaced_lighthouse_restart_when_the_job_stalls_beside_the_new_one():
    """A group whose request to the old Lighthouse hangs (its node went silent) would wait for
    the quorum timeout (600 s). When the job is stalled and the new Lighthouse has been up
    for LIGHTHOUSE_REJOIN_SECONDS, the groups that joined the old one are replaced, uncounted;
    groups that started beside the new one are left alone."""
    s = spec(faultTolerance="perStep", workers={"min": 2, "max": 3, "replicas": 3})
    young = (NOW - dt.timedelta(seconds=20)).isoformat()
    pods = [pod(0, started_at="2026-01-01T11:00:00Z"), pod(1, started_at="2026-01-01T11:00:00Z"),
            pod(2, started_at=young)]
    fresh = js.StoreView((NOW - dt.timedelta(seconds=js.LIGHTHOUSE_REJOIN_SECONDS + 1)).isoformat(), True, False)
    why = "training stalled: no step for 40s"
    plan = plan_job(META, s, {"phase": "Running"}, pods, 4, NOW, store=fresh, stalled=why)
    assert sorted(plan.delete) == ["j-worker-0", "j-worker-1"] and plan.create == []
    assert plan.status["restarts"] == {"counted": 0, "uncounted": 2}
    assert any("stalled" in e[2] and "started before the Lighthouse was replaced" in e[2] for e in plan.events)
    # not stalled, or a Lighthouse too new to have been joined, or a restart-mode job: nothing
    assert plan_job(META, s, {"phase": "Running"}, pods, 4, NOW, store=fresh).delete == []
    new = js.StoreView((NOW - dt.timedelta(seconds=js.LIGHTHOUSE_REJOIN_SECONDS - 5)).isoformat(), True, False)
    assert plan_job(META, s, {"phase": "Running"}, pods, 4, NOW, store=new, stalled=why).delete == []
    restart_mode = spec(workers={"min": 2, "max": 3, "replicas": 3})
    assert plan_job(META, restart_mode, {"phase": "Running"}, pods, 4, NOW, store=fresh, stalled=why).delete == []


def test_workers_that_cannot_reach_a_ready_store_make_the_job_not_ready_until_one_reaches_it():
    """The store's pod is Ready (its node says so) but the workers' connections go nowhere:
    each fails at the store's connect timeout (20 s, not torch's 60). The job is not Ready
    (StoreUnreachable, one Warning event) through the replacements, nothing is counted, and
    leaves that state once a worker has run past twice the connect timeout."""
    cause = "container worker exited with code 1 (Error): RendezvousConnectionError: The connection to the C10d store has failed."
    ready_store = js.StoreView("2026-01-01T11:00:00Z", True, False)
    failed = pod(1, "Failed", message=cause)
    plan = plan_job(META, spec(backoffLimit=0), {"phase": "Running"}, [pod(0), failed], 4, NOW, store=ready_store)
    assert plan.status["restarts"] == {"counted": 0, "uncounted": 1}
    ready = cond(plan, COND_READY)
    assert (ready["status"], ready["reason"]) == ("False", "StoreUnreachable") and "pod is Ready" in ready["message"]
    assert [e[0] for e in plan.events if e[1] == "StoreUnreachable"].count("Warning") == 1
    # next reconcile: the replacement runs, but not yet long enough to have reached the store
    young = [pod(0, started_at="2026-01-01T11:59:50Z"), pod(1, uid="uid-1b", started_at="2026-01-01T11:59:50Z")]
    again = plan_job(META, spec(backoffLimit=0), plan.status, young, 4, NOW, store=ready_store)
    assert cond(again, COND_READY)["reason"] == "StoreUnreachable" and not any(e[0] == "Warning" for e in again.events)
    # a second failure of the same kind: still one Warning in all
    third = plan_job(META, spec(backoffLimit=0), again.status, [young[0], pod(1, "Failed", uid="uid-1c", message=cause)],
                     4, NOW, store=ready_store)
    assert cond(third, COND_READY)["reason"] == "StoreUnreachable" and not any(e[0] == "Warning" for e in third.events)
    # a worker that has run for a minute reached it: the job is back to what its workers say
    proven = [pod(0, started_at="2026-01-01T11:59:00Z"), pod(1, uid="uid-1d", started_at="2026-01-01T11:59:00Z")]
    healthy = plan_job(META, spec(backoffLimit=0), again.status, proven, 4, NOW, store=ready_store)
    assert cond(healthy, COND_READY)["reason"] == "Scaling" and healthy.status["phase"] == "Scaling"
    # a store that is not Ready explains itself (lost or starting): no StoreUnreachable
    starting = plan_job(META, spec(backoffLimit=0), {"phase": "Running"}, [pod(0), failed], 4, NOW,
                        store=js.StoreView("2026-01-01T11:00:00Z", False, False))
    assert cond(starting, COND_READY)["reason"] != "StoreUnreachable"
