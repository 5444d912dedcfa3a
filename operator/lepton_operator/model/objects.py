"""Child objects of a LeptonModel, as plain dicts (pure).

- per revision that needs it, a compression Job ``<model>-compress-<revision>`` that runs
  ``python -m lepton_trainer.compress`` once. The source model's claim is mounted
  read-only at ``COMPRESSION_MOUNT``; the input is the source directory and the artifact
  goes to ``lepton-models/<model>/<revision>`` on the same claim, through a read-write
  mount of ``lepton-models/<model>`` alone (``compression_mounts``). The program writes its result
  JSON to the termination-message file, where the operator reads it (``model.state``);
- one Deployment per revision, ``<model>-<revision>``, running
  ``python -m lepton_trainer.serve`` with readiness on ``/v2/health/ready``;
- one Service, ``<model>`` (ports ``http`` and ``grpc``), selecting the serving pods of every revision, so a canary's
  share of traffic is its share of ready replicas (``split``);
- where the Gateway API is installed, also a Service per revision and an HTTPRoute on the
  model's Service whose backend weights are the canary weight exactly;
- optionally an autoscaling/v2 HorizontalPodAutoscaler on an External metric, or a
  KEDA ScaledObject with a prometheus trigger, targeting the stable Deployment.
- with ``spec.networkPolicy.enabled``, a NetworkPolicy ``<model>-serving`` over the
  serving pods of every revision: ingress only on the serving ports (``http``, which also
  serves ``/metrics``, and ``grpc``), from ``networkPolicy.ingressFrom`` (the model's
  clients and Prometheus) or from anyone when that is empty; and ``<model>-compression``
  over the compression pods, which take no traffic: no ingress. Egress stays open.

A language model (``spec.task: text-generation``) is served over the OpenAI API by the
runtime ``spec.serving.runtime`` names: the image's own server (``serve`` with
``LEPTON_TASK`` and the generation limits), vLLM's OpenAI server on a GPU (its image an
operator setting) or a custom container on its own port and health path. It has no gRPC
port; its Service has ``http`` only, and its NetworkPolicy opens the runtime's port.

Deployments leave ``replicas`` out when an autoscaler owns them (the operator's own or
an HPA), so applying them never fights the autoscaler.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import posixpath
from typing import Any, Mapping

from lepton_trainer import contract

from ..constants import API_VERSION, LABEL_MODEL, LABEL_REVISION, LABEL_ROLE, MODEL_KIND, ROLE_COMPRESSION, ROLE_SERVING
from ..core.fields import Placement, Resources
from ..core.objects import (container_security, env, exposed_ingress, meta, network_policy, placement,
                            pod_security, resources, scratch_env, scratch_mount, scratch_volume)
from ..core.objects import labels as child_labels
from ..scaling import promql
from . import llm
from .spec import Autoscaling, ModelSpec, PvcPath, scoped_query

Obj = dict[str, Any]
COMPRESSION_MOUNT = "/models"
COMPRESSION_CONTAINER = "compress"
COMPRESSION_RESOURCES = Resources(cpu="1", memory="2Gi")   # when the spec sets none
# The serving container's memory (request and limit) when the spec sets none: the server
# reads its limit and refuses what would not fit in it, so it needs one.
SERVING_MEMORY = "2Gi"
VLLM_MEMORY = "16Gi"           # vLLM's container when the spec sets no memory (one GPU when it sets none)
SHM_MOUNT = "/dev/shm"         # vLLM's shared memory (its workers and the tokenizer pool use it)
MOUNT = "/model"
PRESTOP_SECONDS = 5            # a terminating server keeps serving while endpoints drop it
DRAIN_SECONDS = 30             # then lets requests in flight finish (the server's --drain-timeout)
TERMINATION_GRACE_SECONDS = PRESTOP_SECONDS + DRAIN_SECONDS + 5   # longer than both: never killed mid-drain
PORT_NAME = "http"
SERVING_CONTAINER = "server"
GRPC_PORT_NAME = "grpc"
KEDA_API_VERSION = "keda.sh/v1alpha1"
# External metric names an HPA reads (served by a Prometheus adapter rule of the same name).
HPA_METRIC_NAMES = {"rps": "lepton_serve_requests_per_second",
                    "inflight": contract.METRIC_SERVE_INFLIGHT,
                    "p95latency": "lepton_serve_p95_latency_seconds",
                    llm.METRIC_WAITING: "lepton_llm_requests_waiting",
                    llm.METRIC_KV_CACHE: "lepton_llm_kv_cache_usage"}


def owner(meta: Mapping[str, Any]) -> Obj:
    """The model as its children's owner (``core.objects.meta`` makes the reference)."""
    return {"apiVersion": API_VERSION, "kind": MODEL_KIND,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]}}


