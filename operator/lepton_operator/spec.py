"""LeptonJob spec -> frozen dataclasses with defaults and semantic validation (pure).

The CRD schema rejects what it can express at apply time; ``parse_job`` checks the
same rules again (so an API server without CEL still gets clear errors) plus what
the schema cannot express, such as child object names. Every problem found is
reported at once in one ``InvalidSpec``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from lepton_trainer import contract

from .constants import JOB_NAME_MAX

DEFAULT_MODULE = "lepton_trainer.train"
MAX_WORKERS = 999
RESERVED_ENV = frozenset({contract.ENV_JOB_NAME, contract.ENV_JOB_NAMESPACE, contract.ENV_JOB_UID,
                          contract.ENV_CHECKPOINT_DIR, contract.ENV_OUTPUT_DIR,
                          contract.ENV_METRICS_PORT, "POD_IP"})
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class InvalidSpec(ValueError):
    """A spec that no retry will fix; ``problems`` lists every rule it breaks."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclasses.dataclass(frozen=True)
class Workers:
    min: int
    max: int
    replicas: int
    nproc_per_node: int


@dataclasses.dataclass(frozen=True)
class Resources:
    gpus: int = 0
    cpu: str | None = None
    memory: str | None = None


@dataclasses.dataclass(frozen=True)
class Elastic:
    max_restarts: int = 3
    join_timeout: int = 600
    last_call_timeout: int = 2
    close_timeout: int = 10


@dataclasses.dataclass(frozen=True)
class Mount:
    claim_name: str
    path: str
    sub_path: str = ""

    @property
    def uri(self) -> str:
        return f"pvc://{self.claim_name}/{self.sub_path}".rstrip("/")


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
    backoff_limit: int
    active_deadline_seconds: int | None
    suspend: bool
    ttl_seconds_after_finished: int | None
    checkpoint: Mount | None
    output: Mount | None
    pod_security_context: Mapping[str, Any]
    autoscaling: Mapping[str, Any] | None

    @property
    def claim_names(self) -> tuple[str, ...]:
        """The PVCs the workers mount (each once)."""
        return tuple(dict.fromkeys(m.claim_name for m in (self.checkpoint, self.output) if m))


def _int(spec: Mapping[str, Any], key: str, default: int | None, lo: int, hi: int | None,
         problems: list[str], where: str) -> int | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{where}{key} must be an integer, got {value!r}")
        return default
    if value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        problems.append(f"{where}{key} must be {bound}, got {value}")
        return default
    return value


def _mount(raw: Mapping[str, Any] | None, default_path: str, default_claim: str | None,
           problems: list[str], where: str) -> Mount | None:
    if raw is None:
        return None
    claim = raw.get("claimName") or default_claim
    if not claim:
        problems.append(f"{where}.claimName is required")
        return None
    if not _DNS1123.match(claim) or len(claim) > 253:
        problems.append(f"{where}.claimName {claim!r} is not a valid PVC name")
    path = raw.get("path", default_path)
    if not str(path).startswith("/"):
        problems.append(f"{where}.path must be an absolute path, got {path!r}")
    sub_path = raw.get("subPath", "")
    if sub_path.startswith("/") or ".." in sub_path.split("/"):
        problems.append(f"{where}.subPath must be relative and must not contain '..', got {sub_path!r}")
    return Mount(claim, path, sub_path)


def validate_name(name: str) -> list[str]:
    """Problems with a job name as the prefix of its child objects' names."""
    problems = []
    if "." in name:
        problems.append(f"metadata.name {name!r} must not contain dots: it prefixes Service "
                        "and pod host names, which are DNS labels")
    elif not _DNS1035.match(name):
        problems.append(f"metadata.name {name!r} must start with a letter and contain only "
                        "lowercase letters, digits and '-'")
    if len(name) > JOB_NAME_MAX:
        problems.append(f"metadata.name must be at most {JOB_NAME_MAX} characters "
                        f"(child names add up to 11), got {len(name)}")
    return problems


