"""Pieces every child object shares (pure: specs in, plain dicts out, no API client).

Owner references, object metadata and labels, the security defaults, resource
requests, GPU tolerations, env entries, the writable scratch directory, and
NetworkPolicies with the decision of which to apply and which to delete.
``job.objects`` and ``model.objects`` build their children from these.

Security defaults, for every pod the operator makes: run as the image's own non-root
user (``contract.IMAGE_UID``), RuntimeDefault seccomp, no privilege escalation, every
capability dropped and a read-only root filesystem. A spec's ``podSecurityContext`` and
``securityContext`` override single fields (``readOnlyRootFilesystem: false`` turns the
read-only root off). HOME and TMPDIR point at an emptyDir, so the image writes nowhere
else.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Iterable, Mapping

from lepton_trainer import contract

from ..constants import (ANNOTATION_SPEC_HASH, GPU_NODE_LABEL, GPU_RESOURCE, GPU_TAINT_KEY, JOB_KIND, LABEL_COMPONENT, LABEL_JOB,
                         LABEL_MANAGED_BY, LABEL_MODEL, LABEL_NAME, LABEL_ROLE, MANAGED_BY, MODEL_KIND)
from .fields import NetworkPolicySpec, Placement, Resources, escalates

Obj = dict[str, Any]

GPU_TOLERATION = {"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
# A pod that asks for no GPU stays off GPU nodes: a store, a server or a compression step on
# a GPU node burns GPU node hours for nothing (and can keep a GPU pool from scaling down).
AVOID_GPU_NODES = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [{"key": GPU_NODE_LABEL, "operator": "NotIn", "values": ["true"]}]}]}}}
DEFAULT_POD_SECURITY = {"runAsNonRoot": True, "runAsUser": contract.IMAGE_UID, "runAsGroup": contract.IMAGE_UID,
                        "fsGroup": contract.IMAGE_UID, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
                      "capabilities": {"drop": ["ALL"]}}
SCRATCH_VOLUME = "tmp"
SCRATCH_SIZE_LIMIT = "4Gi"     # the scratch emptyDir (HOME, TMPDIR) of every pod

# Per owner kind: the app name label and the label that carries the owner's name.
_APP = {JOB_KIND: ("lepton-job", LABEL_JOB), MODEL_KIND: ("lepton-model", LABEL_MODEL)}


def owner_reference(owner: Mapping[str, Any], controller: bool = True) -> Obj:
    """An ownerReference to ``owner`` (a resource body), so deleting the owner deletes the child."""
    meta = owner["metadata"]
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"],
            "uid": meta["uid"], "controller": controller, "blockOwnerDeletion": True}


def labels(owner_kind: str, owner_name: str, role: str, **extra: str) -> dict[str, str]:
    """The labels of a child of a LeptonJob or LeptonModel with ``role``; ``extra`` maps
    further label keys to values (worker index, revision)."""
    app, owner_label = _APP[owner_kind]
    return {LABEL_NAME: app, LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: role,
            owner_label: owner_name, LABEL_ROLE: role, **extra}


def meta(owner: Mapping[str, Any], name: str, lbls: Mapping[str, str]) -> Obj:
    """Metadata of a child named ``name`` in the owner's namespace, owned by it."""
    return {"name": name, "namespace": owner["metadata"]["namespace"], "labels": dict(lbls),
            "ownerReferences": [owner_reference(owner)]}


def env(name: str, value: Any) -> Obj:
    """A plain ``{name, value}`` env entry (values are strings)."""
    return {"name": name, "value": str(value)}


def resources(r: Resources) -> Obj:
    """requests == limits for cpu/memory; GPUs as nvidia.com/gpu."""
    requests = {k: v for k, v in (("cpu", r.cpu), ("memory", r.memory)) if v}
    limits = dict(requests)
    if r.gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = r.gpus
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def gpus_requested(pod_spec: Mapping[str, Any]) -> int:
    """GPUs a pod spec asks for (limits, else requests, summed over containers)."""
    total = 0
    for c in pod_spec.get("containers") or ():
        res = c.get("resources") or {}
        value = (res.get("limits") or {}).get(GPU_RESOURCE) or (res.get("requests") or {}).get(GPU_RESOURCE)
        total += int(value or 0)
    return total


def chooses_gpu_nodes(p: Placement) -> bool:
    """Whether a placement names the GPU nodes itself: a nodeSelector on their label, or a
    toleration of their taint (the key, or every taint)."""
    return GPU_NODE_LABEL in (p.node_selector or {}) or any(
        t.get("key") == GPU_TAINT_KEY or (not t.get("key") and t.get("operator") == "Exists") for t in p.tolerations)


def placement(p: Placement, gpus: int) -> Obj:
    """The pod spec fields that place a role's pods: its nodeSelector, tolerations (plus the
    GPU taint's when it asks for GPUs), priorityClassName, and its affinity, or, asking for
    no GPU, giving no affinity and not choosing GPU nodes itself, ``AVOID_GPU_NODES``."""
    out: Obj = {}
    if p.node_selector:
        out["nodeSelector"] = dict(p.node_selector)
    tols = with_gpu_toleration(p.tolerations) if gpus else [dict(t) for t in p.tolerations]
    if tols:
        out["tolerations"] = tols
    affinity = p.affinity or (None if gpus or chooses_gpu_nodes(p) else AVOID_GPU_NODES)
    if affinity:
        out["affinity"] = copy.deepcopy(dict(affinity))
    if p.priority_class_name:
        out["priorityClassName"] = p.priority_class_name
    return out


