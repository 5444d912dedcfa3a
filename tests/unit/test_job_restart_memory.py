"""What a LeptonJob's loop must not forget across an operator restart lives in the status
it writes: the failures already counted (``status.countedPodUIDs``), the workers that were
active (``status.activeWorkerUIDs``) and the autoscaler's baseline, cooldown and last
decision (``status.autoscaling``).

The planner tests lose the memory by planning from the written status alone. The loop
tests run the real reconcile (``job.handlers.reconcile``: observe, plan, execute)
against a recording stand-in for the API server and "kill" the process at the worst
moment: after the status write that counts, before the write that acts on it; or after
the operator's own DELETE of a worker, before anything else is written.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from typing import Any

import pytest

from lepton_operator import config
from lepton_operator.constants import ANNOTATION_SPEC_HASH
from lepton_operator.core import kube
from lepton_operator.job import autoscale
from lepton_operator.job import fit
from lepton_operator.job import handlers as jh
from lepton_operator.job import objects as job_objects
from lepton_operator.job import state as js
from lepton_operator.job.spec import parse_job
from lepton_operator.scaling import policy
from lepton_operator.scaling import prometheus
from planning import plan_job

pytestmark = pytest.mark.unit
NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
META = {"name": "j", "namespace": "ns", "uid": "u", "generation": 1}
LOG = logging.getLogger("test")


def spec(**kw):
    base = {"workers": {"min": 2, "max": 2, "replicas": 2}, "resources": {"gpus": 1}}
    base.update(kw)
    return parse_job("j", base, "img")


def pod(i, phase="Running", **kw):
    return js.PodView(name=f"j-worker-{i}", uid=f"uid-{i}", index=i, phase=phase, node="n1",
                      ready=phase == "Running", **kw)


FAILED = pod(1, "Failed", message="container worker exited with code 1")


# --- the planner ---------------------------------------------------------------------

def test_a_counted_failure_is_recorded_in_the_status_that_counts_it():
    plan = plan_job(META, spec(), {"phase": "Running"}, [pod(0), FAILED], 0, NOW)
    assert plan.status["restarts"]["counted"] == 1 and plan.counted_uids == {"uid-1"}
    assert plan.status[js.COUNTED_POD_UIDS] == ["uid-1"]
    assert plan.delete == ["j-worker-1"]


def test_a_plan_from_the_written_status_alone_does_not_count_the_same_pod_again():
    written = plan_job(META, spec(), {"phase": "Running"}, [pod(0), FAILED], 0, NOW).status
    # A fresh process: nothing but the status it wrote, and the failed pod still there.
    again = plan_job(META, spec(), written, [pod(0), FAILED], 0, NOW)
    assert again.status["restarts"] == {"counted": 1, "uncounted": 0} and again.status["restartCount"] == 1
    assert again.counted_uids == set() and not any(e[1] == "WorkerFailed" for e in again.events)
    assert again.delete == ["j-worker-1"]                 # the delete the kill prevented happens now
    assert again.status[js.COUNTED_POD_UIDS] == ["uid-1"]


def test_the_uid_stays_while_the_pod_is_deleting_and_is_dropped_once_it_is_gone():
    written = plan_job(META, spec(), {"phase": "Running"}, [pod(0), FAILED], 0, NOW).status
    deleting = js.dataclasses.replace(FAILED, deleting=True)
    going = plan_job(META, spec(), written, [pod(0), deleting], 0, NOW)
    assert going.status[js.COUNTED_POD_UIDS] == ["uid-1"] and going.status["restarts"]["counted"] == 1
    gone = plan_job(META, spec(), going.status, [pod(0)], 1, NOW)
    assert js.COUNTED_POD_UIDS not in gone.status and gone.status["restarts"]["counted"] == 1
    assert gone.create == [1]
    # A new pod failing under the same name is a new failure.
    second = pod(1, "Failed", message="exit 1")
    second = js.dataclasses.replace(second, uid="uid-1b")
    recount = plan_job(META, spec(), gone.status, [pod(0), second], 0, NOW)
    assert recount.status["restarts"]["counted"] == 2
    assert recount.status[js.COUNTED_POD_UIDS] == ["uid-1b"]


def test_uids_passed_in_and_uids_in_the_status_both_count_as_handled():
    prev = {"phase": "Running", "restarts": {"counted": 1, "uncounted": 0}, js.COUNTED_POD_UIDS: ["uid-0"]}
    failed0 = pod(0, "Failed", message="exit 1")
    plan = plan_job(META, spec(), prev, [failed0, FAILED], 0, NOW, handled_uids={"uid-1"})
    assert plan.status["restarts"]["counted"] == 1
    assert plan.status[js.COUNTED_POD_UIDS] == ["uid-0", "uid-1"]


def test_the_status_lists_the_active_workers_the_plan_keeps():
    deleting = js.dataclasses.replace(pod(2), deleting=True)
    pending = js.PodView(name="j-worker-3", uid="", index=3, phase="Pending")      # created, not yet seen
    pods = [pod(0), pod(1), deleting, pending]
    steady = plan_job(META, spec(workers={"min": 1, "max": 4, "replicas": 3}), {"phase": "Running"}, pods, 8, NOW)
    assert steady.delete == [] and steady.status[js.ACTIVE_WORKER_UIDS] == ["uid-0", "uid-1"]
    plan = plan_job(META, spec(workers={"min": 1, "max": 4, "replicas": 1}), steady.status, pods, 8, NOW)
    assert sorted(plan.delete) == ["j-worker-1", "j-worker-3"]              # scale-down to one
    assert plan.status[js.ACTIVE_WORKER_UIDS] == ["uid-0"]
    suspended = plan_job(META, spec(suspend=True), plan.status, [pod(0)], 8, NOW)
    assert suspended.delete == ["j-worker-0"] and js.ACTIVE_WORKER_UIDS not in suspended.status


def test_a_finished_job_keeps_no_uid_of_a_pod_that_is_gone():
    prev = {"phase": "Failed", "restarts": {"counted": 4, "uncounted": 0}, js.COUNTED_POD_UIDS: ["uid-1"],
            "completionTime": "2026-01-01T11:00:00Z"}
    plan = plan_job(META, spec(), prev, [], 0, NOW)
    assert plan.status["phase"] == "Failed" and js.COUNTED_POD_UIDS not in plan.status


# --- the loop, against a recording API server ----------------------------------------

class Killed(BaseException):
    """The process dies here (SIGKILL): nothing after it runs."""


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Apply a JSON merge patch (RFC 7386) as the API server does."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class FakeAPI:
    """Stands in for ``kube.aio``: keeps the job's status and spec as the API server
    would, records each call, and can die before a chosen call."""

    def __init__(self, status: dict[str, Any] | None = None, spec: dict[str, Any] | None = None):
        self.status = status or {}
        self.spec = spec or {}
        self.calls: list[tuple[str, tuple]] = []
        self.kill_before: str | None = None
        self.kill_after: str | None = None

    async def __call__(self, fn, *args, **kwargs):
        name = fn.__name__
        if name == self.kill_before:
            self.kill_before = None
            raise Killed(name)
        self.calls.append((name, args))
        if name == self.kill_after:     # the call went out, its answer never arrives
            self.kill_after = None
            raise Killed(name)
        if name == "patch_status":
            self.status = merge(self.status, args[4])
            return {}
        if name == "patch":
            self.spec = merge(self.spec, args[4].get("spec", {}))
            return {}
        if name == "create":
            return args[0]
        if name == "delete":
            return True
        return None

    def names(self, verb: str) -> list[str]:
        return [args[2] if verb == "delete" else args[0]["metadata"]["name"]
                for name, args in self.calls if name == verb]


def job_body(status: dict[str, Any], workers: int = 2, generation: int = 1, **more: Any) -> dict[str, Any]:
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob", "metadata": {**META, "generation": generation},
            "spec": {"workers": {"min": workers, "max": workers, "replicas": workers}, "resources": {"gpus": 1},
                     **more},
            "status": status}


def indices(pods: list[js.PodView]) -> dict[str, Any]:
    node = fit.NodeView("n1", fit.Requests(cpu=64000, memory=2 ** 39, gpus=8), {"nvidia.com/gpu.present": "true"},
                        ({"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},))
    return {"lepton_nodes": {"n1": [node]}, "lepton_job_workers": {("ns", "j"): pods},
            "lepton_pod_requests": {"n1": [fit.Requests(gpus=1) for p in pods if p.active]},
            "lepton_job_services": {("ns", "j"): ["j-rdzv", "j-workers"]},
            "lepton_job_rdzv_pods": {("ns", "j"): [("j-rdzv", js.StoreView("2026-01-01T00:00:00Z", True, False))]}}


def reconcile(api: FakeAPI, pods: list[js.PodView], memory: jh.JobMemory | None = None,
              **body: Any) -> jh.JobMemory:
    """One reconcile of the job as a process whose memory is ``memory`` (None: a process
    that just started, whose memory is built from the status on the server); ``body``:
    see ``job_body``."""
    body = job_body(api.status, **body)
    memory = memory or jh.observe.new_memory(dict(api.status))
    shown = indices(pods)
    # The job's NetworkPolicies (on by default) as the index shows them once applied.
    shown["lepton_job_network_policies"] = {("ns", "j"): [
        (p["metadata"]["name"], p["metadata"]["annotations"][ANNOTATION_SPEC_HASH])
        for p in job_objects.network_policies(body, parse_job("j", body["spec"], "img"),
                                              config.get().operator_namespace, config.get().operator_pod_labels)]}
    asyncio.run(jh.reconcile(body, memory, shown, jh.new_runtime(), LOG))
    return memory


@pytest.fixture
def api(monkeypatch) -> FakeAPI:
    fake = FakeAPI(status={"phase": "Running", "restarts": {"counted": 0, "uncounted": 0},
                           "startTime": "2026-01-01T11:00:00Z"})
    monkeypatch.setattr(kube, "aio", fake)
    return fake


def test_killed_between_counting_and_deleting_the_restarted_loop_counts_nothing_twice(api):
    api.kill_before = "delete"
    with pytest.raises(Killed):
        reconcile(api, [pod(0), FAILED])
    assert api.status["restarts"]["counted"] == 1 and api.status[js.COUNTED_POD_UIDS] == ["uid-1"]
    assert api.names("delete") == []                          # the failed pod is still there

    reconcile(api, [pod(0), FAILED])                          # a new process, the same pods
    assert api.status["restarts"] == {"counted": 1, "uncounted": 0}
    assert api.status["restartCount"] == 1
    assert api.names("delete") == ["j-worker-1"]

    reconcile(api, [pod(0)])                                  # the delete is observed
    assert js.COUNTED_POD_UIDS not in api.status and api.status["restarts"]["counted"] == 1
    assert "j-worker-1" in api.names("create")


def test_the_count_and_its_uid_go_out_in_one_status_patch_before_the_delete(api):
    reconcile(api, [pod(0), FAILED])
    verbs = [name for name, _ in api.calls if name in ("patch_status", "delete")]
    assert verbs[:2] == ["patch_status", "delete"]
    first = next(args[4] for name, args in api.calls if name == "patch_status")
    assert first["restarts"]["counted"] == 1 and first[js.COUNTED_POD_UIDS] == ["uid-1"]


def test_a_loop_that_keeps_its_memory_behaves_the_same(api):
    memory = reconcile(api, [pod(0), FAILED])
    reconcile(api, [pod(0), FAILED], memory)
    assert api.status["restarts"]["counted"] == 1


# --- the workers that were active ----------------------------------------------------

def gone_or_going(how: str) -> list[js.PodView]:
    """The job's pods once worker 1 was deleted by someone else: gone, or still deleting."""
    return [pod(0)] if how == "gone" else [pod(0), js.dataclasses.replace(pod(1), deleting=True)]


