"""LeptonJob handlers: kopf indices feed one reconcile loop per job (parse -> plan -> apply -> report).

Each LeptonJob gets a kopf daemon that reconciles whenever the job, one of its pods or
the GPU capacity changes (watch events wake it), and at the latest after the resync
period or the next deadline/TTL. Reads come from kopf indices, fed by the watch streams
kopf already holds, so a reconcile that changes nothing makes no API request; writes go
through ``kube``. The daemon is the only writer of the job's status.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as _dt
import logging
import time
from typing import Any, Iterable

import kopf

from .. import config, jobstate, kube, metrics
from .. import status as st
from ..builders import training
from ..constants import (ANNOTATION_SPEC_HASH, API_VERSION, EVENT_WARNING, GROUP, JOB_KIND,
                         JOB_PLURAL, LABEL_JOB, LABEL_ROLE, PHASE_PENDING, REASON_INVALID_SPEC,
                         ROLE_RDZV, ROLE_WORKER, TERMINAL_PHASES, VERSION)
from ..spec import InvalidSpec, JobSpec, parse_job
from .loop import ReconcileLoops

KIND = "LeptonJob"
PENDING_CREATE_TTL = 30.0     # seconds a created pod may take to show up in the index


@dataclasses.dataclass
class _JobMemory:
    """What one job's loop remembers between reconciles (the status it wrote is the truth)."""
    status: dict[str, Any]
    handled: set[str] = dataclasses.field(default_factory=set)          # failed pod uids counted
    known_active: dict[str, str] = dataclasses.field(default_factory=dict)  # uid -> name
    deleted: set[str] = dataclasses.field(default_factory=set)          # pod uids we deleted
    created: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> monotonic time
    children: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)  # created, unseen
    claims_seen: set[tuple[int, str]] = dataclasses.field(default_factory=set)
    invalid_message: str | None = None


_loops = ReconcileLoops(KIND, metrics.JOB_PHASES, lambda status: _JobMemory(status=status),
                        coalesce_seconds=0.2)
_reserved_gpus: dict[tuple[str, str], tuple[int, float]] = {}  # pods created, not yet seen: (gpus, when)
_node_views: dict[str, jobstate.NodeView] = {}


def _wake(namespace: str | None, name: str | None) -> None:
    if name:
        _loops.wake(namespace, name)


# --- indices (kopf keeps them current from its watch streams) ------------------------

@kopf.index("pods", labels={LABEL_JOB: kopf.PRESENT, LABEL_ROLE: ROLE_WORKER})
def lepton_job_workers(namespace: str, labels: dict, body: kopf.Body, **_: Any):
    """(namespace, job) -> PodView of each worker pod."""
    return {(namespace, labels[LABEL_JOB]): jobstate.pod_view(body)}


@kopf.index("pods", labels={LABEL_JOB: kopf.PRESENT, LABEL_ROLE: ROLE_RDZV})
def lepton_job_rdzv_pods(namespace: str, labels: dict, name: str, **_: Any):
    """(namespace, job) -> rendezvous pod name."""
    return {(namespace, labels[LABEL_JOB]): name}


@kopf.index("services", labels={LABEL_JOB: kopf.PRESENT})
def lepton_job_services(namespace: str, labels: dict, name: str, **_: Any):
    """(namespace, job) -> Service names."""
    return {(namespace, labels[LABEL_JOB]): name}


@kopf.index("pods")
def lepton_gpu_usage(spec: dict, status: dict, **_: Any):
    """node name (None: not bound yet) -> GPUs requested by each non-terminal pod."""
    gpus = jobstate._gpus(spec)
    if not gpus or (status or {}).get("phase") in ("Succeeded", "Failed"):
        return None
    return {spec.get("nodeName"): gpus}


@kopf.index("nodes")
def lepton_gpu_nodes(body: kopf.Body, name: str, **_: Any):
    """node name -> NodeView (GPU nodes only)."""
    view = jobstate.node_view(body)
    return {name: view} if view.gpus else None


# --- wake-ups ------------------------------------------------------------------------

@kopf.on.event("pods", labels={LABEL_JOB: kopf.PRESENT})
def _pod_changed(namespace: str, labels: dict, name: str, type: str, **_: Any) -> None:
    _reserved_gpus.pop((namespace, name), None)
    _wake(namespace, labels.get(LABEL_JOB))
    if type == "DELETED" or labels.get(LABEL_ROLE) == ROLE_WORKER:
        _wake_waiting_for_capacity()


