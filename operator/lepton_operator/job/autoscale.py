"""LeptonJob autoscaler: ``spec.autoscaling`` drives ``spec.workers.replicas`` by goodput.

Pure: the job's observation carries the Prometheus sample (``observe`` queries the job's
total samples/s when a tick is due, at most every ``intervalSeconds``), and ``decide``
applies ``policy.decide_training`` while the job is Running or Scaling: add workers
while the per-worker rate stays above ``efficiency`` times the single-worker rate,
bounded by ``workers.max`` and by the GPUs free in the cluster, with ``cooldownSeconds``
between scale events. It changes only ``spec.workers.replicas`` (like ``kubectl
scale``); the loop does the rest. No data holds the size.

What the policy remembers (the learned single-worker rate and the time of the last
scale event) lives in ``status.autoscaling``, next to the last decision, so an
operator restart neither forgets the baseline nor resets the cooldown. That is why
the cooldown is wall-clock time; the LeptonModel autoscaler's windows are samples kept
in memory and use the monotonic clock. A scale event is recorded in the status before
``spec.workers.replicas`` changes (the plan persists its status first): an operator
killed between the two writes restarts into a cooldown (at worst one scale event
late), never into a second scale event without one. Only the pacing of ticks and the
events already said live in the process (``AutoscalerMemory``); after a restart the
first tick comes at once and decides from the recorded state.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
from typing import Any, Mapping

from lepton_trainer import contract

from ..constants import EVENT_NORMAL, EVENT_WARNING, PHASE_RUNNING, PHASE_SCALING, REASON_NO_METRIC_DATA, \
    REASON_SCALED
from ..core import status as st
from ..scaling import policy, prometheus
from ..scaling.promql import NAMESPACE_LABEL
from .spec import JobSpec, scoped_query


@dataclasses.dataclass(frozen=True)
class AutoscalerMemory:
    """Between ticks, in the process: when the next tick is due and what was said."""
    next_tick: float = 0.0           # monotonic
    no_data: bool = False
    said: str | None = None


@dataclasses.dataclass(frozen=True)
class Tick:
    """One tick's outcome: ``status.autoscaling``, the new size (None: unchanged), the
    events, the memory to keep, and the seconds until the next tick."""
    status: dict[str, Any]
    replicas: int | None
    events: list[st.Event]
    memory: AutoscalerMemory
    delay: float
    decision: policy.Decision | None = None


def default_query(namespace: str, name: str) -> str:
    """The job's samples/s: every node reports the whole job's rate, so take the max (of
    the series scraped in the job's namespace)."""
    return (f'max({contract.METRIC_SAMPLES_PER_SECOND}{{{contract.METRICS_JOB_LABEL}="{name}",'
            f'{contract.METRICS_NAMESPACE_LABEL}="{namespace}",{NAMESPACE_LABEL}="{namespace}"}})')


def promql(spec: JobSpec, namespace: str, name: str) -> str:
    """The query a tick measures: the spec's own, confined to the job's namespace (the
    parser refused a query that cannot be), or the job's samples/s."""
    a = spec.autoscaling
    return scoped_query(a.query, namespace, name) if a.query else default_query(namespace, name)


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


def scales(spec: JobSpec, status: Mapping[str, Any]) -> bool:
    """Whether the autoscaler acts on a job in this status."""
    return spec.autoscaling is not None and status.get("phase") in (PHASE_RUNNING, PHASE_SCALING)


def decide(spec: JobSpec, status: Mapping[str, Any], result: prometheus.QueryResult, memory: AutoscalerMemory,
           free_slots: int, now: float, monotonic: float) -> Tick:
    """One tick from the sample ``result`` (``status``: the plan's new status)."""
    a, w = spec.autoscaling, spec.workers
    pol = policy.TrainingPolicy(w.min, w.max, a.efficiency, a.cooldown_seconds, a.step, spec.resources.gpus)
    free_gpus = free_slots * spec.resources.gpus if spec.resources.gpus else None
    current = w.replicas
    ready = (status.get("workers") or {}).get("ready") or 0
    decision, state = policy.decide_training(pol, state_from_status(status.get("autoscaling"), now), now,
                                             result.value, current, ready, free_gpus)
    events: list[st.Event] = []
    if result.value is None and not memory.no_data:
        events.append((EVENT_WARNING, REASON_NO_METRIC_DATA, f"holding {current} workers: {result.error}"))
    said = memory.said
    if decision.replicas != current:
        inputs = ", ".join(f"{k}={v}" for k, v in decision.inputs.items())
        events.append((EVENT_NORMAL, REASON_SCALED,
                       f"scaled workers {current} -> {decision.replicas} ({decision.reason}): {inputs}"))
    elif decision.reason == policy.GOODPUT_DROPPED and said != decision.reason:
        said = decision.reason
        events.append((EVENT_NORMAL, decision.reason,
                       f"holding {current} workers: per-worker rate {decision.inputs.get('perWorker')} is below "
                       f"{pol.efficiency} x the single-worker rate {decision.inputs.get('baseline')}"))
    shown = {"metricsAvailable": result.ok,
             "message": f"{result.query} = {result.value:g}" if result.ok else f"holding {current} workers: {result.error}",
             **state_to_status(state), "lastDecision": decision.reason, "desiredWorkers": decision.replicas}
    return Tick(shown, decision.replicas if decision.replicas != current else None, events,
                AutoscalerMemory(monotonic + a.interval_seconds, result.value is None, said),
                float(a.interval_seconds), decision)