@pytest.mark.parametrize("how", ["gone", "deleting"])
def test_a_worker_deleted_while_no_operator_ran_is_counted_once_after_the_restart(api, how):
    reconcile(api, [pod(0), pod(1)])                          # then the process dies
    assert api.status[js.ACTIVE_WORKER_UIDS] == ["uid-0", "uid-1"]

    if how == "gone":
        api.kill_before = "create"                            # the next one dies after counting it
        with pytest.raises(Killed):
            reconcile(api, gone_or_going(how))
    else:                                                     # (nothing to create while it is going)
        reconcile(api, gone_or_going(how))
    assert api.status["restarts"] == {"counted": 0, "uncounted": 1} and api.status["restartCount"] == 1
    assert api.status[js.ACTIVE_WORKER_UIDS] == ["uid-0"]

    memory = reconcile(api, gone_or_going(how))               # and the one after it counts nothing again
    reconcile(api, [pod(0)], memory)
    assert api.status["restarts"] == {"counted": 0, "uncounted": 1} and api.status["restartCount"] == 1
    assert "j-worker-1" in api.names("create")
    replaced = js.dataclasses.replace(pod(1), uid="uid-1b")
    reconcile(api, [pod(0), replaced])                        # a restart once it is replaced
    assert api.status["restarts"] == {"counted": 0, "uncounted": 1}
    assert api.status[js.ACTIVE_WORKER_UIDS] == ["uid-0", "uid-1b"]


