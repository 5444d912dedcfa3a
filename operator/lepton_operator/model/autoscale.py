"""LeptonModel builtin autoscaler: serving replicas from a Prometheus metric.

Pure: the model's observation carries the metric (``observe`` queries
``objects.metric_query`` when a tick is due, at most every ``intervalSeconds``), and
``decide`` applies ``policy.decide_inference``: Knative-style stable and panic windows
around a per-replica target, with HPA-style stabilisation of scale-down. No data holds
the size. The windows are samples kept in the loop's memory (``AutoscalerMemory``) and
use the monotonic clock; the size and the last decision are reported in
``status.autoscaling`` and in the ``MetricsAvailable`` condition. With ``engine: hpa``
or ``keda`` an HPA owns the size instead and no tick runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..constants import COND_METRICS, EVENT_NORMAL, FALSE, REASON_METRICS_OK, REASON_NO_METRIC_DATA, \
    REASON_SCALED, TRUE
from ..core import status as st
from ..scaling import policy, prometheus
from .spec import Autoscaling, ModelSpec


@dataclasses.dataclass(frozen=True)
class AutoscalerMemory:
    """Between ticks, in the process."""
    state: policy.InferenceState = dataclasses.field(default_factory=policy.InferenceState)
    total: int | None = None            # the size the autoscaler chose
    last_tick: float = -1e9             # monotonic
    condition: tuple | None = None      # (type, status, reason, message) of the last query


@dataclasses.dataclass(frozen=True)
class Tick:
    """One tick's outcome."""
    memory: AutoscalerMemory
    status: dict[str, Any]              # status.autoscaling
    events: list[st.Event]
    decision: policy.Decision | None = None


def due(a: Autoscaling, memory: AutoscalerMemory, now: float) -> bool:
    return now >= memory.last_tick + a.interval_seconds


def delay(a: Autoscaling, memory: AutoscalerMemory, now: float) -> float:
    """Seconds until the next tick."""
    return max(memory.last_tick + a.interval_seconds - now, 0.05)


def start(spec: ModelSpec, memory: AutoscalerMemory, status: Mapping[str, Any]) -> AutoscalerMemory:
    """The memory with a size: the one chosen last, else the one reported, within bounds."""
    if memory.total is not None:
        return memory
    a = spec.autoscaling
    floor = min(spec.floor, a.max_replicas)
    return dataclasses.replace(memory, total=max(floor, min(a.max_replicas,
                                                            status.get("desiredReplicas") or spec.serving.replicas or 1)))


def decide(spec: ModelSpec, memory: AutoscalerMemory, status: Mapping[str, Any], result: prometheus.QueryResult,
           now: float) -> Tick:
    """One tick from the metric ``result`` (``memory`` as ``start`` made it)."""
    a = spec.autoscaling
    floor = min(spec.floor, a.max_replicas)
    pol = policy.InferencePolicy(a.target, floor, a.max_replicas, a.stable_window_seconds,
                                 a.panic_window_seconds, a.panic_threshold, a.scale_down_delay_seconds,
                                 a.additive)
    old = memory.total
    decision, state = policy.decide_inference(pol, memory.state, now, result.value, old)
    if result.ok:
        condition = (COND_METRICS, TRUE, REASON_METRICS_OK, f"{result.query} = {result.value:g}")
    else:
        condition = (COND_METRICS, FALSE, REASON_NO_METRIC_DATA, f"holding {old} replicas: {result.error}")
    events: list[st.Event] = []
    shown = dict(status.get("autoscaling") or {})
    if decision.replicas != old:
        inputs = ", ".join(f"{k}={v}" for k, v in decision.inputs.items())
        events.append((EVENT_NORMAL, REASON_SCALED,
                       f"scaled {old} -> {decision.replicas} replicas ({decision.reason}): {inputs}"))
        shown = {"lastScaleTime": st.now_iso()}
    shown.update(replicas=decision.replicas, reason=decision.reason, value=result.value, error=result.error)
    return Tick(AutoscalerMemory(state, decision.replicas, now, condition), shown, events, decision)
