"""Desired child objects of a LeptonJob, as plain dicts (pure).

A job owns:

- ``<job>-rdzv`` pod and Service: the c10d TCPStore (``python -m lepton_trainer.rendezvous``)
  on the fixed ``contract.RDZV_PORT``. It is not a worker, so losing any worker leaves the
  rendezvous state alive. With ``faultTolerance: perStep`` the same pod runs torchft's
  Lighthouse on that port instead (``python -m lepton_trainer.lighthouse``), and each
  worker pod is one replica group: ``torchrun --standalone`` for its own processes, which
  join the Lighthouse's quorum every step;
- ``<job>-rdzv`` Secret (``rendezvous_secret``): the store's control-port token, a random
  value the operator makes once, mounted read-only into the c10d store's pod only (a file,
  never env or args) and sent by the operator with each report of lost workers;
- ``<job>-workers``: a headless Service that gives every worker a stable DNS name and
  declares the metrics port;
- ``<job>-worker-<i>`` pods: one torchrun node agent each, joining the store with
  ``--rdzv-id=<job uid>`` and the rendezvous timeouts from the spec.

- unless ``spec.networkPolicy.enabled`` is false, two NetworkPolicies (``network_policies``):
  ``<job>-rdzv`` lets only the job's workers reach the store's (or Lighthouse's) port and
  only the operator's pods its report port, and ``<job>-workers``
  lets the workers reach each other on any port (gloo and NCCL pick theirs) and
  ``networkPolicy.ingressFrom`` (else anyone) reach the metrics port. Egress stays open.

Every child carries an ownerReference to the job, so deleting the job deletes them;
the checkpoint PVC is never owned and never deleted.

Probes: the rendezvous pod has startup, readiness and liveness probes on the store's
TCP port. Workers have none: torchrun is the container's main process, so an agent that
dies ends the pod, which the operator replaces; a liveness kill of a worker that is
waiting in rendezvous or loading would end a ``restartPolicy: Never`` pod as a failure;
and the metrics port is served only by the training process of the built-in trainer
(or a script that uses ``TrainingMetrics``) once the process group has formed, so it
cannot tell a live agent from a dead one. Nothing routes traffic to workers by their
readiness (the headless Service publishes not-ready addresses).

``template_hash`` identifies the worker template from the parsed spec alone (the
fields that shape a worker pod), so it is known without building a pod and an
operator upgrade that builds pods differently never looks like a spec change.
"""
from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import hashlib
import json
from typing import Any, Iterable, Mapping

from lepton_trainer import contract
from lepton_trainer.rendezvous import WORKER_ENV, torchrun_args

from ..constants import (ANNOTATION_GENERATION, ANNOTATION_SPEC_HASH, API_VERSION, JOB_KIND, LABEL_JOB, ROLE_CAPACITY,
                         LABEL_KUEUE_QUEUE, LABEL_ROLE, LABEL_WORKER_INDEX, ROLE_RDZV, ROLE_WORKER)
from ..core.fields import Placement, default
from ..core.objects import (container_security, env, exposed_ingress, meta, network_policy, placement, pod_security,
                            resources, scratch_env, scratch_mount, scratch_volume, with_gpu_toleration)
from ..core.objects import labels as child_labels
from .spec import Elastic, JobSpec

Obj = dict[str, Any]

# The store is one small process; the CPU limit bounds a runaway, the request is what it uses.
RDZV_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}}
# The store's probes, all on its TCP port. Startup allows 5 minutes for the interpreter and
# torch to load on a busy node; after that, liveness restarts the store only when it has
# not accepted a connection for a minute (a restart loses the rendezvous state, and every
# agent then restarts its workers from the checkpoint).
RDZV_STARTUP_PROBE = {"tcpSocket": {"port": "rdzv"}, "periodSeconds": 2, "failureThreshold": 150}
RDZV_READINESS_PROBE = {"tcpSocket": {"port": "rdzv"}, "periodSeconds": 2}
RDZV_LIVENESS_PROBE = {"tcpSocket": {"port": "rdzv"}, "periodSeconds": 10, "timeoutSeconds": 5,
                       "failureThreshold": 6}
