"""LeptonJob autoscaler: ``spec.autoscaling`` drives ``spec.workers.replicas`` by goodput.

The job's own reconcile loop calls ``tick`` (at most every ``intervalSeconds``) while
the job is Running or Scaling. A tick queries Prometheus for the job's total samples/s
and applies ``policy.decide_training``: add workers while the per-worker rate stays
above ``efficiency`` times the single-worker rate, bounded by ``workers.max`` and by
the GPUs free in the cluster, with ``cooldownSeconds`` between scale events. It changes
only ``spec.workers.replicas`` (like ``kubectl scale``); the loop does the rest. No data
holds the size.

What the policy remembers (the learned single-worker rate and the time of the last
scale event) lives in ``status.autoscaling``, next to the last decision, so an
operator restart neither forgets the baseline nor resets the cooldown. That is why
the cooldown is wall-clock time; the LeptonModel autoscaler's windows are samples kept
in memory and use the monotonic clock. A scale event is recorded in the status before
``spec.workers.replicas`` changes: an operator killed between the two writes restarts
into a cooldown (at worst one scale event late), never into a second scale event
without one. Only the pacing of ticks and the events already said live in the process;
after a restart the first tick comes at once and decides from the recorded state.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import time
from typing import Any, Mapping

from lepton_trainer import contract

from .. import metrics
from ..constants import (API_VERSION, EVENT_NORMAL, EVENT_WARNING, JOB_KIND, PHASE_RUNNING, PHASE_SCALING,
                         REASON_NO_METRIC_DATA, REASON_SCALED)
from ..core import kube
from ..core import status as st
from ..core.loop import Memory
from ..scaling import policy, prometheus
from .spec import JobSpec


@dataclasses.dataclass
class AutoscalerMemory:
    """Between ticks, in the process: when the next tick is due and what was said."""
    next_tick: float = 0.0           # monotonic
    no_data: bool = False
    said: str | None = None


def default_query(namespace: str, name: str) -> str:
    """The job's samples/s: every node reports the whole job's rate, so take the max."""
    return (f'max({contract.METRIC_SAMPLES_PER_SECOND}{{{contract.METRICS_JOB_LABEL}="{name}",'
            f'{contract.METRICS_NAMESPACE_LABEL}="{namespace}"}})')


def state_from_status(auto: Mapping[str, Any] | None, now: float) -> policy.TrainingState:
    """The policy state recorded in ``status.autoscaling``; a job seen for the first time
    starts its cooldown now, so the first decision waits one cooldown."""
    auto = auto or {}
    last = st.parse_time(auto.get("lastScaleTime"))
    return policy.TrainingState(auto.get("baselineRate"), auto.get("baselineWorkers"),
                                last.timestamp() if last else now)


def state_to_status(state: policy.TrainingState) -> dict[str, Any]:
    last = (st.now_iso(_dt.datetime.fromtimestamp(state.last_scale, _dt.timezone.utc))
            if state.last_scale is not None else None)
    return {"baselineRate": state.baseline, "baselineWorkers": state.baseline_workers, "lastScaleTime": last}


async def tick(body: Mapping[str, Any], spec: JobSpec, memory: Memory, auto_memory: AutoscalerMemory,
               status: dict[str, Any], free_slots: int, logger: logging.Logger) -> float | None:
    """One autoscaler tick; writes ``status["autoscaling"]`` and returns the seconds until
    the next tick (None: the job is not in a phase that scales)."""
    a = spec.autoscaling
    if a is None or status.get("phase") not in (PHASE_RUNNING, PHASE_SCALING):
        return None
    mono = time.monotonic()
    if mono < auto_memory.next_tick:
        return auto_memory.next_tick - mono
    auto_memory.next_tick = mono + a.interval_seconds
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    now = time.time()
    w = spec.workers
    pol = policy.TrainingPolicy(w.min, w.max, a.efficiency, a.cooldown_seconds, a.step, spec.resources.gpus)
    state = state_from_status(status.get("autoscaling"), now)
    free_gpus = free_slots * spec.resources.gpus if spec.resources.gpus else None

    promql = prometheus.render(a.query, namespace=namespace, job=name) if a.query else default_query(namespace, name)
    result = await prometheus.client().query(promql)
    current = w.replicas
    ready = (status.get("workers") or {}).get("ready") or 0
    decision, state = policy.decide_training(pol, state, now, result.value, current, ready, free_gpus)
    metrics.record_scaling(JOB_KIND, namespace, name, current, decision)
    events: list[st.Event] = []
    if result.value is None and not auto_memory.no_data:
        events.append((EVENT_WARNING, REASON_NO_METRIC_DATA, f"holding {current} workers: {result.error}"))
    auto_memory.no_data = result.value is None
    status["autoscaling"] = {
        "metricsAvailable": result.ok,
        "message": f"{promql} = {result.value:g}" if result.ok else f"holding {current} workers: {result.error}",
        **state_to_status(state), "lastDecision": decision.reason, "desiredWorkers": decision.replicas}
    if decision.replicas != current:
        # The scale event's time is durable before the scale itself (see the module doc).
        await st.write(body, memory, {**memory.status, "autoscaling": status["autoscaling"]})
        await kube.aio(kube.patch, API_VERSION, JOB_KIND, name, namespace,
                       {"spec": {"workers": {"replicas": decision.replicas}}})
        inputs = ", ".join(f"{k}={v}" for k, v in decision.inputs.items())
        events.append((EVENT_NORMAL, REASON_SCALED,
                       f"scaled workers {current} -> {decision.replicas} ({decision.reason}): {inputs}"))
    elif decision.reason == policy.GOODPUT_DROPPED and auto_memory.said != decision.reason:
        auto_memory.said = decision.reason
        events.append((EVENT_NORMAL, decision.reason,
                       f"holding {current} workers: per-worker rate {decision.inputs.get('perWorker')} is below "
                       f"{pol.efficiency} x the single-worker rate {decision.inputs.get('baseline')}"))
    await st.emit(body, memory, events, logger)
    return a.interval_seconds