def with_gpu_toleration(tolerations: Iterable[Mapping[str, Any]]) -> list[Obj]:
    """``tolerations`` plus the GPU taint's, unless one for that key is already there."""
    out = [dict(t) for t in tolerations]
    if not any(t.get("key") == GPU_TAINT_KEY for t in out):
        out.append(dict(GPU_TOLERATION))
    return out


def pod_security(override: Mapping[str, Any] | None = None) -> Obj:
    """The pod securityContext: the defaults with the spec's fields on top."""
    return {**copy.deepcopy(DEFAULT_POD_SECURITY), **copy.deepcopy(dict(override or {}))}


def container_security(override: Mapping[str, Any] | None = None) -> Obj:
    """The container securityContext: the defaults with the spec's fields on top. A spec
    that asks for ``privileged: true`` (or adds CAP_SYS_ADMIN) without setting
    ``allowPrivilegeEscalation`` drops that default: the Pod API refuses the pair."""
    override = copy.deepcopy(dict(override or {}))
    defaults = copy.deepcopy(CONTAINER_SECURITY)
    if escalates(override) and "allowPrivilegeEscalation" not in override:
        defaults.pop("allowPrivilegeEscalation")
    return {**defaults, **override}


def scratch_volume() -> Obj:
    """The emptyDir behind HOME and TMPDIR, at most SCRATCH_SIZE_LIMIT (a pod that writes
    more is evicted, never the node's disk filled)."""
    return {"name": SCRATCH_VOLUME, "emptyDir": {"sizeLimit": SCRATCH_SIZE_LIMIT}}


def scratch_mount() -> Obj:
    return {"name": SCRATCH_VOLUME, "mountPath": contract.WRITABLE_DIR}


def scratch_env() -> list[Obj]:
    """HOME and TMPDIR in the writable scratch directory."""
    return [env("HOME", contract.WRITABLE_DIR), env("TMPDIR", contract.WRITABLE_DIR)]


# --- NetworkPolicies ------------------------------------------------------------------

NETWORK_POLICY_API_VERSION = "networking.k8s.io/v1"
# What the operator does with NetworkPolicies, as RBAC verbs: a kopf index lists and
# watches them, server-side apply patches them (and creates them, which needs create),
# and a policy turned off is deleted. The chart grants exactly these.
NETWORK_POLICY_VERBS = ("list", "watch", "create", "patch", "delete")
# Seconds an applied policy may take to show up in the index before it is applied again.
POLICY_APPLY_TTL = 30.0


def spec_hash(obj: Mapping[str, Any]) -> str:
    """Short stable hash of an object's ``spec``."""
    return hashlib.sha256(json.dumps(obj.get("spec"), sort_keys=True).encode()).hexdigest()[:12]


def exposed_ingress(policy: NetworkPolicySpec, ports: list[Obj]) -> Obj:
    """The ingress rule for ports a resource exposes to the outside (serving ports, the
    metrics port): from ``policy.ingress_from`` when set, else from any source."""
    rule: Obj = {"ports": copy.deepcopy(ports)}
    if policy.ingress_from:
        rule["from"] = copy.deepcopy([dict(p) for p in policy.ingress_from])
    return rule


def network_policy(owner: Mapping[str, Any], name: str, lbls: Mapping[str, str], pod_selector: Mapping[str, str],
                   ingress: list[Obj]) -> Obj:
    """A NetworkPolicy, owned by ``owner``, over the pods ``pod_selector`` matches: ingress
    only as the ``ingress`` rules allow, egress untouched (policyTypes Ingress only). It
    carries the hash of its spec (``ANNOTATION_SPEC_HASH``), so a changed policy is seen
    from the index alone."""
    obj = {"apiVersion": NETWORK_POLICY_API_VERSION, "kind": "NetworkPolicy",
           "metadata": meta(owner, name, lbls),
           "spec": {"podSelector": {"matchLabels": dict(pod_selector)}, "policyTypes": ["Ingress"],
                    "ingress": copy.deepcopy(ingress)}}
    obj["metadata"]["annotations"] = {ANNOTATION_SPEC_HASH: spec_hash(obj)}
    return obj


def policy_changes(desired: Iterable[Obj], present: Mapping[str, str],
                   applied: dict[str, tuple[str, float]], now: float) -> tuple[list[Obj], list[str]]:
    """(policies to apply, names of policies to delete).

    ``desired``: the policies the spec asks for (none when ``networkPolicy.enabled`` is
    false); ``present``: name -> spec hash of the owner's policies the index shows.
    A desired policy is applied when it is missing or its hash differs, unless it was
    applied with that hash less than ``POLICY_APPLY_TTL`` seconds ago (the index has not
    caught up); a present policy that is not desired is deleted. ``applied`` (name ->
    (hash, monotonic time of the apply)) is the caller's memory, updated here.
    """
    wanted = {p["metadata"]["name"]: p for p in desired}
    to_apply = []
    for name, policy in wanted.items():
        want = policy["metadata"]["annotations"][ANNOTATION_SPEC_HASH]
        if present.get(name) == want:
            applied.pop(name, None)
            continue
        last = applied.get(name)
        if last is not None and last[0] == want and now - last[1] < POLICY_APPLY_TTL:
            continue
        applied[name] = (want, now)
        to_apply.append(policy)
    to_delete = sorted(name for name in present if name not in wanted)
    for name in to_delete:
        applied.pop(name, None)
    return to_apply, to_delete
