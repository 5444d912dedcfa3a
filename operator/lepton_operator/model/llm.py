"""Language models (``spec.task: text-generation``): the serving runtimes' metric names and
the PromQL over them (pure).

A language model is served by a runtime the spec names (``serving.runtime``): the image's
built-in OpenAI server, vLLM's OpenAI server, or a custom container. Each exports the
time-to-first-token and inter-token-latency histograms, the running and waiting request
gauges and the KV cache use under vLLM's names (a custom container may name its own), and
a request counter with the HTTP status in a label: the built-in runtime counts
``lepton_serve_requests_total`` by ``code``, vLLM's server ``http_requests_total`` by
``status`` (``2xx`` .. ``5xx``).

Every series is selected by the serving pods' names, which Prometheus' pod discovery puts
in the ``pod`` label (whatever labels the runtime itself adds): a revision's pods are
``<model>-<revision>-<replica set>-<suffix>``. The namespace matcher comes from
``promql.scope`` (analysis) or is written here (autoscaling), like every query the
operator evaluates.
"""
from __future__ import annotations

import dataclasses

from lepton_trainer import contract

from ..config import DEFAULT_VLLM_IMAGE as VLLM_IMAGE
from ..scaling import promql

RUNTIME_BUILTIN, RUNTIME_VLLM, RUNTIME_CUSTOM = "builtin", "vllm", "custom"
RUNTIMES = (RUNTIME_BUILTIN, RUNTIME_VLLM, RUNTIME_CUSTOM)
VLLM_PORT = 8000                 # vLLM's OpenAI server (--port)
VLLM_HEALTH_PATH = "/health"
VLLM_COMMAND = ("python3", "-m", "vllm.entrypoints.openai.api_server")   # vLLM's OpenAI server, every release
CUSTOM_HEALTH_PATH = "/health"
VLLM_REQUESTS = "http_requests_total"        # prometheus-fastapi-instrumentator, label "status"
WINDOW = "1m"                    # the rate window of the ready-made checks
# Ready-made analysis checks (rollout.analysis[].check): seconds (p95) or a fraction (errors).
CHECK_TTFT, CHECK_ITL, CHECK_ERRORS = "timeToFirstTokenP95", "interTokenLatencyP95", "errorRate"
CHECKS = (CHECK_TTFT, CHECK_ITL, CHECK_ERRORS)
LATENCY_CHECKS = (CHECK_TTFT, CHECK_ITL)         # those with a form relative to the stable revision
# Autoscaling metrics of language models: requests waiting per replica (a total over the
# replicas, divided by the target) and the mean KV cache use (0..1, proportional).
METRIC_WAITING, METRIC_KV_CACHE = "waiting", "kvCache"
METRICS = (METRIC_WAITING, METRIC_KV_CACHE)
REVISION_PATTERN = "[0-9a-f]{10}"      # any revision of a model (spec.REVISION_LEN hex digits)


@dataclasses.dataclass(frozen=True)
class RuntimeMetrics:
    """The metric names a runtime exports (``serving.metrics`` of a custom runtime; the
    defaults are vLLM's)."""
    time_to_first_token: str = contract.LLM_METRIC_TTFT
    inter_token_latency: str = contract.LLM_METRIC_ITL
    requests_waiting: str = contract.LLM_METRIC_WAITING
    requests_running: str = contract.LLM_METRIC_RUNNING
    kv_cache_usage: str = contract.LLM_METRIC_KV_CACHE
    requests: str = VLLM_REQUESTS
    status_label: str = "status"         # the request counter's HTTP status label


BUILTIN_METRICS = RuntimeMetrics(requests=contract.METRIC_SERVE_REQUESTS, status_label="code")


def runtime_metrics(runtime: str, custom: RuntimeMetrics | None = None) -> RuntimeMetrics:
    """The metric names of ``runtime`` (a custom runtime's from its spec)."""
    if runtime == RUNTIME_BUILTIN:
        return BUILTIN_METRICS
    if runtime == RUNTIME_CUSTOM and custom is not None:
        return custom
    return RuntimeMetrics()


def pod_selector(model: str, revision: str) -> str:
    """The label matcher of the serving pods of ``model``'s ``revision`` (a revision, a
    regular expression over revisions, or ``${revision}``)."""
    return f'pod=~"{model}-{revision}-.+"'


def _quantile(histogram: str, sel: str) -> str:
    return f"histogram_quantile(0.95, sum by (le) (rate({histogram}_bucket{{{sel}}}[{WINDOW}])))"


def check_query(check: str, metrics: RuntimeMetrics, relative: bool = False) -> str:
    """The PromQL of a ready-made check on the canary (``${model}``, ``${revision}`` and
    ``${stable}`` are filled and the namespace added when it is measured, as for a spec's
    own query). ``errorRate`` is 5xx answers over all answers (0 without errors, no number
    without traffic). A ``relative`` latency check is the canary's p95 divided by the stable
    revision's over the same window (no number when the stable one served nothing)."""
    if check in LATENCY_CHECKS:
        histogram = metrics.time_to_first_token if check == CHECK_TTFT else metrics.inter_token_latency
        canary = _quantile(histogram, pod_selector("${model}", "${revision}"))
        return f"{canary} / {_quantile(histogram, pod_selector('${model}', '${stable}'))}" if relative else canary
    if relative:
        raise ValueError(f"check {check!r} has no relative form; those that do: {', '.join(LATENCY_CHECKS)}")
    sel = pod_selector("${model}", "${revision}")
    if check == CHECK_ERRORS:
        req = metrics.requests
        return (f'(sum(rate({req}{{{sel},{metrics.status_label}=~"5.."}}[{WINDOW}])) or vector(0)) '
                f"/ sum(rate({req}{{{sel}}}[{WINDOW}]))")
    raise ValueError(f"unknown check {check!r}; known: {', '.join(CHECKS)}")


def _model_selector(namespace: str, model: str, revision: str = REVISION_PATTERN) -> str:
    return f'{promql.NAMESPACE_LABEL}="{namespace}",{pod_selector(model, revision)}'


def autoscaling_query(metric: str, metrics: RuntimeMetrics, namespace: str, model: str) -> str:
    """The PromQL the autoscaler (builtin or KEDA) reads for ``metric``: requests waiting
    over all replicas, or their mean KV cache use."""
    sel = _model_selector(namespace, model)
    if metric == METRIC_WAITING:
        return f"sum({metrics.requests_waiting}{{{sel}}})"
    if metric == METRIC_KV_CACHE:
        return f"avg({metrics.kv_cache_usage}{{{sel}}})"
    raise ValueError(f"unknown language-model metric {metric!r}; known: {', '.join(METRICS)}")


def traffic_query(metrics: RuntimeMetrics, namespace: str, model: str, revision: str, seconds: int) -> str:
    """Requests one revision answered in the last ``seconds`` (the canary's traffic guard)."""
    return f"sum(increase({metrics.requests}{{{_model_selector(namespace, model, revision)}}}[{seconds}s]))"