def labels(model: str, role: str, revision: str | None = None) -> dict[str, str]:
    """Labels of a model's child with ``role`` (per-revision children carry the revision)."""
    return child_labels(MODEL_KIND, model, role, **({LABEL_REVISION: revision} if revision else {}))


def _pod_common(pod_security_context: Mapping[str, Any], role: Placement, gpus: int) -> Obj:
    """Security and scheduling settings shared by the compression and serving pods: the
    role's placement; asking for no GPU and naming no affinity, they stay off GPU nodes."""
    return {"securityContext": pod_security(pod_security_context), "enableServiceLinks": False,
            "automountServiceAccountToken": False, **placement(role, gpus)}


# --- compression ------------------------------------------------------------------------

def compression_job_name(model: str, revision: str) -> str:
    return f"{model}-compress-{revision}"


def _params_in_container(params: Mapping[str, Any]) -> dict[str, Any]:
    """The method parameters with distillation's paths (on the source claim) as the
    compression container sees them, under COMPRESSION_MOUNT."""
    out = copy.deepcopy(dict(params))
    if out.get("data"):
        out["data"] = f"{COMPRESSION_MOUNT}/{out['data']}"
    if isinstance(out.get("student"), dict) and out["student"].get("path"):
        out["student"]["path"] = f"{COMPRESSION_MOUNT}/{out['student']['path']}"
    return out


# The compression program's own verdicts (a failed gate, or a compression it could not do)
# end the Job at once: running it again gives the same answer. A pod taken away (eviction,
# preemption, a node lost or drained) is no failure and does not count against backoffLimit.
COMPRESSION_FAILURE_POLICY: Obj = {"rules": [
    {"action": "FailJob", "onExitCodes": {"containerName": COMPRESSION_CONTAINER, "operator": "In",
                                          "values": [contract.COMPRESS_EXIT_FAILED, contract.COMPRESS_EXIT_GATE_FAILED]}},
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
]}


def artifact_in_container(artifact: PvcPath) -> str:
    """The artifact directory as the compression program sees it (and names it in its result)."""
    return f"{COMPRESSION_MOUNT}/{artifact.path}"


def compression_mounts(artifact: PvcPath) -> list[Obj]:
    """The claim read-only at COMPRESSION_MOUNT (the source, evaluation data, a student),
    and over it, read-write, only the model's artifact directory ``lepton-models/<model>``
    (the parent of ``artifact``, where the program stages a revision before renaming it
    into place), at the same path: the kubelet creates it on the claim when it is missing."""
    parent = posixpath.dirname(artifact.path)
    return [{"name": "models", "mountPath": COMPRESSION_MOUNT, "readOnly": True},
            {"name": "models", "mountPath": f"{COMPRESSION_MOUNT}/{parent}", "subPath": parent}]


def _compression_env(spec: ModelSpec, model: str, source: PvcPath, artifact: PvcPath) -> list[Obj]:
    """The compression container's environment (paths as it sees them)."""
    c = spec.compression
    variables = [
        env(contract.ENV_MODEL_DIR, f"{COMPRESSION_MOUNT}/{source.path}".rstrip("/")),
        env(contract.ENV_ARTIFACT_DIR, artifact_in_container(artifact)),
        env(contract.ENV_MODEL_NAME, model),
        env(contract.ENV_COMPRESSION_METHOD, c.method),
        env(contract.ENV_COMPRESSION_PARAMS, json.dumps(_params_in_container(c.params), sort_keys=True)),
        env(contract.ENV_COMPRESSION_LATENCY_BUDGET, c.latency_budget_seconds),
        *scratch_env(),
    ]
    if c.max_accuracy_drop is not None:
        variables.append(env(contract.ENV_MAX_ACCURACY_DROP, c.max_accuracy_drop))
    if c.evaluation:                 # its paths are on the source claim, mounted at COMPRESSION_MOUNT
        evaluation = dict(c.evaluation)
        for key in ("path", "prompts"):
            if evaluation.get(key):
                evaluation[key] = f"{COMPRESSION_MOUNT}/{evaluation[key]}"
        variables.append(env(contract.ENV_COMPRESSION_EVALUATION, json.dumps(evaluation, sort_keys=True)))
    if spec.source.format:
        variables.append(env(contract.ENV_MODEL_FORMAT, spec.source.format))
    if spec.language_model:
        variables.append(env(contract.ENV_TASK, spec.task))
    return variables


