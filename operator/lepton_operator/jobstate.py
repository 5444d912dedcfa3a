"""The LeptonJob state machine (pure): observed pods and capacity in, a plan out.

``plan_job`` decides which worker pods to create and delete, whether to delete the job
(TTL), the new ``.status`` and the events to record. It never touches the API server;
``handlers.job`` gathers the inputs from kopf indices and applies the plan.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
from typing import Any, Iterable, Mapping

from . import status as st
from .constants import (ANNOTATION_GENERATION, ANNOTATION_SPEC_HASH, COND_RECONCILING,
                        EVENT_NORMAL, EVENT_WARNING, FALSE, GPU_RESOURCE, LABEL_WORKER_INDEX, PHASE_FAILED, PHASE_PENDING,
                        PHASE_RESTARTING, PHASE_RUNNING, PHASE_SCALING, PHASE_SUCCEEDED,
                        PHASE_SUSPENDED, REASON_BACKOFF_LIMIT, REASON_CREATING, REASON_DEADLINE,
                        REASON_RESTARTING, REASON_RESUMED, REASON_RUNNING, REASON_SCALING,
                        REASON_SUCCEEDED, REASON_SUSPENDED, REASON_TEMPLATE_CHANGED,
                        REASON_TTL_EXPIRED, REASON_WAITING_FOR_CAPACITY, REASON_WORKER_DISRUPTED,
                        REASON_WORKER_FAILED, TERMINAL_PHASES)
from .spec import JobSpec

# Pod-level reasons that mean the pod was taken away, not that the workload failed.
DISRUPTION_REASONS = frozenset({"Evicted", "Preempting", "Preempted", "NodeLost", "Shutdown",
                                "NodeShutdown", "Terminated", "UnexpectedAdmissionError",
                                "NodeAffinity", "OutOfcpu", "OutOfmemory", "OutOfpods"})
SIGTERM_EXIT, SIGKILL_EXIT = 143, 137
ACTIVE_PHASES = frozenset({"Pending", "Running", "Unknown"})


@dataclasses.dataclass(frozen=True)
class PodView:
    """What the state machine needs to know about one worker pod."""
    name: str
    uid: str
    index: int
    phase: str
    node: str | None = None
    ready: bool = False
    deleting: bool = False
    gpus: int = 0
    retryable: bool = False       # meaningful when phase == "Failed"
    message: str = ""
    template: str = ""            # the spec hash the pod was built from ("" when unknown)
    generation: int = 0           # the job generation it was built at (0 when unknown)

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES and not self.deleting


def _gpus(pod_spec: Mapping[str, Any]) -> int:
    total = 0
    for c in pod_spec.get("containers") or ():
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU_RESOURCE) or (res.get("requests") or {}).get(GPU_RESOURCE)
        total += int(value or 0)
    return total


def classify_failure(pod_status: Mapping[str, Any]) -> tuple[bool, str]:
    """(retryable, message) for a Failed pod.

    Retryable (not counted against backoffLimit): evictions, preemptions, node loss or
    shutdown (pod reason or a ``DisruptionTarget`` condition), and a container killed by
    SIGTERM/SIGKILL from outside (exit 143/137) that was not an OOM kill.
    Everything else, an OOM kill included, is the workload's failure and is counted.
    """
    reason = pod_status.get("reason") or ""
    conditions = pod_status.get("conditions") or ()
    disruption = next((c for c in conditions
                       if c.get("type") == "DisruptionTarget" and c.get("status") == "True"), None)
    if reason in DISRUPTION_REASONS or disruption:
        why = reason or (disruption or {}).get("reason", "DisruptionTarget")
        return True, f"disrupted ({why}): {pod_status.get('message') or (disruption or {}).get('message', '')}".strip()
    for cs in pod_status.get("containerStatuses") or ():
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if not term:
            continue
        code, why = term.get("exitCode"), term.get("reason") or ""
        if why == "OOMKilled":
            return False, f"container {cs.get('name')} was OOMKilled (exit {code})"
        if code in (SIGTERM_EXIT, SIGKILL_EXIT):
            return True, f"container {cs.get('name')} was terminated by a signal (exit {code})"
        if code:
            msg = (term.get("message") or "").strip()
            return False, f"container {cs.get('name')} exited with code {code} ({why}){': ' + msg if msg else ''}"
    return False, f"pod failed: {reason or 'unknown reason'} {pod_status.get('message') or ''}".strip()


def pod_view(pod: Mapping[str, Any]) -> PodView:
    """Summarise a worker pod body (used by the kopf index, so memory stays small)."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec", {}), pod.get("status", {}) or {}
    phase = status.get("phase") or "Pending"
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or ())
    retryable, message = classify_failure(status) if phase == "Failed" else (False, "")
    annotations = meta.get("annotations") or {}
    return PodView(name=meta.get("name", ""), uid=meta.get("uid", ""),
                   index=int((meta.get("labels") or {}).get(LABEL_WORKER_INDEX, -1)),
                   phase=phase, node=spec.get("nodeName"), ready=ready,
                   deleting=bool(meta.get("deletionTimestamp")), gpus=_gpus(spec),
                   retryable=retryable, message=message,
                   template=annotations.get(ANNOTATION_SPEC_HASH, ""),
                   generation=int(annotations.get(ANNOTATION_GENERATION, 0) or 0))


