"""The LeptonJob state machine (pure): observed pods and capacity in, a plan out.

``plan(spec, observed)`` decides which worker pods to create and delete, whether to
delete the job (TTL), the new ``.status`` (the autoscaler's fields included), the events
to record and the writes that do it (``core.execute.Action``). It never touches the API
server: ``job.observe`` gathers a frozen ``JobObserved`` and ``core.execute`` applies the
plan.

It reads as a list of named steps, in the manner of Argo Rollouts' ``rolloutCanary``:
a finished job stays finished; suspend; resume; count failures (and fail past
``backoffLimit``); the deadline; the capacity deadline; completion; replace workers of a
stale template; size the group (provisioning a pool at zero); summarise. A step that settles the job returns an ``Outcome`` and ends the
plan; the others only add to it.

Which failures are already counted is part of the status it writes
(``status.countedPodUIDs``): the failed pods counted in ``status.restarts`` whose deletion
has not been observed yet. A plan made from that status, by a restarted operator
included, never counts those pods again, and drops each uid once its pod is gone.
Which workers were active is part of it too (``status.activeWorkerUIDs``): the active
workers that this plan neither deletes nor finds deleted. Any of them that is gone or
going when the next plan is made, by a restarted operator too, has vanished.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import re
from typing import Any, Callable, Iterable, Mapping

from ..constants import (ANNOTATION_GENERATION, API_VERSION, JOB_KIND, ANNOTATION_SPEC_HASH, COND_READY, EVENT_NORMAL,
                         EVENT_WARNING, LABEL_WORKER_INDEX, PHASE_FAILED, PHASE_PENDING,
                         PHASE_RESTARTING, PHASE_RUNNING, PHASE_SCALING, PHASE_SUCCEEDED,
                         PHASE_SUSPENDED, REASON_BACKOFF_LIMIT, REASON_CAPACITY_TIMEOUT, REASON_CREATING,
                         REASON_DEADLINE,
                         REASON_RESTARTING, REASON_RESUMED, REASON_RUNNING, REASON_SCALING, REASON_STORE_UNREACHABLE,
                         REASON_SUCCEEDED, REASON_SUSPENDED, REASON_TEMPLATE_CHANGED,
                         REASON_TRAINING_STALLED, REASON_TTL_EXPIRED, REASON_WAITING_FOR_CAPACITY,
                         REASON_WORKER_DISRUPTED, REASON_WORKER_FAILED, TERMINAL_PHASES)
from ..core import status as st
from ..core.execute import Action, Effects
from ..core.objects import gpus_requested, policy_changes
from ..core.status import Outcome
from ..scaling import prometheus
from . import autoscale, fit, objects, progress
from .spec import JobSpec
from lepton_trainer.rendezvous import STORE_CONNECT_TIMEOUT

# Pod-level reasons that mean the pod was taken away, not that the workload failed.
DISRUPTION_REASONS = frozenset({"Evicted", "Preempting", "Preempted", "NodeLost", "Shutdown",
                                "NodeShutdown", "Terminated", "UnexpectedAdmissionError",
                                "NodeAffinity", "OutOfcpu", "OutOfmemory", "OutOfpods"})
SIGTERM_EXIT, SIGKILL_EXIT = 143, 137
ACTIVE_PHASES = frozenset({"Pending", "Running", "Unknown"})
# Status field: uids of failed worker pods already counted in ``restarts``, kept until
# their deletion is observed, so that no plan (after an operator restart included)
# counts a failure twice.
COUNTED_POD_UIDS = "countedPodUIDs"
# Status field: uids of the worker pods active after this plan (not deleting, not deleted
# by it), so that a worker gone while no operator ran is still counted as vanished, once.
ACTIVE_WORKER_UIDS = "activeWorkerUIDs"


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
    started_at: str = ""          # status.startTime (RFC 3339, "" before the kubelet starts it)
    finished_at: str = ""         # its container's terminated.finishedAt, when it has one
    ip: str = ""                  # status.podIP: its agent's address in the rendezvous

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES and not self.deleting


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
            msg = (term.get("message") or "").strip()[-1024:]     # the tail: where a traceback ends
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
    finished = next((t["finishedAt"] for cs in status.get("containerStatuses") or ()
                     if (t := (cs.get("state") or {}).get("terminated")) and t.get("finishedAt")), "")
    return PodView(name=meta.get("name", ""), uid=meta.get("uid", ""),
                   index=int((meta.get("labels") or {}).get(LABEL_WORKER_INDEX, -1)),
                   phase=phase, node=spec.get("nodeName"), ready=ready,
                   deleting=bool(meta.get("deletionTimestamp")), gpus=gpus_requested(spec),
                   retryable=retryable, message=message,
                   template=annotations.get(ANNOTATION_SPEC_HASH, ""),
                   generation=int(annotations.get(ANNOTATION_GENERATION, 0) or 0),
                   started_at=status.get("startTime") or "", finished_at=finished,
                   ip=status.get("podIP") or "")


@dataclasses.dataclass(frozen=True)
class StoreView:
    """The rendezvous pod, as the failure classification needs it."""
    created: str                  # metadata.creationTimestamp (RFC 3339)
    ready: bool
    deleting: bool


def store_view(pod: Mapping[str, Any]) -> StoreView:
    meta, status = pod.get("metadata", {}), pod.get("status", {}) or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    return StoreView(created=meta.get("creationTimestamp") or "", ready=ready,
                     deleting=bool(meta.get("deletionTimestamp")))


# What a worker's termination message (its exception, or the tail of its log) says when it
# could not reach its rendezvous store (torch's c10d rendezvous) or its Lighthouse
# (torchft): the infrastructure's failure, not the workload's, so not counted.
STORE_UNREACHABLE = re.compile(
    r"RendezvousConnectionError|DistNetworkError|client socket has timed out while trying to connect"
    r"|failed to connect to \S+ within timeout|Failed to connect to (the )?lighthouse", re.IGNORECASE)

# The rendezvous pod when there is none.
MISSING_STORE = StoreView(created="", ready=False, deleting=False)


@dataclasses.dataclass(frozen=True)
class StoreSecret:
    """The store's control-port token (the job's ``<job>-rdzv`` Secret): the one it holds when
    ``exists``, else a new random one to create it with."""
    token: str = dataclasses.field(repr=False)
    exists: bool
# A worker that fails this close to the loss of its rendezvous store failed because of it.
STORE_LOSS_WINDOW_SECONDS = 60.0


def _ts(value: str) -> _dt.datetime | None:
    try:
        return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def known_active(status: Mapping[str, Any] | None) -> frozenset[str]:
    """The uids of the workers active at the last status written (``ACTIVE_WORKER_UIDS``);
    a status without the field (an older operator's) lists none."""
    return frozenset((status or {}).get(ACTIVE_WORKER_UIDS) or ())


def lost_store(p: PodView, store: StoreView | None, now: _dt.datetime) -> bool:
    """Whether a failed worker failed because the rendezvous store went away: every agent
    exits when its store does, which is the infrastructure's failure, not the workload's.
    True when the store is missing, going or not ready, or was replaced after the worker
    started (the worker's own store is gone), within ``STORE_LOSS_WINDOW_SECONDS`` of the
    failure. ``store`` None: not known, nothing is attributed to it."""
    if store is None:
        return False
    finished = _ts(p.finished_at) or now
    if store.deleting or not store.ready:
        return True
    created, started = _ts(store.created), _ts(p.started_at)
    return bool(created and started and created > started
                and abs((finished - created).total_seconds()) <= STORE_LOSS_WINDOW_SECONDS)


# --- capacity requests (capacity.mode provisioningRequest) --------------------------

REQUEST_PENDING, REQUEST_PROVISIONED, REQUEST_FAILED, REQUEST_EXPIRED = "Pending", "Provisioned", "Failed", "Expired"
# A failed request is kept this long (its message shows in the status) before it is
# deleted and a new one asks again, within capacity.timeoutSeconds.
REQUEST_RETRY_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class CapacityRequestView:
    """The job's ProvisioningRequest (autoscaling.x-k8s.io/v1), as its conditions say:
    Pending (accepted or not yet), Provisioned (the capacity is there for ``count`` pods),
    Failed, or Expired (BookingExpired or CapacityRevoked before the pods consumed it)."""
    name: str
    count: int
    state: str
    message: str = ""
    since: str | None = None            # when it reached that state
    deleting: bool = False


def capacity_request_view(body: Mapping[str, Any]) -> CapacityRequestView:
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    conditions = {c.get("type"): c for c in ((body.get("status") or {}).get("conditions") or ())}
    state, decisive = REQUEST_PENDING, conditions.get("Accepted") or {}
    for type_, value in (("Failed", REQUEST_FAILED), ("BookingExpired", REQUEST_EXPIRED),
                         ("CapacityRevoked", REQUEST_EXPIRED), ("Provisioned", REQUEST_PROVISIONED)):
        if (conditions.get(type_) or {}).get("status") == "True":
            state, decisive = value, conditions[type_]
            break
    count = sum(int(ps.get("count") or 0) for ps in spec.get("podSets") or ())
    return CapacityRequestView(meta.get("name", ""), count, state, decisive.get("message") or "",
                               decisive.get("lastTransitionTime"), bool(meta.get("deletionTimestamp")))


# --- the plan ------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    status: dict[str, Any]
    create: list[int] = dataclasses.field(default_factory=list)     # worker indices
    delete: list[str] = dataclasses.field(default_factory=list)     # worker pod names
    delete_rendezvous: bool = False
    delete_job: bool = False
    counted_uids: set[str] = dataclasses.field(default_factory=set)  # failures handled now
    events: list[st.Event] = dataclasses.field(default_factory=list)
    requeue_after: float | None = None
    outcome: Outcome | None = None
    request_capacity: int = 0           # ask for this many workers (a ProvisioningRequest)
    delete_capacity_request: bool = False
    consume: str | None = None          # new workers consume this Provisioned request
    capacity_short: bool = False        # more workers are wanted than fit on the nodes now
    # What goes out (``core.execute``), and what the loop keeps of it:
    actions: list[Action] = dataclasses.field(default_factory=list)
    persist_first: bool = False         # the status must be durable before the actions
    worker_names: dict[str, int] = dataclasses.field(default_factory=dict)   # created pod -> index
    policies_applied: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict)
    autoscaler: autoscale.AutoscalerMemory = dataclasses.field(default_factory=autoscale.AutoscalerMemory)
    tick: autoscale.Tick | None = None
    report_lost: tuple[str, ...] = ()   # IPs to report to the rendezvous store as gone
    report_token: str | None = dataclasses.field(default=None, repr=False)   # the store's token, for them
    progress: progress.Progress = progress.Progress()

    @property
    def effects(self) -> Effects:
        return Effects(self.status, self.actions, self.events, self.persist_first)


