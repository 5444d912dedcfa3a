"""LeptonModel handlers: one loop per model (parse -> source -> compress -> roll out -> report).

Each LeptonModel gets a kopf daemon that reconciles when the model, its Deployments,
its compression pods or a LeptonJob in its namespace change, on each step deadline,
and on every tick of the builtin autoscaler. The daemon is the only writer of the
model's status. The rollout decisions are in ``modelstate``; scaling math is in
``scaling.policy``; objects come from ``builders``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import kopf

from .. import config, kube, metrics, modelstate
from .. import status as st
from ..builders import compression as cbuild
from ..builders import serving as sbuild
from ..constants import (API_VERSION, COND_METRICS, EVENT_NORMAL, EVENT_WARNING, GROUP, JOB_KIND,
                         JOB_PLURAL, LABEL_MODEL, LABEL_REVISION, LABEL_ROLE, MODEL_KIND, MODEL_PLURAL,
                         MPHASE_PENDING, REASON_INVALID_SPEC, REASON_METRICS_OK, REASON_NO_METRIC_DATA,
                         REASON_SCALED, REASON_SOURCE_NOT_FOUND, ROLE_COMPRESSION, ROLE_SERVING, VERSION,
                         FALSE, TRUE)
from ..model_spec import InvalidSpec, ModelSpec, artifact_path, parse_model, parse_uri, render_query
from ..scaling import policy
from ..scaling.prometheus import Prometheus
from .loop import ReconcileLoops

KIND = MODEL_KIND


@dataclasses.dataclass
class _Memory:
    status: dict[str, Any]
    scale_state: policy.InferenceState = dataclasses.field(default_factory=policy.InferenceState)
    total: int | None = None            # the builtin autoscaler's size
    last_tick: float = -1e9             # monotonic time of the last autoscaler query
    applied: tuple | None = None        # (generation, revision) whose Deployment template was applied
    service_applied: int | None = None  # generation the Service was applied for
    said: set[str] = dataclasses.field(default_factory=set)   # Warning events already posted
    metrics_condition: tuple | None = None   # (type, status, reason, message) of the last query
    route: tuple | None = None               # (generation, backends) of the last applied HTTPRoute
    revision_services: set[str] = dataclasses.field(default_factory=set)
    claims_seen: set[str] = dataclasses.field(default_factory=set)   # source PVCs known to exist


_loops = ReconcileLoops(KIND, metrics.MODEL_PHASES, lambda status: _Memory(status=status))
_prometheus: Prometheus | None = None
_gateway_api: tuple[float, bool] = (-1e9, False)   # (checked at, HTTPRoute served)
GATEWAY_RECHECK_SECONDS = 30.0


async def gateway_api_available() -> bool:
    """Whether the cluster serves Gateway API HTTPRoutes (rechecked every 30 s)."""
    global _gateway_api
    checked, available = _gateway_api
    if time.monotonic() - checked < GATEWAY_RECHECK_SECONDS:
        return available
    try:
        found = await kube.aio(kube.request, "GET", "/apis/" + sbuild.GATEWAY_API_VERSION)
        available = any(r.get("name") == "httproutes" for r in (found or {}).get("resources", ()))
    except kube.ApiException:
        available = False
    _gateway_api = (time.monotonic(), available)
    return available


def prometheus() -> Prometheus:
    global _prometheus
    if _prometheus is None:
        s = config.get()
        _prometheus = Prometheus(s.prometheus_url, s.prometheus_timeout)
    return _prometheus


_wake = _loops.wake


@kopf.on.event(GROUP, VERSION, MODEL_PLURAL)
def _model_changed(namespace: str, name: str, **_: Any) -> None:
    _wake(namespace, name)


@kopf.index("deployments", labels={LABEL_MODEL: kopf.PRESENT, LABEL_ROLE: ROLE_SERVING})
def lepton_model_deployments(namespace: str, labels: dict, body: kopf.Body, **_: Any):
    """(namespace, model) -> the fields of each serving Deployment that a reconcile reads."""
    m = body["metadata"]
    return {(namespace, labels[LABEL_MODEL]): {
        "metadata": {"name": m["name"], "generation": m.get("generation", 0), "labels": dict(labels)},
        "spec": {"replicas": body.get("spec", {}).get("replicas", 1)},
        "status": dict(body.get("status") or {})}}


@kopf.on.event("deployments", labels={LABEL_MODEL: kopf.PRESENT})
def _deployment_changed(namespace: str, labels: dict, **_: Any) -> None:
    _wake(namespace, labels.get(LABEL_MODEL))


@kopf.on.event("pods", labels={LABEL_MODEL: kopf.PRESENT, LABEL_ROLE: ROLE_COMPRESSION})
def _compression_pod_changed(namespace: str, labels: dict, **_: Any) -> None:
    _wake(namespace, labels.get(LABEL_MODEL))


@kopf.on.event(GROUP, VERSION, JOB_PLURAL)
def _job_changed_for_models(namespace: str, **_: Any) -> None:
    _wake(namespace)        # a model in this namespace may be waiting for this job


@kopf.daemon(GROUP, VERSION, MODEL_PLURAL, cancellation_timeout=5.0)
async def lepton_model(body: kopf.Body, uid: str, stopped: kopf.DaemonStopped,
                       logger: logging.Logger, **kwargs: Any) -> None:
    """Reconcile one LeptonModel until it is deleted."""
    deployments = kwargs["lepton_model_deployments"]
    await _loops.run(body, uid, stopped, lambda memory: _reconcile(body, memory, logger, deployments))


def _owner(body: kopf.Body) -> dict[str, Any]:
    m = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": MODEL_KIND,
            "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"]}}


async def _event(body: kopf.Body, memory: _Memory, type_: str, reason: str, message: str,
                 once: bool = False) -> None:
    if once:
        if message in memory.said:
            return
        memory.said.add(message)
    await kube.aio(kube.emit_event, dict(body), type_, reason, message)


async def _write_status(body: kopf.Body, memory: _Memory, new: dict[str, Any]) -> None:
    patch = st.status_changed(memory.status, new)
    for key, value in patch.items():    # a merge patch keeps nested keys it does not name
        old = memory.status.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            patch[key] = {**{k: None for k in old if k not in value}, **value}
    m = body["metadata"]
    if patch:
        await kube.aio(kube.patch_status, API_VERSION, MODEL_KIND, m["name"], m["namespace"], patch)
        memory.status = new
    metrics.MODEL_PHASES.set((m["namespace"], m["name"]), new.get("phase"))


# --- source -----------------------------------------------------------------------------

async def _resolve_source(spec: ModelSpec, namespace: str, memory: _Memory) -> modelstate.SourceState:
    """The source URI, once its LeptonJob succeeded and its PersistentVolumeClaim exists."""
    if spec.source.uri:
        source = modelstate.SourceState(uri=spec.source.uri)
    else:
        job = await kube.aio(kube.get, API_VERSION, JOB_KIND, spec.source.job_name, namespace)
        source = modelstate.source_from_job(spec.source.job_name, namespace, job)
    if source.uri:
        claim = parse_uri(source.uri).claim
        if claim not in memory.claims_seen:
            if await kube.aio(kube.get, "v1", "PersistentVolumeClaim", claim, namespace) is None:
                return modelstate.SourceState(None, REASON_SOURCE_NOT_FOUND,
                                              f"PersistentVolumeClaim {claim!r} of {source.uri} not found "
                                              f"in namespace {namespace!r}; waiting for it")
            memory.claims_seen.add(claim)
    return source


# --- compression ------------------------------------------------------------------------

async def _compression(owner: dict, spec: ModelSpec, revision: str, source_uri: str,
                       memory: _Memory) -> modelstate.CompressionState:
    """Create the revision's compression Job if needed and read its outcome."""
    known = memory.status.get("compression") or {}
    if known.get("revision") == revision and known.get("state") in ("Succeeded", "Failed"):
        return modelstate.CompressionState(known["state"], known)
    m = owner["metadata"]
    src = parse_uri(source_uri)
    job = cbuild.compression_job(owner, spec, revision, src, artifact_path(src, m["name"], revision))
    current = await kube.aio(kube.get, "batch/v1", "Job", job["metadata"]["name"], m["namespace"])
    if current is None:
        await kube.aio(kube.create, job)
        return modelstate.CompressionState("Running", None)
    pods = await kube.aio(kube.list_objects, "v1", "Pod", m["namespace"],
                          f"{LABEL_MODEL}={m['name']},{LABEL_ROLE}={ROLE_COMPRESSION},{LABEL_REVISION}={revision}")
    return modelstate.compression_state(current, pods, cbuild.read_result)