# --- capacity ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NodeView:
    name: str
    gpus: int
    labels: Mapping[str, str]
    taints: tuple[Mapping[str, Any], ...] = ()
    unschedulable: bool = False


def node_view(node: Mapping[str, Any]) -> NodeView:
    meta, spec, status = node.get("metadata", {}), node.get("spec", {}) or {}, node.get("status", {}) or {}
    return NodeView(name=meta.get("name", ""),
                    gpus=int((status.get("allocatable") or {}).get(GPU_RESOURCE, 0) or 0),
                    labels=dict(meta.get("labels") or {}), taints=tuple(spec.get("taints") or ()),
                    unschedulable=bool(spec.get("unschedulable")))


def _tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t.get("key") == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def node_fits(node: NodeView, node_selector: Mapping[str, str],
              tolerations: Iterable[Mapping[str, Any]]) -> bool:
    """Node selector and NoSchedule/NoExecute taints allow a worker on this node."""
    tolerations = list(tolerations)
    return (not node.unschedulable
            and all(node.labels.get(k) == v for k, v in node_selector.items())
            and all(_tolerates(tolerations, t) for t in node.taints
                    if t.get("effect") in ("NoSchedule", "NoExecute")))


def worker_slots(nodes: Iterable[NodeView], used: Mapping[str, int], gpus_per_worker: int,
                 node_selector: Mapping[str, str], tolerations: Iterable[Mapping[str, Any]],
                 unscheduled_gpus: int = 0) -> tuple[int, int]:
    """(workers that fit now, largest GPU count on any fitting node).

    Free GPUs per node are allocatable minus the requests of pods bound to it; GPUs
    requested by pods not yet bound (``unscheduled_gpus``) are taken off the total,
    so two jobs do not both count the same free GPUs.
    """
    tolerations = list(tolerations)
    fitting = [n for n in nodes if node_fits(n, node_selector, tolerations)]
    largest = max((n.gpus for n in fitting), default=0)
    if gpus_per_worker <= 0:
        return 10 ** 6, largest
    slots, pending = 0, unscheduled_gpus
    for n in sorted(fitting, key=lambda n: n.name):
        free = max(n.gpus - used.get(n.name, 0), 0)
        take = min(free, pending)        # pods not yet bound will land somewhere: reserve
        free, pending = free - take, pending - take
        slots += free // gpus_per_worker
    return slots, largest


# --- the plan ------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    status: dict[str, Any]
    create: list[int] = dataclasses.field(default_factory=list)     # worker indices
    delete: list[str] = dataclasses.field(default_factory=list)     # worker pod names
    delete_rendezvous: bool = False
    delete_job: bool = False
    counted_uids: set[str] = dataclasses.field(default_factory=set)  # failures handled now
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    requeue_after: float | None = None


def _seconds_left(start: str | None, limit: int | None, now: _dt.datetime) -> float | None:
    t0 = st.parse_time(start)
    if t0 is None or limit is None:
        return None
    return limit - (now - t0).total_seconds()


