"""LeptonJob spec -> frozen dataclasses with defaults and semantic validation (pure).

The CRD schema rejects what it can express at apply time; ``parse_job`` checks the
same rules again (so an API server without CEL still gets clear errors) plus what
the schema cannot express, such as child object names. Every problem found is
reported at once in one ``InvalidSpec``, ``spec.autoscaling`` included.

The spec's defaults are the dataclasses' field defaults, which ``parse_job`` reads; they
equal the CRD's ``default:`` values (tests/unit/test_defaults.py checks each one).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from lepton_trainer import contract

from ..constants import CHILD_SUFFIX_MAX, JOB_NAME_MAX
from ..core.fields import (InvalidSpec, NetworkPolicySpec, Placement, Resources, choice, default, flag, integer,
                           items, mapping, network_policy, node_selector, number, parser, placement,
                           pod_security_context, quantity, security_context, string_map, text, tolerations,
                           valid_claim_name, validate_name)
from ..scaling import prometheus, promql

DEFAULT_MODULE = "lepton_trainer.train"
CHECKPOINT_PATH = "/checkpoints"   # where ``checkpoint`` is mounted unless it sets ``path``
OUTPUT_PATH = "/output"            # where ``output`` is mounted unless it sets ``path``
MAX_WORKERS = 999
RESERVED_ENV = frozenset({contract.ENV_JOB_NAME, contract.ENV_JOB_NAMESPACE, contract.ENV_JOB_UID,
                          contract.ENV_CHECKPOINT_DIR, contract.ENV_OUTPUT_DIR,
                          contract.ENV_METRICS_PORT, contract.ENV_FAULT_TOLERANCE, contract.ENV_REPLICA_ID,
                          contract.ENV_MIN_REPLICAS, contract.ENV_LIGHTHOUSE, "POD_IP", "HOME", "TMPDIR"})

__all__ = ["InvalidSpec", "JobSpec", "parse_job", "scoped_query", "DEFAULT_MODULE"]


@dataclasses.dataclass(frozen=True)
class Workers:
    """``spec.workers``; unset, ``max`` and ``replicas`` are ``min``, and ``nproc_per_node``
    is the pod's GPUs (at least 1): the defaults below are those of an empty spec."""
    min: int = 1
    max: int = 1
    replicas: int = 1
    nproc_per_node: int = 1


@dataclasses.dataclass(frozen=True)
class Elastic:
    max_restarts: int = 3
    join_timeout: int = 600
    last_call_timeout: int = 2
    close_timeout: int = 10
    keep_alive_interval: int = 3       # an agent's heartbeat period (torch: 5)
    keep_alive_max_attempts: int = 3   # heartbeats missed before its node is dropped (torch: 3)
    launcher: str = "auto"             # auto | lepton | torchrun (see LAUNCHERS)


@dataclasses.dataclass(frozen=True)
class Mount:
    claim_name: str
    path: str
    sub_path: str = ""

    @property
    def uri(self) -> str:
        return f"pvc://{self.claim_name}/{self.sub_path}".rstrip("/")


@dataclasses.dataclass(frozen=True)
class Autoscaling:
    """``spec.autoscaling``: grow ``workers.replicas`` while goodput holds."""
    query: str | None = None          # None: the trainer's samples/s for this job
    efficiency: float = 0.8
    cooldown_seconds: float = 60.0
    step: int = 1
    interval_seconds: float = 5.0


# How a node agent starts its workers: ``torchrun`` runs a fresh interpreter for each on
# every (re)start; ``lepton`` runs ``python -m lepton_trainer.launch``, torchrun's agent with
# workers forked from a process that has imported torch (the image needs lepton_trainer);
# ``auto``: lepton for the operator's trainer image, torchrun for any other image.
LAUNCHERS = ("auto", "lepton", "torchrun")
CAPACITY_MODES = ("provision", "provisioningRequest", "observed")
# ProvisioningRequest classes of the cluster autoscaler (autoscaling.x-k8s.io/v1).
PROVISIONING_CLASSES = ("best-effort-atomic-scale-up.autoscaling.x-k8s.io", "check-capacity.autoscaling.x-k8s.io")
ON_CAPACITY_TIMEOUT = ("Fail", "Suspend")


