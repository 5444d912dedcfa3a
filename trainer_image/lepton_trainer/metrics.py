"""Prometheus metrics of a training job (prometheus-client).

Every metric carries the job's name and namespace as labels (``contract.METRICS_JOB_LABEL``
and ``contract.METRICS_NAMESPACE_LABEL``). Only local rank 0 of each node serves them,
on ``contract.METRICS_PORT``, so the ranks of one node never race for the port.
``lepton_train_samples_per_second`` is the whole job's throughput as seen from that
node (global batch / step time), so aggregate it across nodes with ``max``, not ``sum``.

Usable from a user's own script: ``TrainingMetrics(job="x", port=9400)``.
"""
from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from . import contract

log = logging.getLogger(__name__)

_HELP = {
    contract.METRIC_STEP: "Optimizer steps completed.",
    contract.METRIC_LOSS: "Training loss of the last step.",
    contract.METRIC_SAMPLES_PER_SECOND: "Training samples per second of the whole job.",
    contract.METRIC_WORLD_SIZE: "Ranks in the current process group.",
    contract.METRIC_CHECKPOINT_STEP: "Step of the newest checkpoint written or resumed from.",
    contract.METRIC_RESTARTS: "Worker group restarts seen by this node's elastic agent.",
}


class TrainingMetrics:
    """The job's gauges in a private registry, optionally served over HTTP.

    ``port=None`` keeps the metrics in memory only (ranks other than local rank 0).
    A port that cannot be bound is logged and training goes on without serving.
    """

    def __init__(self, job: str, namespace: str = "", port: int | None = None,
                 addr: str = "0.0.0.0"):
        self.registry = CollectorRegistry()
        labels = {contract.METRICS_JOB_LABEL: job, contract.METRICS_NAMESPACE_LABEL: namespace}
        self._gauges = {name: Gauge(name, text, list(labels), registry=self.registry).labels(**labels)
                        for name, text in _HELP.items()}
        self._server = None
        self._last: tuple[int, float] | None = None
        if port is not None:
            try:
                self._server, _ = start_http_server(port, addr=addr, registry=self.registry)
            except OSError as exc:
                log.warning("metrics not served: cannot bind %s:%s: %s", addr, port, exc)

    def set(self, name: str, value: float) -> None:
        self._gauges[name].set(value)

    def step(self, step: int, loss: float, global_batch: int) -> None:
        """Record a completed step; samples/s comes from the time since the previous call."""
        now = time.perf_counter()
        if self._last is not None and step > self._last[0] and now > self._last[1]:
            rate = (step - self._last[0]) * global_batch / (now - self._last[1])
            self.set(contract.METRIC_SAMPLES_PER_SECOND, rate)
        self._last = (step, now)
        self.set(contract.METRIC_STEP, step)
        self.set(contract.METRIC_LOSS, loss)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