@dataclasses.dataclass
class _Job:
    """The inputs of one plan, and what the steps have decided so far."""
    spec: JobSpec
    plan: Plan
    pods: list[PodView]                 # every worker pod, by index
    active: list[PodView]               # workers that run or will run (stale ones leave it)
    free_slots: int
    now: _dt.datetime
    handled: set[str]
    vanished: int
    template: str
    generation: int | None
    prev_phase: str | None
    no_node_fits: bool = False         # no current node can hold a worker (a pool at zero)
    free_capacity: tuple[tuple[str, fit.Requests], ...] = ()   # the workers' Ready nodes, free now
    store: StoreView | None = None     # the rendezvous pod (MISSING_STORE: none; None: not known)
    failed_now: list[PodView] = dataclasses.field(default_factory=list)
    stale: list[PodView] = dataclasses.field(default_factory=list)
    leaving: list[PodView] = dataclasses.field(default_factory=list)   # replaced for another reason
    capacity_short: bool = False
    request: CapacityRequestView | None = None   # the ProvisioningRequest, if any
    unreachable: str = ""               # why workers failed to reach a store whose pod is Ready
    stalled: str = ""                   # why the job was judged stalled at the last reading (job.progress)

    @property
    def status(self) -> dict[str, Any]:
        return self.plan.status

    @property
    def requesting(self) -> bool:
        return self.spec.capacity.mode == "provisioningRequest"

    @property
    def restarts(self) -> dict[str, int]:
        return self.plan.status["restarts"]

    @property
    def provisioning(self) -> bool:
        """The gang's Pending pods ask a cluster autoscaler for nodes that do not exist yet."""
        return self.no_node_fits and self.spec.capacity.mode == "provision"


