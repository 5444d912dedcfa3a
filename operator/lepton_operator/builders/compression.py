"""The compression Job of a LeptonModel revision, as a plain dict (pure).

``<model>-compress-<revision>`` runs ``python -m lepton_trainer.compress`` once. The
source model's claim is mounted at ``MOUNT``; the input is the source directory and
the artifact goes to ``lepton-models/<model>/<revision>`` on the same claim. The
program writes its result JSON to the termination-message file, where the operator
reads it from the pod's status.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Mapping

from lepton_trainer import contract

from ..constants import (GPU_RESOURCE, LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_MODEL, LABEL_NAME,
                         LABEL_REVISION, LABEL_ROLE, MANAGED_BY, ROLE_COMPRESSION)
from ..model_spec import ModelSpec, PvcPath
from ..spec import Resources
from . import owner_reference
from .training import CONTAINER_SECURITY, DEFAULT_POD_SECURITY, GPU_TOLERATION

Obj = dict[str, Any]
MOUNT = "/models"
DEFAULT_RESOURCES = Resources(cpu="1", memory="2Gi")


def job_name(model: str, revision: str) -> str:
    return f"{model}-compress-{revision}"


def labels(model: str, role: str, revision: str) -> dict[str, str]:
    return {LABEL_NAME: "lepton-model", LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: role,
            LABEL_MODEL: model, LABEL_ROLE: role, LABEL_REVISION: revision}


def meta(owner: Mapping[str, Any], name: str, lbls: dict[str, str]) -> Obj:
    return {"name": name, "namespace": owner["metadata"]["namespace"], "labels": lbls,
            "ownerReferences": [owner_reference(owner)]}


def resources(r: Resources) -> Obj:
    """requests == limits for cpu/memory; GPUs as nvidia.com/gpu."""
    requests = {k: v for k, v in (("cpu", r.cpu), ("memory", r.memory)) if v}
    limits = dict(requests)
    if r.gpus:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = r.gpus
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def pod_common(r: Resources) -> Obj:
    """Security and scheduling settings shared by the compression and serving pods.

    The GPU taint is tolerated even without a GPU request (like the rendezvous pod), so
    CPU-only compression and serving can use spare CPU on GPU nodes.
    """
    del r   # placement is the same with or without GPUs; the GPU limit does the rest
    return {"securityContext": copy.deepcopy(DEFAULT_POD_SECURITY), "enableServiceLinks": False,
            "automountServiceAccountToken": False, "tolerations": [dict(GPU_TOLERATION)]}


def env(name: str, value: Any) -> Obj:
    return {"name": name, "value": str(value)}


def compression_job(owner: Mapping[str, Any], spec: ModelSpec, revision: str, source: PvcPath,
                    artifact: PvcPath) -> Obj:
    """The batch/v1 Job that compresses ``source`` into ``artifact``."""
    model = owner["metadata"]["name"]
    c = spec.compression
    lbls = labels(model, ROLE_COMPRESSION, revision)
    variables = [
        env(contract.ENV_MODEL_DIR, f"{MOUNT}/{source.path}".rstrip("/")),
        env(contract.ENV_ARTIFACT_DIR, f"{MOUNT}/{artifact.path}"),
        env(contract.ENV_MODEL_NAME, model),
        env(contract.ENV_COMPRESSION_METHOD, c.method),
        env(contract.ENV_COMPRESSION_PARAMS, json.dumps(dict(c.params), sort_keys=True)),
    ]
    if c.max_accuracy_drop is not None:
        variables.append(env(contract.ENV_MAX_ACCURACY_DROP, c.max_accuracy_drop))
    res = c.resources if c.resources != Resources() else DEFAULT_RESOURCES
    container = {
        "name": "compress",
        "image": spec.compression_image,
        "imagePullPolicy": spec.serving.image_pull_policy,
        "command": ["python", "-m", "lepton_trainer.compress"],
        "env": variables,
        "volumeMounts": [{"name": "models", "mountPath": MOUNT}],
        "resources": resources(res),
        "securityContext": dict(CONTAINER_SECURITY),
        "terminationMessagePath": contract.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "File",
    }
    template_meta: Obj = {"labels": dict(lbls)}
    if c.pod_annotations:
        template_meta["annotations"] = dict(c.pod_annotations)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": meta(owner, job_name(model, revision), lbls),
        "spec": {
            "backoffLimit": c.backoff_limit,
            "template": {
                "metadata": template_meta,
                "spec": {
                    **pod_common(res),
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": source.claim}}],
                },
            },
        },
    }


def read_result(pod: Mapping[str, Any]) -> tuple[str, dict | None]:
    """(state, result) of a compression pod from its termination message.

    state is "running", "succeeded" or "failed"; result is the parsed JSON object, or
    a dict ``{"message": text}`` when the message is not JSON.
    """
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if not term:
            continue
        text = (term.get("message") or "").strip()
        try:
            result = json.loads(text) if text else None
        except ValueError:
            result = {"message": text[-1024:]}
        if result is not None and not isinstance(result, dict):
            result = {"message": text[-1024:]}
        return ("succeeded" if term.get("exitCode") == 0 else "failed"), result
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        return phase.lower(), None
    return "running", None
