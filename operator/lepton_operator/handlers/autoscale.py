"""LeptonJob autoscaler: ``spec.autoscaling`` drives ``spec.workers.replicas`` by goodput.

A kopf timer per job with ``spec.autoscaling`` queries Prometheus every
``intervalSeconds`` for the job's total samples/s and applies ``policy.decide_training``:
add workers while the per-worker rate stays above ``efficiency`` times the single-worker
rate, bounded by ``workers.max`` and by the GPUs free in the cluster (the same capacity
view the job loop uses), with ``cooldownSeconds`` between scale events. It changes only
``spec.workers.replicas`` (like ``kubectl scale``); the job loop does the rest. No data
holds the size; ``status.autoscaling`` says whether metrics are available, the learned
single-worker rate and the last decision (the job loop owns the rest of the status).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import kopf

from .. import config, jobstate, kube, metrics
from ..builders import training
from ..constants import (API_VERSION, EVENT_NORMAL, EVENT_WARNING, GROUP, JOB_KIND, JOB_PLURAL,
                         PHASE_RUNNING, PHASE_SCALING, REASON_NO_METRIC_DATA, REASON_SCALED, VERSION)
from ..model_spec import render_query
from ..scaling import policy
from ..spec import InvalidSpec, parse_job
from .model import prometheus
from lepton_trainer import contract


@dataclasses.dataclass
class _Memory:
    state: policy.TrainingState
    next_tick: float = 0.0
    no_data: bool = False
    said: str | None = None
    reported: dict | None = None     # last status.autoscaling written


_memory: dict[str, _Memory] = {}


def default_query(namespace: str, name: str) -> str:
    """The job's samples/s: every node reports the whole job's rate, so take the max."""
    return (f'max({contract.METRIC_SAMPLES_PER_SECOND}{{{contract.METRICS_JOB_LABEL}="{name}",'
            f'{contract.METRICS_NAMESPACE_LABEL}="{namespace}"}})')


def parse_autoscaling(raw: dict[str, Any], w_min: int, w_max: int, gpus: int) -> tuple[policy.TrainingPolicy, str | None, float]:
    """(policy, query or None for the default, interval); raises ValueError on bad values."""
    try:
        pol = policy.TrainingPolicy(w_min, w_max, float(raw.get("efficiency", 0.8)),
                                    float(raw.get("cooldownSeconds", 60)), int(raw.get("step", 1)), gpus)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"autoscaling: {exc}") from None
    query = raw.get("query")
    if query is not None and not str(query).strip():
        raise ValueError("autoscaling.query must be a non-empty PromQL query (or left out for the default)")
    return pol, query, max(float(raw.get("intervalSeconds", 5)), 0.5)


@kopf.timer(GROUP, VERSION, JOB_PLURAL, interval=1.0, when=lambda spec, **_: bool(spec.get("autoscaling")))
async def lepton_job_autoscaler(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, namespace: str,
                                name: str, uid: str, logger, **indices: Any) -> None:
    """One autoscaler tick of a LeptonJob (at most every intervalSeconds)."""
    if status.get("phase") not in (PHASE_RUNNING, PHASE_SCALING):
        return
    now = time.time()
    try:
        job = parse_job(name, dict(spec), config.get().trainer_image)
        pol, query, interval = parse_autoscaling(dict(spec["autoscaling"]), job.workers.min, job.workers.max,
                                                 job.resources.gpus)
    except (InvalidSpec, ValueError) as exc:
        mem = _memory.setdefault(uid, _Memory(policy.TrainingState(last_scale=now)))
        if mem.said != str(exc):
            mem.said = str(exc)
            await kube.aio(kube.emit_event, dict(body), EVENT_WARNING, "InvalidSpec", str(exc))
        return
    mem = _memory.setdefault(uid, _Memory(policy.TrainingState(last_scale=now)))
    if now < mem.next_tick:
        return
    mem.next_tick = now + interval

    nodes = [v for store in indices["lepton_gpu_nodes"].values() for v in store]
    usage = indices["lepton_gpu_usage"]
    used = {node: sum(store) for node, store in usage.items() if node}
    slots, _ = jobstate.worker_slots(nodes, used, job.resources.gpus, job.node_selector,
                                     training._tolerations(job), sum(usage.get(None, [])))
    free_gpus = slots * job.resources.gpus if job.resources.gpus else None

    promql = render_query(query, namespace, name).replace("${job}", name) if query else default_query(namespace, name)
    result = await prometheus().query(promql)
    current = job.workers.replicas
    ready = ((status.get("workers") or {}).get("ready")) or 0
    decision, mem.state = policy.decide_training(pol, mem.state, now, result.value, current, ready, free_gpus)
    metrics.record_scaling(JOB_KIND, namespace, name, current, decision)
    if result.value is None and not mem.no_data:
        await kube.aio(kube.emit_event, dict(body), EVENT_WARNING, REASON_NO_METRIC_DATA,
                       f"holding {current} workers: {result.error}")
    mem.no_data = result.value is None
    report = {"metricsAvailable": result.ok, "message": (f"{promql} = {result.value:g}" if result.ok else
                                                          f"holding {current} workers: {result.error}"),
              "baselineRate": mem.state.baseline, "baselineWorkers": mem.state.baseline_workers,
              "lastDecision": decision.reason, "desiredWorkers": decision.replicas}
    if report != mem.reported:
        await kube.aio(kube.patch_status, API_VERSION, JOB_KIND, name, namespace, {"autoscaling": report})
        mem.reported = report
    if decision.replicas != current:
        await kube.aio(kube.patch, API_VERSION, JOB_KIND, name, namespace,
                       {"spec": {"workers": {"replicas": decision.replicas}}})
        inputs = ", ".join(f"{k}={v}" for k, v in decision.inputs.items())
        message = f"scaled workers {current} -> {decision.replicas} ({decision.reason}): {inputs}"
        logger.info(message)
        await kube.aio(kube.emit_event, dict(body), EVENT_NORMAL, REASON_SCALED, message)
    elif decision.reason == policy.GOODPUT_DROPPED and mem.said != decision.reason:
        mem.said = decision.reason
        await kube.aio(kube.emit_event, dict(body), EVENT_NORMAL, decision.reason,
                       f"holding {current} workers: per-worker rate {decision.inputs.get('perWorker')} is below "
                       f"{pol.efficiency} x the single-worker rate {decision.inputs.get('baseline')}")


@kopf.on.delete(GROUP, VERSION, JOB_PLURAL, optional=True)
def _forget(uid: str, **_: Any) -> None:
    _memory.pop(uid, None)
