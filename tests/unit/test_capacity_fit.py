"""How many workers fit: cpu, memory and GPU requests against what each node has free
(job.fit), the shared bookkeeping around it (job.capacity) and what a job that does not
fit says (job.state)."""
from __future__ import annotations

import datetime as dt

import pytest

from lepton_operator.constants import COND_READY
from lepton_operator.job import fit
from lepton_operator.job import state as js
from lepton_operator.job.capacity import PENDING_CREATE_TTL, Capacity
from lepton_operator.job.spec import parse_job

pytestmark = pytest.mark.unit
R = fit.Requests
GI = 2 ** 30
TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
TOLERATE = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def node(name, cpu=0, memory=0, gpus=0, labels=None, taints=(), **kw):
    return fit.NodeView(name, R(cpu * 1000, memory * GI, gpus), labels or {}, tuple(taints), **kw)


def spec(**kw):
    base = {"workers": {"min": 2, "max": 2}, "resources": {"gpus": 0, "cpu": "4", "memory": "16Gi"}}
    return parse_job("j", {**base, **kw}, "img:1", "IfNotPresent")


def test_a_pod_asks_for_its_requests_else_limits_the_largest_init_container_sidecars_and_overhead():
    main = {"resources": {"requests": {"cpu": "500m"}, "limits": {"cpu": "2", "memory": "1Gi", "nvidia.com/gpu": 1}}}
    assert fit.pod_requests({"containers": [main]}) == R(500, GI, 1)
    assert fit.pod_requests({"containers": [main, {"resources": {"requests": {"cpu": "1.5"}}}]}) == R(2000, GI, 1)
    init = {"resources": {"requests": {"cpu": "3", "memory": "100Mi"}}}
    sidecar = {"restartPolicy": "Always", "resources": {"requests": {"cpu": "250m", "memory": "2Gi"}}}
    assert fit.pod_requests({"containers": [main], "initContainers": [init]}) == R(3000, GI, 1)
    assert fit.pod_requests({"containers": [main], "initContainers": [sidecar, init]}) == R(3250, 3 * GI, 1)
    assert fit.pod_requests({"containers": [main], "overhead": {"cpu": "100m"}}) == R(600, GI, 1)
    assert fit.pod_requests({"containers": [{"name": "best-effort"}]}) == R()


def test_a_pod_holds_capacity_while_bound_or_about_to_be_and_not_once_finished_or_unschedulable():
    asks = {"containers": [{"resources": {"requests": {"cpu": "1"}}}]}
    assert fit.pod_usage({"spec": {**asks, "nodeName": "a"}, "status": {"phase": "Running"}}) == ("a", R(1000))
    assert fit.pod_usage({"spec": asks, "status": {"phase": "Pending"}}) == (None, R(1000))
    assert fit.pod_usage({"spec": {**asks, "nodeName": "a"}, "status": {"phase": "Succeeded"}}) is None
    unschedulable = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}
    assert fit.pod_usage({"spec": asks, "status": unschedulable}) is None
    assert fit.pod_usage({"spec": {"containers": [{}]}, "status": {"phase": "Running"}}) is None


def test_a_node_view_reads_allocatable_readiness_and_ignores_heartbeats():
    def body(ready, beat):
        return {"metadata": {"name": "a", "labels": {"x": "y"}},
                "status": {"allocatable": {"cpu": "3500m", "memory": "8Gi", "nvidia.com/gpu": "4", "pods": "110"},
                           "conditions": [{"type": "Ready", "status": ready, "lastHeartbeatTime": beat}]}}
    view = fit.node_view(body("True", "t1"))
    assert view.allocatable == R(3500, 8 * GI, 4) and view.ready and view.labels == {"x": "y"}
    assert fit.node_view(body("True", "t2")) == view
    assert not fit.node_view(body("Unknown", "t2")).ready


def test_a_worker_fits_on_a_node_only_if_every_request_fits_there():
    need = R(4000, 16 * GI)
    nodes = [node("a", cpu=7, memory=64), node("b", cpu=64, memory=20), node("c", cpu=3, memory=512)]
    got = fit.fit_workers(nodes, {}, need, {})
    assert got.slots == 2 and not got.no_node_fits              # a: 1, b: 1 (memory), c: none (cpu)
    # 2 CPU + 2 CPU free on two nodes are not one 4-CPU worker
    assert fit.fit_workers([node("a", 2, 64), node("b", 2, 64)], {}, need, {}).slots == 0
    used = {"a": R(4000, 0), "b": R(0, 8 * GI)}
    got = fit.fit_workers(nodes, used, need, {})
    assert got.slots == 0 and dict(got.free)["a"] == R(3000, 64 * GI)


def test_nodes_that_are_not_ready_or_cordoned_offer_nothing():
    need = R(1000, GI)
    assert fit.fit_workers([node("a", 4, 8, ready=False)], {}, need, {}).slots == 0
    assert fit.fit_workers([node("a", 4, 8, unschedulable=True)], {}, need, {}).slots == 0
    assert fit.fit_workers([node("a", 4, 8)], {}, need, {}).slots == 4


def test_requests_not_bound_yet_are_taken_off_the_free_capacity_in_node_order():
    nodes = [node("a", cpu=6, memory=64), node("b", cpu=6, memory=64)]
    need = R(4000, GI)
    assert fit.fit_workers(nodes, {}, need, {}).slots == 2
    assert fit.fit_workers(nodes, {}, need, {}, pending=R(3000)).slots == 1      # a keeps 3 CPU
    assert fit.fit_workers(nodes, {}, need, {}, pending=R(8000)).slots == 1      # a 0, b 4


