"""What one LeptonModel's reconcile sees: every read, in one frozen ``ModelObserved``.

The model's serving Deployments, its source LeptonJob, its compression Jobs and their
pods, and its NetworkPolicies come from kopf's indices (fed by the watch streams kopf
already holds); whether the cluster serves the Gateway API comes from a check shared by
every model (``GatewayCheck``). So a steady reconcile makes no API request. Prometheus
is read here too: the canary's due measurements and traffic, and the builtin
autoscaler's sample when its tick is due. The few reads left are made once: a source
PersistentVolumeClaim (once per claim) and the parse of the spec's PromQL (once per
generation).

``ModelMemory`` keeps what the loop applied, so that a steady reconcile re-applies
nothing, and the compression Jobs it created until the index shows them; ``remember``
records a reconcile's writes into it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Callable, Mapping

from .. import config, metrics
from ..constants import (ANNOTATION_ABORT, ANNOTATION_RESUME, LABEL_REVISION, REASON_SOURCE_NOT_FOUND)
from ..core import kube
from ..core import status as st
from ..core.execute import Result
from ..core.fields import InvalidSpec
from ..core.loop import Memory
from ..scaling import prometheus, promql
from . import autoscale, objects, progress, state
from .spec import PLACEHOLDER_REVISION, Check, ModelSpec, parse_model, parse_uri, render_query, scoped_query

log = logging.getLogger(__name__)

CREATE_TTL = 30.0             # seconds a created compression Job may take to show up in the index
GATEWAY_RECHECK_SECONDS = 30.0


@dataclasses.dataclass
class ModelMemory(Memory):
    """What one model's loop remembers between reconciles (the status it wrote is the truth)."""
    autoscaler: autoscale.AutoscalerMemory = dataclasses.field(default_factory=autoscale.AutoscalerMemory)
    applied: state.Applied = dataclasses.field(default_factory=state.Applied)
    claims_seen: set[str] = dataclasses.field(default_factory=set)   # source PVCs known to exist
    query_problems: tuple | None = None  # (generation, problems Prometheus found in its PromQL)
    compression_created: dict[str, float] = dataclasses.field(default_factory=dict)  # Job name -> monotonic
    # (compression pod, monotonic time its log was last read, the progress record read)
    compression_progress: tuple[str, float, dict | None] | None = None


def new_memory(status: Mapping[str, Any]) -> ModelMemory:
    """The memory of a loop that starts now, from the status last written."""
    return ModelMemory(status=dict(status), phases=metrics.MODELS_BY_PHASE)


@dataclasses.dataclass
class GatewayCheck:
    """Whether the cluster serves Gateway API HTTPRoutes: one discovery GET every 30 s for
    all models together, from a task of its own (``run``), never from a reconcile."""
    available: bool = False

    async def refresh(self) -> bool:
        try:
            found = await kube.aio(kube.request, "GET", "/apis/" + objects.GATEWAY_API_VERSION)
            self.available = any(r.get("name") == "httproutes" for r in (found or {}).get("resources", ()))
        except kube.RETRYABLE:
            self.available = False
        return self.available

    async def run(self, wanted: Callable[[], bool]) -> None:
        """Refresh now, then every ``GATEWAY_RECHECK_SECONDS`` while ``wanted()`` (models exist)."""
        await self.refresh()
        while True:
            await asyncio.sleep(GATEWAY_RECHECK_SECONDS)
            if wanted():
                await self.refresh()


# --- parse -------------------------------------------------------------------------------------

async def parse(body: Mapping[str, Any], memory: ModelMemory) -> ModelSpec:
    """The model's spec, or ``InvalidSpec`` naming every problem: the spec's own, and the
    PromQL Prometheus cannot parse (found before any canary exists)."""
    settings = config.get()
    meta = body["metadata"]
    spec = parse_model(meta["name"], body.get("spec"), settings.trainer_image, settings.image_pull_policy,
                       namespace=meta["namespace"], vllm_image=settings.vllm_image)
    problems = await _query_problems(spec, meta["namespace"], meta["name"], memory, meta.get("generation"))
    if problems:
        raise InvalidSpec(problems)
    return spec


async def _query_problems(spec: ModelSpec, namespace: str, name: str, memory: ModelMemory,
                          generation: int | None) -> list[str]:
    """Once per generation; an unreachable Prometheus finds nothing and measurements say so later."""
    if memory.query_problems is not None and memory.query_problems[0] == generation:
        return memory.query_problems[1]
    a = spec.autoscaling
    needs = (["spec.rollout.analysis"] if spec.rollout.analysis else []) + (
        [f"spec.autoscaling (engine {a.engine})"] if a is not None and a.engine != "hpa" else [])
    if prometheus.unavailable(needs):
        memory.query_problems = (generation, prometheus.unavailable(needs))
        return memory.query_problems[1]
    queries = [(f"rollout.analysis[{i}] {c.name!r}", c.query, PLACEHOLDER_REVISION)
               for i, c in enumerate(spec.rollout.analysis)]
    if spec.autoscaling is not None and spec.autoscaling.metric == "query":
        queries.append(("autoscaling.query", spec.autoscaling.query or "", ""))
    problems = []
    for where, query, revision in queries:       # parse_model has confined each to the namespace
        why = await prometheus.client().validate(scoped_query(query, namespace, name, revision))
        if why:
            problems.append(f"{where}: Prometheus cannot parse {query!r}: {why}")
    memory.query_problems = (generation, problems)
    return problems


