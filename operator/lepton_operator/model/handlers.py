"""LeptonModel handlers: kopf indices feed one reconcile loop per model.

Each LeptonModel gets a loop (``core.loop``: started by the model's first watch event,
stopped by its deletion; no finalizer) that reconciles when the model, its Deployments,
its compression Jobs or their pods, or a LeptonJob in its namespace change, on each step
deadline, and on every tick of the builtin autoscaler. A reconcile is three stages:
``observe`` reads (kopf's indices, Prometheus) into one frozen ``ModelObserved``;
``state.plan`` decides the size, the revisions, the whole next status and the writes;
the shared ``core.execute`` applies them and writes the status once. A steady
reconcile makes no API request. The loop is the only writer of the model's status.

What every loop shares (the loops and the Gateway API check) is one ``ModelRuntime``,
made at start-up and kept in kopf's ``memo``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Mapping

import kopf

from .. import metrics
from ..constants import (ANNOTATION_SPEC_HASH, GROUP, JOB_PLURAL, LABEL_MANAGED_BY, LABEL_MODEL, LABEL_REVISION,
                         LABEL_ROLE, MANAGED_BY, MODEL_KIND, MODEL_PLURAL, MPHASE_PENDING, ROLE_COMPRESSION,
                         ROLE_SERVING, VERSION)
from ..core import status as st
from ..core.execute import execute
from ..core.fields import InvalidSpec
from ..core.loop import ReconcileLoops
from . import observe, state
from .observe import GatewayCheck, ModelMemory


@dataclasses.dataclass
class ModelRuntime:
    """What the models' loops share in one operator process."""
    loops: ReconcileLoops[ModelMemory]
    gateway: GatewayCheck


def new_runtime() -> ModelRuntime:
    return ModelRuntime(ReconcileLoops(MODEL_KIND, observe.new_memory, pending_phase=MPHASE_PENDING),
                        GatewayCheck())


@kopf.on.startup()
async def _start(memo: kopf.Memo, **_: Any) -> None:
    """Make the models' runtime and start its Gateway API check (see ``GatewayCheck``)."""
    memo.models = runtime = new_runtime()
    memo.models_gateway_task = asyncio.create_task(runtime.gateway.run(lambda: bool(runtime.loops.wakeups)))


@kopf.on.cleanup()
async def _stop(memo: kopf.Memo, **_: Any) -> None:
    """Stop every model's loop and the Gateway API check when the operator stops."""
    task = getattr(memo, "models_gateway_task", None)
    if task is not None:
        task.cancel()
    await memo.models.loops.stop()


# --- indices (kopf keeps them current from its watch streams) ----------------------------

@kopf.index("deployments", labels={LABEL_MODEL: kopf.PRESENT, LABEL_ROLE: ROLE_SERVING})
def lepton_model_deployments(namespace: str, labels: dict, body: kopf.Body, **_: Any):
    """(namespace, model) -> the fields of each serving Deployment that a reconcile reads."""
    m = body["metadata"]
    return {(namespace, labels[LABEL_MODEL]): {
        "metadata": {"name": m["name"], "generation": m.get("generation", 0), "labels": dict(labels)},
        "spec": {"replicas": body.get("spec", {}).get("replicas", 1)},
        "status": dict(body.get("status") or {})}}


@kopf.index(GROUP, VERSION, JOB_PLURAL)
def lepton_model_source_jobs(namespace: str, name: str, body: kopf.Body, **_: Any):
    """(namespace, job) -> the fields of a LeptonJob that a model's source reads."""
    s = body.get("status") or {}
    return {(namespace, name): {
        "metadata": {"uid": body["metadata"].get("uid", "")},
        "status": {k: s[k] for k in ("phase", "conditions", "outputURI", "completionTime") if k in s}}}


@kopf.index("batch", "v1", "jobs", labels={LABEL_MODEL: kopf.PRESENT, LABEL_ROLE: ROLE_COMPRESSION})
def lepton_model_compression_jobs(namespace: str, labels: dict, name: str, body: kopf.Body, **_: Any):
    """(namespace, model) -> each compression Job's name, revision and conditions."""
    return {(namespace, labels[LABEL_MODEL]): {
        "name": name, "revision": labels.get(LABEL_REVISION),
        "status": {"conditions": list((body.get("status") or {}).get("conditions") or ())}}}