@dataclasses.dataclass(frozen=True)
class Capacity:
    """``spec.capacity``: what the job does when no current node can run a worker.

    ``provision`` (default): create the gang at ``workers.min`` as Pending pods, the signal
    a cluster autoscaler or Karpenter provisions nodes for, and wait ``timeout_seconds``
    for them; then fail or suspend. ``provisioningRequest``: ask the cluster autoscaler
    for the whole gang first (a ProvisioningRequest of ``provisioning_class``) and create
    the pods only once it is Provisioned: all or nothing, without holding GPUs while
    waiting. ``observed``: the cluster is what it is (fixed pools): a worker no node can
    ever hold is an invalid spec.
    """
    mode: str = "provision"
    timeout_seconds: int = 1800
    on_timeout: str = "Fail"
    provisioning_class: str = PROVISIONING_CLASSES[0]
    parameters: tuple[tuple[str, str], ...] = ()     # the request's spec.parameters


@dataclasses.dataclass(frozen=True)
class JobNetworkPolicy(NetworkPolicySpec):
    """``spec.networkPolicy`` of a job: on unless ``enabled: false``, so that the rendezvous
    pod's ports (the c10d store or the Lighthouse, and the report port) are closed to
    every pod but the job's own workers and the operator."""
    enabled: bool = True


@dataclasses.dataclass(frozen=True)
class JobSpec:
    image: str
    image_pull_policy: str
    command: tuple[str, ...]
    module: str | None
    args: tuple[str, ...]
    env: tuple[Mapping[str, Any], ...]
    workers: Workers
    resources: Resources
    elastic: Elastic
    node_selector: Mapping[str, str]
    tolerations: tuple[Mapping[str, Any], ...]
    affinity: Mapping[str, Any] | None
    priority_class_name: str | None
    scheduler_name: str | None
    queue_name: str | None
    backoff_limit: int = 3
    active_deadline_seconds: int | None = None
    suspend: bool = False
    ttl_seconds_after_finished: int | None = None
    checkpoint: Mount | None = None
    output: Mount | None = None
    pod_security_context: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    security_context: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    autoscaling: Autoscaling | None = None
    capacity: Capacity = Capacity()
    network_policy: JobNetworkPolicy = JobNetworkPolicy()
    default_image: bool = False        # ``image`` is the operator's trainer image
    fault_tolerance: str = "restart"   # one of contract.FAULT_TOLERANCE_MODES
    rendezvous: Placement = Placement()   # where the rendezvous pod runs

    @property
    def per_step(self) -> bool:
        """``faultTolerance: perStep``: torchft replica groups and a Lighthouse."""
        return self.fault_tolerance == "perStep"

    @property
    def launcher(self) -> str:
        """``lepton`` or ``torchrun``: ``elastic.launcher``, with ``auto`` resolved."""
        if self.elastic.launcher != "auto":
            return self.elastic.launcher
        return "lepton" if self.default_image else "torchrun"

    @property
    def claim_names(self) -> tuple[str, ...]:
        """The PVCs the workers mount (each once)."""
        return tuple(dict.fromkeys(m.claim_name for m in (self.checkpoint, self.output) if m))


def _mount(raw: Any, default_path: str, default_claim: str | None,
           problems: list[str], where: str) -> Mount | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be an object, got {raw!r}")
        return None
    claim = text(raw, "claimName", problems, f"{where}.", default_claim)
    if not claim:
        problems.append(f"{where}.claimName is required")
        return None
    if not valid_claim_name(claim):
        problems.append(f"{where}.claimName {claim!r} is not a valid PVC name")
    path = text(raw, "path", problems, f"{where}.", default_path)
    if not path.startswith("/"):
        problems.append(f"{where}.path must be an absolute path, got {path!r}")
    sub_path = text(raw, "subPath", problems, f"{where}.", default(Mount, "sub_path"))
    if sub_path.startswith("/") or ".." in sub_path.split("/"):
        problems.append(f"{where}.subPath must be relative and must not contain '..', got {sub_path!r}")
    return Mount(claim, path, sub_path)


def _capacity(raw: Mapping[str, Any], problems: list[str]) -> Capacity:
    mode = choice(raw.get("mode", default(Capacity, "mode")), CAPACITY_MODES, problems, "capacity.mode")
    klass = text(raw, "provisioningClassName", problems, "capacity.", default(Capacity, "provisioning_class"))
    parameters = string_map(raw, "parameters", problems, "capacity.")
    if mode != "provisioningRequest" and ("provisioningClassName" in raw or parameters):
        problems.append("capacity.provisioningClassName and capacity.parameters need mode provisioningRequest")
    timeout = integer(raw, "timeoutSeconds", default(Capacity, "timeout_seconds"), 1, 7 * 86400, problems, "capacity.")
    on_timeout = choice(raw.get("onTimeout", default(Capacity, "on_timeout")), ON_CAPACITY_TIMEOUT, problems,
                        "capacity.onTimeout")
    return Capacity(mode, timeout, on_timeout, klass, tuple(sorted(parameters.items())))