def compression_job(owner: Mapping[str, Any], spec: ModelSpec, revision: str, source: PvcPath,
                    artifact: PvcPath) -> Obj:
    """The batch/v1 Job that compresses ``source`` into ``artifact``."""
    model = owner["metadata"]["name"]
    c = spec.compression
    lbls = labels(model, ROLE_COMPRESSION, revision)
    variables = _compression_env(spec, model, source, artifact)
    res = c.resources if c.resources != Resources() else COMPRESSION_RESOURCES
    container = {
        "name": COMPRESSION_CONTAINER,
        "image": spec.compression_image,
        "imagePullPolicy": spec.serving.image_pull_policy,
        "command": ["python", "-m", "lepton_trainer.compress"],
        "env": variables,
        "volumeMounts": [*compression_mounts(artifact), scratch_mount()],
        "resources": resources(res),
        "securityContext": container_security(c.security_context),
        "terminationMessagePath": contract.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "File",
    }
    template_meta: Obj = {"labels": dict(lbls)}
    if c.pod_annotations:
        template_meta["annotations"] = dict(c.pod_annotations)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": meta(owner, compression_job_name(model, revision), lbls),
        "spec": {
            "backoffLimit": c.backoff_limit,
            "activeDeadlineSeconds": c.active_deadline_seconds,
            "podFailurePolicy": COMPRESSION_FAILURE_POLICY,
            "template": {
                "metadata": template_meta,
                "spec": {
                    **_pod_common(c.pod_security_context, c.placement, res.gpus),
                    "restartPolicy": "Never",
                    "containers": [container],
                    "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": source.claim}},
                                scratch_volume()],
                },
            },
        },
    }


# --- serving ----------------------------------------------------------------------------

def deployment_name(model: str, revision: str) -> str:
    return f"{model}-{revision}"


def service_name(model: str) -> str:
    return model


def url(model: str, namespace: str) -> str:
    return f"http://{service_name(model)}.{namespace}.svc:{contract.SERVE_PORT}"


def service_selector(model: str) -> dict[str, str]:
    return {LABEL_MODEL: model, LABEL_ROLE: ROLE_SERVING}


def split(total: int, weight: int) -> tuple[int, int]:
    """(stable, canary) replicas giving the canary about ``weight`` percent of ``total``.

    A canary with a weight gets at least one replica; the stable revision keeps at least
    one until the weight reaches 100, so small totals run one replica more than asked.
    """
    if not 0 <= weight <= 100:
        raise ValueError(f"weight must be within 0..100, got {weight}")
    if weight == 0:
        return total, 0
    if weight == 100:
        return 0, max(total, 1)
    canary = min(max(1, round(total * weight / 100)), max(total, 1))
    return max(total - canary, 1), canary


def _llm_env(spec: ModelSpec, model: str, namespace: str, revision: str) -> list[Obj]:
    """A language model's serving environment: the built-in runtime's variables (a custom
    container gets them too), then the spec's; vLLM reads its arguments and the spec's."""
    s, g = spec.serving, spec.serving.generation
    if s.runtime == llm.RUNTIME_VLLM:
        return [*scratch_env(), *(copy.deepcopy(dict(v)) for v in s.env)]
    return [
        env(contract.ENV_TASK, spec.task),
        *_served_model_env(model, namespace, revision),
        env(contract.ENV_MAX_PROMPT_TOKENS, g.max_prompt_tokens),
        env(contract.ENV_MAX_OUTPUT_TOKENS, g.max_output_tokens),
        env(contract.ENV_MAX_SEQUENCES, g.max_sequences),
        env(contract.ENV_MAX_QUEUED_REQUESTS, s.admission.max_queued_requests),
        env(contract.ENV_QUEUE_TIMEOUT_MS, s.admission.queue_timeout_ms),
        {"name": contract.ENV_MEMORY_LIMIT_BYTES,
         "valueFrom": {"resourceFieldRef": {"containerName": SERVING_CONTAINER, "resource": "limits.memory"}}},
        *([env(contract.ENV_MODEL_FORMAT, spec.source.format)] if spec.source.format and not spec.compression.runs_job
          else []),
        *scratch_env(),
        *(copy.deepcopy(dict(v)) for v in s.env),
    ]


