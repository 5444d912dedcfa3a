"""GPU capacity as every LeptonJob's loop sees it: one object, shared by the loops.

``Capacity`` answers one question, how many workers of a spec fit on the GPUs free now
(``free_slots``), and keeps what that answer needs beyond kopf's indices:

- GPUs *reserved* by worker pods the operator created that no index shows yet, for
  ``PENDING_CREATE_TTL`` seconds, so two jobs never count the same GPUs;
- the GPU nodes as last seen, so a node's heartbeat wakes nobody and a capacity change
  does;
- the jobs *waiting* for capacity (their last plan wanted more workers than fit): only
  they are woken when GPUs are released or nodes change, since waking every job on every
  pod event makes the reconciles grow with the square of the number of jobs;
- cluster-wide GPU usage (``gpu_usage.ClusterGpuUsage``) for an operator that watches
  named namespaces, once its first list is in.

It holds no reference to the event loop: ``wake`` is the callback that wakes one job.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Mapping

from . import gpu_usage, objects
from .spec import JobSpec
from .state import NodeView, worker_slots

PENDING_CREATE_TTL = 30.0     # seconds a created pod may take to show up in the index

Key = tuple[str, str]          # (namespace, job)
Usage = Mapping[str | None, Iterable[int]]   # node (None: not bound) -> GPUs of each pod


@dataclasses.dataclass
class Capacity:
    """The GPU bookkeeping every job's loop shares (see the module doc)."""
    wake: Callable[[str, str], None]
    clock: Callable[[], float] = time.monotonic
    reserved: dict[Key, tuple[int, float]] = dataclasses.field(default_factory=dict)  # pod -> (gpus, when)
    nodes: dict[str, NodeView | None] = dataclasses.field(default_factory=dict)
    waiting: set[Key] = dataclasses.field(default_factory=set)
    cluster: gpu_usage.ClusterGpuUsage | None = None

    def reserve(self, namespace: str, pod: str, gpus: int) -> None:
        """A worker pod was created: hold its GPUs until an index shows it."""
        if gpus:
            self.reserved[(namespace, pod)] = (gpus, self.clock())

    def release(self, namespace: str, pod: str) -> None:
        """The pod shows in the index (or was never created): its GPUs count from there."""
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
        """GPU usage cluster-wide once its first list is in (namespaced mode), else the
        watched namespaces' (kopf's index)."""
        if self.cluster is not None and self.cluster.synced.is_set():
            return self.cluster.usage()
        return indexed

    def free_slots(self, spec: JobSpec, indexed: Usage, nodes: Iterable[NodeView]) -> tuple[int, bool]:
        """(workers of this spec that fit on the GPUs free now, whether no current node can
        hold one at all)."""
        now = self.clock()
        usage = self.usage(indexed)
        used = {node: sum(gpus) for node, gpus in usage.items() if node}
        unscheduled = sum(usage.get(None, ())) + sum(g for g, t in self.reserved.values()
                                                     if now - t < PENDING_CREATE_TTL)
        slots, largest = worker_slots(nodes, used, spec.resources.gpus, spec.node_selector,
                                      objects.tolerations(spec), unscheduled)
        return slots, bool(spec.resources.gpus) and largest < spec.resources.gpus