# --- the reconcile ----------------------------------------------------------------------

async def _reconcile(body: kopf.Body, memory: _Memory, logger: logging.Logger,
                     deployment_index: Any) -> float | None:
    settings = config.get()
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    try:
        spec = parse_model(name, body.get("spec"), settings.trainer_image)
    except InvalidSpec as exc:
        message = "invalid spec: " + "; ".join(exc.problems)
        new = dict(memory.status)
        new.setdefault("phase", MPHASE_PENDING)
        new["conditions"] = st.set_health(new.get("conditions"), ready=False, stalled=True,
                                          reason=REASON_INVALID_SPEC, message=message,
                                          observed_generation=generation)
        new["observedGeneration"] = generation
        await _write_status(body, memory, new)
        await _event(body, memory, EVENT_WARNING, REASON_INVALID_SPEC, message, once=True)
        return None

    owner = _owner(body)
    now = time.time()
    # Read from the watch-fed index: a steady reconcile lists nothing. A Deployment just
    # created may be missing for a moment; creating it again is a no-op (409).
    deployments = {d["metadata"]["labels"].get(LABEL_REVISION): d
                   for d in deployment_index.get((namespace, name), [])}

    # Size: static, the builtin autoscaler's, or the HPA's (read from the stable Deployment).
    new = dict(memory.status)
    delay: float | None = None
    a = spec.autoscaling
    if a is not None and a.engine == "builtin":
        delay = await _autoscale(body, spec, memory, new)
        total = memory.total
    elif a is not None:
        stable = deployments.get((new.get("revisions") or {}).get("stable"))
        total = (stable or {}).get("spec", {}).get("replicas") or a.min_replicas
    else:
        total = spec.serving.replicas

    source = await _resolve_source(spec, namespace, memory)
    revision = spec.revision(source.uri) if source.uri else None
    comp = None
    if revision and spec.compression.runs_job and revision != (new.get("revisions") or {}).get("stable"):
        comp = await _compression(owner, spec, revision, source.uri, memory)

    views = {r: modelstate.deployment_view(d) for r, d in deployments.items()}
    hpa_owned = a is not None and a.engine != "builtin"
    plan = modelstate.plan(spec, name, new, source, revision, comp, total, views, now, hold_stable=hpa_owned)
    if plan.analyze:
        results = [(check, await prometheus().query(render_query(check.query, namespace, name, plan.analyze)))
                   for check in spec.rollout.analysis]
        plan = modelstate.plan(spec, name, new, source, revision, comp, total, views, now,
                               analysis=results, hold_stable=hpa_owned)
        for check, result in results:
            metrics.ANALYSIS.labels(check.name, "nodata" if not result.ok else
                                    "fail" if check.failed(result.value) else "pass").inc()

    # Apply: Service, Deployments (create with replicas, then replicas by patch), cleanup.
    if memory.service_applied != generation:
        await kube.aio(kube.apply, sbuild.service(owner))
        memory.service_applied = generation
    for rev, replicas in plan.replicas.items():
        current = deployments.get(rev)
        if current is None:
            if replicas > 0 and rev in plan.model_dirs:
                dep = sbuild.deployment(owner, spec, rev, plan.model_dirs[rev], replicas)
                await kube.aio(kube.create, dep)
                memory.applied = (generation, rev)
            continue
        if rev == revision and memory.applied != (generation, rev) and rev in plan.model_dirs:
            await kube.aio(kube.apply, sbuild.deployment(owner, spec, rev, plan.model_dirs[rev], None))
            memory.applied = (generation, rev)
        if hpa_owned and rev == plan.status["revisions"].get("stable") and not plan.status["revisions"].get("canary"):
            continue     # the HPA / ScaledObject owns the stable Deployment's replicas
        if current["spec"].get("replicas") != replicas:
            await kube.aio(kube.patch, "apps/v1", "Deployment", current["metadata"]["name"], namespace,
                           {"spec": {"replicas": replicas}})
    for rev in plan.delete:
        if rev in deployments:
            await kube.aio(kube.delete, "apps/v1", "Deployment", deployments[rev]["metadata"]["name"], namespace)
        if rev in deployments:   # its Gateway API backend Service, if one was made
            await kube.aio(kube.delete, "v1", "Service", sbuild.deployment_name(name, rev), namespace)
        memory.revision_services.discard(rev)
    routed = await _route(owner, plan.status["revisions"], memory, generation)
    if hpa_owned and plan.status["revisions"].get("stable"):
        target = sbuild.deployment_name(name, plan.status["revisions"]["stable"])
        obj = (sbuild.hpa(owner, a, target) if a.engine == "hpa"
               else sbuild.scaled_object(owner, a, target, settings.prometheus_url))
        try:
            await kube.aio(kube.apply, obj)
        except kube.ApiException as exc:
            if exc.status != 404:
                raise
            await _event(body, memory, EVENT_WARNING, "AutoscalerAPIMissing",
                         f"cannot create {obj['kind']} ({obj['apiVersion']}): the API is not installed", once=True)

    new = plan.status
    new["observedGeneration"] = generation
    new["url"] = sbuild.url(name, namespace)
    new["desiredReplicas"] = total
    new["trafficRouting"] = "HTTPRoute" if routed else "ReplicaRatio"
    new["conditions"] = st.set_health(new.get("conditions"), ready=plan.ready, stalled=plan.stalled,
                                      reason=plan.reason, message=plan.message,
                                      observed_generation=generation)
    for cond_type, status_, reason, message in plan.conditions:
        new["conditions"] = st.set_condition(new["conditions"], cond_type, status_, reason, message,
                                             observed_generation=generation)
    if a is not None and a.engine == "builtin" and memory.metrics_condition:
        new["conditions"] = st.set_condition(new["conditions"], *memory.metrics_condition,
                                             observed_generation=generation)
    await _write_status(body, memory, new)
    for type_, reason, message in plan.events:
        await _event(body, memory, type_, reason, message)
        (logger.warning if type_ == EVENT_WARNING else logger.info)("%s: %s", reason, message)
    delays = [d for d in (delay, plan.requeue_after) if d is not None]
    return min(delays) if delays else None


