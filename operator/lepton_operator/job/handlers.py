"""LeptonJob handlers: kopf indices feed one reconcile loop per job.

Each LeptonJob gets a loop (``core.loop``: started by the job's first watch event, stopped
by its deletion; no finalizer) that reconciles whenever the job, one of its pods or the
capacity it waits for changes (watch events wake it), and at the latest after the resync
period, the next deadline or TTL, or the next autoscaler tick. A reconcile is three
stages: ``observe`` reads (kopf's indices, the loop's memory of its own writes, the
capacity every job shares, Prometheus when the autoscaler's tick is due) into one frozen
``JobObserved``; ``state.plan`` decides the whole next status and the writes; the shared
``core.execute`` applies them and writes the status once. A reconcile that changes
nothing makes no API request. The loop is the only writer of the job's status.

What every loop shares (the loops themselves, ``capacity.Capacity`` and the lost-worker
reports) is one ``JobRuntime``, made at start-up and kept in kopf's ``memo``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Mapping

import kopf

from .. import config, metrics
from ..constants import (ANNOTATION_SPEC_HASH, GROUP, JOB_KIND, JOB_PLURAL, LABEL_JOB, LABEL_MANAGED_BY,
                         LABEL_ROLE, MANAGED_BY, PHASE_PENDING, ROLE_RDZV, ROLE_WORKER, VERSION)
from ..core import status as st
from ..core.execute import execute
from ..core.fields import InvalidSpec
from ..core.loop import ReconcileLoops
from . import fit, gpu_usage, observe, state
from .capacity import Capacity
from .observe import JobMemory
from .report import LostWorkerReports


@dataclasses.dataclass
class JobRuntime:
    """What the jobs' loops share in one operator process."""
    loops: ReconcileLoops[JobMemory]
    capacity: Capacity
    reports: LostWorkerReports

    def wake(self, namespace: str | None, name: str | None) -> None:
        if name:
            self.loops.wake(namespace, name)


def new_runtime() -> JobRuntime:
    loops = ReconcileLoops(JOB_KIND, observe.new_memory, pending_phase=PHASE_PENDING, coalesce_seconds=0.2)
    return JobRuntime(loops, Capacity(wake=loops.wake), LostWorkerReports())


@kopf.on.startup()
async def _start(memo: kopf.Memo, **_: Any) -> None:
    """Make the jobs' runtime; watching named namespaces and asked to
    (``cluster_gpu_usage``), count the requests of every namespace's pods (see gpu_usage)."""
    memo.jobs = runtime = new_runtime()
    settings = config.get()
    if settings.all_namespaces or not settings.cluster_gpu_usage:
        return
    loop = asyncio.get_running_loop()
    usage = gpu_usage.ClusterGpuUsage(lambda: loop.call_soon_threadsafe(runtime.capacity.wake_waiting))
    runtime.capacity.cluster = usage
    usage.start()
    # Handlers start after the startup activities: give the first list its chance, so the
    # first placements already see every namespace's pods.
    if not await loop.run_in_executor(None, usage.synced.wait, gpu_usage.SYNC_WAIT_SECONDS):
        logging.getLogger("lepton_operator").warning(
            "cluster-wide pod requests not listed within %ss (is list/watch of pods cluster-wide granted?); "
            "counting the watched namespaces' pods until it is", gpu_usage.SYNC_WAIT_SECONDS)


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


@kopf.index("pods")
def lepton_pod_requests(body: kopf.Body, **_: Any):
    """node name (None: not bound yet) -> requests (cpu, memory, GPUs) of each pod that
    holds capacity or is about to (``fit.pod_usage``). A pod that holds none (finished,
    say) maps to nothing: ``{}`` makes kopf drop what the pod held before, where ``None``
    would keep it."""
    usage = fit.pod_usage(body)
    return {} if usage is None else {usage[0]: usage[1]}


@kopf.index("nodes")
def lepton_nodes(body: kopf.Body, name: str, **_: Any):
    """node name -> NodeView."""
    return {name: fit.node_view(body)}


# --- wake-ups ------------------------------------------------------------------------