@kopf.index("pods", labels={LABEL_MODEL: kopf.PRESENT, LABEL_ROLE: ROLE_COMPRESSION})
def lepton_model_compression_pods(namespace: str, labels: dict, body: kopf.Body, **_: Any):
    """(namespace, model) -> each compression pod's creation time, phase, container states
    (its termination message carries the compression result) and whether it is scheduled."""
    m, s = body["metadata"], body.get("status") or {}
    return {(namespace, labels[LABEL_MODEL]): {
        "metadata": {"name": m["name"], "creationTimestamp": m.get("creationTimestamp", ""),
                     "labels": dict(labels)},
        "status": {"phase": s.get("phase"), "containerStatuses": list(s.get("containerStatuses") or ()),
                   "conditions": [c for c in s.get("conditions") or () if c.get("type") == "PodScheduled"]}}}


@kopf.index("networking.k8s.io", "v1", "networkpolicies",
            labels={LABEL_MODEL: kopf.PRESENT, LABEL_MANAGED_BY: MANAGED_BY})
def lepton_model_network_policies(namespace: str, labels: dict, name: str, annotations: dict, **_: Any):
    """(namespace, model) -> (NetworkPolicy name, its spec hash)."""
    return {(namespace, labels[LABEL_MODEL]): (name, annotations.get(ANNOTATION_SPEC_HASH, ""))}


# --- wake-ups ----------------------------------------------------------------------------

@kopf.on.event(GROUP, VERSION, MODEL_PLURAL)
async def lepton_model(type: str | None, body: kopf.Body, memo: kopf.Memo, logger: logging.Logger,
                       **kwargs: Any) -> None:
    """Follow one LeptonModel: its first event starts its loop, every event feeds the loop the
    newest body and wakes it, its deletion stops it (``ReconcileLoops.follow``)."""
    runtime: ModelRuntime = memo.models
    runtime.loops.follow(type, body, logger,
                         lambda live, memory: reconcile(live, memory, kwargs, runtime, logger))


@kopf.on.event("deployments", labels={LABEL_MODEL: kopf.PRESENT})
async def _deployment_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    memo.models.loops.wake(namespace, labels.get(LABEL_MODEL))


@kopf.on.event("networking.k8s.io", "v1", "networkpolicies",
               labels={LABEL_MODEL: kopf.PRESENT, LABEL_MANAGED_BY: MANAGED_BY})
async def _network_policy_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    memo.models.loops.wake(namespace, labels.get(LABEL_MODEL))     # a policy changed or deleted by hand is restored


@kopf.on.event("pods", labels={LABEL_MODEL: kopf.PRESENT, LABEL_ROLE: ROLE_COMPRESSION})
async def _compression_pod_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    memo.models.loops.wake(namespace, labels.get(LABEL_MODEL))


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_MODEL: kopf.PRESENT, LABEL_ROLE: ROLE_COMPRESSION})
async def _compression_job_changed(namespace: str, labels: dict, memo: kopf.Memo, **_: Any) -> None:
    memo.models.loops.wake(namespace, labels.get(LABEL_MODEL))


@kopf.on.event(GROUP, VERSION, JOB_PLURAL)
async def _job_changed_for_models(namespace: str, memo: kopf.Memo, **_: Any) -> None:
    memo.models.loops.wake(namespace)        # a model in this namespace may be waiting for this job


# --- the per-model loop ------------------------------------------------------------------

async def reconcile(body: Mapping[str, Any], memory: ModelMemory, indices: Mapping[str, Any],
                    runtime: ModelRuntime, logger: logging.Logger) -> float | None:
    """One reconcile: parse, observe, plan, execute; the seconds until the next one (None:
    when something changes)."""
    try:
        spec = await observe.parse(body, memory)
    except InvalidSpec as exc:
        await st.report_invalid(body, memory, exc.problems, MPHASE_PENDING, logger)
        return None
    memory.invalid_message = None
    observed = await observe.observe(body, spec, memory, indices, runtime.gateway)
    plan = state.plan(spec, observed)
    if plan.tick is not None:
        meta = body["metadata"]
        metrics.record_scaling(MODEL_KIND, meta["namespace"], meta["name"], observed.autoscaler.total
                               or plan.tick.memory.total, plan.tick.decision)
    await execute(body, memory, plan.effects, logger,
                  record=lambda results: observe.remember(memory, observed, plan, results))
    return plan.requeue_after
