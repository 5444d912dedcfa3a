"""Desired child objects of a LeptonJob, as plain dicts (pure).

A job owns:

- ``<job>-rdzv`` pod and Service: the c10d TCPStore (``python -m lepton_trainer.rendezvous``)
  on the fixed ``contract.RDZV_PORT``. It is not a worker, so losing any worker leaves the
  rendezvous state alive;
- ``<job>-workers``: a headless Service that gives every worker a stable DNS name and
  declares the metrics port;
- ``<job>-worker-<i>`` pods: one torchrun node agent each, joining the store with
  ``--rdzv-id=<job uid>`` and the rendezvous timeouts from the spec.

Every child carries an ownerReference to the job, so deleting the job deletes them;
the checkpoint PVC is never owned and never deleted.
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Mapping

from lepton_trainer import contract
from lepton_trainer.rendezvous import WORKER_ENV, torchrun_args

from ..constants import (ANNOTATION_GENERATION, ANNOTATION_SPEC_HASH, GPU_RESOURCE, GPU_TAINT_KEY,
                         LABEL_COMPONENT, LABEL_JOB, LABEL_KUEUE_QUEUE, LABEL_MANAGED_BY, LABEL_NAME,
                         LABEL_ROLE, LABEL_WORKER_INDEX, MANAGED_BY, ROLE_RDZV, ROLE_WORKER)
from ..spec import JobSpec
from . import owner_reference

Obj = dict[str, Any]

RDZV_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
GPU_TOLERATION = {"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
DEFAULT_POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "privileged": False,
                      "capabilities": {"drop": ["ALL"]}}


def rdzv_name(job: str) -> str:
    return f"{job}-rdzv"


def workers_service_name(job: str) -> str:
    return f"{job}-workers"


def worker_name(job: str, index: int) -> str:
    return f"{job}-worker-{index}"


def worker_selector(job: str) -> str:
    """Label selector of a job's worker pods (also the scale subresource's selector)."""
    return f"{LABEL_JOB}={job},{LABEL_ROLE}={ROLE_WORKER}"


def labels(job: str, role: str, index: int | None = None) -> dict[str, str]:
    out = {LABEL_NAME: "lepton-job", LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: role,
           LABEL_JOB: job, LABEL_ROLE: role}
    if index is not None:
        out[LABEL_WORKER_INDEX] = str(index)
    return out


def _meta(owner: Mapping[str, Any], name: str, lbls: dict[str, str]) -> Obj:
    return {"name": name, "namespace": owner["metadata"]["namespace"], "labels": lbls,
            "ownerReferences": [owner_reference(owner)]}


def _tolerations(spec: JobSpec) -> list[Obj]:
    tolerations = [dict(t) for t in spec.tolerations]
    if spec.resources.gpus and not any(t.get("key") == GPU_TAINT_KEY for t in tolerations):
        tolerations.append(dict(GPU_TOLERATION))
    return tolerations


def _pod_spec_common(spec: JobSpec, tolerate_gpu_taint: bool = False) -> Obj:
    pod: Obj = {
        "securityContext": {**DEFAULT_POD_SECURITY, **copy.deepcopy(dict(spec.pod_security_context))},
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
    }
    tolerations = _tolerations(spec)
    if tolerate_gpu_taint and not any(t.get("key") == GPU_TAINT_KEY for t in tolerations):
        tolerations.append(dict(GPU_TOLERATION))
    if tolerations:
        pod["tolerations"] = tolerations
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if spec.scheduler_name:
        pod["schedulerName"] = spec.scheduler_name
    return pod


def _env(name: str, value: Any) -> Obj:
    return {"name": name, "value": str(value)}


def rendezvous_objects(owner: Mapping[str, Any], spec: JobSpec, trainer_image: str) -> list[Obj]:
    """The rendezvous store pod and its Service."""
    job = owner["metadata"]["name"]
    lbls = labels(job, ROLE_RDZV)
    port = {"name": "rdzv", "containerPort": contract.RDZV_PORT, "protocol": "TCP"}
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": _meta(owner, rdzv_name(job), lbls),
        "spec": {
            **_pod_spec_common(spec, tolerate_gpu_taint=True),   # may share a GPU node; asks no GPU
            "restartPolicy": "Always",
            "containers": [{
                "name": "rendezvous",
                "image": trainer_image,
                "imagePullPolicy": spec.image_pull_policy,
                "command": ["python", "-m", "lepton_trainer.rendezvous",
                            "--port", str(contract.RDZV_PORT)],
                "ports": [port],
                "readinessProbe": {"tcpSocket": {"port": "rdzv"}, "periodSeconds": 2},
                "resources": copy.deepcopy(RDZV_RESOURCES),
                "securityContext": dict(CONTAINER_SECURITY),
            }],
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(owner, rdzv_name(job), lbls),
        "spec": {"selector": {LABEL_JOB: job, LABEL_ROLE: ROLE_RDZV},
                 "ports": [{"name": "rdzv", "port": contract.RDZV_PORT, "targetPort": "rdzv",
                            "protocol": "TCP"}]},
    }
    return [pod, service]


def workers_service(owner: Mapping[str, Any]) -> Obj:
    """Headless Service: stable DNS names for workers, declared metrics port."""
    job = owner["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(owner, workers_service_name(job), labels(job, ROLE_WORKER)),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {LABEL_JOB: job, LABEL_ROLE: ROLE_WORKER},
                 "ports": [{"name": "metrics", "port": contract.METRICS_PORT,
                            "targetPort": "metrics", "protocol": "TCP"}]},
    }


def worker_command(owner: Mapping[str, Any], spec: JobSpec) -> list[str]:
    """``torchrun <options> (-m module | script) args``; ``$(POD_IP)`` is expanded by the kubelet."""
    meta = owner["metadata"]
    w, el = spec.workers, spec.elastic
    opts = torchrun_args(
        endpoint=f"{rdzv_name(meta['name'])}:{contract.RDZV_PORT}", run_id=meta["uid"],
        min_nodes=w.min, max_nodes=w.max, nproc_per_node=w.nproc_per_node,
        max_restarts=el.max_restarts, local_addr="$(POD_IP)",
        join_timeout=el.join_timeout, last_call_timeout=el.last_call_timeout,
        close_timeout=el.close_timeout)
    program = ["-m", spec.module] if spec.module else list(spec.command)
    return ["torchrun", *opts, *program, *spec.args]


def _volumes(spec: JobSpec) -> tuple[list[Obj], list[Obj]]:
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    claim_volume = {claim: f"pvc-{i}" for i, claim in enumerate(spec.claim_names)}
    volumes += [{"name": vol, "persistentVolumeClaim": {"claimName": claim}}
                for claim, vol in claim_volume.items()]
    for m in (spec.checkpoint, spec.output):
        if m:
            mount = {"name": claim_volume[m.claim_name], "mountPath": m.path}
            if m.sub_path:
                mount["subPath"] = m.sub_path
            mounts.append(mount)
    return volumes, mounts


def _resources(spec: JobSpec) -> Obj:
    r = spec.resources
    requests = {k: v for k, v in (("cpu", r.cpu), ("memory", r.memory)) if v}
    limits = dict(requests)
    if r.gpus:
        limits[GPU_RESOURCE] = r.gpus
        requests[GPU_RESOURCE] = r.gpus
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def worker_pod(owner: Mapping[str, Any], spec: JobSpec, index: int) -> Obj:
    """Worker pod ``index``: a torchrun agent; restartPolicy Never (the operator replaces it)."""
    meta = owner["metadata"]
    job = meta["name"]
    lbls = labels(job, ROLE_WORKER, index)
    if spec.queue_name:
        lbls[LABEL_KUEUE_QUEUE] = spec.queue_name
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        _env(contract.ENV_JOB_NAME, job),
        _env(contract.ENV_JOB_NAMESPACE, meta["namespace"]),
        _env(contract.ENV_JOB_UID, meta["uid"]),
        _env(contract.ENV_METRICS_PORT, contract.METRICS_PORT),
        *(_env(k, v) for k, v in WORKER_ENV.items()),
    ]
    if spec.checkpoint:
        env.append(_env(contract.ENV_CHECKPOINT_DIR, spec.checkpoint.path))
    if spec.output:
        env.append(_env(contract.ENV_OUTPUT_DIR, spec.output.path))
    env += [copy.deepcopy(dict(v)) for v in spec.env]
    volumes, mounts = _volumes(spec)
    container = {
        "name": "worker",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": worker_command(owner, spec),
        "env": env,
        "ports": [{"name": "metrics", "containerPort": contract.METRICS_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "securityContext": dict(CONTAINER_SECURITY),
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    pod_spec = {
        **_pod_spec_common(spec),
        "restartPolicy": "Never",
        "subdomain": workers_service_name(job),
        "containers": [container],
        "volumes": volumes,
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.affinity:
        pod_spec["affinity"] = copy.deepcopy(dict(spec.affinity))
    metadata = _meta(owner, worker_name(job, index), lbls)
    metadata["annotations"] = {ANNOTATION_SPEC_HASH: template_hash(pod_spec)}
    if meta.get("generation") is not None:
        metadata["annotations"][ANNOTATION_GENERATION] = str(meta["generation"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {**pod_spec, "hostname": worker_name(job, index)}}


def template_hash(pod_spec: Mapping[str, Any]) -> str:
    """Short stable hash of a worker pod spec without its per-worker host name."""
    return hashlib.sha256(json.dumps(pod_spec, sort_keys=True).encode()).hexdigest()[:12]