def _served_model_env(model: str, namespace: str, revision: str) -> list[Obj]:
    """Where the server finds its model and the names its metrics carry (every runtime of the image)."""
    return [env(contract.ENV_MODEL_DIR, MOUNT), env(contract.ENV_MODEL_NAME, model),
            env(contract.ENV_MODEL_NAMESPACE, namespace), env(contract.ENV_MODEL_REVISION, revision)]


def _serving_env(spec: ModelSpec, model: str, namespace: str, revision: str) -> list[Obj]:
    """The serving container's environment: the contract's variables, then the spec's."""
    s = spec.serving
    if spec.language_model:
        return _llm_env(spec, model, namespace, revision)
    return [
        *_served_model_env(model, namespace, revision),
        env(contract.ENV_MAX_BATCH_SIZE, s.max_batch_size),
        env(contract.ENV_MAX_BATCH_DELAY_MS, s.max_batch_delay_ms),
        env(contract.ENV_MAX_CONCURRENT_REQUESTS, s.admission.max_concurrent_requests),
        env(contract.ENV_MAX_QUEUED_REQUESTS, s.admission.max_queued_requests),
        env(contract.ENV_QUEUE_TIMEOUT_MS, s.admission.queue_timeout_ms),
        {"name": contract.ENV_MEMORY_LIMIT_BYTES,           # the container's own limit (downward API)
         "valueFrom": {"resourceFieldRef": {"containerName": SERVING_CONTAINER, "resource": "limits.memory"}}},
        *([env(contract.ENV_MODEL_FORMAT, spec.source.format)] if spec.source.format and not spec.compression.runs_job
          else []),
        *scratch_env(),
        *(copy.deepcopy(dict(v)) for v in s.env),
    ]


def serving_resources(r: Resources, runtime: str = llm.RUNTIME_BUILTIN) -> Resources:
    """The serving container's resources: the spec's, with SERVING_MEMORY where it sets no
    memory (vLLM: VLLM_MEMORY and at least one GPU)."""
    if runtime == llm.RUNTIME_VLLM:
        return dataclasses.replace(r, gpus=r.gpus or 1, memory=r.memory or VLLM_MEMORY)
    return r if r.memory else dataclasses.replace(r, memory=SERVING_MEMORY)


LLM_LIVENESS_TIMEOUT = 5           # seconds (the kubelet's default is 1)


def _runtime_container(spec: ModelSpec, model: str) -> Obj:
    """What differs between the runtimes: command (or arguments), ports and probes."""
    s = spec.serving
    http = {"port": PORT_NAME}
    ports = [{"name": PORT_NAME, "containerPort": s.http_port, "protocol": "TCP"}]
    if s.runtime == llm.RUNTIME_VLLM:
        g = s.generation
        run = {"command": list(llm.VLLM_COMMAND),
               "args": ["--model", MOUNT, "--served-model-name", model, "--port", str(llm.VLLM_PORT),
                        "--max-num-seqs", str(g.max_sequences),
                        "--max-model-len", str(g.max_prompt_tokens + g.max_output_tokens)]}
        ready = live = llm.VLLM_HEALTH_PATH
    elif s.runtime == llm.RUNTIME_CUSTOM:
        run, ready = {}, s.health_path or llm.CUSTOM_HEALTH_PATH      # the image's own entrypoint
        live = ready
    else:
        run = {"command": ["python", "-m", "lepton_trainer.serve", "--drain-timeout", str(DRAIN_SECONDS)]}
        ready, live = contract.HEALTH_READY_PATH, contract.HEALTH_LIVE_PATH
        if not spec.language_model:
            ports.append({"name": GRPC_PORT_NAME, "containerPort": contract.GRPC_PORT, "protocol": "TCP"})
    # A language model may take minutes to load: its startup probe waits up to ten. On a
    # small CPU share a decode step holds the interpreter for over a second: its liveness
    # probe waits LLM_LIVENESS_TIMEOUT, so a busy server is not restarted as a dead one.
    startup = (2, 60) if not spec.language_model else (5, 120)
    liveness = {"httpGet": {**http, "path": live}, "periodSeconds": 10, "failureThreshold": 3}
    if spec.language_model:
        liveness["timeoutSeconds"] = LLM_LIVENESS_TIMEOUT
    return {**run, "ports": ports,
            "readinessProbe": {"httpGet": {**http, "path": ready}, "periodSeconds": 2, "failureThreshold": 2},
            "livenessProbe": liveness,
            "startupProbe": {"httpGet": {**http, "path": live},
                             "periodSeconds": startup[0], "failureThreshold": startup[1]}}


