"""LeptonModel spec -> frozen dataclasses with defaults and semantic validation (pure).

The CRD schema rejects what it can express at apply time (enums, bounds, CEL rules);
``parse_model`` checks the same rules again, so an API server without CEL still gives
clear errors, and reports every problem at once in one ``InvalidSpec``. The spec's
defaults are the dataclasses' field defaults, which ``parse_model`` reads; they equal the
CRD's ``default:`` values (tests/unit/test_defaults.py checks each one).

A *revision* is a hash of what changes the served bits: the source, the compression
and the serving spec (not replicas, rollout or autoscaling).

``spec.task`` says what the model does: ``predict`` (one forward pass per request, the Open
Inference Protocol v2) or ``text-generation`` (a causal language model served over the
OpenAI API by ``serving.runtime``; see ``model.llm``). Unset, a GGUF source is a language
model and anything else predicts. Each task takes its own compression methods and gate.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Mapping

from lepton_trainer import contract

from ..core.fields import (InvalidSpec, NetworkPolicySpec, Placement, Resources, choice, default, integer, items,
                           mapping, network_policy, number, parser, placement, pod_security_context, resources,
                           security_context, string_map, text, validate_name)
from ..scaling import prometheus, promql
from . import llm

__all__ = ["InvalidSpec", "ModelSpec", "PvcPath", "parse_model", "parse_uri", "artifact_path", "render_query",
           "scoped_query"]

PREDICT, TEXT_GENERATION = contract.TASK_PREDICT, contract.TASK_TEXT_GENERATION
LLM_METHODS = contract.LLM_COMPRESSION_METHODS
METHODS = contract.COMPRESSION_METHODS + tuple(m for m in LLM_METHODS if m not in contract.COMPRESSION_METHODS)
TASK_METHODS = {PREDICT: contract.COMPRESSION_METHODS, TEXT_GENERATION: LLM_METHODS}
VLLM_METHODS = ("none", "bf16", "fp16")      # vLLM loads a Hugging Face directory in these dtypes
STRATEGIES = ("canary", "replace")
ENGINES = ("builtin", "hpa", "keda")
METRICS = ("rps", "inflight", "p95latency", "query") + llm.METRICS
FORMATS = contract.MODEL_FORMATS + (contract.MODEL_FORMAT_GGUF,)
URI_SCHEMES = ("pvc",)            # s3:// and others plug in here
REVISION_LEN = 10
CHILD_SUFFIX_LEN = len("-compress-") + REVISION_LEN
MODEL_NAME_MAX = 63 - CHILD_SUFFIX_LEN   # "<name>-compress-<revision>" must fit 63
PLACEHOLDER_REVISION = "revision"   # ${revision} in an analysis query, checked before a canary exists
ARTIFACT_ROOT = "lepton-models"   # artifacts: <claim>/lepton-models/<model>/<revision>
# compression.evaluation is passed to the compression program as written (its own defaults
# fill the rest); the parser checks the metric against this type when the gate names none.
EVALUATION_TYPE = "fidelity"
# A language model's gate: perplexity, with these defaults filled in where the spec sets none.
LLM_EVALUATION_DEFAULTS = (("maxPerplexityIncrease", 0.10), ("minTokenAgreement", 0.80), ("maxNewTokens", 16))


@dataclasses.dataclass(frozen=True)
class Source:
    job_name: str | None = None
    uri: str | None = None
    format: str | None = None        # contract.MODEL_FORMATS; None: detected from the directory


@dataclasses.dataclass(frozen=True)
class PvcPath:
    claim: str
    path: str             # inside the claim, no leading slash ("" = the root)

    @property
    def uri(self) -> str:
        return f"pvc://{self.claim}/{self.path}".rstrip("/")


# Exported programs take only the methods implemented for their format (the CRD's CEL rule
# refuses the other pairs too); int8-static takes exported programs only.
EXPORTED_FORMATS = frozenset(contract.EXPORTED_FORMAT_METHODS)


@dataclasses.dataclass(frozen=True)
class Compression:
    method: str = "none"
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    max_accuracy_drop: float | None = None
    resources: Resources = Resources()
    backoff_limit: int = 1
    pod_annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    pod_security_context: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    security_context: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    evaluation: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # the gate (contract.EVALUATION_*)
    placement: Placement = Placement()
    active_deadline_seconds: int = 7200      # the compression Job ends (fails) after this long
    latency_budget_seconds: int = contract.COMPRESSION_LATENCY_BUDGET_SECONDS   # per model measured

    @property
    def runs_job(self) -> bool:
        return self.method != "none"


@dataclasses.dataclass(frozen=True)
class Admission:
    """``spec.serving.admission``: what a serving pod admits before it refuses (503,
    RESOURCE_EXHAUSTED); the server derives the rest from its memory limit."""
    max_concurrent_requests: int = 64
    max_queued_requests: int = 32
    queue_timeout_ms: int = 5000


@dataclasses.dataclass(frozen=True)
class Generation:
    """``spec.serving.generation``: what one request to a language model may ask."""
    max_prompt_tokens: int = 2048      # the longest prompt accepted (longer: 400)
    max_output_tokens: int = 512       # the largest max_tokens accepted (larger: 400)
    max_sequences: int = 8             # sequences decoded together (the batch)


@dataclasses.dataclass(frozen=True)
class Serving:
    image: str
    image_pull_policy: str = "IfNotPresent"
    replicas: int = 1
    resources: Resources = Resources()
    max_batch_size: int = 32              # also the most rows one request may carry
    max_batch_delay_ms: int = 0
    env: tuple[Mapping[str, Any], ...] = ()
    pod_annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    pod_security_context: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    security_context: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    placement: Placement = Placement()
    admission: Admission = Admission()
    runtime: str = llm.RUNTIME_BUILTIN        # language models: builtin, vllm or custom
    generation: Generation = Generation()
    port: int | None = None                   # custom: the container's HTTP port (default SERVE_PORT)
    health_path: str | None = None            # custom: its health path (default llm.CUSTOM_HEALTH_PATH)
    metrics: llm.RuntimeMetrics | None = None  # custom: its metric names (default vLLM's)

    @property
    def runtime_metrics(self) -> llm.RuntimeMetrics:
        return llm.runtime_metrics(self.runtime, self.metrics)

    @property
    def http_port(self) -> int:
        """The port the serving container answers HTTP (and /metrics) on."""
        if self.runtime == llm.RUNTIME_VLLM:
            return llm.VLLM_PORT
        return self.port or contract.SERVE_PORT


@dataclasses.dataclass(frozen=True)
class Step:
    weight: int
    pause_seconds: int = 0


# Measurement verdicts (the names of Argo Rollouts' analysis phases).
SUCCESSFUL, FAILED, INCONCLUSIVE, ERROR = "Successful", "Failed", "Inconclusive", "Error"
ON_INCONCLUSIVE = ("rollback", "pause")


@dataclasses.dataclass(frozen=True)
class Check:
    """One analysis query: every series' value must be <= ``max`` and/or >= ``min``.

    It is measured ``count`` times, every ``interval_seconds``; the step passes once
    ``count`` measurements were Successful. More than ``failure_limit`` Failed
    measurements roll the canary back; more than ``inconclusive_limit`` Inconclusive
    ones, or more than ``consecutive_error_limit`` Errors in a row, end the rollout as
    ``rollout.onInconclusive`` says.
    """
    name: str
    query: str
    max: float | None = None
    min: float | None = None
    count: int = 1
    interval_seconds: int = 10
    failure_limit: int = 0
    inconclusive_limit: int = 5
    consecutive_error_limit: int = 4
    relative_to_stable: bool = False     # a ready-made latency check as a ratio to the stable revision's

    def failed(self, value: float) -> bool:
        return (self.max is not None and value > self.max) or (self.min is not None and value < self.min)

    def judge(self, result) -> tuple[str, float | None]:
        """(verdict, the value that decided it) of one measurement (a QueryResult).

        A failed query is Error; no number (no series, NaN) is Inconclusive; ±Inf compares
        as a number; with several series each is judged and the worst decides.
        """
        if result.failed:
            return ERROR, None
        if not result.values:
            return INCONCLUSIVE, None
        bad = [v for v in result.values if self.failed(v)]
        if bad:
            return FAILED, max(bad, key=lambda v: self._excess(v))
        return SUCCESSFUL, max(result.values, key=lambda v: self._excess(v))

    def _excess(self, v: float) -> float:
        """How far ``v`` is toward (or past) a bound: larger is worse."""
        return max(v - self.max if self.max is not None else float("-inf"),
                   self.min - v if self.min is not None else float("-inf"))

    def bound_text(self) -> str:
        return " and ".join(t for t in (f"<= {self.max}" if self.max is not None else "",
                                        f">= {self.min}" if self.min is not None else "") if t)


@dataclasses.dataclass(frozen=True)
class Rollout:
    strategy: str = "canary"
    steps: tuple[Step, ...] = (Step(20, 30), Step(50, 30))
    analysis: tuple[Check, ...] = ()
    progress_deadline_seconds: int = 600
    on_inconclusive: str = "rollback"
    min_requests: int = 0


@dataclasses.dataclass(frozen=True)
class Autoscaling:
    engine: str = "builtin"
    metric: str = "rps"
    target: float = 10.0
    query: str | None = None
    min_replicas: int = 1
    max_replicas: int = 10
    stable_window_seconds: int = 60
    panic_window_seconds: int = 6
    panic_threshold: float = 2.0
    scale_down_delay_seconds: int = 30
    interval_seconds: float = 2.0

    @property
    def additive(self) -> bool:
        """Totals over replicas are divided by the target; latency and KV cache use are proportional."""
        return self.metric not in ("p95latency", llm.METRIC_KV_CACHE)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    source: Source
    compression: Compression
    serving: Serving
    rollout: Rollout
    autoscaling: Autoscaling | None
    compression_image: str
    network_policy: NetworkPolicySpec = NetworkPolicySpec()   # not part of a revision
    task: str = PREDICT

    @property
    def language_model(self) -> bool:
        return self.task == TEXT_GENERATION

    @property
    def floor(self) -> int:
        """The fewest replicas an autoscaler may run: minReplicas, or more when
        ``spec.serving.replicas`` (what ``kubectl scale`` sets) asks for more."""
        a = self.autoscaling
        return max(a.min_replicas, self.serving.replicas) if a else self.serving.replicas

    def revision(self, source_uri: str | None = None, source_identity: str = "") -> str:
        """Hash of the source (and the run that made it), the compression and the serving spec."""
        serving, compression = dataclasses.asdict(self.serving), dataclasses.asdict(self.compression)
        for key in ("replicas", "pod_annotations", "placement"):     # where pods run is no new revision
            serving.pop(key)
        if self.serving.admission == Admission():                      # the defaults leave the hash
            serving.pop("admission")                                    # as it was before them
        if not self.language_model:          # the language-model fields leave a predict model's hash
            for key in ("runtime", "generation", "port", "health_path", "metrics"):
                serving.pop(key)
        for key in ("pod_annotations", "placement", "active_deadline_seconds", "latency_budget_seconds"):
            compression.pop(key)
        source = dataclasses.asdict(self.source)
        for part, keys in ((serving, ("pod_security_context", "security_context")),   # unset fields
                           (compression, ("pod_security_context", "security_context", "evaluation")),
                           (source, ("format",))):                                    # leave the hash
            for key in keys:                                                           # as it was
                if not part[key]:
                    part.pop(key)
        ident = {"source": source, "sourceURI": source_uri,
                 "compression": compression, "serving": serving,
                 "compressionImage": self.compression_image}
        if source_identity:                     # the run that made the source (LeptonJob uid)
            ident["sourceIdentity"] = source_identity
        if self.language_model:
            ident["task"] = self.task
        blob = json.dumps(ident, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:REVISION_LEN]


def parse_uri(uri: str) -> PvcPath:
    """``pvc://claim/path`` -> PvcPath; raises ValueError with a clear message otherwise."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise ValueError(f"source.uri {uri!r} must look like pvc://claim/path")
    if scheme not in URI_SCHEMES:
        raise ValueError(f"source.uri scheme {scheme!r} is not supported; use pvc://claim/path")
    claim, _, path = rest.partition("/")
    path = path.strip("/")
    if not claim:
        raise ValueError(f"source.uri {uri!r} names no PersistentVolumeClaim")
    if ".." in path.split("/"):
        raise ValueError(f"source.uri {uri!r} must not contain '..'")
    return PvcPath(claim, path)