def test_gpu_workers_respect_taints_selectors_and_the_gpus_free():
    nodes = [node("a", 64, 512, 8, {"pool": "x"}, (TAINT,)), node("b", 64, 512, 4, {"pool": "y"}, (TAINT,)),
             node("c", 64, 512, 8, {"pool": "x"}, unschedulable=True)]
    need, tolerated = R(gpus=2), {"tolerations": TOLERATE}
    got = fit.fit_workers(nodes, {"a": R(gpus=2)}, need, tolerated)
    assert (got.slots, got.largest_gpus) == (5, 8)
    assert fit.fit_workers(nodes, {"a": R(gpus=2)}, need, tolerated, pending=R(gpus=2)).slots == 4
    assert fit.fit_workers(nodes, {}, need, {**tolerated, "nodeSelector": {"pool": "y"}}).slots == 2
    untolerated = fit.fit_workers(nodes, {}, need, {})
    assert (untolerated.slots, untolerated.largest_gpus, untolerated.no_node_fits) == (0, 0, True)
    assert fit.fit_workers(nodes, {}, R(gpus=16), tolerated).no_node_fits       # no node is that large


def test_workers_that_ask_for_nothing_fit_without_limit_where_they_may_go():
    assert fit.fit_workers([node("a", 1, 1)], {}, R(), {}).slots >= 10 ** 6
    assert fit.fit_workers([], {}, R(), {}).slots == 0


def test_required_node_affinity_places_workers_as_the_scheduler_would():
    nodes = [node("gpu", 64, 512, 8, {"nvidia.com/gpu.present": "true"}), node("cpu", 8, 32, 0, {"zone": "1"})]
    # A worker that asks for no GPU keeps off GPU nodes (the pod's affinity): only the CPU node counts.
    got = fit.worker_fit(spec(), nodes)
    assert got.slots == 2 and [name for name, _ in got.free] == ["cpu"]
    gt = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "Gt", "values": ["0"]}]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu"]}]}]}}}
    assert fit.fit_workers(nodes, {}, R(1000), {"affinity": gt}).slots == 8 + 64
    empty_term = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{}]}}}
    assert fit.fit_workers(nodes, {}, R(1000), {"affinity": empty_term}).slots == 0


def test_capacity_counts_bound_pending_and_reserved_requests_until_the_reservation_expires():
    now = [0.0]
    cap = Capacity(wake=lambda ns, name: None, clock=lambda: now[0])
    nodes = [node("cpu", cpu=9, memory=64)]
    usage = {"cpu": [R(1000, GI)], None: [R(0, 0, 1)]}
    assert cap.free_slots(spec(), usage, nodes).slots == 2
    cap.reserve("ns", "other-worker-0", R(4000, 16 * GI))       # created, not in the index yet
    assert cap.free_slots(spec(), usage, nodes).slots == 1
    now[0] = PENDING_CREATE_TTL + 1
    assert cap.free_slots(spec(), usage, nodes).slots == 2
    cap.reserve("ns", "other-worker-1", R(4000, 16 * GI))
    cap.release("ns", "other-worker-1")                         # the index shows it now
    assert cap.free_slots(spec(), usage, nodes).slots == 2


def test_only_a_change_of_a_nodes_capacity_wakes_the_waiting_jobs():
    woken = []
    cap = Capacity(wake=lambda ns, name: woken.append(name))
    cap.set_waiting(("ns", "j"), True)
    cap.node_changed("a", node("a", 4, 8))
    cap.node_changed("a", node("a", 4, 8))                      # a heartbeat: the same view
    cap.node_changed("a", node("a", 4, 8, ready=False))
    cap.set_waiting(("ns", "j"), False)
    cap.node_changed("a", node("a", 8, 8))
    assert woken == ["j", "j"]


def test_a_gang_whose_min_does_not_fit_starts_none_and_says_why():
    s = spec()
    meta = {"name": "j", "namespace": "ns", "uid": "u", "generation": 1}
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    got = fit.worker_fit(s, [node("x", cpu=7, memory=64), node("y", cpu=2, memory=64)])
    observed = js.JobObserved(meta=meta, status={}, workers=js.Workers.of([]), now=now,
                              free_slots=got.slots, free_capacity=got.free)
    plan = js.plan(s, observed)
    assert plan.create == [] and plan.capacity_short and plan.status["phase"] == "Pending"
    ready = next(c for c in plan.status["conditions"] if c["type"] == COND_READY)
    assert ready["reason"] == "WaitingForCapacity"
    assert ready["message"].startswith("waiting for capacity: 2 workers need 4 CPU, 16Gi memory each; 1 fit now "
                                       "(node x: 7 CPU, 64Gi memory free; node y: 2 CPU, 64Gi memory free)")
    assert any(e[1] == "WaitingForCapacity" for e in plan.events)
    enough = fit.worker_fit(s, [node("x", cpu=8, memory=64)])
    plan = js.plan(s, js.JobObserved(meta=meta, status=plan.status, workers=js.Workers.of([]), now=now,
                                     free_slots=enough.slots, free_capacity=enough.free))
    assert plan.create == [0, 1]


def test_a_finished_pod_drops_out_of_the_requests_index():
    """kopf keeps an object's indexed values when the index function returns None, and
    replaces them when it returns a mapping: a pod that finishes must map to ``{}``, or
    the requests it held while running would count against every job forever."""
    from lepton_operator.job.handlers import lepton_pod_requests

    pod = {"metadata": {"name": "p", "namespace": "n"},
           "spec": {"nodeName": "a", "containers": [{"resources": {"requests": {"cpu": "500m"}}}]},
           "status": {"phase": "Running"}}
    assert lepton_pod_requests(body=pod) == {"a": R(500, 0, 0)}
    assert lepton_pod_requests(body={**pod, "status": {"phase": "Succeeded"}}) == {}
