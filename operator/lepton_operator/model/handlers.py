"""LeptonModel handlers: one reconcile loop per model.

Each LeptonModel gets a kopf daemon that reconciles when the model, its Deployments,
its compression pods or a LeptonJob in its namespace change, on each step deadline,
and on every tick of the builtin autoscaler. A reconcile reads as its steps: parse,
size (``model.autoscale``), resolve the source, compress, analyse the canary when
its step is due, plan (``model.state``), apply (its NetworkPolicies too, when
``spec.networkPolicy`` asks for them), report. The loop is the only writer
of the model's status. Objects come from ``model.objects``; scaling math is in
``scaling.policy``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import kopf

from .. import config, metrics
from ..constants import (ANNOTATION_ABORT, ANNOTATION_RESUME, ANNOTATION_SPEC_HASH, API_VERSION, EVENT_WARNING,
                         GROUP, JOB_KIND, JOB_PLURAL, LABEL_MANAGED_BY, LABEL_MODEL, LABEL_REVISION, LABEL_ROLE,
                         MANAGED_BY, MODEL_KIND, MODEL_PLURAL, MPHASE_PENDING, REASON_SOURCE_NOT_FOUND,
                         ROLE_COMPRESSION, ROLE_SERVING, VERSION)
from ..core import kube
from ..core import status as st
from ..core.fields import InvalidSpec
from ..core.loop import Memory, ReconcileLoops
from ..core.objects import policy_changes
from ..scaling import prometheus
from . import autoscale, objects, state
from .spec import ModelSpec, artifact_path, parse_model, parse_uri, render_query


@dataclasses.dataclass
class ModelMemory(Memory):
    """What one model's loop remembers between reconciles (the status it wrote is the truth)."""
    autoscaler: autoscale.AutoscalerMemory = dataclasses.field(default_factory=autoscale.AutoscalerMemory)
    applied: tuple | None = None        # (generation, revision) whose Deployment template was applied
    service_applied: int | None = None  # generation the Service was applied for
    route: tuple | None = None          # (generation, backends) of the last applied HTTPRoute
    revision_services: set[str] = dataclasses.field(default_factory=set)
    claims_seen: set[str] = dataclasses.field(default_factory=set)   # source PVCs known to exist
    query_problems: tuple | None = None  # (generation, problems Prometheus found in its PromQL)


_loops = ReconcileLoops(MODEL_KIND, lambda status: ModelMemory(status=status, phases=metrics.MODELS_BY_PHASE),
                        pending_phase=MPHASE_PENDING)
_gateway_api: tuple[float, bool] = (-1e9, False)   # (checked at, HTTPRoute served)
GATEWAY_RECHECK_SECONDS = 30.0


async def gateway_api_available() -> bool:
    """Whether the cluster serves Gateway API HTTPRoutes (rechecked every 30 s)."""
    global _gateway_api
    checked, available = _gateway_api
    if time.monotonic() - checked < GATEWAY_RECHECK_SECONDS:
        return available
    try:
        found = await kube.aio(kube.request, "GET", "/apis/" + objects.GATEWAY_API_VERSION)
        available = any(r.get("name") == "httproutes" for r in (found or {}).get("resources", ()))
    except kube.ApiException:
        available = False
    _gateway_api = (time.monotonic(), available)
    return available


# --- watches and the index ----------------------------------------------------------------

@kopf.on.event(GROUP, VERSION, MODEL_PLURAL)
def _model_changed(namespace: str, name: str, **_: Any) -> None:
    _loops.wake(namespace, name)


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
    _loops.wake(namespace, labels.get(LABEL_MODEL))


@kopf.index("networking.k8s.io", "v1", "networkpolicies",
            labels={LABEL_MODEL: kopf.PRESENT, LABEL_MANAGED_BY: MANAGED_BY})
def lepton_model_network_policies(namespace: str, labels: dict, name: str, annotations: dict, **_: Any):
    """(namespace, model) -> (NetworkPolicy name, its spec hash)."""
    return {(namespace, labels[LABEL_MODEL]): (name, annotations.get(ANNOTATION_SPEC_HASH, ""))}


@kopf.on.event("networking.k8s.io", "v1", "networkpolicies",
               labels={LABEL_MODEL: kopf.PRESENT, LABEL_MANAGED_BY: MANAGED_BY})
def _network_policy_changed(namespace: str, labels: dict, **_: Any) -> None:
    _loops.wake(namespace, labels.get(LABEL_MODEL))     # a policy changed or deleted by hand is restored