def artifact_path(source: PvcPath, model: str, revision: str) -> PvcPath:
    """Where the compression Job writes a revision's artifact (same claim as the source)."""
    return PvcPath(source.claim, f"{ARTIFACT_ROOT}/{model}/{revision}")


def render_query(query: str, namespace: str, model: str, revision: str = "", stable: str = "") -> str:
    """Fill ``${namespace}``, ``${model}``, ``${revision}`` (the canary) and ``${stable}``
    in a PromQL query (``${stable}`` is ``revision`` when no stable revision is named)."""
    return prometheus.render(query, namespace=namespace, model=model, revision=revision, stable=stable or revision)


def scoped_query(query: str, namespace: str, model: str, revision: str = "", stable: str = "") -> str:
    """The query as the operator evaluates it: rendered, then confined to ``namespace``
    (``promql.scope``; raises ``promql.ScopeError``)."""
    return promql.scope(render_query(query, namespace, model, revision, stable), namespace)


def _scope_problems(namespace: str, model: str, rollout: Rollout, autoscaling: Autoscaling | None) -> list[str]:
    """The queries that cannot be confined to ``namespace``, rendered as they will be: the
    autoscaling query with no revision, the analysis queries with ``PLACEHOLDER_REVISION``."""
    queries = [(f"rollout.analysis[{i}].query", c.query, PLACEHOLDER_REVISION)
               for i, c in enumerate(rollout.analysis) if c.query]
    if autoscaling is not None and autoscaling.metric == "query" and (autoscaling.query or "").strip():
        queries.append(("autoscaling.query", autoscaling.query, ""))
    problems = []
    for field, query, revision in queries:
        try:
            scoped_query(query, namespace, model, revision)
        except promql.ScopeError as exc:
            problems.append(f"{field}: {exc}")
    return problems


