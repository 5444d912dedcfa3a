"""LeptonJob handlers: kopf indices feed one reconcile loop per job.

Each LeptonJob gets a kopf daemon that reconciles whenever the job, one of its pods or
the GPU capacity changes (watch events wake it), and at the latest after the resync
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
from ..core.objects import gpus_requested
from . import gpu_usage, observe, state
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
    """Make the jobs' runtime; watching named namespaces, count the GPUs of every
    namespace's pods (see gpu_usage)."""
    memo.jobs = runtime = new_runtime()
    settings = config.get()
    if settings.all_namespaces or not settings.cluster_gpu_usage:
        return
    loop = asyncio.get_running_loop()
    usage = gpu_usage.ClusterGpuUsage(lambda: loop.call_soon_threadsafe(runtime.capacity.wake_waiting))
    runtime.capacity.cluster = usage
    usage.start()
    # Handlers start after the startup activities: give the first list its chance, so the
    # first placements already see every namespace's GPUs.
    if not await loop.run_in_executor(None, usage.synced.wait, gpu_usage.SYNC_WAIT_SECONDS):
        logging.getLogger("lepton_operator").warning(
            "cluster-wide GPU usage not listed within %ss (is list/watch of pods cluster-wide granted?); "
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
def _pod_changed(namespace: str, labels: dict, name: str, type: str, status: dict, memo: kopf.Memo,
                 **_: Any) -> None:
    memo.jobs.capacity.release(namespace, name)
    memo.jobs.wake(namespace, labels.get(LABEL_JOB))
    if type == "DELETED" or (status or {}).get("phase") in ("Succeeded", "Failed"):
        memo.jobs.capacity.wake_waiting()          # its GPUs are free (or about to be)


@kopf.on.event("networking.k8s.io", "v1", "networkpolicies",
               labels={LABEL_JOB: kopf.PRESENT, LABEL_MANAGED_BY: MANAGED_BY})
def _network_policy_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    memo.jobs.wake(namespace, labels.get(LABEL_JOB))     # a policy changed or deleted by hand is restored


@kopf.on.event("nodes")
def _node_changed(body: kopf.Body, name: str, type: str, memo: kopf.Memo, **_: Any) -> None:
    memo.jobs.capacity.node_changed(name, None if type == "DELETED" else state.node_view(body))


@kopf.on.event(GROUP, VERSION, JOB_PLURAL)
def _job_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    memo.jobs.wake(namespace, name)


@kopf.on.event("autoscaling.x-k8s.io", "v1", "provisioningrequests", labels={LABEL_JOB: kopf.PRESENT})
def _capacity_request_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    memo.jobs.wake(namespace, labels.get(LABEL_JOB))


# --- the per-job loop -----------------------------------------------------------------

@kopf.daemon(GROUP, VERSION, JOB_PLURAL, cancellation_timeout=5.0)
async def lepton_job(body: kopf.Body, uid: str, stopped: kopf.DaemonStopped, memo: kopf.Memo,
                     logger: logging.Logger, **kwargs: Any) -> None:
    """Reconcile one LeptonJob until it is deleted."""
    runtime: JobRuntime = memo.jobs
    try:
        await runtime.loops.run(body, uid, stopped, logger,
                                lambda memory: reconcile(body, memory, kwargs, runtime, logger))
    finally:
        if stopped:
            runtime.capacity.set_waiting((body["metadata"]["namespace"], body["metadata"]["name"]), False)


async def reconcile(body: Mapping[str, Any], memory: JobMemory, indices: Mapping[str, Any], runtime: JobRuntime,
                    logger: logging.Logger) -> float | None:
    """One reconcile: parse, observe, plan, execute; the seconds until the next one (None:
    when something changes)."""
    try:
        spec = await observe.parse(body, memory, observe.gpu_nodes(indices))
    except InvalidSpec as exc:
        await st.report_invalid(body, memory, exc.problems, PHASE_PENDING, logger)
        return None
    memory.invalid_message = None
    observed = await observe.observe(body, spec, memory, indices, runtime.capacity)
    plan = state.plan(spec, observed)
    if plan.report_lost:
        meta = body["metadata"]
        runtime.reports.report(meta["namespace"], meta["name"], meta["uid"], plan.report_lost, spec.workers.min)
    if plan.tick is not None and plan.tick.decision is not None:
        meta = body["metadata"]
        metrics.record_scaling(JOB_KIND, meta["namespace"], meta["name"], spec.workers.replicas, plan.tick.decision)
    await execute(body, memory, plan.effects, logger,
                  record=lambda results: observe.remember(memory, observed, plan, results, runtime.capacity))
    return None if plan.delete_job else plan.requeue_after