# --- the observation ---------------------------------------------------------------------------

async def _source(spec: ModelSpec, namespace: str, memory: ModelMemory, jobs: Mapping[Any, Any]) -> state.SourceState:
    """The source URI, once its LeptonJob succeeded and its PersistentVolumeClaim exists."""
    if spec.source.uri:
        source = state.SourceState(uri=spec.source.uri)
    else:
        job = next(iter(jobs.get((namespace, spec.source.job_name), [])), None)
        source = state.source_from_job(spec.source.job_name, namespace, job)
    if source.uri:
        claim = parse_uri(source.uri).claim
        if claim not in memory.claims_seen:
            if await kube.aio(kube.get, "v1", "PersistentVolumeClaim", claim, namespace) is None:
                return state.SourceState(None, REASON_SOURCE_NOT_FOUND,
                                         f"PersistentVolumeClaim {claim!r} of {source.uri} not found "
                                         f"in namespace {namespace!r}; waiting for it")
            memory.claims_seen.add(claim)
    return source


def _compression(spec: ModelSpec, meta: Mapping[str, Any], status: Mapping[str, Any], revision: str | None,
                 indices: Mapping[str, Any], memory: ModelMemory, now: float) -> tuple[state.CompressionState | None, bool]:
    """(the revision's compression outcome, whether its Job must be created)."""
    if not revision or not spec.compression.runs_job or revision == (status.get("revisions") or {}).get("stable"):
        return None, False
    known = status.get("compression") or {}
    if known.get("revision") == revision and known.get("state") in ("Succeeded", "Failed"):
        return state.CompressionState(known["state"], known), False
    key = (meta["namespace"], meta["name"])
    job = next((j for j in indices.get("lepton_model_compression_jobs", {}).get(key, [])
                if j["revision"] == revision), None)
    if job is None:
        name = objects.compression_job_name(meta["name"], revision)
        recent = now - memory.compression_created.get(name, -CREATE_TTL) < CREATE_TTL
        return state.CompressionState("Running", None), not recent
    pods = [p for p in indices.get("lepton_model_compression_pods", {}).get(key, [])
            if p["metadata"]["labels"].get(LABEL_REVISION) == revision]
    return state.compression_state(job, pods), False


async def _progress(comp: state.CompressionState | None, namespace: str, name: str, revision: str | None,
                    indices: Mapping[str, Any], memory: ModelMemory, now: float) -> state.CompressionState | None:
    """``comp`` with the program's last progress record while its pod is Running: the tail of
    the pod's log, read at most every ``compression_progress_seconds`` (between reads, the
    record last read); no read at all when nothing compresses."""
    if comp is None or comp.state != "Running" or comp.pending:
        memory.compression_progress = None
        return comp
    pod = max((p for p in indices.get("lepton_model_compression_pods", {}).get((namespace, name), [])
               if p["metadata"]["labels"].get(LABEL_REVISION) == revision
               and (p.get("status") or {}).get("phase") == "Running"),
              key=lambda p: p["metadata"].get("creationTimestamp", ""), default=None)
    if pod is None:
        return comp
    pod_name, known = pod["metadata"]["name"], memory.compression_progress
    before = known[2] if known is not None and known[0] == pod_name else None
    if known is None or known[0] != pod_name or progress.due(known[1], now, config.get().compression_progress_seconds):
        record = before
        try:
            text = await kube.aio(kube.pod_log, pod_name, namespace, objects.COMPRESSION_CONTAINER,
                                  progress.TAIL_LINES, progress.LIMIT_BYTES)
            record = progress.last(text) or before
        except kube.RETRYABLE as exc:      # no log yet, or none served: keep what was read
            log.debug("LeptonModel %s/%s: no log of compression pod %s: %s", namespace, name, pod_name,
                      kube.describe(exc))
        if record is not None and record != before:
            log.info("LeptonModel %s/%s: compressing: %s", namespace, name, progress.describe(record))
        memory.compression_progress = (pod_name, now, record)
    record = memory.compression_progress[2]
    return dataclasses.replace(comp, progress=record) if record is not None else comp