def scoped_query(query: str, namespace: str, job: str) -> str:
    """``spec.autoscaling.query`` with ``${namespace}`` and ``${job}`` filled in, confined to
    ``namespace`` (``promql.scope``; raises ``promql.ScopeError``)."""
    return promql.scope(prometheus.render(query, namespace=namespace, job=job), namespace)


def _autoscaling(raw: Any, problems: list[str], namespace: str, job: str) -> Autoscaling | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"autoscaling must be an object, got {raw!r}")
        return None
    where = "autoscaling."
    query = raw.get("query")
    if query is not None and (not isinstance(query, str) or not query.strip()):
        problems.append("autoscaling.query must be a non-empty PromQL query (or left out for the default)")
    elif query is not None:
        try:
            scoped_query(query, namespace, job)
        except promql.ScopeError as exc:
            problems.append(f"autoscaling.query: {exc}")
    return Autoscaling(
        query=str(query) if query is not None else default(Autoscaling, "query"),
        efficiency=number(raw, "efficiency", default(Autoscaling, "efficiency"), 0, 1, problems, where, lo_open=True),
        cooldown_seconds=float(integer(raw, "cooldownSeconds", default(Autoscaling, "cooldown_seconds"), 0, 86400,
                                       problems, where)),
        step=integer(raw, "step", default(Autoscaling, "step"), 1, 64, problems, where),
        interval_seconds=number(raw, "intervalSeconds", default(Autoscaling, "interval_seconds"), 0.5, 3600,
                                problems, where))


def _program(spec: Mapping[str, Any], problems: list[str]) -> tuple[tuple[str, ...], str | None]:
    """(command, module): the spec sets one of them; neither runs ``DEFAULT_MODULE``."""
    command = items(spec, "command", problems, "", str, "a string")
    module = text(spec, "module", problems, "")
    if command and module:
        problems.append("set either command or module, not both")
    if command:
        return command, None
    return command, module or DEFAULT_MODULE


def _workers(spec: Mapping[str, Any], problems: list[str]) -> tuple[Workers, Resources]:
    """``spec.workers`` and ``spec.resources``: the worker count defaults follow ``min``,
    the processes per node the GPUs per pod."""
    raw = mapping(spec, "workers", problems, "")
    w_min = integer(raw, "min", default(Workers, "min"), 1, MAX_WORKERS, problems, "workers.")
    w_max = integer(raw, "max", w_min, 1, MAX_WORKERS, problems, "workers.")
    replicas = integer(raw, "replicas", w_min, 0, MAX_WORKERS, problems, "workers.")
    if w_max < w_min:
        problems.append(f"workers.max ({w_max}) must be >= workers.min ({w_min})")
    elif not w_min <= replicas <= w_max:
        problems.append(f"workers.replicas ({replicas}) must be between workers.min ({w_min}) "
                        f"and workers.max ({w_max})")

    raw_res = mapping(spec, "resources", problems, "")
    gpus = integer(raw_res, "gpus", default(Resources, "gpus"), 0, 64, problems, "resources.")
    resources = Resources(gpus, quantity(raw_res.get("cpu")), quantity(raw_res.get("memory")))
    nproc = integer(raw, "nprocPerNode", max(gpus, 1), 1, 64, problems, "workers.")
    return Workers(w_min, w_max, replicas, nproc), resources


def _elastic(raw: Mapping[str, Any], problems: list[str]) -> Elastic:
    where = "elastic."
    return Elastic(
        integer(raw, "maxRestarts", default(Elastic, "max_restarts"), 0, 1000, problems, where),
        integer(raw, "joinTimeoutSeconds", default(Elastic, "join_timeout"), 1, 86400, problems, where),
        integer(raw, "lastCallTimeoutSeconds", default(Elastic, "last_call_timeout"), 0, 3600, problems, where),
        integer(raw, "closeTimeoutSeconds", default(Elastic, "close_timeout"), 0, 3600, problems, where),
        integer(raw, "keepAliveIntervalSeconds", default(Elastic, "keep_alive_interval"), 1, 300, problems, where),
        integer(raw, "keepAliveMaxAttempts", default(Elastic, "keep_alive_max_attempts"), 1, 100, problems, where),
        choice(raw.get("launcher", default(Elastic, "launcher")), LAUNCHERS, problems, "elastic.launcher"))