@kopf.on.event("nodes")
def _node_changed(body: kopf.Body, name: str, type: str, **_: Any) -> None:
    view = None if type == "DELETED" else jobstate.node_view(body)
    if _node_views.get(name) != view:          # ignore heartbeats; react to capacity changes
        _node_views[name] = view
        _wake_waiting_for_capacity()


@kopf.on.event(GROUP, VERSION, JOB_PLURAL)
def _job_changed(namespace: str, name: str, **_: Any) -> None:
    _wake(namespace, name)


def _wake_waiting_for_capacity() -> None:
    _loops.wake_all()


# --- the per-job loop -----------------------------------------------------------------

@kopf.daemon(GROUP, VERSION, JOB_PLURAL, cancellation_timeout=5.0)
async def lepton_job(body: kopf.Body, uid: str, stopped: kopf.DaemonStopped,
                     logger: logging.Logger, **kwargs: Any) -> None:
    """Reconcile one LeptonJob until it is deleted."""
    await _loops.run(body, uid, stopped, lambda memory: _reconcile(body, memory, kwargs, logger))


def _owner(body: kopf.Body) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": JOB_KIND,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                         "generation": meta.get("generation")}}


async def _cluster_problems(spec: JobSpec, namespace: str, generation: int, memory: _JobMemory,
                            nodes: Iterable[jobstate.NodeView]) -> list[str]:
    """Spec problems only the cluster can reveal: missing PVCs, GPUs no node can ever give."""
    problems = []
    for claim in spec.claim_names:
        if (generation, claim) in memory.claims_seen:
            continue
        if await kube.aio(kube.get, "v1", "PersistentVolumeClaim", claim, namespace) is None:
            problems.append(f"PersistentVolumeClaim {claim!r} does not exist in namespace {namespace!r}")
        else:
            memory.claims_seen.add((generation, claim))
    if spec.resources.gpus:
        _, largest = jobstate.worker_slots(nodes, {}, spec.resources.gpus, spec.node_selector,
                                           training._tolerations(spec))
        if largest < spec.resources.gpus:
            problems.append(f"resources.gpus={spec.resources.gpus} per worker, but the largest node "
                            f"that matches nodeSelector/tolerations has {largest} GPUs: no node can "
                            "ever run a worker")
    return problems


async def _write_status(body: kopf.Body, memory: _JobMemory, new: dict[str, Any]) -> None:
    patch = st.status_changed(memory.status, new)
    meta = body["metadata"]
    if patch:
        await kube.aio(kube.patch_status, API_VERSION, JOB_KIND, meta["name"], meta["namespace"], patch)
        memory.status = new
    metrics.JOB_PHASES.set((meta["namespace"], meta["name"]), new.get("phase"))


async def _events(body: kopf.Body, events: list[tuple[str, str, str]]) -> None:
    involved = dict(body)
    await asyncio.gather(*(kube.aio(kube.emit_event, involved, *event) for event in events))


async def _report_invalid(body: kopf.Body, memory: _JobMemory, problems: list[str],
                          logger: logging.Logger) -> None:
    message = "invalid spec: " + "; ".join(problems)
    gen = body["metadata"].get("generation")
    new = dict(memory.status)
    new.setdefault("phase", PHASE_PENDING)
    new["conditions"] = st.set_health(new.get("conditions"), ready=False, stalled=True,
                                      reason=REASON_INVALID_SPEC, message=message,
                                      observed_generation=gen)
    new["observedGeneration"] = gen
    await _write_status(body, memory, new)
    if memory.invalid_message != message:
        memory.invalid_message = message
        logger.warning(message)
        await _events(body, [(EVENT_WARNING, REASON_INVALID_SPEC, message)])