def _serving_container(spec: ModelSpec, variables: list[Obj], model_dir: PvcPath, model: str) -> Obj:
    """The ``server`` container: ``model_dir`` mounted read-only at MOUNT, the runtime's
    ports (REST and gRPC for a predict model), and readiness, liveness and startup probes
    on its health paths."""
    s = spec.serving
    mount = {"name": "model", "mountPath": MOUNT, "readOnly": True}
    if model_dir.path:
        mount["subPath"] = model_dir.path
    container = {
        "name": SERVING_CONTAINER,
        "image": s.image,
        "imagePullPolicy": s.image_pull_policy,
        **_runtime_container(spec, model),
        "env": variables,
        "volumeMounts": [mount, scratch_mount(),
                         *([{"name": "shm", "mountPath": SHM_MOUNT}] if s.runtime == llm.RUNTIME_VLLM else [])],
        "securityContext": container_security(s.security_context),
        # Endpoints drop a terminating pod a moment after it is told to stop: it keeps
        # serving that long before the server drains (see TERMINATION_GRACE_SECONDS).
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
    }
    container["resources"] = resources(serving_resources(s.resources, s.runtime))
    return container


def deployment(owner: Mapping[str, Any], spec: ModelSpec, revision: str, model_dir: PvcPath,
               replicas: int | None) -> Obj:
    """The Deployment of ``revision`` serving ``model_dir``; ``replicas`` None leaves it out."""
    m = owner["metadata"]
    model, s = m["name"], spec.serving
    lbls = labels(model, ROLE_SERVING, revision)
    container = _serving_container(spec, _serving_env(spec, model, m["namespace"], revision), model_dir, model)
    gpus = serving_resources(s.resources, s.runtime).gpus
    shm = [{"name": "shm", "emptyDir": {"medium": "Memory"}}] if s.runtime == llm.RUNTIME_VLLM else []
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(s.http_port),
                   "prometheus.io/path": contract.METRICS_PATH, **dict(s.pod_annotations)}
    dep_spec: Obj = {
        "selector": {"matchLabels": {LABEL_MODEL: model, LABEL_REVISION: revision}},
        "progressDeadlineSeconds": spec.rollout.progress_deadline_seconds,
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "template": {
            "metadata": {"labels": dict(lbls), "annotations": annotations},
            "spec": {
                **_pod_common(s.pod_security_context, s.placement, gpus),
                "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
                "containers": [container],
                "volumes": [{"name": "model", "persistentVolumeClaim": {
                    "claimName": model_dir.claim, "readOnly": True}}, scratch_volume(), *shm],
            },
        },
    }
    if replicas is not None:
        dep_spec = {"replicas": replicas, **dep_spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": meta(owner, deployment_name(model, revision), lbls), "spec": dep_spec}


def _service_ports(spec: ModelSpec | None = None) -> list[Obj]:
    """REST (Open Inference Protocol v2 over HTTP, and /metrics) and v2 gRPC; a language
    model's HTTP only (the OpenAI API), on SERVE_PORT whatever port its runtime listens on."""
    http = {"name": PORT_NAME, "port": contract.SERVE_PORT, "targetPort": PORT_NAME, "protocol": "TCP"}
    if spec is not None and spec.language_model:
        return [http]
    return [http, {"name": GRPC_PORT_NAME, "port": contract.GRPC_PORT, "targetPort": GRPC_PORT_NAME,
                   "protocol": "TCP"}]


def service(owner: Mapping[str, Any], spec: ModelSpec | None = None) -> Obj:
    """ClusterIP Service over the serving pods of every revision."""
    model = owner["metadata"]["name"]
    lbls = labels(model, ROLE_SERVING)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(owner, service_name(model), lbls),
            "spec": {"selector": service_selector(model),
                     "ports": _service_ports(spec)}}