def _env(spec: Mapping[str, Any], problems: list[str]) -> tuple[Mapping[str, Any], ...]:
    """``spec.env``: named EnvVars, none of them one the operator sets."""
    env = items(spec, "env", problems, "", Mapping, "an EnvVar object")
    for i, var in enumerate(env):
        if not isinstance(var.get("name"), str) or not var["name"]:
            problems.append(f"env[{i}].name is required")
        elif var.get("name") in RESERVED_ENV:
            problems.append(f"env {var.get('name')} is set by the operator and cannot be overridden")
    return env


def _mounts(spec: Mapping[str, Any], problems: list[str]) -> tuple[Mount | None, Mount | None]:
    """``spec.checkpoint`` and ``spec.output``; an unset output lies next to the
    checkpoints (``<subPath>/output`` on the same claim)."""
    checkpoint = _mount(spec.get("checkpoint"), CHECKPOINT_PATH, None, problems, "checkpoint")
    raw_output = spec.get("output")
    if raw_output is None and checkpoint:
        raw_output = {"subPath": "/".join(p for p in (checkpoint.sub_path, "output") if p)}
    output = _mount(raw_output, OUTPUT_PATH, checkpoint.claim_name if checkpoint else None,
                    problems, "output")
    return checkpoint, output


@parser
def parse_job(name: str, spec: Mapping[str, Any] | None, default_image: str,
              default_pull_policy: str = "IfNotPresent", namespace: str = "default") -> JobSpec:
    """Parse and validate a LeptonJob spec; raises ``InvalidSpec`` listing every problem.
    ``default_image`` and ``default_pull_policy`` apply where the spec names none; the
    autoscaling query must select nothing outside ``namespace``, the job's own."""
    spec = spec or {}
    problems = validate_name(name, JOB_NAME_MAX, CHILD_SUFFIX_MAX)
    command, module = _program(spec, problems)
    workers, resources = _workers(spec, problems)
    elastic = _elastic(mapping(spec, "elastic", problems, ""), problems)
    env = _env(spec, problems)
    checkpoint, output = _mounts(spec, problems)
    image = text(spec, "image", problems, "", default_image)
    job = JobSpec(
        image=image, default_image=image == default_image,
        image_pull_policy=text(spec, "imagePullPolicy", problems, "", default_pull_policy),
        command=command, module=module,
        args=items(spec, "args", problems, "", str, "a string"),
        env=env, workers=workers, resources=resources, elastic=elastic,
        node_selector=node_selector(spec, "nodeSelector", problems, ""),
        tolerations=tolerations(spec, "tolerations", problems, ""),
        affinity=mapping(spec, "affinity", problems, "") or None,
        priority_class_name=text(spec, "priorityClassName", problems, ""),
        rendezvous=placement(mapping(spec, "rendezvous", problems, ""), problems, "rendezvous."),
        scheduler_name=text(spec, "schedulerName", problems, ""),
        queue_name=text(spec, "queueName", problems, ""),
        backoff_limit=integer(spec, "backoffLimit", default(JobSpec, "backoff_limit"), 0, 1000, problems, ""),
        active_deadline_seconds=integer(spec, "activeDeadlineSeconds", default(JobSpec, "active_deadline_seconds"),
                                        1, None, problems, ""),
        suspend=flag(spec, "suspend", default(JobSpec, "suspend"), problems, ""),
        ttl_seconds_after_finished=integer(spec, "ttlSecondsAfterFinished",
                                           default(JobSpec, "ttl_seconds_after_finished"), 0, None, problems, ""),
        checkpoint=checkpoint, output=output,
        pod_security_context=pod_security_context(spec, "podSecurityContext", problems, ""),
        security_context=security_context(spec, "securityContext", problems, ""),
        autoscaling=_autoscaling(spec.get("autoscaling"), problems, namespace, name),
        capacity=_capacity(mapping(spec, "capacity", problems, ""), problems),
        network_policy=network_policy(spec.get("networkPolicy"), problems, cls=JobNetworkPolicy),
        fault_tolerance=choice(spec.get("faultTolerance", default(JobSpec, "fault_tolerance")),
                               contract.FAULT_TOLERANCE_MODES, problems, "faultTolerance"),
    )
    if problems:
        raise InvalidSpec(problems)
    return job