def plan_job(meta: Mapping[str, Any], spec: JobSpec, prev: Mapping[str, Any] | None,
             pods: Iterable[PodView], free_slots: int, now: _dt.datetime,
             handled_uids: Iterable[str] = (), vanished: int = 0,
             selector: str = "", template: str = "") -> Plan:
    """Decide the next step for a job.

    ``handled_uids``: failed pods whose failure was already counted (they may still show
    in the index until their deletion is observed). ``vanished``: active workers that
    disappeared without the operator deleting them (drained, evicted through the API);
    they are replaced and counted as uncounted restarts. ``template``: the spec hash of
    the worker pod the current spec builds; active workers built from another template
    at an older job generation are replaced together (the group re-forms once, from the
    checkpoint); that restart is not a failure, so it counts against neither maxRestarts
    nor backoffLimit.
    """
    now_s = st.now_iso(now)
    gen = meta.get("generation")
    status = copy.deepcopy(dict(prev or {}))
    restarts = status.setdefault("restarts", {"counted": 0, "uncounted": 0})
    prev_phase = status.get("phase")
    handled = set(handled_uids)
    plan = Plan(status=status)
    pods = sorted(pods, key=lambda p: p.index)
    active = [p for p in pods if p.active]
    w = spec.workers

    def finish(phase: str, reason: str, message: str, ready: bool, stalled: bool = False,
               event_type: str = EVENT_NORMAL) -> Plan:
        status["phase"] = phase
        status["conditions"] = st.set_health(status.get("conditions"), ready=ready, reason=reason,
                                             message=message, stalled=stalled,
                                             observed_generation=gen, now=now_s)
        if phase == PHASE_SUSPENDED:   # suspended is settled, not in progress
            status["conditions"] = st.set_condition(status["conditions"], COND_RECONCILING, FALSE,
                                                    reason, "", gen, now_s)
        status["observedGeneration"] = gen
        running = [p for p in active if p.phase == "Running"]
        status["workers"] = {"desired": w.replicas, "scheduled": sum(1 for p in active if p.node),
                             "running": len(running), "ready": sum(1 for p in running if p.ready)}
        status["replicas"] = len(active) - sum(1 for p in active if p.name in plan.delete) + len(plan.create)
        status["selector"] = selector
        status["workersReady"] = f"{status['workers']['ready']}/{w.replicas}"
        if phase != prev_phase:
            plan.events.append((event_type, reason, f"{prev_phase or 'New'} -> {phase}: {message}"))
        return plan

    # A terminal job stays terminal: finish cleaning up, then wait for its TTL.
    if prev_phase in TERMINAL_PHASES:
        plan.delete = [p.name for p in active]
        plan.delete_rendezvous = True
        left = _seconds_left(status.get("completionTime"), spec.ttl_seconds_after_finished, now)
        if left is not None and left <= 0:
            plan.delete_job = True
            plan.events.append((EVENT_NORMAL, REASON_TTL_EXPIRED,
                                f"deleting the job {spec.ttl_seconds_after_finished}s after it finished"))
        plan.requeue_after = left if left is not None and left > 0 else None
        cond = st.get_condition(status.get("conditions"), "Ready") or {}
        return finish(prev_phase, cond.get("reason", prev_phase), cond.get("message", ""),
                      ready=prev_phase == PHASE_SUCCEEDED, stalled=prev_phase == PHASE_FAILED)

    def terminal(phase: str, reason: str, message: str) -> Plan:
        plan.delete = [p.name for p in active]
        plan.delete_rendezvous = True
        status["completionTime"] = now_s
        if spec.ttl_seconds_after_finished is not None:
            plan.requeue_after = float(spec.ttl_seconds_after_finished)
        if phase == PHASE_SUCCEEDED and spec.output:
            status["outputURI"] = spec.output.uri
        ok = phase == PHASE_SUCCEEDED
        return finish(phase, reason, message, ready=ok, stalled=not ok,
                      event_type=EVENT_NORMAL if ok else EVENT_WARNING)

    if spec.suspend:
        plan.delete = [p.name for p in pods if not p.deleting]
        plan.delete_rendezvous = False
        status.pop("startTime", None)    # the deadline counts from the last resume
        return finish(PHASE_SUSPENDED, REASON_SUSPENDED, "suspended: workers deleted, checkpoints kept",
                      ready=False)
    if prev_phase == PHASE_SUSPENDED:
        plan.events.append((EVENT_NORMAL, REASON_RESUMED, "resumed: recreating workers"))
    status.setdefault("startTime", now_s)

    # Failures: each failed pod is classified once, then replaced.
    failed_now = [p for p in pods if p.phase == "Failed" and not p.deleting and p.uid not in handled]
    for p in failed_now:
        key = "uncounted" if p.retryable else "counted"
        restarts[key] += 1
        plan.counted_uids.add(p.uid)
        plan.events.append((EVENT_NORMAL if p.retryable else EVENT_WARNING,
                            REASON_WORKER_DISRUPTED if p.retryable else REASON_WORKER_FAILED,
                            f"worker {p.name}: {p.message}"))
    if vanished:
        restarts["uncounted"] += vanished
        plan.events.append((EVENT_NORMAL, REASON_WORKER_DISRUPTED,
                            f"{vanished} worker pod(s) disappeared; replacing them"))
    plan.delete = [p.name for p in pods if p.phase == "Failed" and not p.deleting]
    if restarts["counted"] > spec.backoff_limit:
        return terminal(PHASE_FAILED, REASON_BACKOFF_LIMIT,
                        f"{restarts['counted']} worker failures exceed backoffLimit {spec.backoff_limit}"
                        + (f"; last: {failed_now[-1].message}" if failed_now else ""))

    left = _seconds_left(status["startTime"], spec.active_deadline_seconds, now)
    if left is not None and left <= 0:
        return terminal(PHASE_FAILED, REASON_DEADLINE,
                        f"the job ran longer than activeDeadlineSeconds={spec.active_deadline_seconds}")
    plan.requeue_after = left

    if any(p.phase == "Succeeded" for p in pods) and not active:
        return terminal(PHASE_SUCCEEDED, REASON_SUCCEEDED, "training finished")
    if any(p.phase == "Succeeded" for p in pods):   # the group is finishing; add nobody
        return finish(prev_phase or PHASE_RUNNING, REASON_RUNNING, "workers are finishing", ready=True)

    # A changed template (image, command, env, resources...) replaces the whole group.
    # Only a change of the job's own spec counts: an operator upgrade that builds pods
    # differently does not restart running training.
    stale = [p for p in active if template and p.template and p.template != template
             and gen and 0 < p.generation < gen]
    if stale:
        plan.delete += [p.name for p in stale]
        plan.events.append((EVENT_NORMAL, REASON_TEMPLATE_CHANGED,
                            f"the worker template changed ({stale[0].template} -> {template}): "
                            f"replacing {len(stale)} worker(s), which resume from the last checkpoint"))
        active = [p for p in active if p not in stale]

    # Sizing: gang-create up to min all at once, then add what capacity allows, up to replicas.
    have = len(active)
    if have > w.replicas:
        extra = sorted(active, key=lambda p: p.index, reverse=True)[:have - w.replicas]
        plan.delete += [p.name for p in extra]
        have = w.replicas
    want = w.replicas - have
    gang = max(w.min - have, 0)
    capacity_short = False
    if want:
        if gang and free_slots < gang:
            want, capacity_short = 0, True
        else:
            capacity_short = free_slots < want
            want = min(want, free_slots)
    # A name is free once its old pod is gone; a pod that is going keeps its index.
    used = {p.index for p in active if p.name not in plan.delete}
    used |= {p.index for p in pods if p.deleting or p in stale}
    plan.create = [i for i in range(w.max) if i not in used][:want]

    restarting = bool(failed_now or vanished) or (
        prev_phase == PHASE_RESTARTING and any(not p.ready for p in active))
    running = [p for p in active if p.phase == "Running" and p.name not in plan.delete]
    total = have + len(plan.create)
    if stale:
        return finish(PHASE_RESTARTING, REASON_TEMPLATE_CHANGED,
                      f"replacing {len(stale)} worker(s) built from an older template", ready=False)
    if restarting and prev_phase not in (None, PHASE_PENDING):
        return finish(PHASE_RESTARTING, REASON_RESTARTING,
                      f"replacing failed workers ({restarts['counted']} counted, "
                      f"{restarts['uncounted']} uncounted restarts)", ready=False)
    if len(running) < w.min:
        if capacity_short and not active:
            return finish(PHASE_PENDING, REASON_WAITING_FOR_CAPACITY,
                          f"waiting for GPU capacity for {w.min} workers "
                          f"({spec.resources.gpus} GPU each); {free_slots} fit now", ready=False)
        return finish(PHASE_PENDING, REASON_CREATING,
                      f"{len(running)}/{w.min} workers running (min {w.min})", ready=False)
    short = f"; {w.replicas - total} more wait for GPU capacity" if capacity_short else ""
    if len(running) < total or plan.delete:
        return finish(PHASE_SCALING, REASON_SCALING,
                      f"{len(running)} of {total} workers running, desired {w.replicas}{short}",
                      ready=False)
    return finish(PHASE_RUNNING, REASON_RUNNING,
                  f"{len(running)}/{w.replicas} workers running{short}", ready=True)
