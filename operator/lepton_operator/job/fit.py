"""How many workers fit on the nodes now (pure): requests of cpu, memory and GPUs.

A node offers its allocatable ``cpu``, ``memory`` and ``nvidia.com/gpu`` minus the
requests of the non-terminal pods bound to it; a node that is not Ready, or is cordoned,
offers nothing. A worker fits on a node only if every one of its requests fits there and
its placement (nodeSelector, tolerations of NoSchedule/NoExecute taints, required node
affinity) allows the node; ``fit_workers`` counts how many fit across the nodes.
Requests of pods that are not bound yet (and that the scheduler has not found
unschedulable) will land somewhere: they are taken off the nodes' free resources in node
name order, so two jobs do not count the same free capacity.

Quantities are parsed with the Kubernetes client's ``parse_quantity``; a pod's requests
are what the scheduler counts (each container's requests, else its limits; the largest
init container; sidecars; the pod's overhead).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping

from kubernetes.utils.quantity import parse_quantity

from ..constants import GPU_RESOURCE
from ..core.objects import placement, resources
from . import objects
from .spec import JobSpec

UNLIMITED = 10 ** 6           # workers that ask for nothing fit "without limit" on a node
NOTE_NODES = 3                # nodes a shortfall's note names


@dataclasses.dataclass(frozen=True)
class Requests:
    """cpu (millicores), memory (bytes) and GPUs: what a pod asks for, or a node offers."""
    cpu: int = 0
    memory: int = 0
    gpus: int = 0

    def __add__(self, other: "Requests") -> "Requests":
        return Requests(self.cpu + other.cpu, self.memory + other.memory, self.gpus + other.gpus)

    def __sub__(self, other: "Requests") -> "Requests":
        """What is left, never below zero."""
        return Requests(max(self.cpu - other.cpu, 0), max(self.memory - other.memory, 0),
                        max(self.gpus - other.gpus, 0))

    def __bool__(self) -> bool:
        return bool(self.cpu or self.memory or self.gpus)

    def peak(self, other: "Requests") -> "Requests":
        return Requests(max(self.cpu, other.cpu), max(self.memory, other.memory), max(self.gpus, other.gpus))

    def fits_in(self, free: "Requests") -> bool:
        return self.cpu <= free.cpu and self.memory <= free.memory and self.gpus <= free.gpus

    def times_in(self, free: "Requests") -> int:
        """How many of these fit in ``free`` (``UNLIMITED`` when nothing is asked for)."""
        counts = [f // n for n, f in ((self.cpu, free.cpu), (self.memory, free.memory), (self.gpus, free.gpus)) if n]
        return min(counts, default=UNLIMITED)


def resource_list(values: Mapping[str, Any] | None) -> Requests:
    """A Kubernetes ResourceList (``{cpu, memory, nvidia.com/gpu, ...}``) -> Requests."""
    values = values or {}
    cpu, memory, gpus = (values.get(k) for k in ("cpu", "memory", GPU_RESOURCE))
    return Requests(math.ceil(parse_quantity(cpu) * 1000) if cpu is not None else 0,
                    math.ceil(parse_quantity(memory)) if memory is not None else 0,
                    math.ceil(parse_quantity(gpus)) if gpus is not None else 0)


def container_requests(resources: Mapping[str, Any] | None) -> Requests:
    """A container's requests as the scheduler counts them: each resource's request, else
    its limit (a limit alone sets the request)."""
    resources = resources or {}
    return resource_list({**(resources.get("limits") or {}), **(resources.get("requests") or {})})


def pod_requests(pod_spec: Mapping[str, Any]) -> Requests:
    """A pod's effective requests: its containers and sidecars (init containers with
    ``restartPolicy: Always``), or the largest init container with the sidecars started
    before it, whichever is larger; plus the pod's overhead."""
    total = Requests()
    for c in pod_spec.get("containers") or ():
        total += container_requests(c.get("resources"))
    sidecars, init_peak = Requests(), Requests()
    for c in pod_spec.get("initContainers") or ():
        r = container_requests(c.get("resources"))
        if c.get("restartPolicy") == "Always":
            sidecars += r
        else:
            init_peak = init_peak.peak(sidecars + r)
    return (total + sidecars).peak(init_peak) + resource_list(pod_spec.get("overhead"))