@kopf.on.event("pods", labels={LABEL_MODEL: kopf.PRESENT, LABEL_ROLE: ROLE_COMPRESSION})
def _compression_pod_changed(namespace: str, labels: dict, **_: Any) -> None:
    _loops.wake(namespace, labels.get(LABEL_MODEL))


@kopf.on.event(GROUP, VERSION, JOB_PLURAL)
def _job_changed_for_models(namespace: str, **_: Any) -> None:
    _loops.wake(namespace)        # a model in this namespace may be waiting for this job


@kopf.daemon(GROUP, VERSION, MODEL_PLURAL, cancellation_timeout=5.0)
async def lepton_model(body: kopf.Body, uid: str, stopped: kopf.DaemonStopped,
                       logger: logging.Logger, **kwargs: Any) -> None:
    """Reconcile one LeptonModel until it is deleted."""
    deployments, policies = kwargs["lepton_model_deployments"], kwargs["lepton_model_network_policies"]
    await _loops.run(body, uid, stopped, logger,
                     lambda memory: _reconcile(body, memory, logger, deployments, policies))


def _owner(body: kopf.Body) -> dict[str, Any]:
    m = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": MODEL_KIND,
            "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"]}}


# --- the steps of a reconcile ------------------------------------------------------------

async def _size(body: kopf.Body, spec: ModelSpec, memory: ModelMemory, deployments: dict[str, Any],
                status: dict[str, Any], logger: logging.Logger) -> tuple[int, float | None]:
    """(total replicas, seconds until the next autoscaler tick): static, the builtin
    autoscaler's, or the HPA's (read from the stable Deployment)."""
    a = spec.autoscaling
    if a is None:
        return spec.serving.replicas, None
    if a.engine == "builtin":
        delay = await autoscale.tick(body, spec, memory, memory.autoscaler, status, logger)
        return memory.autoscaler.total, delay
    stable = deployments.get((status.get("revisions") or {}).get("stable"))
    return (stable or {}).get("spec", {}).get("replicas") or spec.floor, None


async def _resolve_source(spec: ModelSpec, namespace: str, memory: ModelMemory) -> state.SourceState:
    """The source URI, once its LeptonJob succeeded and its PersistentVolumeClaim exists."""
    if spec.source.uri:
        source = state.SourceState(uri=spec.source.uri)
    else:
        job = await kube.aio(kube.get, API_VERSION, JOB_KIND, spec.source.job_name, namespace)
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


async def _compression(owner: dict, spec: ModelSpec, revision: str, source_uri: str,
                       memory: ModelMemory) -> state.CompressionState:
    """Create the revision's compression Job if needed and read its outcome."""
    known = memory.status.get("compression") or {}
    if known.get("revision") == revision and known.get("state") in ("Succeeded", "Failed"):
        return state.CompressionState(known["state"], known)
    m = owner["metadata"]
    src = parse_uri(source_uri)
    job = objects.compression_job(owner, spec, revision, src, artifact_path(src, m["name"], revision))
    current = await kube.aio(kube.get, "batch/v1", "Job", job["metadata"]["name"], m["namespace"])
    if current is None:
        await kube.aio(kube.create, job)
        return state.CompressionState("Running", None)
    pods = await kube.aio(kube.list_objects, "v1", "Pod", m["namespace"],
                          f"{LABEL_MODEL}={m['name']},{LABEL_ROLE}={ROLE_COMPRESSION},{LABEL_REVISION}={revision}")
    return state.compression_state(current, pods)


async def _query_problems(spec: ModelSpec, namespace: str, name: str, memory: ModelMemory,
                          generation: int | None) -> list[str]:
    """PromQL that Prometheus cannot parse, found before any canary exists (once per
    generation; an unreachable Prometheus finds nothing and measurements say so later)."""
    if memory.query_problems is not None and memory.query_problems[0] == generation:
        return memory.query_problems[1]
    a = spec.autoscaling
    needs = (["spec.rollout.analysis"] if spec.rollout.analysis else []) + (
        [f"spec.autoscaling (engine {a.engine})"] if a is not None and a.engine != "hpa" else [])
    if prometheus.unavailable(needs):
        memory.query_problems = (generation, prometheus.unavailable(needs))
        return memory.query_problems[1]
    queries = [(f"rollout.analysis[{i}] {c.name!r}", c.query) for i, c in enumerate(spec.rollout.analysis)]
    if spec.autoscaling is not None and spec.autoscaling.metric == "query":
        queries.append(("autoscaling.query", spec.autoscaling.query or ""))
    problems = []
    for where, query in queries:
        why = await prometheus.client().validate(render_query(query, namespace, name, "revision"))
        if why:
            problems.append(f"{where}: Prometheus cannot parse {query!r}: {why}")
    memory.query_problems = (generation, problems)
    return problems


