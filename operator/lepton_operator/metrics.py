"""The operator's own Prometheus metrics (prometheus-client), served on ``/metrics``."""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("lepton_operator_reconciles_total", "Reconciles run, by resource kind.", ["kind"])
ERRORS = Counter("lepton_operator_reconcile_errors_total",
                 "Reconciles that ended in an error, by kind and error class.", ["kind", "error"])
DURATION = Histogram("lepton_operator_reconcile_duration_seconds", "Time spent in one reconcile.",
                     ["kind"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
API_REQUESTS = Counter("lepton_operator_api_requests_total",
                       "Requests the operator sent to the API server, by HTTP verb and outcome.",
                       ["verb", "code"])
JOBS = Gauge("lepton_operator_jobs", "LeptonJobs known to the operator, by phase.", ["phase"])
MODELS = Gauge("lepton_operator_models", "LeptonModels known to the operator, by phase.", ["phase"])
SCALE_DECISIONS = Counter("lepton_operator_scale_decisions_total",
                          "Autoscaler decisions, by resource kind, reason and direction (up, down, hold).",
                          ["kind", "reason", "direction"])
SCALE_DESIRED = Gauge("lepton_operator_autoscaler_desired_replicas",
                      "Replicas (or workers) the autoscaler wants.", ["kind", "namespace", "name"])
SCALE_INPUT = Gauge("lepton_operator_autoscaler_metric_value",
                    "The metric value of the autoscaler's last decision (NaN: no data).",
                    ["kind", "namespace", "name"])
LEADER = Gauge("lepton_operator_leader",
               "1 while this replica reconciles (it holds the leader Lease, or runs without leader "
               "election), 0 while it waits as a standby.")
RDZV_REPORTS = Counter("lepton_operator_rendezvous_reports_total",
                       "Reports of lost workers sent to a job's rendezvous store, by outcome (forgotten: "
                       "the store dropped them; unknown: it no longer had them; failed: not delivered).",
                       ["outcome"])
ANALYSIS = Counter("lepton_operator_canary_analysis_total",
                   "Canary analysis measurements, by model and query, and verdict "
                   "(Successful, Failed, Inconclusive, Error).",
                   ["namespace", "model", "query", "verdict"])


class PhaseTracker:
    """Keeps a ``<kind> by phase`` gauge equal to the phases of the objects it was told about."""

    def __init__(self, gauge: Gauge):
        self._gauge, self._phases = gauge, {}

    def set(self, key: object, phase: str | None) -> None:
        old = self._phases.pop(key, None)
        if old is not None:
            self._gauge.labels(old).dec()
        if phase is not None:
            self._phases[key] = phase
            self._gauge.labels(phase).inc()

    def forget(self, key: object) -> None:
        self.set(key, None)


JOBS_BY_PHASE = PhaseTracker(JOBS)
MODELS_BY_PHASE = PhaseTracker(MODELS)


def record_scaling(kind: str, namespace: str, name: str, current: int, decision) -> None:
    """Count one autoscaler decision (a ``scaling.policy.Decision``) and export its inputs."""
    direction = "up" if decision.replicas > current else "down" if decision.replicas < current else "hold"
    SCALE_DECISIONS.labels(kind, decision.reason, direction).inc()
    SCALE_DESIRED.labels(kind, namespace, name).set(decision.replicas)
    value = decision.inputs.get("value", decision.inputs.get("throughput"))
    SCALE_INPUT.labels(kind, namespace, name).set(float("nan") if value is None else value)


@contextlib.contextmanager
def reconcile(kind: str) -> Iterator[None]:
    """Count and time one reconcile of ``kind``; an exception is counted as an error."""
    RECONCILES.labels(kind).inc()
    start = time.perf_counter()
    try:
        yield
    except Exception as exc:
        ERRORS.labels(kind, type(exc).__name__).inc()
        raise
    finally:
        DURATION.labels(kind).observe(time.perf_counter() - start)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` from a background thread."""
    start_http_server(port, addr=addr)