def pod_usage(pod: Mapping[str, Any]) -> tuple[str | None, Requests] | None:
    """(node name, None while not bound; its requests) of a pod that holds or is about to
    hold capacity; None for one that holds none: terminal, asking for nothing, or not
    bound and found unschedulable by the scheduler (it waits for capacity, takes none)."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    node = spec.get("nodeName")
    if node is None and any(c.get("type") == "PodScheduled" and c.get("status") == "False"
                            and c.get("reason") == "Unschedulable" for c in status.get("conditions") or ()):
        return None
    requests = pod_requests(spec)
    return (node, requests) if requests else None


# --- nodes -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NodeView:
    """What placement needs of a node (no heartbeat: a node's status updates that change
    none of this compare equal)."""
    name: str
    allocatable: Requests
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    taints: tuple[Mapping[str, Any], ...] = ()
    unschedulable: bool = False
    ready: bool = True


def node_view(node: Mapping[str, Any]) -> NodeView:
    meta, spec, status = node.get("metadata", {}), node.get("spec", {}) or {}, node.get("status", {}) or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    return NodeView(name=meta.get("name", ""), allocatable=resource_list(status.get("allocatable")),
                    labels=dict(meta.get("labels") or {}), taints=tuple(spec.get("taints") or ()),
                    unschedulable=bool(spec.get("unschedulable")), ready=ready)


def _tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator") == "Exists" and (not t.get("key") or t.get("key") == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _matches(values: Mapping[str, str], expr: Mapping[str, Any]) -> bool:
    """One node selector requirement (``In``, ``NotIn``, ``Exists``, ``DoesNotExist``, ``Gt``, ``Lt``)."""
    key, op, wanted = expr.get("key"), expr.get("operator"), list(expr.get("values") or ())
    value = values.get(key)
    if op in ("Gt", "Lt"):
        try:
            have, bound = int(value or ""), int(wanted[0])
        except (ValueError, IndexError):
            return False
        return have > bound if op == "Gt" else have < bound
    return {"In": value in wanted, "NotIn": value not in wanted, "Exists": key in values,
            "DoesNotExist": key not in values}.get(op, False)


def _affinity_allows(node: NodeView, affinity: Mapping[str, Any] | None) -> bool:
    """The required node affinity: any of its terms, each with all of its requirements
    (an empty term matches no node)."""
    required = ((affinity or {}).get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    terms = (required or {}).get("nodeSelectorTerms")
    if not terms:
        return True
    fields = {"metadata.name": node.name}
    return any((t.get("matchExpressions") or t.get("matchFields"))
               and all(_matches(node.labels, e) for e in t.get("matchExpressions") or ())
               and all(_matches(fields, e) for e in t.get("matchFields") or ()) for t in terms)


def node_fits(node: NodeView, placement: Mapping[str, Any]) -> bool:
    """A pod placed by ``placement`` (its ``nodeSelector``, ``tolerations`` and
    ``affinity``) may go on this node: not cordoned, selector and required node affinity
    match, NoSchedule/NoExecute taints tolerated. (Readiness is the caller's question.)"""
    tolerations = list(placement.get("tolerations") or ())
    return (not node.unschedulable
            and all(node.labels.get(k) == v for k, v in (placement.get("nodeSelector") or {}).items())
            and _affinity_allows(node, placement.get("affinity"))
            and all(_tolerates(tolerations, t) for t in node.taints
                    if t.get("effect") in ("NoSchedule", "NoExecute")))


# --- the fit -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fit:
    """``slots``: workers that fit now; ``no_node_fits``: no node the workers may use could
    hold one even empty (a pool at zero); ``largest_gpus``: the most GPUs such a node has;
    ``free``: the Ready nodes the workers may use, with what they offer now."""
    slots: int
    no_node_fits: bool
    largest_gpus: int
    free: tuple[tuple[str, Requests], ...] = ()


def fit_workers(nodes: Iterable[NodeView], used: Mapping[str, Requests], need: Requests,
                placement: Mapping[str, Any], pending: Requests = Requests()) -> Fit:
    """How many workers that each ask for ``need`` and are placed by ``placement`` fit on
    ``nodes``, given the requests ``used`` of the pods bound to each node and ``pending``,
    the requests of pods not bound yet (see the module doc)."""
    eligible = sorted((n for n in nodes if node_fits(n, placement)), key=lambda n: n.name)
    free: list[tuple[str, Requests]] = []
    for n in (n for n in eligible if n.ready):
        left = n.allocatable - used.get(n.name, Requests())
        take = left - (left - pending)                  # what of the pending requests lands here
        free.append((n.name, left - take))
        pending = pending - take
    slots = min(sum(need.times_in(f) for _, f in free), UNLIMITED)
    return Fit(slots, no_node_fits=not any(need.fits_in(n.allocatable) for n in eligible),
               largest_gpus=max((n.allocatable.gpus for n in eligible), default=0), free=tuple(free))


def worker_requests(spec: JobSpec) -> Requests:
    """What one worker of ``spec`` asks for (its container's requests)."""
    return container_requests(resources(spec.resources))


def worker_fit(spec: JobSpec, nodes: Iterable[NodeView], used: Mapping[str, Requests] | None = None,
               pending: Requests = Requests()) -> Fit:
    """``fit_workers`` for the workers of ``spec``, placed as their pods are."""
    return fit_workers(nodes, used or {}, worker_requests(spec),
                       placement(objects.worker_placement(spec), spec.resources.gpus), pending)


def cpu_text(millicores: int) -> str:
    return str(millicores // 1000) if millicores % 1000 == 0 else f"{millicores / 1000:g}"


def memory_text(size: int) -> str:
    for unit, scale in (("Ti", 2 ** 40), ("Gi", 2 ** 30), ("Mi", 2 ** 20), ("Ki", 2 ** 10)):
        if size >= scale:
            return f"{round(size / scale, 1):g}{unit}"
    return str(size)


def describe(r: Requests, kinds: Requests | None = None) -> str:
    """``r`` in words ("4 CPU, 16Gi memory, 1 GPU"), only the kinds ``kinds`` asks for
    (every kind ``r`` has when None)."""
    kinds = kinds or r
    parts = [text for wanted, text in ((kinds.cpu, f"{cpu_text(r.cpu)} CPU"),
                                       (kinds.memory, f"{memory_text(r.memory)} memory"),
                                       (kinds.gpus, f"{r.gpus} GPU")) if wanted]
    return ", ".join(parts) or "nothing"


def shortfall_note(free: Iterable[tuple[str, Requests]], need: Requests) -> str:
    """Where workers that ask for ``need`` could go and what is free there (``Fit.free``),
    in a few words: the nodes that hold the most of them first."""
    free = list(free)
    if not free:
        return "no Ready, schedulable node matches the workers' nodeSelector, tolerations and affinity"
    shown = sorted(free, key=lambda nf: -need.times_in(nf[1]))[:NOTE_NODES]
    more = f"; {len(free) - len(shown)} more node(s)" if len(free) > len(shown) else ""
    return "; ".join(f"node {name}: {describe(r, need)} free" for name, r in shown) + more