async def _reconcile(body: kopf.Body, memory: _JobMemory, indices: dict[str, Any],
                     logger: logging.Logger) -> float | None:
    settings = config.get()
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    key = (namespace, name)
    nodes = [v for store in indices["lepton_gpu_nodes"].values() for v in store]
    terminal = memory.status.get("phase") in TERMINAL_PHASES
    try:
        spec = parse_job(name, body.get("spec"), settings.trainer_image)
        if not terminal:
            problems = await _cluster_problems(spec, namespace, generation, memory, nodes)
            if problems:
                raise InvalidSpec(problems)
    except InvalidSpec as exc:
        await _report_invalid(body, memory, exc.problems, logger)
        return None
    memory.invalid_message = None

    # Observed workers, corrected for what the index has not caught up with yet.
    now_mono = time.monotonic()
    pods = {p.name: p for p in indices["lepton_job_workers"].get(key, [])}
    current_uids = {p.uid for p in pods.values()}
    memory.deleted &= current_uids
    memory.created = {n: t for n, t in memory.created.items()
                      if n not in pods and now_mono - t < PENDING_CREATE_TTL}
    views = [dataclasses.replace(p, deleting=True) if p.uid in memory.deleted else p
             for p in pods.values()]
    views += [jobstate.PodView(name=n, uid="", index=int(n.rsplit("-", 1)[1]), phase="Pending",
                               gpus=spec.resources.gpus) for n in memory.created]
    # Active workers that are gone or going without the operator deleting them (drain,
    # eviction through the API, kubectl delete) were disrupted.
    by_uid = {p.uid: p for p in pods.values()}
    vanished = sum(1 for uid in memory.known_active
                   if uid not in by_uid or (by_uid[uid].deleting and uid not in memory.deleted))
    memory.handled &= current_uids

    usage = indices["lepton_gpu_usage"]
    used = {node: sum(store) for node, store in usage.items() if node}
    unscheduled = sum(usage.get(None, [])) + sum(g for g, t in _reserved_gpus.values()
                                                 if now_mono - t < PENDING_CREATE_TTL)
    slots, _ = jobstate.worker_slots(nodes, used, spec.resources.gpus, spec.node_selector,
                                     training._tolerations(spec), unscheduled)

    owner = _owner(body)
    template = training.worker_pod(owner, spec, 0)["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
    plan = jobstate.plan_job(meta, spec, memory.status, views, slots,
                             _dt.datetime.now(_dt.timezone.utc), memory.handled, vanished,
                             training.worker_selector(name), template)

    # Restart counts are made durable before the pods they count are deleted.
    if plan.counted_uids or vanished or plan.delete_job:
        await _write_status(body, memory, plan.status)
    memory.handled |= plan.counted_uids
    if plan.delete_job:
        await _events(body, plan.events)
        await kube.aio(kube.delete, API_VERSION, JOB_KIND, name, namespace)
        return None

    to_delete = [n for n in plan.delete if n in pods or n in memory.created]
    for pod_name in to_delete:
        if pod_name in pods:
            memory.deleted.add(pods[pod_name].uid)
        memory.created.pop(pod_name, None)
    creates = []
    if plan.status.get("phase") not in TERMINAL_PHASES:
        creates += _missing_shared_children(owner, spec, settings.trainer_image, indices, key, memory)
    elif plan.delete_rendezvous and indices["lepton_job_rdzv_pods"].get(key):
        to_delete.append(training.rdzv_name(name))
    for index in plan.create:
        pod = training.worker_pod(owner, spec, index)
        memory.created[pod["metadata"]["name"]] = time.monotonic()
        if spec.resources.gpus:
            _reserved_gpus[(namespace, pod["metadata"]["name"])] = (spec.resources.gpus, time.monotonic())
        creates.append(pod)
    # Independent writes go out together (the API client is thread-safe).
    await asyncio.gather(*(kube.aio(kube.create, obj) for obj in creates),
                         *(kube.aio(kube.delete, "v1", "Pod", n, namespace) for n in to_delete))
    await _write_status(body, memory, plan.status)
    await _events(body, plan.events)
    memory.known_active = {p.uid: p.name for p in pods.values()
                           if p.active and p.uid not in memory.deleted}
    return plan.requeue_after


def _missing_shared_children(owner: dict[str, Any], spec: JobSpec, trainer_image: str,
                             indices: dict[str, Any], key: tuple[str, str],
                             memory: _JobMemory) -> list[dict[str, Any]]:
    """The rendezvous pod and Services that the indices do not show (and were not just created)."""
    now = time.monotonic()
    seen = {("Service", n) for n in indices["lepton_job_services"].get(key, [])}
    seen |= {("Pod", n) for n in indices["lepton_job_rdzv_pods"].get(key, [])}
    rdzv_pod, rdzv_service = training.rendezvous_objects(owner, spec, trainer_image)
    missing = []
    for obj in (rdzv_service, training.workers_service(owner), rdzv_pod):
        ident = (obj["kind"], obj["metadata"]["name"])
        if ident in seen:
            memory.children.pop(ident, None)
        elif now - memory.children.get(ident, -PENDING_CREATE_TTL) >= PENDING_CREATE_TTL:
            memory.children[ident] = now
            missing.append(obj)
    return missing