def _seconds_left(start: str | None, limit: int | None, now: _dt.datetime) -> float | None:
    t0 = st.parse_time(start)
    if t0 is None or limit is None:
        return None
    return limit - (now - t0).total_seconds()


def _terminal(job: _Job, phase: str, reason: str, message: str) -> Outcome:
    """Finish the job: delete its workers and store, start the TTL clock."""
    job.plan.delete = [p.name for p in job.active]
    job.plan.delete_rendezvous = True
    job.status["completionTime"] = st.now_iso(job.now)
    if job.spec.ttl_seconds_after_finished is not None:
        job.plan.requeue_after = float(job.spec.ttl_seconds_after_finished)
    ok = phase == PHASE_SUCCEEDED
    if ok and job.spec.output:
        job.status["outputURI"] = job.spec.output.uri
    return Outcome(phase, reason, message, ready=ok, stalled=not ok)


# --- the steps, in order -------------------------------------------------------------

def stay_terminal(job: _Job) -> Outcome | None:
    """A finished job stays finished: clean up what is left, then wait for its TTL."""
    if job.prev_phase not in TERMINAL_PHASES:
        return None
    plan = job.plan
    plan.delete = [p.name for p in job.active]
    plan.delete_rendezvous = True
    left = _seconds_left(job.status.get("completionTime"), job.spec.ttl_seconds_after_finished, job.now)
    if left is not None and left <= 0:
        plan.delete_job = True
        plan.events.append((EVENT_NORMAL, REASON_TTL_EXPIRED,
                            f"deleting the job {job.spec.ttl_seconds_after_finished}s after it finished"))
    plan.requeue_after = left if left is not None and left > 0 else None
    cond = st.get_condition(job.status.get("conditions"), COND_READY) or {}
    return Outcome(job.prev_phase, cond.get("reason", job.prev_phase), cond.get("message", ""),
                   ready=job.prev_phase == PHASE_SUCCEEDED, stalled=job.prev_phase == PHASE_FAILED)


def suspend(job: _Job) -> Outcome | None:
    """``suspend: true`` deletes the workers and the rendezvous pod (a suspended job runs
    nothing) and keeps the Services, checkpoints and status; resuming starts a new store."""
    if not job.spec.suspend:
        return None
    job.plan.delete = [p.name for p in job.pods if not p.deleting]
    job.plan.delete_rendezvous = True
    job.status.pop("startTime", None)    # the deadline counts from the last resume
    # Ready: the job is as its spec asks (suspended), so kstatus says Current and a Flux
    # wait ends; Argo CD reads the phase and shows Suspended.
    return Outcome(PHASE_SUSPENDED, REASON_SUSPENDED,
                   "suspended (spec.suspend: true): no workers and no rendezvous pod run, checkpoints are kept; "
                   "set spec.suspend to false to resume", ready=True)


def resume(job: _Job) -> None:
    """Leaving suspension is an event; the deadline clock starts now."""
    if job.prev_phase == PHASE_SUSPENDED:
        job.plan.events.append((EVENT_NORMAL, REASON_RESUMED, "resumed: recreating workers"))
    job.status.setdefault("startTime", st.now_iso(job.now))


def count_failures(job: _Job) -> Outcome | None:
    """Classify each failed pod once (counted or not), replace it, and fail the job past
    ``backoffLimit``. Workers that vanished without the operator deleting them count as
    uncounted restarts."""
    plan, restarts = job.plan, job.restarts
    job.failed_now = [p for p in job.pods if p.phase == "Failed" and not p.deleting and p.uid not in job.handled]
    for p in job.failed_now:
        retryable, message = p.retryable, p.message
        if not retryable and lost_store(p, job.store, job.now):
            retryable, message = True, f"the rendezvous store was lost ({message})"
        elif not retryable and STORE_UNREACHABLE.search(message):
            retryable, message = True, f"the rendezvous store or Lighthouse was unreachable ({message})"
            _store_unreachable_now(job, message)
        restarts["uncounted" if retryable else "counted"] += 1
        plan.counted_uids.add(p.uid)
        plan.events.append((EVENT_NORMAL if retryable else EVENT_WARNING,
                            REASON_WORKER_DISRUPTED if retryable else REASON_WORKER_FAILED,
                            f"worker {p.name}: {message}"))
    if job.vanished:
        restarts["uncounted"] += job.vanished
        plan.events.append((EVENT_NORMAL, REASON_WORKER_DISRUPTED,
                            f"{job.vanished} worker pod(s) disappeared; replacing them"))
    plan.delete = [p.name for p in job.pods if p.phase == "Failed" and not p.deleting]
    if restarts["counted"] > job.spec.backoff_limit:
        last = f"; last: {job.failed_now[-1].message}" if job.failed_now else ""
        return _terminal(job, PHASE_FAILED, REASON_BACKOFF_LIMIT,
                         f"{restarts['counted']} worker failures exceed backoffLimit {job.spec.backoff_limit}{last}")
    # Workers replaced after a failure or a disruption: restarts that really happen.
    job.status["restartCount"] = job.status.get("restartCount", 0) + len(job.failed_now) + job.vanished
    return None


# A worker Running this long has reached its store: it would have failed at the connect timeout.
STORE_PROVEN_SECONDS = 2 * STORE_CONNECT_TIMEOUT