async def _analyse(checks: list, namespace: str, name: str, revision: str) -> list:
    """Measure each due check of the canary ``revision`` once: (check, result) pairs."""
    results = [(check, await prometheus.client().query(render_query(check.query, namespace, name, revision)))
               for check in checks]
    for check, result in results:
        metrics.ANALYSIS.labels(namespace, name, check.name, check.judge(result)[0]).inc()
    return results


async def _traffic(spec: ModelSpec, status: dict[str, Any], namespace: str, name: str, now: float) -> float | None:
    """Requests the canary served since its step's pods were ready (for rollout.minRequests)."""
    revs = status.get("revisions") or {}
    ready = st.parse_time(revs.get("stepReadyTime"))
    if not spec.rollout.min_requests or not revs.get("canary") or ready is None:
        return None
    seconds = max(int(now - ready.timestamp()), 1)
    return (await prometheus.client().query(objects.traffic_query(namespace, name, revs["canary"], seconds))).value


def _decision(body: kopf.Body, status: dict[str, Any]) -> str | None:
    """A person's "resume" or "abort" of the paused canary (the annotation names it)."""
    canary = (status.get("revisions") or {}).get("canary")
    annotations = body["metadata"].get("annotations") or {}
    if canary and annotations.get(ANNOTATION_ABORT) == canary:
        return "abort"
    if canary and annotations.get(ANNOTATION_RESUME) == canary:
        return "resume"
    return None


async def _apply(body: kopf.Body, spec: ModelSpec, plan: state.Plan, revision: str | None,
                 deployments: dict[str, Any], memory: ModelMemory, logger: logging.Logger) -> bool:
    """Service, Deployments (created with replicas, then replicas by patch), cleanup, the
    HTTPRoute and the HPA or ScaledObject. True when an HTTPRoute routes the traffic."""
    owner, meta = _owner(body), body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    a = spec.autoscaling
    hpa_owned = a is not None and a.engine != "builtin"
    revs = plan.status["revisions"]
    if memory.service_applied != generation:
        await kube.aio(kube.apply, objects.service(owner))
        memory.service_applied = generation
    for rev, replicas in plan.replicas.items():
        current = deployments.get(rev)
        if current is None:
            if replicas > 0 and rev in plan.model_dirs:
                await kube.aio(kube.create, objects.deployment(owner, spec, rev, plan.model_dirs[rev], replicas))
                memory.applied = (generation, rev)
            continue
        if rev == revision and memory.applied != (generation, rev) and rev in plan.model_dirs:
            await kube.aio(kube.apply, objects.deployment(owner, spec, rev, plan.model_dirs[rev], None))
            memory.applied = (generation, rev)
        if hpa_owned and rev == revs.get("stable") and not revs.get("canary"):
            continue     # the HPA / ScaledObject owns the stable Deployment's replicas
        if current["spec"].get("replicas") != replicas:
            await kube.aio(kube.patch, "apps/v1", "Deployment", current["metadata"]["name"], namespace,
                           {"spec": {"replicas": replicas}})
    for rev in plan.delete:
        if rev in deployments:
            await kube.aio(kube.delete, "apps/v1", "Deployment", deployments[rev]["metadata"]["name"], namespace)
            # and its Gateway API backend Service, if one was made
            await kube.aio(kube.delete, "v1", "Service", objects.deployment_name(name, rev), namespace)
        memory.revision_services.discard(rev)
    routed = await _route(owner, revs, memory, generation)
    if hpa_owned and revs.get("stable"):
        target = objects.deployment_name(name, revs["stable"])
        obj = (objects.hpa(owner, a, target, spec.floor) if a.engine == "hpa"
               else objects.scaled_object(owner, a, target, config.get().prometheus_url, spec.floor))
        try:
            await kube.aio(kube.apply, obj)
        except kube.ApiException as exc:
            if exc.status != 404:
                raise
            await st.emit(body, memory, [(EVENT_WARNING, "AutoscalerAPIMissing",
                                          f"cannot create {obj['kind']} ({obj['apiVersion']}): "
                                          "the API is not installed")], logger, once=True)
    return routed


async def _network_policies(owner: dict, spec: ModelSpec, memory: ModelMemory, present: dict[str, str]) -> None:
    """Apply the NetworkPolicy the spec asks for where the index does not show it as it
    is; delete the model's policies it no longer asks for (``networkPolicy.enabled: false``)."""
    to_apply, to_delete = policy_changes(objects.network_policies(owner, spec), present, memory.policies,
                                         time.monotonic())
    for obj in to_apply:
        await kube.aio(kube.apply, obj)
    for name in to_delete:
        await kube.aio(kube.delete, "networking.k8s.io/v1", "NetworkPolicy", name, owner["metadata"]["namespace"])


