"""What one LeptonJob's reconcile sees: every read, in one frozen ``JobObserved``.

Reads come from kopf's indices (fed by the watch streams kopf already holds), from
``capacity.Capacity`` and from the loop's own memory of its recent writes, so a
reconcile that changes nothing makes no API request. The few reads an index cannot
serve are here too: a PersistentVolumeClaim the spec names (once per generation and
claim), the autoscaler's Prometheus sample (only when a tick is due) and the store's
Secret (no index watches Secrets: its token is kept in the memory once the loop created or
read it, and read when a plan needs it and the memory has none, as after a restart).

The index lags the operator's own writes by a moment. ``JobMemory`` keeps what the loop
wrote until the watch shows it (pods created or deleted, shared children created,
NetworkPolicies applied) and ``remember`` records a reconcile's writes into it; the
observation is corrected with it (``workers``), as controller-runtime's expectations do.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import secrets
import time
from typing import Any, Iterable, Mapping

from lepton_trainer import contract

from .. import config, metrics
from ..constants import PHASE_RUNNING, PHASE_SUSPENDED, TERMINAL_PHASES
from ..core import kube
from ..core.execute import Result
from ..core.fields import InvalidSpec
from ..core.loop import Memory
from ..scaling import prometheus
from . import autoscale, fit, objects, progress, state
from .capacity import PENDING_CREATE_TTL, Capacity
from .spec import JobSpec, parse_job

Indices = Mapping[str, Mapping[Any, Any]]


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
    progress: progress.Progress = progress.Progress()
    rdzv_token: str | None = dataclasses.field(default=None, repr=False)   # the store's, once known

    @property
    def known_active(self) -> frozenset[str]:
        """The uids of the workers active at the last status written (by this process, or
        by the one before it when this memory was just built from the job's status).
        Read from that status rather than kept beside it, the workers vanished ones are
        counted from and the counts go together: a status write that fails leaves both
        as they were."""
        return state.known_active(self.status)


def new_memory(status: Mapping[str, Any]) -> JobMemory:
    """The memory of a loop that starts now, from the status last written."""
    return JobMemory(status=dict(status), phases=metrics.JOBS_BY_PHASE)


# --- parse and the problems only the cluster can reveal ----------------------------------------

async def parse(body: Mapping[str, Any], memory: JobMemory, nodes: Iterable[fit.NodeView]) -> JobSpec:
    """The job's spec, or ``InvalidSpec`` naming every problem: the spec's own, and (while
    the job is not finished) those only the cluster reveals."""
    settings = config.get()
    meta = body["metadata"]
    spec = parse_job(meta["name"], body.get("spec"), settings.trainer_image, settings.image_pull_policy,
                     namespace=meta["namespace"])
    if memory.status.get("phase") not in TERMINAL_PHASES:
        problems = prometheus.unavailable(["spec.autoscaling"] if spec.autoscaling else [])
        problems += await _cluster_problems(spec, meta["namespace"], meta.get("generation"), memory, nodes)
        if problems:
            raise InvalidSpec(problems)
    return spec


async def _cluster_problems(spec: JobSpec, namespace: str, generation: int | None, memory: JobMemory,
                            nodes: Iterable[fit.NodeView]) -> list[str]:
    """Missing PVCs (each looked up once per generation), GPUs no node can ever give."""
    problems = []
    for claim in spec.claim_names:
        if (generation, claim) in memory.claims_seen:
            continue
        if await kube.aio(kube.get, "v1", "PersistentVolumeClaim", claim, namespace) is None:
            problems.append(f"PersistentVolumeClaim {claim!r} does not exist in namespace {namespace!r}")
        else:
            memory.claims_seen.add((generation, claim))
    if spec.resources.gpus and spec.capacity.mode == "observed":
        largest = fit.worker_fit(spec, nodes).largest_gpus
        if largest < spec.resources.gpus:
            problems.append(f"resources.gpus={spec.resources.gpus} per worker, but the largest node "
                            f"that matches nodeSelector/tolerations has {largest} GPUs: no node can "
                            "ever run a worker")
    return problems


# --- the observation ---------------------------------------------------------------------------

def node_views(indices: Indices) -> list[fit.NodeView]:
    return [v for store in indices["lepton_nodes"].values() for v in store]


def workers(spec: JobSpec, memory: JobMemory, pods: Iterable[state.PodView], now: float) -> state.Workers:
    """Workers from the index, corrected for what it has not caught up with yet: pods the
    operator deleted look deleting, pods it created look Pending. Active workers that are
    gone or going without the operator deleting them (drain, eviction through the API,
    kubectl delete) were disrupted. ``lost``: the IPs of the workers that were active at
    the last reconcile and are not now (the operator deleted them, or they failed, are
    being deleted or are gone; a worker that succeeded is not lost)."""
    by_name = {p.name: p for p in pods}
    current_uids = {p.uid for p in by_name.values()}
    deleted = memory.deleted & current_uids
    created = {n: (i, t) for n, (i, t) in memory.created.items()
               if n not in by_name and now - t < PENDING_CREATE_TTL}
    views = [dataclasses.replace(p, deleting=True) if p.uid in deleted else p for p in by_name.values()]
    views += [state.PodView(name=n, uid="", index=i, phase="Pending", gpus=spec.resources.gpus)
              for n, (i, _) in created.items()]
    by_uid = {p.uid: p for p in by_name.values()}
    vanished = sum(1 for uid in memory.known_active
                   if uid not in by_uid or (by_uid[uid].deleting and uid not in deleted))
    lost, active = lost_workers(memory.addrs, by_name.values(), deleted)
    return state.Workers(by_name, tuple(views), vanished, lost, active, frozenset(deleted), frozenset(created))


def lost_workers(addrs: Mapping[str, str], pods: Iterable[state.PodView], deleted: Iterable[str]
                 ) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the IPs of the workers in ``addrs`` (uid -> IP, active at the last reconcile) that
    are not active now, the active workers' uid -> IP to remember for the next one). A
    worker the operator deleted (``deleted``), that failed, is being deleted or is gone is
    lost; one that succeeded is not; neither is an address an active worker now has."""
    pods, deleted = list(pods), set(deleted)
    active = {p.uid: p.ip for p in pods if p.active and p.ip and p.uid not in deleted}
    succeeded = {p.uid for p in pods if p.phase == "Succeeded"}
    lost = sorted({ip for uid, ip in addrs.items() if uid not in active and uid not in succeeded}
                  - set(active.values()))
    return tuple(lost), active


def _children(indices: Indices, key: tuple[str, str], memory: JobMemory, now: float) -> frozenset:
    """The shared children (rendezvous pod, Services) the indices show, or that this loop
    created less than ``PENDING_CREATE_TTL`` ago (and the index does not show yet)."""
    seen = {("Service", n) for n in indices["lepton_job_services"].get(key, [])}
    seen |= {("Pod", n) for n, _ in indices["lepton_job_rdzv_pods"].get(key, [])}
    memory.children = {ident: t for ident, t in memory.children.items()     # shown: the index took over
                       if ident not in seen and now - t < PENDING_CREATE_TTL}
    return frozenset(seen | set(memory.children))


async def _store_secret(spec: JobSpec, meta: Mapping[str, Any], memory: JobMemory, children: frozenset,
                        lost: bool) -> state.StoreSecret | None:
    """The store's token when a plan may need it: a c10d store pod to create (its Secret
    comes first), or lost workers to report. From the memory, else read once from the
    Secret; a new random one when the Secret does not exist (the plan creates it), or when
    nothing of the job exists yet (no status, no child), without reading: should an earlier
    operator have created the Secret before it wrote any status, the create finds it (409)
    and the token is read from it when next needed."""
    name = objects.rdzv_name(meta["name"])
    if spec.per_step or spec.suspend or memory.status.get("phase") in TERMINAL_PHASES \
            or (("Pod", name) in children and not lost):
        return None
    if memory.rdzv_token:
        return state.StoreSecret(memory.rdzv_token, exists=True)
    if not memory.status and not children:
        return state.StoreSecret(secrets.token_urlsafe(32), exists=False)
    secret = await kube.aio(kube.get, "v1", "Secret", name, meta["namespace"])
    if secret is None:
        return state.StoreSecret(secrets.token_urlsafe(32), exists=False)
    memory.rdzv_token = objects.secret_token(secret) or None
    return state.StoreSecret(memory.rdzv_token or "", exists=True)


async def _sample(spec: JobSpec, meta: Mapping[str, Any], memory: JobMemory, now: float
                  ) -> prometheus.QueryResult | None:
    """The autoscaler's sample, when a tick is due and the job may scale."""
    phase = memory.status.get("phase")
    if spec.autoscaling is None or phase in TERMINAL_PHASES or phase == PHASE_SUSPENDED \
            or now < memory.autoscaler.next_tick:
        return None
    return await prometheus.client().query(autoscale.promql(spec, meta["namespace"], meta["name"]))


async def _step(meta: Mapping[str, Any], memory: JobMemory, now: float) -> prometheus.QueryResult | None:
    """The job's training step, when the job runs and its next reading is due (``job.progress``)."""
    if not config.get().prometheus_url or memory.status.get("phase") != PHASE_RUNNING \
            or now < memory.progress.next_tick:
        return None
    return await prometheus.client().query(progress.query(meta["namespace"], meta["name"]))


async def observe(body: Mapping[str, Any], spec: JobSpec, memory: JobMemory, indices: Indices,
                  capacity: Capacity) -> state.JobObserved:
    """One frozen observation of the job (see the module doc)."""
    settings = config.get()
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    mono = time.monotonic()
    seen = workers(spec, memory, indices["lepton_job_workers"].get(key, []), mono)
    store = next((v for _, v in indices["lepton_job_rdzv_pods"].get(key, [])), state.MISSING_STORE)
    fits = capacity.free_slots(spec, indices["lepton_pod_requests"], node_views(indices))
    children = _children(indices, key, memory, mono)
    return state.JobObserved(
        meta=dict(meta), status=memory.status, workers=seen, now=_dt.datetime.now(_dt.timezone.utc),
        free_slots=fits.slots, no_node_fits=fits.no_node_fits, free_capacity=fits.free, store=store,
        store_secret=await _store_secret(spec, meta, memory, children,
                                         bool(seen.lost) and settings.reports_lost_workers),
        request=next(iter(indices.get("lepton_job_capacity_requests", {}).get(key, [])), None),
        children=children,
        policies=dict(indices.get("lepton_job_network_policies", {}).get(key, [])),
        policies_applied=dict(memory.policies), monotonic=mono, template=objects.template_hash(spec),
        trainer_image=settings.trainer_image, operator_namespace=settings.operator_namespace,
        operator_pod_labels=settings.operator_pod_labels,
        reports_lost_workers=settings.reports_lost_workers,
        sample=await _sample(spec, meta, memory, mono), autoscaler=memory.autoscaler,
        progress=memory.progress, step=await _step(meta, memory, mono),
        progress_interval=settings.progress_interval if settings.prometheus_url else 0.0,
        stall_seconds=settings.stall_seconds)


# --- what the loop remembers of its own writes -------------------------------------------------

def remember(memory: JobMemory, observed: state.JobObserved, plan: "state.Plan", results: list[Result],
             capacity: Capacity) -> None:
    """Record a reconcile's writes: the pods it deleted and created (a create that failed, or
    found a pod of that name still there, is forgotten: its DELETED event, or the next
    reconcile, brings the worker back), the shared children it created, the policies it
    applied, the active workers' addresses and the autoscaler's pacing."""
    namespace = observed.meta["namespace"]
    seen = observed.workers
    memory.deleted = set(seen.deleted) | {seen.pods[n].uid for n in plan.delete if n in seen.pods}
    memory.created = {n: v for n, v in memory.created.items() if n in seen.created and n not in plan.delete}
    memory.addrs = dict(observed.workers.addrs)
    memory.policies = dict(plan.policies_applied)
    memory.autoscaler = plan.autoscaler
    memory.progress = plan.progress
    for action, result in results:
        ok = result is not None and not isinstance(result, BaseException)
        if action.verb != "create" or action.name in plan.delete:
            continue
        if action.kind == "Secret":      # created now: its token is this one (found: read when needed)
            memory.rdzv_token = action.body["stringData"][contract.RDZV_TOKEN_KEY] if ok else memory.rdzv_token
            continue
        if action.kind == "Pod" and action.name in plan.worker_names:
            if ok:
                memory.created[action.name] = (plan.worker_names[action.name], observed.monotonic)
                capacity.reserve(namespace, action.name, fit.pod_requests(action.body["spec"]))
            else:
                capacity.release(namespace, action.name)
        elif not isinstance(result, BaseException):
            memory.children[(action.kind, action.name)] = observed.monotonic
    capacity.set_waiting((namespace, observed.meta["name"]), plan.capacity_short)