async def _analysis(spec: ModelSpec, status: Mapping[str, Any], namespace: str, name: str,
                    revision: str | None, now: float) -> tuple[list | None, float | None]:
    """(the canary's due measurements, the requests it served in its step): each due check
    measured once, unless ``minRequests`` says the canary has had too little traffic."""
    due = state.analysis_due(spec, status, revision, now)
    traffic = await _traffic(spec, status, namespace, name, now)
    if traffic is not None and traffic < spec.rollout.min_requests:
        due = []                       # not judged on too little traffic
    if not due:
        return None, traffic
    stable = (status.get("revisions") or {}).get("stable") or ""
    results = [(check, await _measure(check, namespace, name, revision, stable)) for check in due]
    for check, result in results:
        metrics.ANALYSIS.labels(namespace, name, check.name, check.judge(result)[0]).inc()
    return results, traffic


async def _measure(check: Check, namespace: str, name: str, revision: str, stable: str) -> prometheus.QueryResult:
    """One measurement of ``check`` on the canary ``revision`` (beside the ``stable`` one),
    its query confined to the model's namespace (a query the revisions make unscopable is
    an Error measurement)."""
    try:
        query = scoped_query(check.query, namespace, name, revision, stable)
    except promql.ScopeError as exc:
        return prometheus.query_error(render_query(check.query, namespace, name, revision, stable), str(exc))
    return await prometheus.client().query(query)


async def _traffic(spec: ModelSpec, status: Mapping[str, Any], namespace: str, name: str, now: float) -> float | None:
    """Requests the canary served since its step's pods were ready (for rollout.minRequests)."""
    revs = status.get("revisions") or {}
    ready = st.parse_time(revs.get("stepReadyTime"))
    if not spec.rollout.min_requests or not revs.get("canary") or ready is None:
        return None
    seconds = max(int(now - ready.timestamp()), 1)
    return (await prometheus.client().query(objects.traffic_query(namespace, name, revs["canary"], seconds, spec))).value


def decision(meta: Mapping[str, Any], status: Mapping[str, Any]) -> str | None:
    """A person's "resume" or "abort" of the paused canary (the annotation names it)."""
    canary = (status.get("revisions") or {}).get("canary")
    annotations = meta.get("annotations") or {}
    if canary and annotations.get(ANNOTATION_ABORT) == canary:
        return "abort"
    if canary and annotations.get(ANNOTATION_RESUME) == canary:
        return "resume"
    return None


async def _sample(spec: ModelSpec, meta: Mapping[str, Any], memory: ModelMemory, now: float
                  ) -> prometheus.QueryResult | None:
    """The builtin autoscaler's sample, when its tick is due."""
    a = spec.autoscaling
    if a is None or a.engine != "builtin" or not autoscale.due(a, memory.autoscaler, now):
        return None
    return await prometheus.client().query(objects.metric_query(a, meta["namespace"], meta["name"],
                                                                  spec.serving.runtime_metrics))


async def observe(body: Mapping[str, Any], spec: ModelSpec, memory: ModelMemory, indices: Mapping[str, Any],
                  gateway: GatewayCheck) -> state.ModelObserved:
    """One frozen observation of the model (see the module doc)."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    status = memory.status
    deployments = {d["metadata"]["labels"].get(LABEL_REVISION): d
                   for d in indices.get("lepton_model_deployments", {}).get((namespace, name), [])}
    source = await _source(spec, namespace, memory, indices.get("lepton_model_source_jobs", {}))
    revision = spec.revision(source.uri, source.identity) if source.uri else None
    mono, now = time.monotonic(), time.time()
    comp, create_job = _compression(spec, meta, status, revision, indices, memory, mono)
    comp = await _progress(comp, namespace, name, revision, indices, memory, mono)
    analysis, traffic = await _analysis(spec, status, namespace, name, revision, now)
    return state.ModelObserved(
        meta=dict(meta), status=status, deployments=deployments, source=source, revision=revision, comp=comp,
        create_compression=create_job, compression_jobs=tuple(
            (j["name"], j["revision"]) for j in indices.get("lepton_model_compression_jobs", {}).get((namespace, name), [])),
        now=now, monotonic=mono, analysis=analysis, traffic=traffic,
        decision=decision(meta, status), sample=await _sample(spec, meta, memory, mono),
        autoscaler=memory.autoscaler, gateway=gateway.available, applied=memory.applied,
        policies=dict(indices.get("lepton_model_network_policies", {}).get((namespace, name), [])),
        policies_applied=dict(memory.policies), prometheus_url=config.get().prometheus_url)


def remember(memory: ModelMemory, observed: state.ModelObserved, plan: state.Plan, results: list[Result]) -> None:
    """Record a reconcile's writes: what it applied (only when every write succeeded, so a
    failed one is applied again), the compression Jobs it created, the autoscaler's state."""
    memory.autoscaler = plan.autoscaler
    memory.policies = dict(plan.policies_applied)
    memory.compression_created = {n: t for n, t in memory.compression_created.items()
                                  if observed.monotonic - t < CREATE_TTL}
    for action, result in results:
        if action.kind == "Job" and action.verb == "create" and not isinstance(result, BaseException):
            memory.compression_created[action.name] = observed.monotonic
    if not any(isinstance(r, BaseException) for _, r in results):
        memory.applied = plan.applied