def _store_unreachable_now(job: _Job, message: str) -> None:
    """A worker failed to reach the store while the store's pod is Ready: its node does not
    run it, or its network does not carry it. A person has to look (Warning, once)."""
    store = job.store
    if store is None or not store.ready or store.deleting:
        return
    job.unreachable = ("the workers cannot reach the rendezvous store although its pod is Ready (its node may not "
                       f"run it, or that node's network may not carry it); replacing them, uncounted: {message}")
    if _ready_condition(job).get("reason") != REASON_STORE_UNREACHABLE:
        job.plan.events.append((EVENT_WARNING, REASON_STORE_UNREACHABLE, job.unreachable))


def _ready_condition(job: _Job) -> Mapping[str, Any]:
    return st.get_condition(job.status.get("conditions"), COND_READY) or {}


def store_unreachable(job: _Job) -> str:
    """Why the job is not Ready for its store: a failure of that kind now, or one before (the
    Ready condition says so) while no worker has run past the store's connect timeout yet."""
    if job.unreachable:
        return job.unreachable
    ready = _ready_condition(job)
    if ready.get("reason") != REASON_STORE_UNREACHABLE:
        return ""
    proven = any(p.phase == "Running" and (t := _ts(p.started_at)) and (job.now - t).total_seconds() > STORE_PROVEN_SECONDS
                 for p in job.active)
    return "" if proven else ready.get("message", "")


def check_deadline(job: _Job) -> Outcome | None:
    """``activeDeadlineSeconds``, counted from the start or the last resume."""
    left = _seconds_left(job.status["startTime"], job.spec.active_deadline_seconds, job.now)
    if left is not None and left <= 0:
        return _terminal(job, PHASE_FAILED, REASON_DEADLINE,
                         f"the job ran longer than activeDeadlineSeconds={job.spec.active_deadline_seconds}")
    job.plan.requeue_after = left
    return None


def check_capacity_timeout(job: _Job) -> Outcome | None:
    """A wait for capacity ends after ``capacity.timeoutSeconds``: the job fails, or its
    workers are released (Suspended) until its spec changes."""
    c, status = job.spec.capacity, job.status
    held = status.get("capacitySuspendedGeneration")
    if held is not None and held != job.generation:        # the spec changed: try again
        status.pop("capacitySuspendedGeneration")
        status.pop("waitingForCapacitySince", None)
        held = None
    if held is None:
        left = _seconds_left(status.get("waitingForCapacitySince"), c.timeout_seconds, job.now)
        if left is None or left > 0:
            if left is not None:
                job.plan.requeue_after = min(left, job.plan.requeue_after or left)
            return None
        message = f"no capacity for {job.spec.workers.min} worker(s) within capacity.timeoutSeconds={c.timeout_seconds}"
        if c.on_timeout == "Fail":
            return _terminal(job, PHASE_FAILED, REASON_CAPACITY_TIMEOUT, message)
        status["capacitySuspendedGeneration"] = job.generation
        job.plan.events.append((EVENT_WARNING, REASON_CAPACITY_TIMEOUT, message + "; workers released"))
    job.plan.delete = [p.name for p in job.pods if not p.deleting]
    return Outcome(PHASE_SUSPENDED, REASON_CAPACITY_TIMEOUT,
                   f"no capacity within capacity.timeoutSeconds={c.timeout_seconds}; workers released. "
                   "Any change of the job's spec tries again", settled=True)


def check_completion(job: _Job) -> Outcome | None:
    """A worker that succeeded means training finished: wait for the others, add nobody.
    While they finish the job is Running and Ready, whatever phase it was in before."""
    if not any(p.phase == "Succeeded" for p in job.pods):
        return None
    if not job.active:
        return _terminal(job, PHASE_SUCCEEDED, REASON_SUCCEEDED, "training finished")
    return Outcome(PHASE_RUNNING, REASON_RUNNING, "workers are finishing", ready=True)


def replace_stale(job: _Job) -> None:
    """A changed worker template (image, command, env, resources...) replaces the whole
    group once. Only a change of the job's own spec counts: workers built at an older
    generation from another template."""
    gen = job.generation
    job.stale = [p for p in job.active if job.template and p.template and p.template != job.template
                 and gen and 0 < p.generation < gen]
    if not job.stale:
        return
    job.plan.delete += [p.name for p in job.stale]
    job.plan.events.append((EVENT_NORMAL, REASON_TEMPLATE_CHANGED,
                            f"the worker template changed ({job.stale[0].template} -> {job.template}): "
                            f"replacing {len(job.stale)} worker(s), which resume from the last checkpoint"))
    job.active = [p for p in job.active if p not in job.stale]


# A store created this long after a worker started is not the store that worker joined.
STORE_REPLACED_SECONDS = 10.0
# How long replica groups that joined a replaced Lighthouse have to step with the new one
# (they ask it again about once a second, ``objects.quorum_retries``) before a stall of the
# job is theirs to restart.
LIGHTHOUSE_REJOIN_SECONDS = 30.0


def rejoin_lighthouse(job: _Job) -> None:
    """perStep: replica groups that joined a Lighthouse that was replaced ask the new one for
    their next quorum in place: their managers retry a failed quorum request about once a
    second, so they step again within a second of its start, keeping their processes and
    weights. Only when the job is stalled (no step in its window, ``job.progress``) while the
    new Lighthouse has run for ``LIGHTHOUSE_REJOIN_SECONDS`` (a group whose request to the
    old one hangs, as when its node went silent, would wait for the quorum timeout) are
    those groups replaced, resuming from the checkpoint: an uncounted restart."""
    store = job.store
    if not job.spec.per_step or store is None or not job.stalled or store == MISSING_STORE \
            or not store.ready or store.deleting or not (created := _ts(store.created)):
        return
    if (job.now - created).total_seconds() < LIGHTHOUSE_REJOIN_SECONDS:
        return
    running = [p for p in job.active if p.phase == "Running" and _ts(p.started_at)]
    orphans = [p for p in running if (created - _ts(p.started_at)).total_seconds() > STORE_REPLACED_SECONDS]
    if not orphans:
        return
    job.plan.delete += [p.name for p in orphans]
    job.restarts["uncounted"] += len(orphans)
    job.status["restartCount"] = job.status.get("restartCount", 0) + len(orphans)
    job.plan.events.append((EVENT_NORMAL, REASON_WORKER_DISRUPTED,
                            f"the job is stalled and {len(orphans)} replica group(s) started before the Lighthouse "
                            f"was replaced at {store.created}: they restart from the last checkpoint to join the "
                            "new one"))
    job.active = [p for p in job.active if p not in orphans]
    job.leaving += orphans