# The store's token: a Secret volume, its one key as a file readable by the pod's fsGroup
# (the image's user by default) and nobody else.
RDZV_TOKEN_VOLUME = "rdzv-token"
RDZV_TOKEN_MODE = 0o440
SHM_SIZE_LIMIT = "1Gi"         # /dev/shm of a worker that sets no memory
# faultTolerance perStep. The Lighthouse drops a replica group whose manager (heartbeat every
# 100 ms, on its own thread) has been silent this long; until then a quorum without it waits,
# so this is most of what a lost pod costs the survivors. A false drop costs a step: the
# group rejoins at the next one and heals from a peer.
LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS = 2000
# torchft's timeout of one collective, commit vote or healing transfer: a peer that stops
# answering without closing its connections (a partitioned node) costs this much.
FT_TIMEOUT_SECONDS = 30
# How long one (re)connection of a replica group to the Lighthouse may take, each try
# (torchft's default is 60 s). After the Lighthouse is replaced, a reconnection can first
# reach the old pod's address until the Service's rules on the node catch up, a SYN that
# nobody answers: this bounds what it costs. At a worker's start it is also how long the
# Lighthouse has to come up (a worker that gives up is an uncounted restart).
FT_CONNECT_TIMEOUT_SECONDS = 10
# JobSpec fields that do not shape a worker pod (sizing, lifecycle, autoscaling, the network).
_NOT_TEMPLATE = ("suspend", "backoff_limit", "active_deadline_seconds", "ttl_seconds_after_finished",
                 "autoscaling", "capacity", "network_policy", "rendezvous",
                 "default_image")     # follows from ``image``, which is in the hash
# Fields added after jobs already ran: left out of the hash while at their defaults, so that
# an operator upgrade does not make the running workers look stale.
_ADDED_LATER = {"elastic": (Elastic, ("keep_alive_interval", "keep_alive_max_attempts", "launcher"))}
_ADDED_LATER_TOP = {name: default(JobSpec, name) for name in ("fault_tolerance",)}


def owner(meta: Mapping[str, Any]) -> Obj:
    """The job as its children's owner (``core.objects.meta`` makes the reference)."""
    return {"apiVersion": API_VERSION, "kind": JOB_KIND,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                         "generation": meta.get("generation")}}


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
    """Labels of a job's child with ``role`` (workers also carry their index)."""
    return child_labels(JOB_KIND, job, role, **({LABEL_WORKER_INDEX: str(index)} if index is not None else {}))


def tolerations(spec: JobSpec, gpu: bool | None = None) -> list[Obj]:
    """The spec's tolerations, plus the GPU taint's when the pods ask for GPUs (or ``gpu``)."""
    wants_gpu = bool(spec.resources.gpus) if gpu is None else gpu
    if wants_gpu:
        return with_gpu_toleration(spec.tolerations)
    return [dict(t) for t in spec.tolerations]


def template_hash(spec: JobSpec) -> str:
    """Short stable hash of everything in the spec that shapes a worker pod."""
    fields = dataclasses.asdict(spec)
    for key in _NOT_TEMPLATE:
        fields.pop(key)
    fields["workers"].pop("replicas")
    for group, (cls, keys) in _ADDED_LATER.items():
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key in keys:
            if fields[group][key] == defaults[key]:
                del fields[group][key]
    for key, default in _ADDED_LATER_TOP.items():
        if fields[key] == default:
            del fields[key]
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def worker_placement(spec: JobSpec) -> Placement:
    """The workers' placement: the spec's top-level nodeSelector, tolerations, affinity, priority."""
    return Placement(spec.node_selector, spec.tolerations, spec.affinity, spec.priority_class_name)


def rendezvous_placement(spec: JobSpec) -> Placement:
    """``spec.rendezvous``'s placement; its priority is the workers' unless it names one (a
    store preempted before its workers stops them all)."""
    return dataclasses.replace(spec.rendezvous, priority_class_name=spec.rendezvous.priority_class_name
                               or spec.priority_class_name)