def policy_name(model: str, role: str) -> str:
    """``<model>-serving`` or ``<model>-compression``: distinct suffixes, so no two models'
    policies can share a name."""
    return f"{model}-{role}"


def network_policies(owner: Mapping[str, Any], spec: ModelSpec) -> list[Obj]:
    """The model's NetworkPolicies, or none unless ``spec.networkPolicy.enabled``:
    ``<model>-serving`` over the serving pods (the serving ports, from ``ingressFrom`` or
    anyone) and ``<model>-compression`` over the compression pods, which take no traffic
    (no ingress at all)."""
    if not spec.network_policy.enabled:
        return []
    model = owner["metadata"]["name"]
    ports = [{"port": contract.SERVE_PORT, "protocol": "TCP"}, {"port": contract.GRPC_PORT, "protocol": "TCP"}]
    if spec.language_model:           # the runtime's port (and SERVE_PORT, where a revision before it listens)
        ports = [{"port": p, "protocol": "TCP"} for p in sorted({contract.SERVE_PORT, spec.serving.http_port})]
    return [network_policy(owner, policy_name(model, ROLE_SERVING), labels(model, ROLE_SERVING),
                           service_selector(model), [exposed_ingress(spec.network_policy, ports)]),
            network_policy(owner, policy_name(model, ROLE_COMPRESSION), labels(model, ROLE_COMPRESSION),
                           {LABEL_MODEL: model, LABEL_ROLE: ROLE_COMPRESSION}, [])]


# --- Gateway API traffic split ----------------------------------------------------------

GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"


def revision_service(owner: Mapping[str, Any], revision: str, spec: ModelSpec | None = None) -> Obj:
    """A Service over one revision's pods: the backend an HTTPRoute weights."""
    model = owner["metadata"]["name"]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": meta(owner, deployment_name(model, revision), labels(model, ROLE_SERVING, revision)),
            "spec": {"selector": {LABEL_MODEL: model, LABEL_REVISION: revision},
                     "ports": _service_ports(spec)}}


def http_route(owner: Mapping[str, Any], backends: list[tuple[str, int]]) -> Obj:
    """An HTTPRoute attached to the model's Service (Gateway API mesh/GAMMA style) that
    sends ``weight`` of the traffic to each (revision, weight) backend."""
    model = owner["metadata"]["name"]
    lbls = labels(model, ROLE_SERVING)
    return {"apiVersion": GATEWAY_API_VERSION, "kind": "HTTPRoute", "metadata": meta(owner, model, lbls),
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": service_name(model),
                                     "port": contract.SERVE_PORT}],
                     "rules": [{"backendRefs": [{"name": deployment_name(model, rev), "port": contract.SERVE_PORT,
                                                 "weight": weight} for rev, weight in backends]}]}}


# --- autoscaling --------------------------------------------------------------------------

def metric_selector(namespace: str, model: str) -> str:
    """The model's series: its own labels, in its namespace (the scrape's ``namespace``
    label, which a pod in another namespace cannot claim)."""
    return (f'{contract.METRICS_MODEL_LABEL}="{model}",'
            f'{contract.METRICS_MODEL_NAMESPACE_LABEL}="{namespace}",{promql.NAMESPACE_LABEL}="{namespace}"')