async def _route(owner: dict, revs: dict, memory: ModelMemory, generation: int | None) -> bool:
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
            await kube.aio(kube.apply, objects.revision_service(owner, rev))
            memory.revision_services.add(rev)
    if memory.route != (generation, backends):
        await kube.aio(kube.apply, objects.http_route(owner, backends))
        memory.route = (generation, backends)
    return True


def _report(spec: ModelSpec, plan: state.Plan, memory: ModelMemory, meta: dict, total: int,
            routed: bool) -> dict[str, Any]:
    """The status to write: the plan's, with the outcome, its conditions and the serving facts."""
    new, generation = plan.status, meta.get("generation")
    st.apply_outcome(new, plan.outcome, generation)
    new["url"] = objects.url(meta["name"], meta["namespace"])
    new["desiredReplicas"] = total
    new["trafficRouting"] = "HTTPRoute" if routed else "ReplicaRatio"
    if spec.autoscaling is not None:
        new["autoscaling"] = {**(new.get("autoscaling") or {}), "floor": spec.floor,
                              "floorFrom": "spec.serving.replicas" if spec.floor > spec.autoscaling.min_replicas
                              else "autoscaling.minReplicas"}
    for cond_type, status_, reason, message in plan.conditions:
        new["conditions"] = st.set_condition(new["conditions"], cond_type, status_, reason, message,
                                             observed_generation=generation)
    a = spec.autoscaling
    if a is not None and a.engine == "builtin" and memory.autoscaler.condition:
        new["conditions"] = st.set_condition(new["conditions"], *memory.autoscaler.condition,
                                             observed_generation=generation)
    return new


async def _reconcile(body: kopf.Body, memory: ModelMemory, logger: logging.Logger,
                     deployment_index: Any, policy_index: Any = None) -> float | None:
    settings = config.get()
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    try:
        spec = parse_model(name, body.get("spec"), settings.trainer_image, settings.image_pull_policy)
        problems = await _query_problems(spec, namespace, name, memory, meta.get("generation"))
        if problems:
            raise InvalidSpec(problems)
    except InvalidSpec as exc:
        await st.report_invalid(body, memory, exc.problems, MPHASE_PENDING, logger)
        return None
    memory.invalid_message = None

    # Read from the watch-fed index: a steady reconcile lists nothing. A Deployment just
    # created may be missing for a moment; creating it again is a no-op (409).
    deployments = {d["metadata"]["labels"].get(LABEL_REVISION): d
                   for d in deployment_index.get((namespace, name), [])}
    new = dict(memory.status)
    total, tick = await _size(body, spec, memory, deployments, new, logger)
    source = await _resolve_source(spec, namespace, memory)
    revision = spec.revision(source.uri, source.identity) if source.uri else None
    comp = None
    if revision and spec.compression.runs_job and revision != (new.get("revisions") or {}).get("stable"):
        comp = await _compression(_owner(body), spec, revision, source.uri, memory)

    now = time.time()
    due = state.analysis_due(spec, new, revision, now)
    traffic = await _traffic(spec, new, namespace, name, now)
    if traffic is not None and traffic < spec.rollout.min_requests:
        due = []                       # not judged on too little traffic
    analysis = await _analyse(due, namespace, name, revision) if due else None
    views = {r: state.deployment_view(d) for r, d in deployments.items()}
    hpa_owned = spec.autoscaling is not None and spec.autoscaling.engine != "builtin"
    plan = state.plan(spec, name, new, source, revision, comp, total, views, now, analysis=analysis,
                      hold_stable=hpa_owned, decision=_decision(body, new), traffic=traffic, namespace=namespace)

    routed = await _apply(body, spec, plan, revision, deployments, memory, logger)
    await _network_policies(_owner(body), spec, memory, dict((policy_index or {}).get((namespace, name), [])))
    old_conditions = memory.status.get("conditions")
    new = _report(spec, plan, memory, meta, total, routed)
    await st.write(body, memory, new)
    decided = {reason for _, reason, _ in plan.events}
    waits = [e for e in st.transition_events(old_conditions, new["conditions"]) if e[1] not in decided]
    await st.emit(body, memory, plan.events + waits, logger)
    delays = [d for d in (tick, plan.requeue_after) if d is not None]
    return min(delays) if delays else None