def _pod_spec_common(spec: JobSpec, role: Placement, gpus: int) -> Obj:
    pod: Obj = {
        "securityContext": pod_security(spec.pod_security_context),
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        **placement(role, gpus),
    }
    if spec.scheduler_name:
        pod["schedulerName"] = spec.scheduler_name
    return pod


def lighthouse_url(job: str) -> str:
    """Where a perStep job's replica groups find its Lighthouse (the rendezvous Service)."""
    return f"http://{rdzv_name(job)}:{contract.RDZV_PORT}"


def rendezvous_secret(owner: Mapping[str, Any], token: str) -> Obj:
    """The Secret ``<job>-rdzv`` holding the store's control-port ``token``; owned by the job,
    so it is deleted with it (never with the checkpoints), and immutable."""
    job = owner["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta(owner, rdzv_name(job), labels(job, ROLE_RDZV)),
            "type": "Opaque", "immutable": True, "stringData": {contract.RDZV_TOKEN_KEY: token}}


def secret_token(secret: Mapping[str, Any]) -> str:
    """The token in a ``rendezvous_secret`` as the API server returns it ("" when it holds none)."""
    try:
        return base64.b64decode((secret.get("data") or {}).get(contract.RDZV_TOKEN_KEY) or "").decode().strip()
    except (binascii.Error, UnicodeDecodeError):
        return ""


def _token_volume(job: str) -> tuple[Obj, Obj]:
    """(volume, mount) of the store's token: the Secret's one key, read-only, at contract.RDZV_TOKEN_FILE."""
    volume = {"name": RDZV_TOKEN_VOLUME, "secret": {
        "secretName": rdzv_name(job), "defaultMode": RDZV_TOKEN_MODE,
        "items": [{"key": contract.RDZV_TOKEN_KEY, "path": contract.RDZV_TOKEN_KEY}]}}
    return volume, {"name": RDZV_TOKEN_VOLUME, "mountPath": contract.RDZV_TOKEN_DIR, "readOnly": True}


def _coordinator_command(owner: Mapping[str, Any], spec: JobSpec) -> tuple[list[str], list[Obj]]:
    """(command, ports) of the rendezvous pod: the c10d store and its report port (which
    changes the job's own run only), or for perStep the Lighthouse alone (lost groups leave
    its quorum by their heartbeat)."""
    port = {"name": "rdzv", "containerPort": contract.RDZV_PORT, "protocol": "TCP"}
    if spec.per_step:
        return (["python", "-m", "lepton_trainer.lighthouse", "--port", str(contract.RDZV_PORT),
                 "--min-replicas", str(spec.workers.min),
                 "--join-timeout-ms", str(spec.elastic.last_call_timeout * 1000),
                 "--heartbeat-timeout-ms", str(LIGHTHOUSE_HEARTBEAT_TIMEOUT_MS)], [port])
    control = {"name": "control", "containerPort": contract.RDZV_CONTROL_PORT, "protocol": "TCP"}
    return (["python", "-m", "lepton_trainer.rendezvous",
             "--port", str(contract.RDZV_PORT), "--control-port", str(contract.RDZV_CONTROL_PORT),
             "--run-id", owner["metadata"]["uid"]],
            [port, control])