def metric_query(a: Autoscaling, namespace: str, model: str, metrics: llm.RuntimeMetrics | None = None) -> str:
    """The PromQL the builtin autoscaler and KEDA evaluate (a total over all replicas,
    except p95 latency and KV cache use); a spec's own query confined to the model's
    namespace. ``metrics``: a language model's runtime metric names."""
    sel = metric_selector(namespace, model)
    if a.metric in llm.METRICS:
        return llm.autoscaling_query(a.metric, metrics or llm.BUILTIN_METRICS, namespace, model)
    if a.metric == "rps":
        return f"sum(irate({contract.METRIC_SERVE_REQUESTS}{{{sel}}}[1m]))"
    if a.metric == "inflight":
        return f"sum({contract.METRIC_SERVE_INFLIGHT}{{{sel}}})"
    if a.metric == "p95latency":
        return (f"histogram_quantile(0.95, sum by (le) "
                f"(rate({contract.METRIC_SERVE_LATENCY}_bucket{{{sel}}}[1m])))")
    return scoped_query(a.query or "", namespace, model)


def _target(a: Autoscaling) -> tuple[str, str]:
    """(HPA/KEDA metric target type, value as a Kubernetes quantity string)."""
    kind = "AverageValue" if a.additive else "Value"
    return kind, (f"{a.target:g}" if a.target >= 1 or a.target == 0 else f"{round(a.target * 1000)}m")


def _behavior(a: Autoscaling) -> Obj:
    return {"scaleUp": {"stabilizationWindowSeconds": 0},
            "scaleDown": {"stabilizationWindowSeconds": a.scale_down_delay_seconds}}


def traffic_query(namespace: str, model: str, revision: str, seconds: int, spec: ModelSpec | None = None) -> str:
    """Requests one revision served in the last ``seconds`` (the canary's traffic guard);
    a language model's from its runtime's request counter."""
    if spec is not None and spec.language_model:
        return llm.traffic_query(spec.serving.runtime_metrics, namespace, model, revision, seconds)
    sel = f'{metric_selector(namespace, model)},{contract.METRICS_REVISION_LABEL}="{revision}"'
    return f"sum(increase({contract.METRIC_SERVE_REQUESTS}{{{sel}}}[{seconds}s]))"


def hpa(owner: Mapping[str, Any], a: Autoscaling, target_deployment: str, floor: int | None = None) -> Obj:
    """autoscaling/v2 HPA on an External metric selected by model and namespace labels:
    the server's own (``lepton_namespace``) and the scrape's ``namespace``, which a pod in
    another namespace cannot claim (the metrics adapter turns them into label matchers)."""
    m = owner["metadata"]
    model, ns = m["name"], m["namespace"]
    kind, value = _target(a)
    target = {"type": kind, "averageValue" if kind == "AverageValue" else "value": value}
    lbls = labels(model, ROLE_SERVING)
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": meta(owner, model, lbls),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target_deployment},
            "minReplicas": max(a.min_replicas, floor or 0), "maxReplicas": a.max_replicas,
            "metrics": [{"type": "External", "external": {
                "metric": {"name": HPA_METRIC_NAMES[a.metric], "selector": {"matchLabels": {
                    contract.METRICS_MODEL_LABEL: model, contract.METRICS_MODEL_NAMESPACE_LABEL: ns,
                    promql.NAMESPACE_LABEL: ns}}},
                "target": target}}],
            "behavior": _behavior(a),
        },
    }


def scaled_object(owner: Mapping[str, Any], a: Autoscaling, target_deployment: str,
                  prometheus_url: str, floor: int | None = None, metrics: llm.RuntimeMetrics | None = None) -> Obj:
    """KEDA ScaledObject with a prometheus trigger. ``ignoreNullValues: false`` makes an
    empty answer an error, which KEDA's HPA treats as "hold", never as zero."""
    m = owner["metadata"]
    model, ns = m["name"], m["namespace"]
    kind, _ = _target(a)
    lbls = labels(model, ROLE_SERVING)
    return {
        "apiVersion": KEDA_API_VERSION, "kind": "ScaledObject",
        "metadata": meta(owner, model, lbls),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target_deployment},
            "minReplicaCount": max(a.min_replicas, floor or 0), "maxReplicaCount": a.max_replicas,
            "pollingInterval": max(1, math.ceil(a.interval_seconds)),
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(a)}},
            "triggers": [{"type": "prometheus", "metricType": kind, "metadata": {
                "serverAddress": prometheus_url,
                "query": metric_query(a, ns, model, metrics),
                "threshold": f"{a.target:g}",
                "ignoreNullValues": "false",
            }}],
        },
    }
