"""Capacity as every LeptonJob's loop sees it: one object, shared by the loops.

``Capacity`` answers one question, how many workers of a spec fit on the nodes now
(``free_slots``: their cpu, memory and GPU requests against what each node has free, see
``job.fit``), and keeps what that answer needs beyond kopf's indices:

- the requests *reserved* by worker pods the operator created that no index shows yet,
  for ``PENDING_CREATE_TTL`` seconds, so two jobs never count the same capacity;
- the nodes as last seen, so a node's heartbeat wakes nobody and a capacity change does;
- the jobs *waiting* for capacity (their last plan wanted more workers than fit): only
  they are woken when capacity is released or nodes change, since waking every job on
  every pod event makes the reconciles grow with the square of the number of jobs;
- cluster-wide pod requests (``gpu_usage.ClusterGpuUsage``) for an operator that watches
  named namespaces and is asked to (``cluster_gpu_usage``), once its first list is in.

It holds no reference to the event loop: ``wake`` is the callback that wakes one job.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Mapping

from . import fit, gpu_usage
from .fit import NodeView, Requests
from .spec import JobSpec

PENDING_CREATE_TTL = 30.0     # seconds a created pod may take to show up in the index

Key = tuple[str, str]          # (namespace, job)
Usage = Mapping[str | None, Iterable[Requests]]   # node (None: not bound) -> requests of each pod


@dataclasses.dataclass
class Capacity:
    """The capacity bookkeeping every job's loop shares (see the module doc)."""
    wake: Callable[[str, str], None]
    clock: Callable[[], float] = time.monotonic
    reserved: dict[Key, tuple[Requests, float]] = dataclasses.field(default_factory=dict)  # pod -> (requests, when)
    nodes: dict[str, NodeView | None] = dataclasses.field(default_factory=dict)
    waiting: set[Key] = dataclasses.field(default_factory=set)
    cluster: gpu_usage.ClusterGpuUsage | None = None

    def reserve(self, namespace: str, pod: str, requests: Requests) -> None:
        """A worker pod was created: hold its requests until an index shows it."""
        if requests:
            self.reserved[(namespace, pod)] = (requests, self.clock())

    def release(self, namespace: str, pod: str) -> None:
        """The pod shows in the index (or was never created): its requests count from there."""
        self.reserved.pop((namespace, pod), None)

    def node_changed(self, name: str, view: NodeView | None) -> None:
        """A node event (None: deleted); a change of capacity wakes the waiting jobs."""
        if self.nodes.get(name) != view:
            self.nodes[name] = view
            self.wake_waiting()

    def set_waiting(self, key: Key, waiting: bool) -> None:
        """Whether the job ``key`` wants more workers than fit (woken on a release)."""
        (self.waiting.add if waiting else self.waiting.discard)(key)

    def wake_waiting(self) -> None:
        for namespace, name in list(self.waiting):
            self.wake(namespace, name)

    def usage(self, indexed: Usage) -> Usage:
        """Pod requests cluster-wide once its first list is in (namespaced mode, when
        asked for), else the watched namespaces' (kopf's index)."""
        if self.cluster is not None and self.cluster.synced.is_set():
            return self.cluster.usage()
        return indexed

    def free_slots(self, spec: JobSpec, indexed: Usage, nodes: Iterable[NodeView]) -> fit.Fit:
        """How many workers of this spec fit on the nodes now (``fit.Fit``)."""
        now = self.clock()
        usage = self.usage(indexed)
        used = {node: sum(requests, Requests()) for node, requests in usage.items() if node}
        pending = sum(usage.get(None, ()), Requests()) + sum(
            (r for r, t in self.reserved.values() if now - t < PENDING_CREATE_TTL), Requests())
        return fit.worker_fit(spec, nodes, used, pending)