def rendezvous_objects(owner: Mapping[str, Any], spec: JobSpec, trainer_image: str) -> list[Obj]:
    """The rendezvous pod (the c10d store, or for perStep the Lighthouse) and its Service.
    The store's pod mounts the ``rendezvous_secret`` (which must exist before it)."""
    job = owner["metadata"]["name"]
    lbls = labels(job, ROLE_RDZV)
    command, ports = _coordinator_command(owner, spec)
    volumes, mounts = [scratch_volume()], [scratch_mount()]
    if not spec.per_step:
        volume, mount = _token_volume(job)
        volumes.append(volume)
        mounts.append(mount)
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": meta(owner, rdzv_name(job), lbls),
        "spec": {
            **_pod_spec_common(spec, rendezvous_placement(spec), 0),   # asks no GPU: off GPU nodes by default
            "restartPolicy": "Always",
            "containers": [{
                "name": "rendezvous",
                "image": trainer_image,
                "imagePullPolicy": spec.image_pull_policy,
                "command": command,
                "ports": ports,
                "env": scratch_env(),
                "startupProbe": copy.deepcopy(RDZV_STARTUP_PROBE),
                "readinessProbe": copy.deepcopy(RDZV_READINESS_PROBE),
                "livenessProbe": copy.deepcopy(RDZV_LIVENESS_PROBE),
                "resources": copy.deepcopy(RDZV_RESOURCES),
                "securityContext": container_security(spec.security_context),
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(owner, rdzv_name(job), lbls),
        "spec": {"selector": {LABEL_JOB: job, LABEL_ROLE: ROLE_RDZV},
                 "ports": [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"],
                            "protocol": "TCP"} for p in ports]},
    }
    return [pod, service]


def workers_service(owner: Mapping[str, Any]) -> Obj:
    """Headless Service: stable DNS names for workers, declared metrics port."""
    job = owner["metadata"]["name"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(owner, workers_service_name(job), labels(job, ROLE_WORKER)),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {LABEL_JOB: job, LABEL_ROLE: ROLE_WORKER},
                 "ports": [{"name": "metrics", "port": contract.METRICS_PORT,
                            "targetPort": "metrics", "protocol": "TCP"}]},
    }


def operator_peer(operator_namespace: str, operator_labels: Iterable[tuple[str, str]] = ()) -> Obj:
    """The NetworkPolicyPeer of the operator's pods: its namespace, and within it the pods
    with ``operator_labels`` (every pod of the namespace when there are none)."""
    peer: Obj = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}}}
    if labels := dict(operator_labels):
        peer["podSelector"] = {"matchLabels": labels}
    return peer


def network_policies(owner: Mapping[str, Any], spec: JobSpec, operator_namespace: str = "",
                     operator_labels: Iterable[tuple[str, str]] = ()) -> list[Obj]:
    """The job's NetworkPolicies (on by default), or none with ``networkPolicy.enabled: false``.

    ``<job>-rdzv`` (the rendezvous pod): ingress only from the job's own workers, only on
    the store's port (the c10d store, or in perStep mode the Lighthouse, whose kill
    endpoint has no credential), and from the operator's pods (``operator_peer``, when its
    namespace is known) only on the store's report port, which a Lighthouse does not
    open. ``<job>-workers`` (the workers): from each other on every port (the torchrun
    agents and gloo/NCCL choose ports at run time), and on the metrics port from
    ``networkPolicy.ingressFrom`` (Prometheus), or from anyone when that is empty.
    Traffic from the node itself (probes, a host's scraper) is the network plugin's to
    allow, as NetworkPolicy engines do.
    """
    if not spec.network_policy.enabled:
        return []
    job = owner["metadata"]["name"]
    workers = {LABEL_JOB: job, LABEL_ROLE: ROLE_WORKER}
    from_workers = [{"podSelector": {"matchLabels": dict(workers)}}]
    metrics = [{"port": contract.METRICS_PORT, "protocol": "TCP"}]
    store_ingress = [{"from": from_workers, "ports": [{"port": contract.RDZV_PORT, "protocol": "TCP"}]}]
    if operator_namespace and not spec.per_step:   # the store's report port (no Lighthouse has one)
        store_ingress.append({"from": [operator_peer(operator_namespace, operator_labels)],
                              "ports": [{"port": contract.RDZV_CONTROL_PORT, "protocol": "TCP"}]})
    return [
        network_policy(owner, rdzv_name(job), labels(job, ROLE_RDZV), {LABEL_JOB: job, LABEL_ROLE: ROLE_RDZV},
                       store_ingress),
        network_policy(owner, workers_service_name(job), labels(job, ROLE_WORKER), workers,
                       [{"from": from_workers}, exposed_ingress(spec.network_policy, metrics)]),
    ]


LAUNCHER_COMMANDS = {"torchrun": ["torchrun"], "lepton": ["python", "-m", "lepton_trainer.launch"]}