def test_a_reconcile_that_fails_after_counting_a_vanished_worker_does_not_count_it_again(api):
    memory = reconcile(api, [pod(0), pod(1)])
    api.kill_before = "create"           # here: the create fails and the same loop tries again
    with pytest.raises(Killed):
        reconcile(api, [pod(0)], memory)
    reconcile(api, [pod(0)], memory)
    assert api.status["restarts"] == {"counted": 0, "uncounted": 1} and api.status["restartCount"] == 1


def stale(i: int) -> js.PodView:
    return js.dataclasses.replace(pod(i), template="an-older-template", generation=1)


@pytest.mark.parametrize("change", ["scale-down", "template", "suspend"])
def test_killed_after_its_own_delete_the_restarted_operator_does_not_count_that_worker(api, change):
    before = [stale(0), stale(1)]
    reconcile(api, before)
    assert api.status[js.ACTIVE_WORKER_UIDS] == ["uid-0", "uid-1"]
    body, deleted = {"scale-down": ({"workers": 1}, ["j-worker-1"]),
                     "template": ({"generation": 2}, ["j-worker-0", "j-worker-1"]),
                     "suspend": ({"suspend": True}, ["j-worker-0", "j-worker-1"])}[change]

    api.kill_after = "delete"
    with pytest.raises(Killed):
        reconcile(api, before, **body)
    # a suspended job runs nothing: its rendezvous pod goes too
    assert sorted(api.names("delete")) == sorted(deleted + (["j-rdzv"] if change == "suspend" else []))
    kept = sorted(p.uid for p in before if p.name not in deleted)
    assert api.status.get(js.ACTIVE_WORKER_UIDS, []) == kept    # listed no more, before the DELETE

    deleting = [js.dataclasses.replace(p, deleting=True) if p.name in deleted else p for p in before]
    memory = reconcile(api, deleting, **body)                 # a new process; the deletes are observed
    reconcile(api, [p for p in before if p.name not in deleted], memory, **body)
    assert api.status["restarts"] == {"counted": 0, "uncounted": 0} and api.status["restartCount"] == 0
    assert not any(name == "emit_event" and args[2] == "WorkerDisrupted" for name, args in api.calls)


