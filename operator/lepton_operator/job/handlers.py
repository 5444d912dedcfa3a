"""LeptonJob handlers: kopf indices feed one reconcile loop per job.

Each LeptonJob gets a kopf daemon that reconciles whenever the job, one of its pods or
the GPU capacity changes (watch events wake it), and at the latest after the resync
period, the next deadline or TTL, or the next autoscaler tick. A reconcile reads as its
steps: parse, observe the workers, measure capacity, plan (``job.state``), make the
counted restarts durable, apply (pods, Services and, with ``spec.networkPolicy``, the
NetworkPolicies), autoscale (``job.autoscale``), report. A worker that was active and is
gone or going is reported to the job's rendezvous store at once (``_report_lost``), so
that the others re-form without waiting out its keep-alive. Reads come
from kopf indices, fed by the watch streams kopf already holds, so a reconcile that
changes nothing makes no API request; writes go through ``core.kube``. The loop is the
only writer of the job's status.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import datetime as _dt
import functools
import logging
import time
from typing import Any, Iterable

import kopf
from lepton_trainer import contract, rendezvous

from .. import config, metrics
from ..constants import (ANNOTATION_SPEC_HASH, API_VERSION, GROUP, JOB_KIND, JOB_PLURAL, LABEL_JOB, LABEL_MANAGED_BY,
                         LABEL_ROLE, MANAGED_BY, PHASE_PENDING, ROLE_RDZV, ROLE_WORKER, TERMINAL_PHASES, VERSION)
from ..core import kube
from ..core import status as st
from ..core.fields import InvalidSpec
from ..core.loop import Memory, ReconcileLoops
from ..core.objects import gpus_requested, policy_changes
from ..scaling import prometheus
from . import autoscale, gpu_usage, objects, state
from .spec import JobSpec, parse_job

PENDING_CREATE_TTL = 30.0     # seconds a created pod may take to show up in the index
REPORT_TIMEOUT = 3.0          # seconds for one report of lost workers to a rendezvous store


@dataclasses.dataclass
class JobMemory(Memory):
    """What one job's loop remembers between reconciles (the status it wrote is the truth;
    which failed pods are already counted and which workers were active are part of it,
    see ``state.COUNTED_POD_UIDS`` and ``state.ACTIVE_WORKER_UIDS``)."""
    deleted: set[str] = dataclasses.field(default_factory=set)          # pod uids we deleted
    created: dict[str, tuple[int, float]] = dataclasses.field(default_factory=dict)  # name -> (index, monotonic)
    children: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)  # created, unseen
    claims_seen: set[tuple[int, str]] = dataclasses.field(default_factory=set)
    addrs: dict[str, str] = dataclasses.field(default_factory=dict)     # uid -> IP of active workers
    autoscaler: autoscale.AutoscalerMemory = dataclasses.field(default_factory=autoscale.AutoscalerMemory)

    @property
    def known_active(self) -> frozenset[str]:
        """The uids of the workers active at the last status written (by this process, or
        by the one before it when this memory was just built from the job's status).
        Read from that status rather than kept beside it, the workers vanished ones are
        counted from and the counts go together: a status write that fails leaves both
        as they were. A status without the field (an older operator's) lists none."""
        return frozenset(self.status.get(state.ACTIVE_WORKER_UIDS) or ())


_loops = ReconcileLoops(JOB_KIND, lambda status: JobMemory(status=status, phases=metrics.JOBS_BY_PHASE),
                        pending_phase=PHASE_PENDING, coalesce_seconds=0.2)
_reserved_gpus: dict[tuple[str, str], tuple[int, float]] = {}  # pods created, not yet seen: (gpus, when)
_node_views: dict[str, state.NodeView] = {}


def _wake(namespace: str | None, name: str | None) -> None:
    if name:
        _loops.wake(namespace, name)


# --- indices (kopf keeps them current from its watch streams) ------------------------

@kopf.index("pods", labels={LABEL_JOB: kopf.PRESENT, LABEL_ROLE: ROLE_WORKER})
def lepton_job_workers(namespace: str, labels: dict, body: kopf.Body, **_: Any):
    """(namespace, job) -> PodView of each worker pod."""
    return {(namespace, labels[LABEL_JOB]): state.pod_view(body)}


@kopf.index("pods", labels={LABEL_JOB: kopf.PRESENT, LABEL_ROLE: ROLE_RDZV})
def lepton_job_rdzv_pods(namespace: str, labels: dict, name: str, body: kopf.Body, **_: Any):
    """(namespace, job) -> (rendezvous pod name, its StoreView)."""
    return {(namespace, labels[LABEL_JOB]): (name, state.store_view(body))}


@kopf.index("services", labels={LABEL_JOB: kopf.PRESENT})
def lepton_job_services(namespace: str, labels: dict, name: str, **_: Any):
    """(namespace, job) -> Service names."""
    return {(namespace, labels[LABEL_JOB]): name}


@kopf.index("networking.k8s.io", "v1", "networkpolicies",
            labels={LABEL_JOB: kopf.PRESENT, LABEL_MANAGED_BY: MANAGED_BY})
def lepton_job_network_policies(namespace: str, labels: dict, name: str, annotations: dict, **_: Any):
    """(namespace, job) -> (NetworkPolicy name, its spec hash)."""
    return {(namespace, labels[LABEL_JOB]): (name, annotations.get(ANNOTATION_SPEC_HASH, ""))}


@kopf.index("autoscaling.x-k8s.io", "v1", "provisioningrequests", labels={LABEL_JOB: kopf.PRESENT})
def lepton_job_capacity_requests(namespace: str, labels: dict, body: kopf.Body, **_: Any):
    """(namespace, job) -> CapacityRequestView of its ProvisioningRequest (capacity.mode
    provisioningRequest; where the cluster autoscaler's CRD is not installed, kopf serves
    no such resource and the index stays empty)."""
    return {(namespace, labels[LABEL_JOB]): state.capacity_request_view(body)}


@kopf.on.event("autoscaling.x-k8s.io", "v1", "provisioningrequests", labels={LABEL_JOB: kopf.PRESENT})
def _capacity_request_changed(namespace: str, labels: dict, **_: Any) -> None:
    _wake(namespace, labels.get(LABEL_JOB))


@kopf.index("pods")
def lepton_gpu_usage(spec: dict, status: dict, **_: Any):
    """node name (None: not bound yet) -> GPUs requested by each non-terminal pod."""
    gpus = gpus_requested(spec)
    if not gpus or (status or {}).get("phase") in ("Succeeded", "Failed"):
        return None
    return {spec.get("nodeName"): gpus}


@kopf.index("nodes")
def lepton_gpu_nodes(body: kopf.Body, name: str, **_: Any):
    """node name -> NodeView (GPU nodes only)."""
    view = state.node_view(body)
    return {name: view} if view.gpus else None


# --- wake-ups ------------------------------------------------------------------------

@kopf.on.event("pods", labels={LABEL_JOB: kopf.PRESENT})
def _pod_changed(namespace: str, labels: dict, name: str, type: str, status: dict, **_: Any) -> None:
    _reserved_gpus.pop((namespace, name), None)
    _wake(namespace, labels.get(LABEL_JOB))
    if type == "DELETED" or (status or {}).get("phase") in ("Succeeded", "Failed"):
        _wake_waiting_for_capacity()          # its GPUs are free (or about to be)


@kopf.on.event("networking.k8s.io", "v1", "networkpolicies",
               labels={LABEL_JOB: kopf.PRESENT, LABEL_MANAGED_BY: MANAGED_BY})
def _network_policy_changed(namespace: str, labels: dict, **_: Any) -> None:
    _wake(namespace, labels.get(LABEL_JOB))     # a policy changed or deleted by hand is restored


@kopf.on.event("nodes")
def _node_changed(body: kopf.Body, name: str, type: str, **_: Any) -> None:
    view = None if type == "DELETED" else state.node_view(body)
    if _node_views.get(name) != view:          # ignore heartbeats; react to capacity changes
        _node_views[name] = view
        _wake_waiting_for_capacity()


@kopf.on.event(GROUP, VERSION, JOB_PLURAL)
def _job_changed(namespace: str, name: str, **_: Any) -> None:
    _wake(namespace, name)


# Jobs whose last plan wanted more workers than the free GPUs allowed. Only they are woken
# when GPUs are released or nodes change: waking every job on every pod event makes the
# reconciles grow with the square of the number of jobs.
_waiting_for_capacity: set[tuple[str, str]] = set()


def _wake_waiting_for_capacity() -> None:
    for namespace, name in list(_waiting_for_capacity):
        _loops.wake(namespace, name)


_cluster_usage: gpu_usage.ClusterGpuUsage | None = None


@kopf.on.startup()
async def _start_cluster_gpu_usage(**_: Any) -> None:
    """Watching named namespaces, count the GPUs of every namespace's pods (see gpu_usage)."""
    global _cluster_usage
    settings = config.get()
    if settings.all_namespaces or not settings.cluster_gpu_usage:
        return
    loop = asyncio.get_running_loop()
    _cluster_usage = gpu_usage.ClusterGpuUsage(lambda: loop.call_soon_threadsafe(_wake_waiting_for_capacity))
    _cluster_usage.start()
    # Handlers start after the startup activities: give the first list its chance, so the
    # first placements already see every namespace's GPUs.
    if not await loop.run_in_executor(None, _cluster_usage.synced.wait, gpu_usage.SYNC_WAIT_SECONDS):
        logging.getLogger("lepton_operator").warning(
            "cluster-wide GPU usage not listed within %ss (is list/watch of pods cluster-wide granted?); "
            "counting the watched namespaces' pods until it is", gpu_usage.SYNC_WAIT_SECONDS)


# --- the per-job loop -----------------------------------------------------------------

@kopf.daemon(GROUP, VERSION, JOB_PLURAL, cancellation_timeout=5.0)
async def lepton_job(body: kopf.Body, uid: str, stopped: kopf.DaemonStopped,
                     logger: logging.Logger, **kwargs: Any) -> None:
    """Reconcile one LeptonJob until it is deleted."""
    try:
        await _loops.run(body, uid, stopped, logger, lambda memory: _reconcile(body, memory, kwargs, logger))
    finally:
        if stopped:
            _waiting_for_capacity.discard((body["metadata"]["namespace"], body["metadata"]["name"]))


def _owner(body: kopf.Body) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": JOB_KIND,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                         "generation": meta.get("generation")}}


@dataclasses.dataclass
class _Observed:
    """The job's workers as the plan should see them."""
    pods: dict[str, state.PodView]      # by name, from the index
    views: list[state.PodView]          # corrected for deletes and creates not yet seen
    vanished: int


async def _cluster_problems(spec: JobSpec, namespace: str, generation: int, memory: JobMemory,
                            nodes: Iterable[state.NodeView]) -> list[str]:
    """Spec problems only the cluster can reveal: missing PVCs, GPUs no node can ever give."""
    problems = []
    for claim in spec.claim_names:
        if (generation, claim) in memory.claims_seen:
            continue
        if await kube.aio(kube.get, "v1", "PersistentVolumeClaim", claim, namespace) is None:
            problems.append(f"PersistentVolumeClaim {claim!r} does not exist in namespace {namespace!r}")
        else:
            memory.claims_seen.add((generation, claim))
    if spec.resources.gpus and spec.capacity.mode == "observed":
        _, largest = state.worker_slots(nodes, {}, spec.resources.gpus, spec.node_selector,
                                        objects.tolerations(spec))
        if largest < spec.resources.gpus:
            problems.append(f"resources.gpus={spec.resources.gpus} per worker, but the largest node "
                            f"that matches nodeSelector/tolerations has {largest} GPUs: no node can "
                            "ever run a worker")
    return problems


def _observe(spec: JobSpec, memory: JobMemory, pods: Iterable[state.PodView]) -> _Observed:
    """Workers from the index, corrected for what it has not caught up with yet: pods the
    operator deleted look deleting, pods it created look Pending. Active workers that are
    gone or going without the operator deleting them (drain, eviction through the API,
    kubectl delete) were disrupted."""
    now = time.monotonic()
    by_name = {p.name: p for p in pods}
    current_uids = {p.uid for p in by_name.values()}
    memory.deleted &= current_uids
    memory.created = {n: (i, t) for n, (i, t) in memory.created.items()
                      if n not in by_name and now - t < PENDING_CREATE_TTL}
    views = [dataclasses.replace(p, deleting=True) if p.uid in memory.deleted else p for p in by_name.values()]
    views += [state.PodView(name=n, uid="", index=i, phase="Pending", gpus=spec.resources.gpus)
              for n, (i, _) in memory.created.items()]
    by_uid = {p.uid: p for p in by_name.values()}
    vanished = sum(1 for uid in memory.known_active
                   if uid not in by_uid or (by_uid[uid].deleting and uid not in memory.deleted))
    return _Observed(by_name, views, vanished)


def _lost_workers(memory: JobMemory, observed: _Observed) -> list[str]:
    """The IPs of the workers that were active at the last reconcile and are not now (the
    operator deleted them, or they failed, are being deleted or are gone; a worker that
    succeeded is not lost); remembers the active ones' IPs for the next reconcile."""
    active = {p.uid: p.ip for p in observed.pods.values() if p.active and p.ip and p.uid not in memory.deleted}
    succeeded = {p.uid for p in observed.pods.values() if p.phase == "Succeeded"}
    lost = sorted({ip for uid, ip in memory.addrs.items() if uid not in active and uid not in succeeded}
                  - set(active.values()))
    memory.addrs = active
    return lost


# Reports wait on the network (DNS, the store's pod), never on the API client's threads.
_report_executor = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="rdzv-report")
_report_tasks: set[asyncio.Task] = set()


def _report_lost(namespace: str, job: str, uid: str, addrs: list[str], min_nodes: int,
                 logger: logging.Logger) -> None:
    """Tell the job's rendezvous store (``POST /v1/forget`` on its Service) that the agents
    at ``addrs`` are gone, without holding up the reconcile. Best effort: a report that
    does not arrive leaves the keep-alive timeout to drop them."""
    url = f"http://{objects.rdzv_name(job)}.{namespace}.svc:{contract.RDZV_CONTROL_PORT}"

    async def send() -> None:
        call = functools.partial(rendezvous.forget, url, uid, addrs, min_nodes, timeout=REPORT_TIMEOUT)
        try:
            answer = await asyncio.get_running_loop().run_in_executor(_report_executor, call)
        except Exception as exc:  # noqa: BLE001 (any failure of a best-effort report)
            metrics.RDZV_REPORTS.labels("failed").inc()
            logger.info("Lost workers %s not reported to %s (%s): the others re-form after the "
                        "keep-alive timeout", ", ".join(addrs), url, exc)
            return
        forgotten = answer.get("forgotten") or []
        metrics.RDZV_REPORTS.labels("forgotten" if forgotten else "unknown").inc()
        if forgotten:
            logger.info("Lost workers %s reported: the rendezvous store dropped %s (round %s)",
                        ", ".join(addrs), ", ".join(forgotten), answer.get("round"))

    task = asyncio.create_task(send())
    _report_tasks.add(task)
    task.add_done_callback(_report_tasks.discard)


def _free_slots(spec: JobSpec, indices: dict[str, Any], nodes: list[state.NodeView]) -> tuple[int, bool]:
    """(workers of this spec that fit on the GPUs free now, whether no current node can
    hold one at all). Pods created but not yet seen hold their GPUs for a while, so two
    jobs never count the same GPUs."""
    now = time.monotonic()
    # Cluster-wide once its first list is in (namespaced mode), else the watched namespaces'.
    usage = _cluster_usage.usage() if _cluster_usage and _cluster_usage.synced.is_set() else indices["lepton_gpu_usage"]
    used = {node: sum(store) for node, store in usage.items() if node}
    unscheduled = sum(usage.get(None, [])) + sum(g for g, t in _reserved_gpus.values()
                                                 if now - t < PENDING_CREATE_TTL)
    slots, largest = state.worker_slots(nodes, used, spec.resources.gpus, spec.node_selector,
                                        objects.tolerations(spec), unscheduled)
    return slots, bool(spec.resources.gpus) and largest < spec.resources.gpus


def _writes(owner: dict[str, Any], spec: JobSpec, plan: state.Plan, observed: _Observed, memory: JobMemory,
            indices: dict[str, Any], key: tuple[str, str], trainer_image: str) -> tuple[list, list[str]]:
    """(objects to create, worker pod names to delete) for a plan, recorded in memory."""
    namespace, name = key
    to_delete = [n for n in plan.delete if n in observed.pods or n in memory.created]
    for pod_name in to_delete:
        if pod_name in observed.pods:
            memory.deleted.add(observed.pods[pod_name].uid)
        memory.created.pop(pod_name, None)
    creates = []
    if plan.status.get("phase") not in TERMINAL_PHASES:
        creates += _missing_shared_children(owner, spec, trainer_image, indices, key, memory)
    elif plan.delete_rendezvous and indices["lepton_job_rdzv_pods"].get(key):
        to_delete.append(objects.rdzv_name(name))
    for index in plan.create:
        pod = objects.worker_pod(owner, spec, index)
        if plan.consume:
            objects.consume(pod, plan.consume, spec)
        pod_name = pod["metadata"]["name"]
        memory.created[pod_name] = (index, time.monotonic())
        if spec.resources.gpus:
            _reserved_gpus[(namespace, pod_name)] = (spec.resources.gpus, time.monotonic())
        creates.append(pod)
    return creates, to_delete


async def _reconcile(body: kopf.Body, memory: JobMemory, indices: dict[str, Any],
                     logger: logging.Logger) -> float | None:
    settings = config.get()
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    key = (namespace, name)
    nodes = [v for store in indices["lepton_gpu_nodes"].values() for v in store]

    # Parse: a spec no retry will fix is reported once and waits for the next change.
    try:
        spec = parse_job(name, body.get("spec"), settings.trainer_image, settings.image_pull_policy)
        if memory.status.get("phase") not in TERMINAL_PHASES:
            problems = prometheus.unavailable(["spec.autoscaling"] if spec.autoscaling else [])
            problems += await _cluster_problems(spec, namespace, generation, memory, nodes)
            if problems:
                raise InvalidSpec(problems)
    except InvalidSpec as exc:
        await st.report_invalid(body, memory, exc.problems, PHASE_PENDING, logger)
        return None
    memory.invalid_message = None

    # Observe, measure, plan.
    observed = _observe(spec, memory, indices["lepton_job_workers"].get(key, []))
    store = next((v for _, v in indices["lepton_job_rdzv_pods"].get(key, [])), state.MISSING_STORE)
    lost = _lost_workers(memory, observed)
    if lost and settings.reports_lost_workers and not spec.per_step and store.ready and not store.deleting \
            and memory.status.get("phase") not in TERMINAL_PHASES:
        _report_lost(namespace, name, meta["uid"], lost, spec.workers.min, logger)
    slots, no_node_fits = _free_slots(spec, indices, nodes)
    plan = state.plan_job(meta, spec, memory.status, observed.views, slots,
                          _dt.datetime.now(_dt.timezone.utc), (), observed.vanished,
                          objects.worker_selector(name), objects.template_hash(spec), no_node_fits, store,
                          next(iter(indices.get("lepton_job_capacity_requests", {}).get(key, [])), None))

    # Restart counts, and the uids of the failed pods they count, are made durable in one
    # status patch before those pods are deleted: a restart in between counts nothing twice.
    # The same patch carries the workers still active (state.ACTIVE_WORKER_UIDS), without
    # those counted as vanished now and without those about to be deleted (scale-down,
    # template change, suspend, a finished job): a restarted operator counts as vanished
    # only the workers it had listed, so a worker this reconcile deletes must have left
    # the list before its DELETE. Recovering that intent after a restart instead would
    # mean guessing why a pod is going. A reconcile that deletes no listed worker makes
    # no such patch; one that does makes the status write it would make after the deletes
    # before them instead (a second one follows only when the autoscaler changes the
    # status too). Killed after the patch and before the DELETE, the worker is listed
    # again by the next reconcile unless that one deletes it; gone on its own meanwhile,
    # it is not counted.
    old_conditions = memory.status.get("conditions")
    deleting = {observed.pods[n].uid for n in plan.delete if n in observed.pods}
    if plan.counted_uids or observed.vanished or plan.delete_job or deleting & memory.known_active:
        await st.write(body, memory, plan.status)
    if plan.delete_job:
        await st.emit(body, memory, plan.events, logger)
        await kube.aio(kube.delete, API_VERSION, JOB_KIND, name, namespace)
        return None

    # Apply: independent writes go out together (the API client is thread-safe).
    owner = _owner(body)
    creates, to_delete = _writes(owner, spec, plan, observed, memory, indices, key, settings.trainer_image)
    policies, stale_policies = _network_policy_writes(owner, spec, indices, key, memory)
    results = await asyncio.gather(*(kube.aio(kube.create, obj) for obj in creates),
                                   *(kube.aio(kube.delete, "v1", "Pod", n, namespace) for n in to_delete),
                                   *(kube.aio(kube.apply, obj) for obj in policies),
                                   *(kube.aio(kube.delete, "networking.k8s.io/v1", "NetworkPolicy", n, namespace)
                                     for n in stale_policies),
                                   _capacity_request_writes(owner, spec, plan), return_exceptions=True)
    for obj, result in zip(creates, results):
        # None (409): a pod of that name still exists (the one being replaced); an error:
        # no pod. Either way the memory of the create would hide the missing worker; its
        # DELETED event, or the next reconcile, brings it back.
        pod_name = obj["metadata"]["name"]
        if (result is None or isinstance(result, BaseException)) and obj["kind"] == "Pod" \
                and pod_name in memory.created:
            memory.created.pop(pod_name)
            _reserved_gpus.pop((namespace, pod_name), None)
        if isinstance(result, BaseException):
            memory.children.pop((obj["kind"], pod_name), None)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:   # a refused child first: it is reported, the others are retried
        raise next((r for r in failed if isinstance(r, kube.Refused)), failed[0])

    if plan.capacity_short:
        _waiting_for_capacity.add(key)
    else:
        _waiting_for_capacity.discard(key)

    # Autoscale, then report.
    tick = await autoscale.tick(body, spec, memory, memory.autoscaler, plan.status, slots, logger)
    await st.write(body, memory, plan.status)
    decided = {reason for _, reason, _ in plan.events}
    waits = [e for e in st.transition_events(old_conditions, plan.status["conditions"]) if e[1] not in decided]
    await st.emit(body, memory, plan.events + waits, logger)
    delays = [d for d in (plan.requeue_after, tick) if d is not None]
    return min(delays) if delays else None


def _network_policy_writes(owner: dict[str, Any], spec: JobSpec, indices: dict[str, Any], key: tuple[str, str],
                           memory: JobMemory) -> tuple[list[dict[str, Any]], list[str]]:
    """(NetworkPolicies to apply, names of the job's policies to delete): the ones the
    spec asks for that the index does not show as they are, and the ones it no longer
    asks for (``networkPolicy.enabled: false``)."""
    present = dict(indices.get("lepton_job_network_policies", {}).get(key, []))
    return policy_changes(objects.network_policies(owner, spec, config.get().operator_namespace), present,
                          memory.policies, time.monotonic())


async def _capacity_request_writes(owner: dict[str, Any], spec: JobSpec, plan: state.Plan) -> None:
    """capacity.mode provisioningRequest: ask for the gang (the worker PodTemplate, then
    the ProvisioningRequest naming it), or give a request back (consumed, failed, expired,
    or the job finished)."""
    namespace, job = owner["metadata"]["namespace"], owner["metadata"]["name"]
    if plan.request_capacity:
        template, request = objects.capacity_request(owner, spec, plan.request_capacity)
        await kube.aio(kube.apply, template)
        await kube.aio(kube.create, request)
    elif plan.delete_capacity_request:
        name = objects.capacity_request_name(job)
        await kube.aio(kube.delete, objects.PROVISIONING_API_VERSION, "ProvisioningRequest", name, namespace)
        await kube.aio(kube.delete, "v1", "PodTemplate", name, namespace)


def _missing_shared_children(owner: dict[str, Any], spec: JobSpec, trainer_image: str,
                             indices: dict[str, Any], key: tuple[str, str],
                             memory: JobMemory) -> list[dict[str, Any]]:
    """The rendezvous pod and Services that the indices do not show (and were not just created)."""
    now = time.monotonic()
    seen = {("Service", n) for n in indices["lepton_job_services"].get(key, [])}
    seen |= {("Pod", n) for n, _ in indices["lepton_job_rdzv_pods"].get(key, [])}
    rdzv_pod, rdzv_service = objects.rendezvous_objects(owner, spec, trainer_image)
    missing = []
    for obj in (rdzv_service, objects.workers_service(owner), rdzv_pod):
        ident = (obj["kind"], obj["metadata"]["name"])
        if ident in seen:
            memory.children.pop(ident, None)
        elif now - memory.children.get(ident, -PENDING_CREATE_TTL) >= PENDING_CREATE_TTL:
            memory.children[ident] = now
            missing.append(obj)
    return missing