def worker_command(owner: Mapping[str, Any], spec: JobSpec) -> list[str]:
    """``torchrun <options> (-m module | script) args``, or the same through
    ``python -m lepton_trainer.launch`` (``spec.launcher``); ``$(POD_IP)`` is expanded by
    the kubelet. For perStep, each pod's agent is standalone: its processes are one
    replica group, and the groups meet at the Lighthouse, not in a rendezvous."""
    m = owner["metadata"]
    w, el = spec.workers, spec.elastic
    program = ["-m", spec.module] if spec.module else list(spec.command)
    if spec.per_step:
        opts = ["--standalone", "--nnodes=1", f"--nproc-per-node={w.nproc_per_node}",
                f"--max-restarts={el.max_restarts}"]
        return [*LAUNCHER_COMMANDS[spec.launcher], *opts, *program, *spec.args]
    opts = torchrun_args(
        endpoint=f"{rdzv_name(m['name'])}:{contract.RDZV_PORT}", run_id=m["uid"],
        min_nodes=w.min, max_nodes=w.max, nproc_per_node=w.nproc_per_node,
        max_restarts=el.max_restarts, local_addr="$(POD_IP)",
        join_timeout=el.join_timeout, last_call_timeout=el.last_call_timeout,
        close_timeout=el.close_timeout, keep_alive_interval=el.keep_alive_interval,
        keep_alive_max_attempt=el.keep_alive_max_attempts)
    return [*LAUNCHER_COMMANDS[spec.launcher], *opts, *program, *spec.args]


def _volumes(spec: JobSpec) -> tuple[list[Obj], list[Obj]]:
    # /dev/shm is memory: it counts against the pod's memory, and holds at most SHM_SIZE_LIMIT
    # (or the worker's memory, when set)
    shm = {"medium": "Memory", "sizeLimit": spec.resources.memory or SHM_SIZE_LIMIT}
    volumes = [{"name": "dshm", "emptyDir": shm}, scratch_volume()]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, scratch_mount()]
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


def quorum_retries(quorum_timeout: int) -> int:
    """How often a replica group's manager asks the Lighthouse again after a failed quorum
    request (the Lighthouse gone, or replaced): torchft waits the quorum timeout divided by
    this plus one between tries, so about once a second until the quorum timeout. A group
    that joined a Lighthouse that is replaced joins the new one in place, without a
    restart: about a second after its start where its address is reachable at once, up to
    ``FT_CONNECT_TIMEOUT_SECONDS`` later where a reconnection first reaches the old pod."""
    return max(1, int(quorum_timeout))


def _worker_env(owner: Mapping[str, Any], spec: JobSpec, index: int) -> list[Obj]:
    """The worker container's environment: the job's identity, paths, fault tolerance, the user's."""
    m = owner["metadata"]
    job = m["name"]
    variables = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        env(contract.ENV_JOB_NAME, job),
        env(contract.ENV_JOB_NAMESPACE, m["namespace"]),
        env(contract.ENV_JOB_UID, m["uid"]),
        env(contract.ENV_METRICS_PORT, contract.METRICS_PORT),
        *(env(k, v) for k, v in WORKER_ENV.items()),
        *scratch_env(),
    ]
    if spec.checkpoint:
        variables.append(env(contract.ENV_CHECKPOINT_DIR, spec.checkpoint.path))
    if spec.output:
        variables.append(env(contract.ENV_OUTPUT_DIR, spec.output.path))
    if spec.per_step:
        variables += [env(contract.ENV_FAULT_TOLERANCE, spec.fault_tolerance),
                      env(contract.ENV_REPLICA_ID, worker_name(job, index)),
                      env(contract.ENV_MIN_REPLICAS, spec.workers.min),
                      env(contract.ENV_LIGHTHOUSE, lighthouse_url(job)),
                      env(contract.ENV_FT_TIMEOUT, FT_TIMEOUT_SECONDS),
                      env(contract.ENV_FT_QUORUM_TIMEOUT, spec.elastic.join_timeout),
                      env(contract.ENV_FT_QUORUM_RETRIES, quorum_retries(spec.elastic.join_timeout)),
                      env(contract.ENV_FT_CONNECT_TIMEOUT, FT_CONNECT_TIMEOUT_SECONDS)]
    variables += [copy.deepcopy(dict(v)) for v in spec.env]
    return variables