def _claim_path(path: Any, field: str, problems: list[str]) -> None:
    """A path on the source claim: relative to its root, without '..'."""
    if path is None:
        return
    if not isinstance(path, str) or not path:
        problems.append(f"{field} must be a path on the source claim, got {path!r}")
    elif path.startswith("/") or ".." in path.split("/"):
        problems.append(f"{field} must be relative to the source claim, got {path!r}")


def _params(raw_c: Mapping[str, Any], problems: list[str]) -> Mapping[str, Any]:
    """``compression.params``: free-form method parameters, except distillation's student
    and training data, whose paths lie on the source claim."""
    params = mapping(raw_c, "params", problems, "compression.")
    student = params.get("student")
    if student is not None:
        if not isinstance(student, Mapping) or ("layers" in student) == ("path" in student):
            problems.append("compression.params.student must set exactly one of layers (keep that many of "
                            "the teacher's layers) or path (a student directory on the source claim)")
        elif "layers" in student:
            integer(student, "layers", None, 1, 1000, problems, "compression.params.student.")
        else:
            _claim_path(student["path"], "compression.params.student.path", problems)
    _claim_path(params.get("data"), "compression.params.data", problems)
    return params


def _format_method_problems(fmt: str | None, method: str) -> list[str]:
    """A pair of source.format and compression.method with no implementation (the CRD's rule)."""
    if not fmt or method not in METHODS:
        return []
    allowed = contract.EXPORTED_FORMAT_METHODS.get(fmt)
    if (allowed is not None and method in allowed) or (allowed is None and method != "int8-static"):
        return []
    table = "; ".join(f"{f} takes {', '.join(m)}" for f, m in contract.EXPORTED_FORMAT_METHODS.items())
    return [f"compression.method {method} has no implementation for source.format {fmt}: {table}; "
            f"int8-static needs torch.export or onnx"]