def size_group(job: _Job) -> None:
    """Gang-create up to ``min`` all at once, then add what capacity allows, up to
    ``replicas``; remove the highest indices above ``replicas``."""
    w, plan = job.spec.workers, job.plan
    have = len(job.active)
    if have > w.replicas:
        extra = sorted(job.active, key=lambda p: p.index, reverse=True)[:have - w.replicas]
        plan.delete += [p.name for p in extra]
        have = w.replicas
    want = w.replicas - have
    gang = max(w.min - have, 0)
    if want:
        if gang and job.free_slots < gang and job.requesting:
            # provisioningRequest: the gang waits for the cluster autoscaler's answer.
            want = gang if _capacity_granted(job, gang) else 0
            job.capacity_short = not want
        elif gang and job.free_slots < gang:
            # All or nothing on nodes that exist; on a pool at zero, the gang's Pending pods are
            # the demand the cluster autoscaler provisions for (nothing beyond min).
            want, job.capacity_short = (gang if job.provisioning else 0), True
        else:
            job.capacity_short = job.free_slots < want
            want = min(want, job.free_slots)
    # A name is free once its old pod is gone; a pod that is going keeps its index.
    used = {p.index for p in job.active if p.name not in plan.delete}
    used |= {p.index for p in job.pods if p.deleting or p in job.stale or p in job.leaving}
    plan.create = [i for i in range(w.max) if i not in used][:want]
    r = job.request
    if r is not None and r.state == REQUEST_PROVISIONED and not r.deleting:
        plan.consume = r.name            # the pods land on the capacity it booked
    if r is not None and not r.deleting and not gang and job.active and all(p.node for p in job.active):
        plan.delete_capacity_request = True      # consumed: the gang is there, every worker on a node


def _capacity_granted(job: _Job, gang: int) -> bool:
    """provisioningRequest mode: whether the gang's ProvisioningRequest is Provisioned for
    ``gang`` workers. Else ask for one (none yet), or drop one that failed (after
    ``REQUEST_RETRY_SECONDS``), expired or asked for another count, so a new one asks again."""
    r, plan = job.request, job.plan
    if r is None:
        plan.request_capacity = gang
        return False
    if r.deleting:
        return False
    if r.state == REQUEST_PROVISIONED and r.count >= gang:
        return True
    if r.state == REQUEST_FAILED:
        left = _seconds_left(r.since, int(REQUEST_RETRY_SECONDS), job.now)
        if left is not None and left > 0:
            plan.requeue_after = min(left, plan.requeue_after or left)
            return False
    elif r.state == REQUEST_PENDING and r.count == gang:
        return False
    plan.delete_capacity_request = True
    return False


def _request_message(job: _Job, gang: int) -> str:
    r, c = job.request, job.spec.capacity
    state = "asking" if r is None or r.deleting else r.state + (f" ({r.message})" if r.message else "")
    name = f" {r.name}" if r is not None else ""
    return (f"ProvisioningRequest{name} (class {c.provisioning_class}) asks the cluster autoscaler for "
            f"{gang} worker(s) ({_need(job.spec)} each): {state}; the workers are created "
            f"once it is Provisioned, for at most {c.timeout_seconds}s")


def _need(spec: JobSpec) -> str:
    """What one worker asks for, in words ("4 CPU, 16Gi memory, 1 GPU")."""
    need = fit.worker_requests(spec)
    return fit.describe(need) if need else "no cpu, memory or GPU"


def summarise(job: _Job) -> Outcome:
    """The phase the group is in after this plan."""
    w, plan, restarts = job.spec.workers, job.plan, job.restarts
    restarting = bool(job.failed_now or job.vanished) or (
        job.prev_phase == PHASE_RESTARTING and any(not p.ready for p in job.active))
    running = [p for p in job.active if p.phase == "Running" and p.name not in plan.delete]
    have = min(len(job.active), w.replicas)
    total = have + len(plan.create)
    if unreachable := store_unreachable(job):
        return Outcome(PHASE_RESTARTING, REASON_STORE_UNREACHABLE, unreachable)
    if job.stale:
        return Outcome(PHASE_RESTARTING, REASON_TEMPLATE_CHANGED,
                       f"replacing {len(job.stale)} worker(s) built from an older template")
    if restarting and job.prev_phase not in (None, PHASE_PENDING):
        return Outcome(PHASE_RESTARTING, REASON_RESTARTING,
                       f"replacing failed workers ({restarts['counted']} counted, "
                       f"{restarts['uncounted']} uncounted restarts)")
    if len(running) < w.min:
        if job.requesting and job.capacity_short and not plan.create:
            return Outcome(PHASE_PENDING, REASON_WAITING_FOR_CAPACITY,
                           _request_message(job, max(w.min - len(job.active), 0)))
        if job.provisioning and job.capacity_short:
            return Outcome(PHASE_PENDING, REASON_WAITING_FOR_CAPACITY,
                           f"no current node can run a worker ({_need(job.spec)} each); {w.min} "
                           f"Pending worker(s) ask the cluster autoscaler for nodes, for at most "
                           f"{job.spec.capacity.timeout_seconds}s")
        if job.capacity_short and not job.active:
            note = fit.shortfall_note(job.free_capacity, fit.worker_requests(job.spec))
            return Outcome(PHASE_PENDING, REASON_WAITING_FOR_CAPACITY,
                           f"waiting for capacity: {w.min} workers need {_need(job.spec)} each; {job.free_slots} "
                           f"fit now ({note}), for at most "
                           f"{job.spec.capacity.timeout_seconds}s")
        return Outcome(PHASE_PENDING, REASON_CREATING, f"{len(running)}/{w.min} workers running (min {w.min})")
    short = f"; {w.replicas - total} more wait for capacity" if job.capacity_short else ""
    if len(running) < total or plan.delete:
        return Outcome(PHASE_SCALING, REASON_SCALING,
                       f"{len(running)} of {total} workers running, desired {w.replicas}{short}")
    return Outcome(PHASE_RUNNING, REASON_RUNNING, f"{len(running)}/{w.replicas} workers running{short}",
                   ready=True)