def worker_pod(owner: Mapping[str, Any], spec: JobSpec, index: int) -> Obj:
    """Worker pod ``index``: a torchrun agent; restartPolicy Never (the operator replaces it)."""
    m = owner["metadata"]
    job = m["name"]
    lbls = labels(job, ROLE_WORKER, index)
    if spec.queue_name:
        lbls[LABEL_KUEUE_QUEUE] = spec.queue_name
    volumes, mounts = _volumes(spec)
    container = {
        "name": "worker",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": worker_command(owner, spec),
        "env": _worker_env(owner, spec, index),
        "ports": [{"name": "metrics", "containerPort": contract.METRICS_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
        "securityContext": container_security(spec.security_context),
        # The trainer writes its exception there; a script that writes nothing (an
        # ImportError, say) leaves the tail of its log, which the job's failure then quotes.
        "terminationMessagePath": contract.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    res = resources(spec.resources)
    if res:
        container["resources"] = res
    pod_spec = {
        **_pod_spec_common(spec, worker_placement(spec), spec.resources.gpus),
        "restartPolicy": "Never",
        "subdomain": workers_service_name(job),
        "hostname": worker_name(job, index),
        "containers": [container],
        "volumes": volumes,
    }
    metadata = meta(owner, worker_name(job, index), lbls)
    metadata["annotations"] = {ANNOTATION_SPEC_HASH: template_hash(spec)}
    if m.get("generation") is not None:
        metadata["annotations"][ANNOTATION_GENERATION] = str(m["generation"])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


# --- capacity.mode provisioningRequest -----------------------------------------------------

# The cluster autoscaler's ProvisioningRequest, and the pod annotations with which workers
# consume the capacity it booked (k8s.io/autoscaler cluster-autoscaler/provisioningrequest/pods).
PROVISIONING_API_VERSION = "autoscaling.x-k8s.io/v1"
CONSUME_ANNOTATION = "cluster-autoscaler.kubernetes.io/consume-provisioning-request"
CLASS_ANNOTATION = "cluster-autoscaler.kubernetes.io/provisioning-class-name"
# What the operator does with them, as RBAC verbs (the chart grants exactly these): an index
# lists and watches the requests; the PodTemplate is applied (server-side: create and
# patch), the request created; both are deleted once consumed.
CAPACITY_REQUEST_VERBS = {"provisioningrequests": ("list", "watch", "create", "delete"),
                          "podtemplates": ("create", "patch", "delete")}


def capacity_request_name(job: str) -> str:
    return f"{job}-capacity"


def capacity_request(owner: Mapping[str, Any], spec: JobSpec, count: int) -> list[Obj]:
    """The PodTemplate of a worker and the ProvisioningRequest that asks for ``count`` of
    them, in the order they are created (the request names the template)."""
    job = owner["metadata"]["name"]
    name = capacity_request_name(job)
    pod = worker_pod(owner, spec, 0)
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta(owner, name, labels(job, ROLE_CAPACITY)),
                "template": {"metadata": {"labels": labels(job, ROLE_WORKER)}, "spec": pod["spec"]}}
    request_spec: Obj = {"provisioningClassName": spec.capacity.provisioning_class,
                         "podSets": [{"podTemplateRef": {"name": name}, "count": count}]}
    if spec.capacity.parameters:
        request_spec["parameters"] = dict(spec.capacity.parameters)
    request = {"apiVersion": PROVISIONING_API_VERSION, "kind": "ProvisioningRequest",
               "metadata": meta(owner, name, labels(job, ROLE_CAPACITY)), "spec": request_spec}
    return [template, request]


def consume(pod: Obj, request: str, spec: JobSpec) -> Obj:
    """``pod``, annotated to land on the capacity the ProvisioningRequest ``request`` booked."""
    pod["metadata"].setdefault("annotations", {}).update(
        {CONSUME_ANNOTATION: request, CLASS_ANNOTATION: spec.capacity.provisioning_class})
    return pod