async def _route(owner: dict, revs: dict, memory: _Memory, generation: int | None) -> bool:
    """Weight stable and canary exactly with an HTTPRoute where the Gateway API exists."""
    stable = revs.get("stable")
    if not stable or not await gateway_api_available():
        return False
    backends = [(stable, 100)]
    if revs.get("canary"):
        weight = int(revs.get("canaryWeight", 0))
        backends = [(stable, 100 - weight), (revs["canary"], weight)]
    for rev, _ in backends:
        if rev not in memory.revision_services:
            await kube.aio(kube.apply, sbuild.revision_service(owner, rev))
            memory.revision_services.add(rev)
    if memory.route != (generation, backends):
        await kube.aio(kube.apply, sbuild.http_route(owner, backends))
        memory.route = (generation, backends)
    return True


# --- builtin autoscaler -----------------------------------------------------------------

async def _autoscale(body: kopf.Body, spec: ModelSpec, memory: _Memory, new: dict[str, Any]) -> float:
    """One tick of the builtin autoscaler (at most every intervalSeconds); returns the delay
    until the next tick."""
    a = spec.autoscaling
    if memory.total is None:
        memory.total = max(a.min_replicas, min(a.max_replicas,
                                               new.get("desiredReplicas") or spec.serving.replicas or 1))
    now = time.monotonic()
    left = memory.last_tick + a.interval_seconds - now
    if left > 0:
        return left
    memory.last_tick = now
    meta = body["metadata"]
    query = sbuild.metric_query(a, meta["namespace"], meta["name"])
    result = await prometheus().query(query)
    pol = policy.InferencePolicy(a.target, a.min_replicas, a.max_replicas, a.stable_window_seconds,
                                 a.panic_window_seconds, a.panic_threshold, a.scale_down_delay_seconds,
                                 a.additive)
    decision, memory.scale_state = policy.decide_inference(pol, memory.scale_state, now, result.value,
                                                           memory.total)
    old = memory.total
    if result.ok:
        memory.metrics_condition = (COND_METRICS, TRUE, REASON_METRICS_OK, f"{query} = {result.value:g}")
    else:
        memory.metrics_condition = (COND_METRICS, FALSE, REASON_NO_METRIC_DATA,
                                    f"holding {old} replicas: {result.error}")
    metrics.record_scaling(MODEL_KIND, meta["namespace"], meta["name"], old, decision)
    if decision.replicas != old:
        memory.total = decision.replicas
        inputs = ", ".join(f"{k}={v}" for k, v in decision.inputs.items())
        await _event(body, memory, EVENT_NORMAL, REASON_SCALED,
                     f"scaled {old} -> {decision.replicas} replicas ({decision.reason}): {inputs}")
        new["autoscaling"] = {"lastScaleTime": st.now_iso()}
    new["autoscaling"] = {**(new.get("autoscaling") or {}), "replicas": memory.total, "reason": decision.reason,
                          "value": result.value, "error": result.error}
    return a.interval_seconds