SETTLING_STEPS: tuple[Callable[[_Job], Outcome | None], ...] = (
    stay_terminal, suspend, resume, count_failures, check_deadline, check_capacity_timeout, check_completion)
SHAPING_STEPS: tuple[Callable[[_Job], None], ...] = (replace_stale, rejoin_lighthouse, size_group)


def _remember_counted(job: _Job) -> None:
    """Keep in the status the uids of failed pods counted now or before whose pods still
    exist (deleting ones included); a pod the index no longer shows is gone for good, and
    its uid is dropped. The field is absent when there is nothing to remember."""
    present = {p.uid for p in job.pods if p.uid}
    counted = sorted((job.handled | job.plan.counted_uids) & present)
    if counted:
        job.status[COUNTED_POD_UIDS] = counted
    else:
        job.status.pop(COUNTED_POD_UIDS, None)


def _remember_active(job: _Job) -> None:
    """Keep in the status the uids of the workers that are active and stay so: not
    deleting (the operator's own deletes not yet observed look deleting too) and not
    deleted by this plan. Pods created but not yet seen have no uid and wait for the
    plan that sees them. The field is absent when there is none; a status without it
    (written before the field existed) remembers no worker."""
    active = sorted(p.uid for p in job.pods if p.active and p.uid and p.name not in job.plan.delete)
    if active:
        job.status[ACTIVE_WORKER_UIDS] = active
    else:
        job.status.pop(ACTIVE_WORKER_UIDS, None)


def _report_capacity_request(job: _Job, outcome: Outcome) -> None:
    """A finished or suspended job gives its ProvisioningRequest back; ``capacityRequest``
    in the status shows the request a waiting gang depends on, and is absent otherwise."""
    r, plan, status = job.request, job.plan, job.plan.status
    if r is not None and not r.deleting and (outcome.phase in TERMINAL_PHASES or outcome.phase == PHASE_SUSPENDED):
        plan.delete_capacity_request = True
    if job.requesting and not plan.delete_capacity_request and (plan.request_capacity or (r and not r.deleting)):
        shown = {"name": r.name, "state": r.state, "count": r.count, "message": r.message} if r else \
            {"state": "Requesting", "count": plan.request_capacity}
        status["capacityRequest"] = {k: v for k, v in shown.items() if v}
    else:
        status.pop("capacityRequest", None)


def _report(job: _Job, outcome: Outcome, selector: str) -> Plan:
    """Write the outcome and the worker counts into the status; an event on a phase change."""
    plan, status, w = job.plan, job.plan.status, job.spec.workers
    plan.outcome = outcome
    plan.capacity_short = job.capacity_short and outcome.phase not in TERMINAL_PHASES
    st.apply_outcome(status, outcome, job.generation, st.now_iso(job.now))
    if outcome.reason == REASON_WAITING_FOR_CAPACITY:     # the capacity deadline counts from here
        status.setdefault("waitingForCapacitySince", st.now_iso(job.now))
    elif outcome.reason != REASON_CAPACITY_TIMEOUT:
        status.pop("waitingForCapacitySince", None)
    running = [p for p in job.active if p.phase == "Running"]
    status["workers"] = {"desired": w.replicas, "scheduled": sum(1 for p in job.active if p.node),
                         "running": len(running), "ready": sum(1 for p in running if p.ready)}
    status["replicas"] = (len(job.active) - sum(1 for p in job.active if p.name in plan.delete)
                          + len(plan.create))
    status["selector"] = selector
    _remember_counted(job)
    _remember_active(job)
    _report_capacity_request(job, outcome)
    # A finished or suspended job runs no workers: READY says so instead of "0/N".
    status["workersReady"] = ("-" if outcome.phase in TERMINAL_PHASES or outcome.phase == PHASE_SUSPENDED
                              else f"{status['workers']['ready']}/{w.replicas}")
    if outcome.phase != job.prev_phase:
        plan.events.append((EVENT_WARNING if outcome.phase == PHASE_FAILED else EVENT_NORMAL, outcome.reason,
                            f"{job.prev_phase or 'New'} -> {outcome.phase}: {outcome.message}"))
    return plan




# --- the observation a plan is made from ---------------------------------------------

@dataclasses.dataclass(frozen=True)
class Workers:
    """The job's workers as the plan should see them."""
    pods: Mapping[str, PodView] = dataclasses.field(default_factory=dict)   # by name, from the index
    views: tuple[PodView, ...] = ()     # corrected for deletes and creates not yet seen
    vanished: int = 0                   # active workers gone without the operator deleting them
    lost: tuple[str, ...] = ()          # IPs of the workers active before and not now
    addrs: Mapping[str, str] = dataclasses.field(default_factory=dict)   # uid -> IP of the active ones
    deleted: frozenset[str] = frozenset()   # uids of workers this loop deleted, not yet gone
    created: frozenset[str] = frozenset()   # names of workers this loop created, not yet seen

    @staticmethod
    def of(pods: Iterable[PodView], vanished: int = 0) -> "Workers":
        """Workers exactly as given (no correction for writes the index has not shown)."""
        pods = tuple(pods)
        return Workers({p.name: p for p in pods}, pods, vanished)