def test_a_reconcile_that_deletes_a_listed_worker_writes_the_status_before_the_delete(api):
    memory = reconcile(api, [pod(0), pod(1)])
    api.calls.clear()
    reconcile(api, [pod(0), pod(1)], memory, workers=1)
    verbs = [name for name, _ in api.calls if name in ("patch_status", "delete")]
    assert verbs == ["patch_status", "delete"]                # one status write, before the DELETE
    first = next(args[4] for name, args in api.calls if name == "patch_status")
    assert first[js.ACTIVE_WORKER_UIDS] == ["uid-0"]


def test_what_the_autoscaler_adds_after_the_write_before_the_deletes_is_written_too(api, monkeypatch):
    with_prometheus = config.from_env({}, prometheus_url="http://prometheus:9090")
    monkeypatch.setattr(config, "get", lambda: with_prometheus)
    monkeypatch.setattr(prometheus, "client", lambda: FakePrometheus(100.0))
    auto = {"autoscaling": {"cooldownSeconds": 60, "intervalSeconds": 5}}
    memory = reconcile(api, [pod(0), pod(1)], **auto)
    api.calls.clear()
    memory.autoscaler = dataclasses.replace(memory.autoscaler, next_tick=0.0)   # its next tick is due
    reconcile(api, [pod(0), pod(1)], memory, workers=1, **auto)
    assert api.names("delete") == ["j-worker-1"]
    assert api.status["autoscaling"] == memory.status["autoscaling"]
    assert api.status["autoscaling"]["desiredWorkers"] == 1


def test_a_steady_reconcile_makes_no_api_call_with_the_active_workers_listed(api):
    memory = reconcile(api, [pod(0), pod(1)])
    assert api.status[js.ACTIVE_WORKER_UIDS] == ["uid-0", "uid-1"]
    api.calls.clear()
    reconcile(api, [pod(0), pod(1)], memory)                  # the same process
    reconcile(api, [pod(0), pod(1)])                          # a restarted one, from that status
    assert api.calls == []


