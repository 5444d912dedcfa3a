"""LeptonModel builtin autoscaler: serving replicas from a Prometheus metric.

The model's own reconcile loop calls ``tick`` (at most every ``intervalSeconds``). A
tick queries the metric (``objects.metric_query``) and applies
``policy.decide_inference``: Knative-style stable and panic windows around a
per-replica target, with HPA-style stabilisation of scale-down. No data holds the
size. The windows are samples kept in memory and use the monotonic clock; the size
and the last decision are reported in ``status.autoscaling`` and in the
``MetricsAvailable`` condition. With ``engine: hpa`` or ``keda`` an HPA owns the size
instead and no tick runs.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Mapping

from .. import metrics
from ..constants import COND_METRICS, EVENT_NORMAL, FALSE, MODEL_KIND, REASON_METRICS_OK, REASON_NO_METRIC_DATA, \
    REASON_SCALED, TRUE
from ..core import status as st
from ..core.loop import Memory
from ..scaling import policy, prometheus
from . import objects
from .spec import ModelSpec


@dataclasses.dataclass
class AutoscalerMemory:
    """Between ticks, in the process."""
    state: policy.InferenceState = dataclasses.field(default_factory=policy.InferenceState)
    total: int | None = None            # the size the autoscaler chose
    last_tick: float = -1e9             # monotonic
    condition: tuple | None = None      # (type, status, reason, message) of the last query


async def tick(body: Mapping[str, Any], spec: ModelSpec, memory: Memory, auto: AutoscalerMemory,
               status: dict[str, Any], logger: logging.Logger) -> float:
    """One tick; updates ``auto.total`` and ``status["autoscaling"]`` and returns the
    seconds until the next tick."""
    a = spec.autoscaling
    floor = min(spec.floor, a.max_replicas)
    if auto.total is None:
        auto.total = max(floor, min(a.max_replicas, status.get("desiredReplicas") or spec.serving.replicas or 1))
    now = time.monotonic()
    left = auto.last_tick + a.interval_seconds - now
    if left > 0:
        return left
    auto.last_tick = now
    meta = body["metadata"]
    query = objects.metric_query(a, meta["namespace"], meta["name"])
    result = await prometheus.client().query(query)
    pol = policy.InferencePolicy(a.target, floor, a.max_replicas, a.stable_window_seconds,
                                 a.panic_window_seconds, a.panic_threshold, a.scale_down_delay_seconds,
                                 a.additive)
    decision, auto.state = policy.decide_inference(pol, auto.state, now, result.value, auto.total)
    old = auto.total
    if result.ok:
        auto.condition = (COND_METRICS, TRUE, REASON_METRICS_OK, f"{query} = {result.value:g}")
    else:
        auto.condition = (COND_METRICS, FALSE, REASON_NO_METRIC_DATA, f"holding {old} replicas: {result.error}")
    metrics.record_scaling(MODEL_KIND, meta["namespace"], meta["name"], old, decision)
    if decision.replicas != old:
        auto.total = decision.replicas
        inputs = ", ".join(f"{k}={v}" for k, v in decision.inputs.items())
        await st.emit(body, memory, [(EVENT_NORMAL, REASON_SCALED,
                                      f"scaled {old} -> {decision.replicas} replicas ({decision.reason}): {inputs}")],
                      logger)
        status["autoscaling"] = {"lastScaleTime": st.now_iso()}
    status["autoscaling"] = {**(status.get("autoscaling") or {}), "replicas": auto.total,
                             "reason": decision.reason, "value": result.value, "error": result.error}
    return a.interval_seconds