@dataclasses.dataclass(frozen=True)
class JobObserved:
    """Everything one plan reads; ``job.observe.observe`` builds it (a test, directly).

    ``handled_uids``: failed pods whose failure was already counted (they may still show
    in the index until their deletion is observed), in addition to those recorded in
    ``status[COUNTED_POD_UIDS]``. ``workers.vanished``: active workers that disappeared
    without the operator deleting them (drained, evicted through the API); they are
    replaced and counted as uncounted restarts. ``free_slots``: how many more workers fit
    on the nodes now (their cpu, memory and GPU requests, ``job.fit``); ``free_capacity``:
    the Ready nodes the workers may use and what each has free (a shortfall names them).
    ``no_node_fits``: no current node matching the workers' placement could hold one even
    empty (``capacity.mode`` decides what that means). ``store``: the rendezvous pod
    (``MISSING_STORE`` when there is none);
    workers that failed because it went away are uncounted restarts (:func:`lost_store`).
    ``request``: the job's ProvisioningRequest (capacity.mode provisioningRequest).
    ``store_secret``: the store's token, when the plan may need it (the store pod is to be
    created, or lost workers reported): the Secret's, or a new one when it does not exist.
    ``children``: the shared children (kind, name) the indices show or that were just
    created; ``policies``: the job's NetworkPolicies the index shows (name -> spec hash)
    and ``policies_applied`` those applied recently (``core.objects.policy_changes``).
    ``template``: the hash of the worker template the current spec builds
    (``objects.template_hash``); active workers built from another template at an older
    job generation are replaced together. ``sample``: the autoscaler's Prometheus answer,
    when its tick is due.
    """
    meta: Mapping[str, Any]
    status: Mapping[str, Any] | None
    workers: Workers
    now: _dt.datetime
    free_slots: int = 0
    no_node_fits: bool = False
    free_capacity: tuple[tuple[str, fit.Requests], ...] = ()
    store: StoreView | None = None
    store_secret: StoreSecret | None = None     # None: not needed or not known, no Secret is created
    request: CapacityRequestView | None = None
    handled_uids: frozenset[str] = frozenset()
    children: frozenset[tuple[str, str]] | None = None   # None: not known, nothing is created
    policies: Mapping[str, str] | None = None            # None: not known, nothing is applied
    policies_applied: Mapping[str, tuple[str, float]] = dataclasses.field(default_factory=dict)
    monotonic: float = 0.0
    template: str = ""                  # the hash of the worker template the spec builds ("": not compared)
    trainer_image: str = ""
    operator_namespace: str = ""
    operator_pod_labels: tuple[tuple[str, str], ...] = ()
    reports_lost_workers: bool = False
    sample: prometheus.QueryResult | None = None
    autoscaler: autoscale.AutoscalerMemory = dataclasses.field(default_factory=autoscale.AutoscalerMemory)
    progress: progress.Progress = progress.Progress()
    step: prometheus.QueryResult | None = None    # the job's training step, when it was read now
    progress_interval: float = 0.0                # 0: training progress is not watched
    stall_seconds: float = 30.0


# --- the plan ------------------------------------------------------------------------

def plan(spec: JobSpec, observed: JobObserved) -> Plan:
    """The whole next step of a job: its status, events and writes (see the module doc)."""
    p = _decide(spec, observed)
    _liveness(observed, p)
    _autoscale(spec, observed, p)
    _writes(spec, observed, p)
    return p


def _liveness(observed: JobObserved, p: Plan) -> None:
    """A Running job whose training step stopped growing is not Ready: reason TrainingStalled,
    a Warning event when it starts (``job.progress``). Outside Running the count restarts."""
    if not observed.progress_interval or p.outcome is None or p.outcome.phase != PHASE_RUNNING:
        p.progress = progress.Progress()
        return
    mono, seen = observed.monotonic, observed.progress
    if observed.step is not None:
        seen = progress.update(seen, observed.step.value, mono)
        seen = dataclasses.replace(seen, next_tick=mono + observed.progress_interval * (
            1 if seen.step is not None else progress.NO_SERIES_BACKOFF))
    why = progress.stalled(seen, mono, observed.stall_seconds) if p.outcome.ready else ""
    p.progress = dataclasses.replace(seen, stalled=why)
    p.requeue_after = _sooner(p.requeue_after, max(seen.next_tick - mono, 0.05))
    if not why:
        return
    p.outcome = Outcome(PHASE_RUNNING, REASON_TRAINING_STALLED, why)
    st.apply_outcome(p.status, p.outcome, observed.meta.get("generation"), st.now_iso(observed.now))
    if not observed.progress.stalled:
        p.events.append((EVENT_WARNING, REASON_TRAINING_STALLED, why))


def _decide(spec: JobSpec, observed: JobObserved) -> Plan:
    """Run the steps: the settling ones until one settles the job, then the shaping ones.
    Workers built from another template at an older job generation are replaced together
    (the group re-forms once, from the checkpoint); that restart is not a failure, so it
    counts against neither maxRestarts nor backoffLimit."""
    meta = observed.meta
    status = copy.deepcopy(dict(observed.status or {}))
    status.setdefault("restarts", {"counted": 0, "uncounted": 0})
    status.setdefault("restartCount", 0)
    pods = sorted(observed.workers.views, key=lambda p: p.index)
    job = _Job(spec=spec, plan=Plan(status=status), pods=pods, active=[p for p in pods if p.active],
               free_slots=observed.free_slots, now=observed.now,
               handled=set(observed.handled_uids) | set(status.get(COUNTED_POD_UIDS) or ()),
               vanished=observed.workers.vanished, template=observed.template,
               generation=meta.get("generation"), prev_phase=status.get("phase"),
               no_node_fits=observed.no_node_fits, free_capacity=observed.free_capacity, store=observed.store,
               request=observed.request, stalled=observed.progress.stalled)
    selector = objects.worker_selector(meta.get("name", ""))
    for step in SETTLING_STEPS:
        outcome = step(job)
        if outcome is not None:
            return _report(job, outcome, selector)
    for shape in SHAPING_STEPS:
        shape(job)
    return _report(job, summarise(job), selector)