def parse_job(name: str, spec: Mapping[str, Any] | None, default_image: str) -> JobSpec:
    """Parse and validate a LeptonJob spec; raises ``InvalidSpec`` listing every problem."""
    spec = spec or {}
    problems = validate_name(name)

    command = tuple(spec.get("command") or ())
    module = spec.get("module")
    if command and module:
        problems.append("set either command or module, not both")
    if not command and not module:
        module = DEFAULT_MODULE

    raw_workers = spec.get("workers") or {}
    w_min = _int(raw_workers, "min", 1, 1, MAX_WORKERS, problems, "workers.")
    w_max = _int(raw_workers, "max", w_min, 1, MAX_WORKERS, problems, "workers.")
    replicas = _int(raw_workers, "replicas", w_min, 0, MAX_WORKERS, problems, "workers.")
    if w_max < w_min:
        problems.append(f"workers.max ({w_max}) must be >= workers.min ({w_min})")
    elif not w_min <= replicas <= w_max:
        problems.append(f"workers.replicas ({replicas}) must be between workers.min ({w_min}) "
                        f"and workers.max ({w_max})")

    raw_res = spec.get("resources") or {}
    gpus = _int(raw_res, "gpus", 0, 0, 64, problems, "resources.")
    resources = Resources(gpus, _quantity(raw_res.get("cpu")), _quantity(raw_res.get("memory")))
    nproc = _int(raw_workers, "nprocPerNode", max(gpus, 1), 1, 64, problems, "workers.")

    raw_el = spec.get("elastic") or {}
    elastic = Elastic(
        _int(raw_el, "maxRestarts", 3, 0, 1000, problems, "elastic."),
        _int(raw_el, "joinTimeoutSeconds", 600, 1, 86400, problems, "elastic."),
        _int(raw_el, "lastCallTimeoutSeconds", 2, 0, 3600, problems, "elastic."),
        _int(raw_el, "closeTimeoutSeconds", 10, 0, 3600, problems, "elastic."))

    env = tuple(spec.get("env") or ())
    for var in env:
        if var.get("name") in RESERVED_ENV:
            problems.append(f"env {var.get('name')} is set by the operator and cannot be overridden")

    checkpoint = _mount(spec.get("checkpoint"), "/checkpoints", None, problems, "checkpoint")
    raw_output = spec.get("output")
    if raw_output is None and checkpoint:   # default: next to the checkpoints, same claim
        raw_output = {"subPath": "/".join(p for p in (checkpoint.sub_path, "output") if p)}
    output = _mount(raw_output, "/output", checkpoint.claim_name if checkpoint else None,
                    problems, "output")

    job = JobSpec(
        image=spec.get("image") or default_image,
        image_pull_policy=spec.get("imagePullPolicy") or "IfNotPresent",
        command=command, module=module if not command else None, args=tuple(spec.get("args") or ()),
        env=env,
        workers=Workers(w_min, w_max, replicas, nproc),
        resources=resources, elastic=elastic,
        node_selector=dict(spec.get("nodeSelector") or {}),
        tolerations=tuple(spec.get("tolerations") or ()),
        affinity=spec.get("affinity"),
        priority_class_name=spec.get("priorityClassName"),
        scheduler_name=spec.get("schedulerName"),
        queue_name=spec.get("queueName"),
        backoff_limit=_int(spec, "backoffLimit", 3, 0, 1000, problems, ""),
        active_deadline_seconds=_int(spec, "activeDeadlineSeconds", None, 1, None, problems, ""),
        suspend=bool(spec.get("suspend", False)),
        ttl_seconds_after_finished=_int(spec, "ttlSecondsAfterFinished", None, 0, None, problems, ""),
        checkpoint=checkpoint, output=output,
        pod_security_context=dict(spec.get("podSecurityContext") or {}),
        autoscaling=spec.get("autoscaling"),
    )
    if problems:
        raise InvalidSpec(problems)
    return job


def _quantity(value: Any) -> str | None:
    return None if value is None else str(value)