@kopf.on.event("pods", labels={LABEL_JOB: kopf.PRESENT})
async def _pod_changed(namespace: str, labels: dict, name: str, type: str, status: dict, memo: kopf.Memo,
                 **_: Any) -> None:
    memo.jobs.capacity.release(namespace, name)
    memo.jobs.wake(namespace, labels.get(LABEL_JOB))
    if _holds_nothing(type, status):
        memo.jobs.capacity.wake_waiting()          # its capacity is free (or about to be)


@kopf.on.event("pods", labels={LABEL_JOB: kopf.ABSENT})
async def _other_pod_changed(type: str, spec: dict, status: dict, memo: kopf.Memo, **_: Any) -> None:
    """Any other pod (a model's server, a user's pod) that leaves its node frees its
    requests for the jobs waiting for capacity."""
    capacity = memo.jobs.capacity
    if capacity.waiting and (spec or {}).get("nodeName") and _holds_nothing(type, status):
        capacity.wake_waiting()


def _holds_nothing(type: str, status: dict | None) -> bool:
    """Whether a pod's event says it no longer holds its node's capacity."""
    return type == "DELETED" or (status or {}).get("phase") in ("Succeeded", "Failed")


@kopf.on.event("networking.k8s.io", "v1", "networkpolicies",
               labels={LABEL_JOB: kopf.PRESENT, LABEL_MANAGED_BY: MANAGED_BY})
async def _network_policy_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    memo.jobs.wake(namespace, labels.get(LABEL_JOB))     # a policy changed or deleted by hand is restored


@kopf.on.event("nodes")
async def _node_changed(body: kopf.Body, name: str, type: str, memo: kopf.Memo, **_: Any) -> None:
    memo.jobs.capacity.node_changed(name, None if type == "DELETED" else fit.node_view(body))


@kopf.on.event(GROUP, VERSION, JOB_PLURAL)
async def lepton_job(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                     **kwargs: Any) -> None:
    """Follow one LeptonJob: its first event starts its loop, every event feeds the loop the
    newest body and wakes it, its deletion stops it (``ReconcileLoops.follow``)."""
    runtime: JobRuntime = memo.jobs
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    runtime.loops.follow(type, body, logger,
                         lambda live, memory: reconcile(live, memory, kwargs, runtime, logger),
                         on_stop=lambda: runtime.capacity.set_waiting(key, False))


@kopf.on.event("autoscaling.x-k8s.io", "v1", "provisioningrequests", labels={LABEL_JOB: kopf.PRESENT})
async def _capacity_request_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    memo.jobs.wake(namespace, labels.get(LABEL_JOB))


# --- the per-job loop -----------------------------------------------------------------

@kopf.on.cleanup()
async def _stop(memo: kopf.Memo, **_: Any) -> None:
    """Stop every job's loop when the operator stops."""
    await memo.jobs.loops.stop()


async def reconcile(body: Mapping[str, Any], memory: JobMemory, indices: Mapping[str, Any], runtime: JobRuntime,
                    logger: logging.Logger) -> float | None:
    """One reconcile: parse, observe, plan, execute; the seconds until the next one (None:
    when something changes)."""
    try:
        spec = await observe.parse(body, memory, observe.node_views(indices))
    except InvalidSpec as exc:
        await st.report_invalid(body, memory, exc.problems, PHASE_PENDING, logger)
        return None
    memory.invalid_message = None
    observed = await observe.observe(body, spec, memory, indices, runtime.capacity)
    plan = state.plan(spec, observed)
    if plan.report_lost:
        meta = body["metadata"]
        runtime.reports.report(meta["namespace"], meta["name"], meta["uid"], plan.report_lost, spec.workers.min,
                               plan.report_token)
    if plan.tick is not None and plan.tick.decision is not None:
        meta = body["metadata"]
        metrics.record_scaling(JOB_KIND, meta["namespace"], meta["name"], spec.workers.replicas, plan.tick.decision)
    await execute(body, memory, plan.effects, logger,
                  record=lambda results: observe.remember(memory, observed, plan, results, runtime.capacity))
    return None if plan.delete_job else plan.requeue_after