def _autoscale(spec: JobSpec, observed: JobObserved, p: Plan) -> None:
    """The autoscaler's tick, when its sample is in and the job scales: its fields join the
    status, and a new size is a spec patch made after the status is durable."""
    p.autoscaler = observed.autoscaler
    if not autoscale.scales(spec, p.status):
        return
    if observed.sample is None:
        p.requeue_after = _sooner(p.requeue_after, max(observed.autoscaler.next_tick - observed.monotonic, 0.05))
        return
    tick = autoscale.decide(spec, p.status, observed.sample, observed.autoscaler, observed.free_slots,
                            observed.now.timestamp(), observed.monotonic)
    p.tick, p.autoscaler = tick, tick.memory
    p.status["autoscaling"] = tick.status
    p.events += tick.events
    p.requeue_after = _sooner(p.requeue_after, tick.delay)
    if tick.replicas is not None:
        p.persist_first = True
        meta = observed.meta
        p.actions.append(Action.patch(API_VERSION, JOB_KIND, meta["name"], meta["namespace"],
                                      {"spec": {"workers": {"replicas": tick.replicas}}}))


def _sooner(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _writes(spec: JobSpec, observed: JobObserved, p: Plan) -> None:
    """The writes of the plan, and whether its status must be durable before them.

    Restart counts, and the uids of the failed pods they count, are durable before those
    pods are deleted: a restart in between counts nothing twice. The same status lists the
    workers still active (``ACTIVE_WORKER_UIDS``), without those about to be deleted: a
    restarted operator counts as vanished only the workers it had listed, so a worker
    this plan deletes must have left the list before its DELETE."""
    meta = observed.meta
    namespace, name = meta["namespace"], meta["name"]
    pods = observed.workers.pods
    deleting = {pods[n].uid for n in p.delete if n in pods}
    if p.counted_uids or observed.workers.vanished or p.delete_job or deleting & known_active(observed.status):
        p.persist_first = True
    if p.delete_job:
        p.actions = [Action.delete(API_VERSION, JOB_KIND, name, namespace)]
        return
    owner = objects.owner(meta)
    p.delete = [n for n in p.delete if n in pods or n in observed.workers.created]
    p.actions += [Action.delete("v1", "Pod", n, namespace) for n in p.delete]
    if p.status.get("phase") not in TERMINAL_PHASES and not p.delete_rendezvous:
        p.actions += _create_children(owner, spec, observed)
    elif p.delete_rendezvous and observed.store not in (None, MISSING_STORE) and not observed.store.deleting:
        p.actions.append(Action.delete("v1", "Pod", objects.rdzv_name(name), namespace))
    for index in p.create:
        pod = objects.worker_pod(owner, spec, index)
        if p.consume:
            objects.consume(pod, p.consume, spec)
        p.worker_names[pod["metadata"]["name"]] = index
        p.actions.append(Action.create(pod))
    p.actions += _policy_writes(owner, spec, observed, p)
    p.actions += _capacity_request_writes(owner, spec, p)
    store = observed.store
    if observed.workers.lost and observed.reports_lost_workers and not spec.per_step and store is not None \
            and store.ready and not store.deleting and (observed.status or {}).get("phase") not in TERMINAL_PHASES:
        p.report_lost = observed.workers.lost
        secret = observed.store_secret
        p.report_token = secret.token if secret is not None and secret.exists else None


def _create_children(owner: Mapping[str, Any], spec: JobSpec, observed: JobObserved) -> list[Action]:
    """Create the missing children; the store's Secret, when it does not exist, first and
    the store's pod (which mounts it) once it does."""
    actions = [Action.create(o) for o in _missing_children(owner, spec, observed)]
    secret = observed.store_secret
    if spec.per_step or secret is None or secret.exists or observed.children is None:
        return actions
    pod = next((a for a in actions if a.kind == "Pod"), None)
    created = Action.create(objects.rendezvous_secret(owner, secret.token), then=(pod,) if pod else ())
    return [created, *(a for a in actions if a is not pod)]


def _missing_children(owner: Mapping[str, Any], spec: JobSpec, observed: JobObserved) -> list[dict[str, Any]]:
    """The rendezvous pod and Services neither shown nor just created."""
    if observed.children is None:
        return []
    rdzv_pod, rdzv_service = objects.rendezvous_objects(owner, spec, observed.trainer_image)
    return [o for o in (rdzv_service, objects.workers_service(owner), rdzv_pod)
            if (o["kind"], o["metadata"]["name"]) not in observed.children]


def _policy_writes(owner: Mapping[str, Any], spec: JobSpec, observed: JobObserved, p: Plan) -> list[Action]:
    """Apply the NetworkPolicies the spec asks for that the index does not show as they
    are; delete those it no longer asks for (``networkPolicy.enabled: false``)."""
    p.policies_applied = dict(observed.policies_applied)
    if observed.policies is None:
        return []
    desired = objects.network_policies(owner, spec, observed.operator_namespace, observed.operator_pod_labels)
    to_apply, to_delete = policy_changes(desired, observed.policies, p.policies_applied, observed.monotonic)
    return [Action.apply(o) for o in to_apply] + [
        Action.delete("networking.k8s.io/v1", "NetworkPolicy", n, owner["metadata"]["namespace"]) for n in to_delete]


def _capacity_request_writes(owner: Mapping[str, Any], spec: JobSpec, p: Plan) -> list[Action]:
    """capacity.mode provisioningRequest: ask for the gang (the worker PodTemplate, then
    the ProvisioningRequest naming it), or give a request back (consumed, failed, expired,
    or the job finished)."""
    namespace, job = owner["metadata"]["namespace"], owner["metadata"]["name"]
    if p.request_capacity:
        template, request = objects.capacity_request(owner, spec, p.request_capacity)
        return [Action.apply(template, then=(Action.create(request),))]
    if p.delete_capacity_request:
        name = objects.capacity_request_name(job)
        return [Action.delete(objects.PROVISIONING_API_VERSION, "ProvisioningRequest", name, namespace,
                              then=(Action.delete("v1", "PodTemplate", name, namespace),))]
    return []