@pytest.mark.parametrize("how", ["gone", "deleting"])
def test_a_status_without_the_list_counts_no_worker_as_vanished(api, how):
    # Written by an operator that did not list its workers: nothing is known to have vanished.
    assert js.ACTIVE_WORKER_UIDS not in api.status
    memory = reconcile(api, gone_or_going(how))
    assert api.status["restarts"] == {"counted": 0, "uncounted": 0} and api.status["restartCount"] == 0
    assert not any(name == "emit_event" and args[2] == "WorkerDisrupted" for name, args in api.calls)
    assert api.status[js.ACTIVE_WORKER_UIDS] == ["uid-0"]     # from now on the list is kept
    reconcile(api, [pod(0), js.dataclasses.replace(pod(1), uid="uid-1b")], memory)
    assert api.status[js.ACTIVE_WORKER_UIDS] == ["uid-0", "uid-1b"]
    assert api.status["restarts"] == {"counted": 0, "uncounted": 0}


# --- the autoscaler --------------------------------------------------------------------

class FakePrometheus:
    def __init__(self, value: float):
        self.value = value

    async def query(self, promql: str) -> prometheus.QueryResult:
        return prometheus.QueryResult(promql, (self.value,))


def autoscaled(cooldown: int = 60) -> tuple[Any, dict[str, Any]]:
    raw = {"workers": {"min": 1, "max": 4, "replicas": 1}, "resources": {"gpus": 1},
           "autoscaling": {"cooldownSeconds": cooldown, "intervalSeconds": 5}}
    return parse_job("j", raw, "img"), raw


def tick(api: FakeAPI, raw: dict[str, Any]) -> dict[str, Any]:
    """One reconcile of the autoscaled job ``raw`` (one running worker) by a process that
    just started, whose first autoscaler tick runs at once; the status it leaves."""
    body = {**job_body(api.status), "spec": raw}
    memory = jh.observe.new_memory(dict(api.status))
    before = config.get()
    config.configure(config.from_env({}, prometheus_url="http://prometheus:9090"))
    try:
        asyncio.run(jh.reconcile(body, memory, indices([pod(0)]), jh.new_runtime(), LOG))
    finally:
        config.configure(before)
    return api.status


def test_the_scale_event_is_in_the_status_before_the_spec_changes(api, monkeypatch):
    monkeypatch.setattr(prometheus, "client", lambda: FakePrometheus(100.0))
    _, raw = autoscaled()
    long_ago = time.time() - 3600
    api.status = {"phase": "Running", "workers": {"ready": 1},
                  "autoscaling": autoscale.state_to_status(policy.TrainingState(100.0, 1, long_ago))}
    tick(api, raw)
    verbs = [name for name, _ in api.calls if name in ("patch_status", "patch")]
    assert verbs == ["patch_status", "patch"]
    assert api.status["autoscaling"]["lastDecision"] == policy.GOODPUT_HOLDS
    assert api.spec["workers"]["replicas"] == 2


def test_killed_after_recording_a_scale_event_the_restarted_autoscaler_waits_its_cooldown(api, monkeypatch):
    monkeypatch.setattr(prometheus, "client", lambda: FakePrometheus(100.0))
    _, raw = autoscaled(cooldown=600)
    long_ago = time.time() - 3600
    api.status = {"phase": "Running", "workers": {"ready": 1},
                  "autoscaling": autoscale.state_to_status(policy.TrainingState(100.0, 1, long_ago))}
    api.kill_before = "patch"
    with pytest.raises(Killed):
        tick(api, raw)
    recorded = api.status["autoscaling"]
    assert autoscale.state_from_status(recorded, 0.0).last_scale > long_ago
    # A new process, the scale never applied: it holds for the cooldown rather than scaling
    # again at once, and keeps the learned baseline.
    status = tick(api, raw)
    assert status["autoscaling"]["lastDecision"] == policy.COOLDOWN
    assert status["autoscaling"]["baselineRate"] == 100.0
    assert "patch" not in [name for name, _ in api.calls]


def test_a_restarted_autoscaler_keeps_the_cooldown_of_the_last_scale_event(api, monkeypatch):
    monkeypatch.setattr(prometheus, "client", lambda: FakePrometheus(200.0))
    _, raw = autoscaled(cooldown=600)
    just_now = time.time() - 30
    api.status = {"phase": "Running", "workers": {"ready": 1},
                  "autoscaling": {**autoscale.state_to_status(policy.TrainingState(100.0, 1, just_now)),
                                  "lastDecision": policy.GOODPUT_HOLDS}}
    status = tick(api, raw)                                   # a fresh memory: the first tick runs at once
    assert status["autoscaling"]["lastDecision"] == policy.COOLDOWN
    assert status["autoscaling"]["baselineRate"] == 100.0 and status["autoscaling"]["baselineWorkers"] == 1