def _llm_evaluation(raw: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """A language model's gate (``type: perplexity``, the only one it takes): the text
    sample and prompts (paths on the source claim) and the bounds, the defaults filled in."""
    where = "compression.evaluation."
    unknown = sorted(set(raw) - set(contract.LLM_EVALUATION_FIELDS))
    if unknown:
        problems.append(f"compression.evaluation has fields {unknown} that a text-generation model's gate "
                        f"(type perplexity) does not take; it takes {', '.join(contract.LLM_EVALUATION_FIELDS)}")
    if raw.get("type", contract.EVALUATION_PERPLEXITY) != contract.EVALUATION_PERPLEXITY:
        problems.append(f"compression.evaluation.type {raw['type']} is for spec.task predict; a text-generation "
                        f"model is gated by type perplexity")
    for key in ("path", "prompts"):
        _claim_path(raw.get(key), f"compression.evaluation.{key}", problems)
    number(raw, "maxPerplexityIncrease", None, 0, None, problems, where)
    number(raw, "minTokenAgreement", None, 0, 1, problems, where)
    integer(raw, "maxNewTokens", None, 1, 4096, problems, where)
    integer(raw, "samples", None, 1, 100000, problems, where)
    return {"type": contract.EVALUATION_PERPLEXITY, **dict(LLM_EVALUATION_DEFAULTS), **raw}


def _evaluation(raw: Any, problems: list[str], task: str = PREDICT) -> dict[str, Any]:
    """``compression.evaluation``: the gate's data file (a path on the source claim) and
    metric, or a fidelity threshold (a language model: ``_llm_evaluation``); passed to the
    compression program as JSON."""
    if raw is not None and not isinstance(raw, Mapping):
        problems.append(f"compression.evaluation must be an object, got {raw!r}")
        return {}
    if task == TEXT_GENERATION:
        return _llm_evaluation(raw or {}, problems)
    if raw is None:
        return {}
    where = "compression.evaluation."
    if raw.get("type") == contract.EVALUATION_PERPLEXITY:
        problems.append("compression.evaluation.type perplexity needs spec.task text-generation (a language model)")
        return dict(raw)
    unknown = sorted(set(raw) - set(contract.EVALUATION_FIELDS))
    if unknown:
        problems.append(f"compression.evaluation has unknown fields {unknown}")
    kind = choice(raw.get("type", EVALUATION_TYPE), contract.EVALUATION_TYPES, problems, where + "type")
    metrics = contract.EVALUATION_METRICS[kind]
    if "metric" in raw:
        choice(raw["metric"], metrics, problems, where + f"metric (for type {kind})")
    path = raw.get("path")
    if kind == "data" and not path:
        problems.append("compression.evaluation.path is required for type data: a file on the source claim")
    _claim_path(path, "compression.evaluation.path", problems)
    number(raw, "threshold", None, 0, 1, problems, where)
    number(raw, "maxDrop", None, 0, None, problems, where)
    integer(raw, "k", None, 1, 1000, problems, where)
    integer(raw, "samples", None, 1, 100000, problems, where)
    return {"type": kind, **raw}


def _source(raw: Mapping[str, Any], problems: list[str]) -> Source:
    job_ref, uri = raw.get("jobRef"), text(raw, "uri", problems, "source.")
    if job_ref is not None and not isinstance(job_ref, Mapping):
        problems.append(f"source.jobRef must be an object (name: a LeptonJob), got {job_ref!r}")
    job = text(job_ref, "name", problems, "source.jobRef.") if isinstance(job_ref, Mapping) else None
    if (job_ref is not None) == bool(uri):
        problems.append("source must set exactly one of jobRef (a LeptonJob) or uri (pvc://claim/path)")
    elif job_ref is not None and not job:
        problems.append("source.jobRef.name is required: name a LeptonJob in this namespace")
    if uri:
        try:
            parse_uri(uri)
        except ValueError as exc:
            problems.append(str(exc))
    fmt = text(raw, "format", problems, "source.")
    if fmt is not None:
        fmt = choice(fmt, FORMATS, problems, "source.format")
    return Source(job or None, uri or None, fmt)


def _check_query(c: Mapping[str, Any], where: str, metrics: llm.RuntimeMetrics | None,
                 problems: list[str]) -> tuple[str, str, bool]:
    """(query, default name, relative to stable) of one analysis entry: its own PromQL, or a
    ready-made ``check`` of a language model rendered over its runtime's metric names."""
    query = (text(c, "query", problems, f"{where}.") or "").strip()
    ready = text(c, "check", problems, f"{where}.")
    if ready is None:
        if not query:
            problems.append(f"{where}.query must be a non-empty PromQL query (or set check)")
        if c.get("relativeToStable"):
            problems.append(f"{where}.relativeToStable is for a ready-made check; a query compares with "
                            "${stable} itself")
        return query, "", False
    if query:
        problems.append(f"{where} sets both query and check; set one")
    if ready not in llm.CHECKS:
        problems.append(f"{where}.check must be one of {', '.join(llm.CHECKS)}; got {ready!r}")
        return query, "", False
    if metrics is None:
        problems.append(f"{where}.check {ready} needs spec.task text-generation (a language model's metrics)")
        return query, "", False
    relative = c.get("relativeToStable", False)
    if not isinstance(relative, bool):
        problems.append(f"{where}.relativeToStable must be true or false, got {relative!r}")
        relative = False
    if relative and ready not in llm.LATENCY_CHECKS:
        problems.append(f"{where}.relativeToStable compares a latency check ({', '.join(llm.LATENCY_CHECKS)}) "
                        f"with the stable revision's; {ready} has no relative form")
        relative = False
    return llm.check_query(ready, metrics, relative), ready, relative


def _rollout(raw: Mapping[str, Any], problems: list[str], metrics: llm.RuntimeMetrics | None = None) -> Rollout:
    strategy = choice(raw.get("strategy", default(Rollout, "strategy")), STRATEGIES, problems, "rollout.strategy")
    steps = []
    for i, s in enumerate(items(raw, "steps", problems, "rollout.", Mapping, "a step object ({weight, pauseSeconds})")):
        w = integer(s, "weight", None, 1, 100, problems, f"rollout.steps[{i}].")
        p = integer(s, "pauseSeconds", default(Step, "pause_seconds"), 0, 86400, problems, f"rollout.steps[{i}].")
        if w is None:
            problems.append(f"rollout.steps[{i}].weight is required")
        else:
            steps.append(Step(w, p))
    weights = [s.weight for s in steps]
    if any(b <= a for a, b in zip(weights, weights[1:])):
        problems.append(f"rollout.steps weights must strictly increase, got {weights}")
    checks = []
    for i, c in enumerate(items(raw, "analysis", problems, "rollout.", Mapping, "a check object")):
        where = f"rollout.analysis[{i}]"
        query, ready, relative = _check_query(c, where, metrics, problems)
        lo = number(c, "min", None, None, None, problems, f"{where}.")
        hi = number(c, "max", None, None, None, problems, f"{where}.")
        if lo is None and hi is None:
            problems.append(f"{where} needs a threshold: set max and/or min")
        w = f"{where}."
        checks.append(Check(text(c, "name", problems, f"{where}.", ready or f"query-{i}"), query, hi, lo,
                            integer(c, "count", default(Check, "count"), 1, 1000, problems, w),
                            integer(c, "intervalSeconds", default(Check, "interval_seconds"), 1, 3600, problems, w),
                            integer(c, "failureLimit", default(Check, "failure_limit"), 0, 1000, problems, w),
                            integer(c, "inconclusiveLimit", default(Check, "inconclusive_limit"), 0, 1000, problems, w),
                            integer(c, "consecutiveErrorLimit", default(Check, "consecutive_error_limit"), 0, 1000,
                                    problems, w), relative))
    names = [c.name for c in checks]
    if len(set(names)) != len(names):
        problems.append(f"rollout.analysis names must be unique, got {names}")
    return Rollout(strategy, tuple(steps) if "steps" in raw else default(Rollout, "steps"), tuple(checks),
                   integer(raw, "progressDeadlineSeconds", default(Rollout, "progress_deadline_seconds"), 30, 86400,
                           problems, "rollout."),
                   choice(raw.get("onInconclusive", default(Rollout, "on_inconclusive")), ON_INCONCLUSIVE, problems,
                          "rollout.onInconclusive"),
                   integer(raw, "minRequests", default(Rollout, "min_requests"), 0, 10**9, problems, "rollout."))


def _autoscaling(raw: Any, problems: list[str]) -> Autoscaling | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append(f"autoscaling must be an object, got {raw!r}")
        return None
    where = "autoscaling."
    engine = choice(raw.get("engine", default(Autoscaling, "engine")), ENGINES, problems, "autoscaling.engine")
    metric = choice(raw.get("metric", default(Autoscaling, "metric")), METRICS, problems, "autoscaling.metric")
    query = text(raw, "query", problems, where)
    if metric == "query" and not (query or "").strip():
        problems.append("autoscaling.query must be a non-empty PromQL query when metric is query")
    if metric != "query" and query:
        problems.append("autoscaling.query is only used with metric: query")
    if metric == "query" and engine == "hpa":
        problems.append("autoscaling.metric query needs engine builtin or keda: an HPA reads a "
                        "named External metric, not PromQL")
    target = number(raw, "target", None, 0, None, problems, where, lo_open=True)
    if target is None and "target" not in raw:
        problems.append("autoscaling.target is required (per replica for rps, inflight and query; "
                        "seconds for p95latency)")
    lo = integer(raw, "minReplicas", default(Autoscaling, "min_replicas"), 1, 1000, problems, where)
    hi = integer(raw, "maxReplicas", max(lo, default(Autoscaling, "max_replicas")), 1, 1000, problems, where)
    if hi < lo:
        problems.append(f"autoscaling.maxReplicas ({hi}) must be >= minReplicas ({lo})")
    stable = integer(raw, "stableWindowSeconds", default(Autoscaling, "stable_window_seconds"), 6, 3600,
                     problems, where)
    panic = integer(raw, "panicWindowSeconds", max(1, stable // 10), 1, 3600, problems, where)
    if panic > stable:
        problems.append(f"autoscaling.panicWindowSeconds ({panic}) must be <= stableWindowSeconds ({stable})")
    return Autoscaling(
        engine, metric, target or 1.0, query, lo, hi, stable, panic,
        number(raw, "panicThreshold", default(Autoscaling, "panic_threshold"), 1, 100, problems, where, lo_open=True),
        integer(raw, "scaleDownDelaySeconds", default(Autoscaling, "scale_down_delay_seconds"), 0, 3600,
                problems, where),
        number(raw, "intervalSeconds", default(Autoscaling, "interval_seconds"), 0.5, 300, problems, where))


def _admission(raw_s: Mapping[str, Any], problems: list[str]) -> Admission:
    raw, where = mapping(raw_s, "admission", problems, "serving."), "serving.admission."
    return Admission(
        integer(raw, "maxConcurrentRequests", default(Admission, "max_concurrent_requests"), 1, 10000, problems,
                where),
        integer(raw, "maxQueuedRequests", default(Admission, "max_queued_requests"), 1, 10000, problems, where),
        integer(raw, "queueTimeoutMs", default(Admission, "queue_timeout_ms"), 1, 600000, problems, where))


def _compression(raw_c: Mapping[str, Any], task: str, problems: list[str]) -> Compression:
    method = raw_c.get("method", default(Compression, "method"))
    if method not in METHODS:          # a method of the other task is refused by _task_problems
        method = choice(method, TASK_METHODS[task], problems, "compression.method")
    return Compression(
        method, _params(raw_c, problems),
        number(raw_c, "maxAccuracyDrop", None, 0, 1, problems, "compression."),
        resources(raw_c.get("resources"), problems, "compression.resources."),
        integer(raw_c, "backoffLimit", default(Compression, "backoff_limit"), 0, 10, problems, "compression."),
        string_map(raw_c, "podAnnotations", problems, "compression."),
        pod_security_context(raw_c, "podSecurityContext", problems, "compression."),
        security_context(raw_c, "securityContext", problems, "compression."),
        _evaluation(raw_c.get("evaluation"), problems, task),
        placement(raw_c, problems, "compression."),
        integer(raw_c, "activeDeadlineSeconds", default(Compression, "active_deadline_seconds"), 60, 7 * 86400,
                problems, "compression."),
        integer(raw_c, "latencyBudgetSeconds", default(Compression, "latency_budget_seconds"), 1, 600,
                problems, "compression."))


RESERVED_ENV = frozenset({
    contract.ENV_MODEL_DIR, contract.ENV_MODEL_NAME, contract.ENV_MODEL_NAMESPACE, contract.ENV_MODEL_REVISION,
    contract.ENV_MAX_BATCH_SIZE, contract.ENV_MAX_BATCH_DELAY_MS, contract.ENV_MODEL_FORMAT, contract.ENV_GRPC_PORT,
    contract.ENV_MAX_CONCURRENT_REQUESTS, contract.ENV_MAX_QUEUED_REQUESTS, contract.ENV_QUEUE_TIMEOUT_MS,
    contract.ENV_MEMORY_LIMIT_BYTES, contract.ENV_TASK, contract.ENV_MAX_PROMPT_TOKENS,
    contract.ENV_MAX_OUTPUT_TOKENS, contract.ENV_MAX_SEQUENCES, "HOME", "TMPDIR"})


def _env(raw_s: Mapping[str, Any], problems: list[str]) -> tuple[Mapping[str, Any], ...]:
    env = items(raw_s, "env", problems, "serving.", Mapping, "an EnvVar object")
    for i, var in enumerate(env):
        if not isinstance(var.get("name"), str) or not var["name"]:
            problems.append(f"serving.env[{i}].name is required")
        elif var.get("name") in RESERVED_ENV:
            problems.append(f"serving.env {var.get('name')} is set by the operator and cannot be overridden")
    return env


def _generation(raw_s: Mapping[str, Any], problems: list[str]) -> Generation:
    raw, where = mapping(raw_s, "generation", problems, "serving."), "serving.generation."
    return Generation(
        integer(raw, "maxPromptTokens", default(Generation, "max_prompt_tokens"), 1, 10**6, problems, where),
        integer(raw, "maxOutputTokens", default(Generation, "max_output_tokens"), 1, 10**6, problems, where),
        integer(raw, "maxSequences", default(Generation, "max_sequences"), 1, 4096, problems, where))


METRIC_FIELDS = {"timeToFirstToken": "time_to_first_token", "interTokenLatency": "inter_token_latency",
                 "requestsWaiting": "requests_waiting", "requestsRunning": "requests_running",
                 "kvCacheUsage": "kv_cache_usage", "requests": "requests"}


def _runtime_metrics(raw_s: Mapping[str, Any], problems: list[str]) -> llm.RuntimeMetrics | None:
    """``serving.metrics`` of a custom runtime: its metric names (unset: vLLM's)."""
    if raw_s.get("metrics") is None:
        return None
    raw = mapping(raw_s, "metrics", problems, "serving.")
    unknown = sorted(set(raw) - set(METRIC_FIELDS))
    if unknown:
        problems.append(f"serving.metrics has unknown fields {unknown}; it takes {', '.join(METRIC_FIELDS)}")
    names = {}
    for key, attr in METRIC_FIELDS.items():
        value = text(raw, key, problems, "serving.metrics.")
        if value is not None and not METRIC_NAME.fullmatch(value):
            problems.append(f"serving.metrics.{key} must be a Prometheus metric name, got {value!r}")
        elif value is not None:
            names[attr] = value
    return llm.RuntimeMetrics(**names)


def _serving(raw_s: Mapping[str, Any], image: str, pull_policy: str, problems: list[str]) -> Serving:
    batching = mapping(raw_s, "batching", problems, "serving.")
    return Serving(
        image, text(raw_s, "imagePullPolicy", problems, "serving.", pull_policy),
        integer(raw_s, "replicas", default(Serving, "replicas"), 0, 1000, problems, "serving."),
        resources(raw_s.get("resources"), problems, "serving.resources."),
        integer(batching, "maxBatchSize", default(Serving, "max_batch_size"), 1, 4096, problems, "serving.batching."),
        integer(batching, "maxBatchDelayMs", default(Serving, "max_batch_delay_ms"), 0, 10000, problems,
                "serving.batching."),
        _env(raw_s, problems), string_map(raw_s, "podAnnotations", problems, "serving."),
        pod_security_context(raw_s, "podSecurityContext", problems, "serving."),
        security_context(raw_s, "securityContext", problems, "serving."),
        placement(raw_s, problems, "serving."), _admission(raw_s, problems),
        choice(raw_s.get("runtime", default(Serving, "runtime")), llm.RUNTIMES, problems, "serving.runtime"),
        _generation(raw_s, problems),
        integer(raw_s, "port", None, 1, 65535, problems, "serving."),
        text(raw_s, "healthPath", problems, "serving."),
        _runtime_metrics(raw_s, problems))


METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _task_problems(task: str, source: Source, compression: Compression, serving: Serving,
                   raw_s: Mapping[str, Any], autoscaling: Autoscaling | None) -> list[str]:
    """Pairs of spec.task, source.format, compression.method, serving.runtime and the
    metrics that have no implementation (the CRD's rules), each naming both fields."""
    problems, fmt, method, runtime = [], source.format, compression.method, serving.runtime
    if task == PREDICT and fmt == contract.MODEL_FORMAT_GGUF:
        problems.append("source.format gguf needs spec.task text-generation: a GGUF file is a language model")
    if task == TEXT_GENERATION and fmt not in (None, *contract.LLM_MODEL_FORMATS):
        problems.append(f"spec.task text-generation takes source.format {' or '.join(contract.LLM_MODEL_FORMATS)}, "
                        f"got {fmt}")
    if method in METHODS and method not in TASK_METHODS[task]:
        problems.append(f"compression.method {method} is not for spec.task {task}: {task} takes "
                        f"{', '.join(TASK_METHODS[task])}")
    if task == PREDICT:
        problems += [f"serving.{key} needs spec.task text-generation (a language model)"
                     for key in ("runtime", "generation", "port", "healthPath", "metrics")
                     if raw_s.get(key) is not None and (key != "runtime" or runtime != llm.RUNTIME_BUILTIN)]
    if runtime == llm.RUNTIME_VLLM and method not in VLLM_METHODS:
        problems.append(f"compression.method {method} cannot be served by serving.runtime vllm: vllm takes "
                        f"compression.method {', '.join(VLLM_METHODS)}")
    if runtime == llm.RUNTIME_VLLM and method == "none" and fmt == contract.MODEL_FORMAT_GGUF:
        problems.append("serving.runtime vllm loads a Hugging Face directory: with source.format gguf set "
                        "compression.method bf16 or fp16")
    if runtime == llm.RUNTIME_CUSTOM and not raw_s.get("image"):
        problems.append("serving.image is required with serving.runtime custom (a container that speaks the "
                        "OpenAI API)")
    if task == TEXT_GENERATION and runtime != llm.RUNTIME_CUSTOM:
        problems += [f"serving.{key} is only for serving.runtime custom"
                     for key in ("port", "healthPath", "metrics") if raw_s.get(key) is not None]
    path = serving.health_path
    if path is not None and not path.startswith("/"):
        problems.append(f"serving.healthPath must be an absolute URL path, got {path!r}")
    metric = autoscaling.metric if autoscaling else None
    if task == PREDICT and metric in llm.METRICS:
        problems.append(f"autoscaling.metric {metric} needs spec.task text-generation (a language model's metrics)")
    if runtime != llm.RUNTIME_BUILTIN and metric in ("rps", "inflight", "p95latency"):
        problems.append(f"autoscaling.metric {metric} reads the built-in server's metrics; with serving.runtime "
                        f"{runtime} use {', '.join(llm.METRICS)} or query")
    return problems


def _task(spec: Mapping[str, Any], source: Source, problems: list[str]) -> str:
    """``spec.task``; unset: text-generation for a GGUF source, else predict."""
    if spec.get("task") is None:
        return TEXT_GENERATION if source.format == contract.MODEL_FORMAT_GGUF else PREDICT
    return choice(spec["task"], contract.TASKS, problems, "spec.task")


@parser
def parse_model(name: str, spec: Mapping[str, Any] | None, default_image: str,
                default_pull_policy: str = "IfNotPresent", namespace: str = "default",
                vllm_image: str = llm.VLLM_IMAGE) -> ModelSpec:
    """Parse and validate the spec of a LeptonModel in ``namespace``; raises ``InvalidSpec``
    listing every problem. ``default_image`` and ``default_pull_policy`` apply where the spec
    names none (``vllm_image`` to ``serving.runtime: vllm``)."""
    spec = spec or {}
    problems = validate_name(name, MODEL_NAME_MAX, CHILD_SUFFIX_LEN)
    source = _source(mapping(spec, "source", problems, ""), problems)
    task = _task(spec, source, problems)
    raw_c = mapping(spec, "compression", problems, "")
    compression = _compression(raw_c, task, problems)
    raw_s = mapping(spec, "serving", problems, "")
    runtime = raw_s.get("runtime", default(Serving, "runtime"))
    image = text(raw_s, "image", problems, "serving.", vllm_image if runtime == llm.RUNTIME_VLLM else default_image)
    serving = _serving(raw_s, image, default_pull_policy, problems)
    metrics = serving.runtime_metrics if task == TEXT_GENERATION else None
    rollout = _rollout(mapping(spec, "rollout", problems, ""), problems, metrics)
    autoscaling = _autoscaling(spec.get("autoscaling"), problems)
    policy = network_policy(spec.get("networkPolicy"), problems)
    # a vLLM or custom image cannot compress: the compression Job then runs the operator's image
    compression_image = text(raw_c, "image", problems, "compression.",
                             image if serving.runtime == llm.RUNTIME_BUILTIN else default_image)
    problems += _format_method_problems(source.format, compression.method) + _task_problems(
        task, source, compression, serving, raw_s, autoscaling) + _scope_problems(
        namespace, name, rollout, autoscaling)
    if problems:
        raise InvalidSpec(problems)
    return ModelSpec(source, compression, serving, rollout, autoscaling, compression_image, policy, task)
