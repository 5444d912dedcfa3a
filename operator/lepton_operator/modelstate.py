"""LeptonModel rollout decisions (pure): what each revision should run and what status says.

``plan`` takes the spec, the previous status, the resolved source, the compression
outcome, the total replicas wanted, the observed Deployments and the time, and returns
a ``Plan``: replicas per revision, Deployments to delete, the new status, the health
summary, events, and when to look again. Canary analysis is two-phase: a plan whose
``analyze`` names a revision asks the caller to run the analysis queries and plan again
with their results.

Revisions live in ``status.revisions``: ``stable`` (and ``stableURI``, its model
directory), ``canary`` with ``canaryStep``/``canaryWeight`` and the step's start and
ready times, and ``failed`` (with ``failedReason``/``failedMessage``): the revision the
gate rejected or the analysis rolled back, not retried until the spec changes.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
from typing import Any, Callable, Iterable, Mapping

from . import status as st
from .builders.serving import split
from .constants import (COND_COMPRESSED, EVENT_NORMAL, EVENT_WARNING, FALSE, MPHASE_COMPRESSING,
                        MPHASE_DEGRADED, MPHASE_DEPLOYING, MPHASE_FAILED, MPHASE_PENDING,
                        MPHASE_PROGRESSING, MPHASE_READY, MPHASE_ROLLING_BACK, REASON_ANALYSIS_FAILED,
                        REASON_ANALYSIS_NO_DATA, REASON_CANARY_STEP, REASON_COMPRESSED,
                        REASON_COMPRESSING, REASON_COMPRESSION_FAILED, REASON_DEPLOYING,
                        REASON_GATE_FAILED, REASON_PODS_NOT_READY, REASON_PROMOTED, REASON_ROLLED_BACK,
                        REASON_SERVING, REASON_SOURCE_FAILED, REASON_SOURCE_NOT_FOUND,
                        REASON_WAITING_FOR_SOURCE, TRUE)
from .model_spec import ModelSpec, PvcPath, artifact_path, parse_uri


@dataclasses.dataclass(frozen=True)
class SourceState:
    uri: str | None = None
    reason: str | None = None
    message: str = ""
    stalled: bool = False


def source_from_job(job_name: str, namespace: str, job: Mapping[str, Any] | None) -> SourceState:
    """The model source from its LeptonJob: its outputURI once it succeeded."""
    if job is None:
        return SourceState(None, REASON_SOURCE_NOT_FOUND,
                           f"source.jobRef: LeptonJob {job_name!r} not found in namespace {namespace!r}; "
                           "waiting for it to be created")
    s = job.get("status") or {}
    phase = s.get("phase") or "Pending"
    if phase == "Failed":
        return SourceState(None, REASON_SOURCE_FAILED, f"source LeptonJob {job_name!r} failed", stalled=True)
    if phase != "Succeeded":
        return SourceState(None, REASON_WAITING_FOR_SOURCE,
                           f"waiting for LeptonJob {job_name!r} to succeed (phase {phase})")
    if not s.get("outputURI"):
        return SourceState(None, REASON_SOURCE_FAILED,
                           f"LeptonJob {job_name!r} succeeded but records no outputURI "
                           "(give the job spec.output or spec.checkpoint)", stalled=True)
    return SourceState(s["outputURI"])


@dataclasses.dataclass(frozen=True)
class CompressionState:
    state: str                      # Running | Succeeded | Failed
    result: Mapping[str, Any] | None


def compression_state(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]],
                      read_result: Callable[[Mapping[str, Any]], tuple[str, dict | None]]) -> CompressionState:
    """Outcome of a compression Job from its conditions and its pods' termination messages."""
    conds = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or () if c.get("status") == TRUE}
    outcomes = [read_result(p) for p in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""),
                                               reverse=True)]
    done = next((r for s, r in outcomes if s == "succeeded"), None)
    if done is not None or "Complete" in conds:
        return CompressionState("Succeeded", done or {})
    if "Failed" in conds:
        failed = next((r for s, r in outcomes if s == "failed" and r), None)
        return CompressionState("Failed", failed or {"message": conds["Failed"].get("message", "the Job failed")})
    return CompressionState("Running", None)


def _pick(result: Mapping[str, Any], *keys: str) -> float | None:
    for key in keys:
        value: Any = result
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def gate_verdict(result: Mapping[str, Any], max_drop: float | None) -> tuple[str, str] | None:
    """(reason, message) when the result shows a failed accuracy gate, else None."""
    before = _pick(result, "accuracy_before", "accuracyBefore", "accuracy.before")
    after = _pick(result, "accuracy_after", "accuracyAfter", "accuracy.after")
    limit = max_drop if max_drop is not None else _pick(result, "max_accuracy_drop", "maxAccuracyDrop")
    if before is not None and after is not None and limit is not None and before - after > limit + 1e-12:
        return REASON_GATE_FAILED, (f"accuracy gate failed: accuracy {before:.4f} -> {after:.4f}, "
                                    f"drop {before - after:.4f} > maxAccuracyDrop {limit:g}")
    text = _text(result)
    if result.get("gate") in (False, "failed") or "gate" in text.lower():
        return REASON_GATE_FAILED, f"accuracy gate failed: {text or result}"
    return None


def _text(result: Mapping[str, Any]) -> str:
    """The prose of a compression result (``reason`` from lepton_trainer.compress)."""
    return str(result.get("reason") or result.get("message") or result.get("error") or "")


@dataclasses.dataclass(frozen=True)
class DeploymentView:
    replicas: int
    ready: int
    updated: int
    current: bool           # the controller has observed the newest generation


def deployment_view(d: Mapping[str, Any]) -> DeploymentView:
    s = d.get("status") or {}
    return DeploymentView(d.get("spec", {}).get("replicas", 1), s.get("readyReplicas", 0) or 0,
                          s.get("updatedReplicas", 0) or 0,
                          s.get("observedGeneration", 0) >= d["metadata"].get("generation", 0))


def is_ready(view: DeploymentView | None, want: int) -> bool:
    """All ``want`` pods of a Deployment are updated and ready (never while they crash)."""
    return (view is not None and view.current and view.replicas == want
            and view.ready >= want and view.updated >= want)


@dataclasses.dataclass
class Plan:
    status: dict[str, Any]
    replicas: dict[str, int] = dataclasses.field(default_factory=dict)
    model_dirs: dict[str, PvcPath] = dataclasses.field(default_factory=dict)
    delete: list[str] = dataclasses.field(default_factory=list)
    ready: bool = False
    stalled: bool = False
    reason: str = REASON_DEPLOYING
    message: str = ""
    conditions: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    events: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    requeue_after: float | None = None
    analyze: str | None = None

    def outcome(self, phase: str, reason: str, message: str, ready: bool = False, stalled: bool = False):
        self.status["phase"], self.reason, self.message, self.ready, self.stalled = \
            phase, reason, message, ready, stalled

    def requeue(self, seconds: float) -> None:
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def _iso(t: float) -> str:
    return st.now_iso(_dt.datetime.fromtimestamp(t, _dt.timezone.utc))


def _since(stamp: str | None, now: float) -> float:
    parsed = st.parse_time(stamp)
    return now - parsed.timestamp() if parsed else 0.0


def plan(spec: ModelSpec, name: str, prev: Mapping[str, Any], source: SourceState, revision: str | None,
         comp: CompressionState | None, total: int, deployments: Mapping[str, DeploymentView], now: float,
         analysis: list | None = None, hold_stable: bool = False) -> Plan:
    """Decide replicas per revision and the status. ``hold_stable``: an HPA owns the stable
    size, so a canary is added next to it instead of taking replicas from it."""
    status = {k: v for k, v in prev.items()}
    revs = dict(status.get("revisions") or {})
    status["revisions"] = revs
    p = Plan(status)
    stable, canary, failed = revs.get("stable"), revs.get("canary"), revs.get("failed")
    if stable and revs.get("stableURI"):
        p.model_dirs[stable] = parse_uri(revs["stableURI"])
    if source.uri:
        status["sourceURI"] = source.uri
    busy = False    # a rollout step, compression or source wait decides the outcome

    def fail(reason: str, message: str) -> None:
        revs.update(failed=revision, failedReason=reason, failedMessage=message)
        for k in ("canary", "canaryStep", "canaryWeight", "stepStartTime", "stepReadyTime"):
            revs.pop(k, None)
        p.events.append((EVENT_WARNING, reason, message))

    if revision is None:
        busy = True
        p.outcome(MPHASE_DEGRADED if stable and source.stalled else MPHASE_PENDING if not stable
                  else status.get("phase", MPHASE_PENDING), source.reason or REASON_WAITING_FOR_SOURCE,
                  source.message, stalled=source.stalled)
        if not stable:
            p.status["phase"] = MPHASE_FAILED if source.stalled else MPHASE_PENDING
        p.requeue(5)
    elif revision != stable and revision != failed:
        target_dir = parse_uri(source.uri)
        if spec.compression.runs_job:
            target_dir = artifact_path(target_dir, name, revision)
            result = dict((comp.result if comp else None) or {})
            verdict = gate_verdict(result, spec.compression.max_accuracy_drop) if comp and comp.state != "Running" else None
            if comp is None or comp.state == "Running":
                busy = True
                p.outcome(MPHASE_COMPRESSING, REASON_COMPRESSING,
                          f"compressing revision {revision} ({spec.compression.method})")
                p.conditions.append((COND_COMPRESSED, FALSE, REASON_COMPRESSING, p.message))
                p.requeue(2)
            elif verdict or comp.state == "Failed":
                reason, message = verdict or (REASON_COMPRESSION_FAILED,
                                              f"compression failed: {_text(result) or result}")
                message += (f"; revision {revision} is not rolled out"
                            + (f", revision {stable} keeps serving" if stable else ""))
                status["compression"] = {**result, "revision": revision, "state": "Failed"}
                p.conditions.append((COND_COMPRESSED, FALSE, reason, message))
                fail(reason, message)
            else:
                if (status.get("compression") or {}).get("revision") != revision:
                    p.events.append((EVENT_NORMAL, REASON_COMPRESSED, f"revision {revision} compressed: "
                                     + ", ".join(f"{k}={v}" for k, v in sorted(result.items())
                                                 if isinstance(v, (int, float)))))
                status["compression"] = {**result, "revision": revision, "state": "Succeeded"}
                p.conditions.append((COND_COMPRESSED, TRUE, REASON_COMPRESSED, f"revision {revision} compressed"))
        if revision != revs.get("failed") and not busy:
            p.model_dirs[revision] = target_dir
            if not stable:
                revs.update(stable=revision, stableURI=target_dir.uri)
                stable = revision
                p.events.append((EVENT_NORMAL, REASON_DEPLOYING, f"deploying revision {revision}"))
            else:
                busy = _canary(spec, p, revs, stable, revision, target_dir, total, deployments, now,
                               analysis, hold_stable)
                stable = revs.get("stable")
    elif revision == stable and revs.get("canary"):
        p.events.append((EVENT_NORMAL, REASON_ROLLED_BACK,
                         f"canary {revs['canary']} abandoned: the spec is back at revision {stable}"))
        for k in ("canary", "canaryStep", "canaryWeight", "stepStartTime", "stepReadyTime"):
            revs.pop(k, None)

    # Steady state and cleanup.
    canary, failed = revs.get("canary"), revs.get("failed")
    if stable and stable not in p.replicas:
        p.replicas[stable] = total
    if failed and failed in deployments:
        p.replicas.setdefault(failed, 0)
    p.delete = [r for r in deployments if r not in p.replicas and r not in (stable, canary, failed)]
    if failed and failed == revision:
        rolled_back = failed in deployments and deployments[failed].ready > 0
        p.outcome(MPHASE_ROLLING_BACK if rolled_back else MPHASE_DEGRADED if stable else MPHASE_FAILED,
                  revs.get("failedReason", REASON_ROLLED_BACK), revs.get("failedMessage", ""), stalled=True)
        if rolled_back:
            p.requeue(1)
    elif not busy:
        view = deployments.get(stable)
        want = p.replicas.get(stable, total) if not hold_stable else (view.replicas if view else total)
        if is_ready(view, want):
            p.outcome(MPHASE_READY, REASON_SERVING, f"revision {stable} serving with {want} ready replicas",
                      ready=True)
        else:
            ready = view.ready if view else 0
            was_ready = prev.get("phase") in (MPHASE_READY, MPHASE_DEGRADED)
            p.outcome(MPHASE_DEGRADED if was_ready else MPHASE_DEPLOYING, REASON_PODS_NOT_READY,
                      f"{ready}/{want} serving pods of revision {stable} are ready")
            p.requeue(2)
    status["replicas"] = sum(v.ready for v in deployments.values())
    return p


def _canary(spec: ModelSpec, p: Plan, revs: dict, stable: str, revision: str, target_dir: PvcPath,
            total: int, deployments: Mapping[str, DeploymentView], now: float, analysis: list | None,
            hold_stable: bool) -> bool:
    """Advance the rollout of ``revision`` next to ``stable``; True while it is in progress."""
    steps = spec.rollout.steps if spec.rollout.strategy == "canary" else ()
    if revs.get("canary") != revision:
        first = steps[0].weight if steps else 100
        revs.update(canary=revision, canaryStep=0, canaryWeight=first, stepStartTime=_iso(now))
        revs.pop("stepReadyTime", None)
        p.events.append((EVENT_NORMAL, REASON_CANARY_STEP,
                         f"rolling out revision {revision} next to {stable}: "
                         + (f"step 1/{len(steps)}, weight {first}%" if steps else "replace once ready")))
    i = revs.get("canaryStep", 0)
    weight = steps[i].weight if steps else 100
    if steps:
        stable_n, canary_n = split(total, weight)
        if hold_stable:
            stable_n = total
    else:
        stable_n, canary_n = total, max(total, 1)
    p.replicas[stable], p.replicas[revision] = stable_n, canary_n
    p.model_dirs[revision] = target_dir

    def promote() -> bool:
        for k in ("canary", "canaryStep", "canaryWeight", "stepStartTime", "stepReadyTime"):
            revs.pop(k, None)
        revs.update(stable=revision, stableURI=target_dir.uri)
        p.replicas.pop(stable, None)
        p.replicas[revision] = total
        p.events.append((EVENT_NORMAL, REASON_PROMOTED, f"revision {revision} promoted to stable "
                                                       f"(replaces {stable})"))
        return False

    def rollback(reason: str, message: str) -> bool:
        for k in ("canary", "canaryStep", "canaryWeight", "stepStartTime", "stepReadyTime"):
            revs.pop(k, None)
        revs.update(failed=revision, failedReason=reason, failedMessage=message)
        p.replicas[stable], p.replicas[revision] = total, 0
        p.events.append((EVENT_WARNING, REASON_ROLLED_BACK, message))
        return False

    where = f"step {i + 1}/{len(steps)} (weight {weight}%)" if steps else "replace"
    if not is_ready(deployments.get(revision), canary_n):
        if _since(revs.get("stepStartTime"), now) > spec.rollout.progress_deadline_seconds:
            view = deployments.get(revision)
            return rollback(REASON_PODS_NOT_READY,
                            f"canary {revision} rolled back at {where}: {view.ready if view else 0}/{canary_n} "
                            f"pods ready after {spec.rollout.progress_deadline_seconds}s")
        p.outcome(MPHASE_PROGRESSING, REASON_CANARY_STEP, f"canary {revision} at {where}: waiting for its pods")
        p.requeue(1)
        return True
    if not steps:
        return promote()
    revs.setdefault("stepReadyTime", _iso(now))
    left = steps[i].pause_seconds - _since(revs["stepReadyTime"], now)
    if left > 0:
        p.outcome(MPHASE_PROGRESSING, REASON_CANARY_STEP, f"canary {revision} at {where}: pausing {left:.0f}s")
        p.requeue(left)
        return True
    if spec.rollout.analysis:
        if analysis is None:
            p.analyze = revision
            p.outcome(MPHASE_PROGRESSING, REASON_CANARY_STEP, f"canary {revision} at {where}: analysing")
            return True
        p.status["analysis"] = [
            {"name": c.name, "query": r.query, "value": r.value, "threshold": c.bound_text(),
             "passed": r.ok and not c.failed(r.value), **({"error": r.error} if r.error else {})}
            for c, r in analysis]
        bad = [(c, r) for c, r in analysis if r.ok and c.failed(r.value)]
        if bad:
            c, r = bad[0]
            return rollback(REASON_ANALYSIS_FAILED,
                            f"canary {revision} rolled back at {where}: analysis {c.name!r} = {r.value:g}, "
                            f"must be {c.bound_text()} (query: {r.query})")
        missing = [(c, r) for c, r in analysis if not r.ok]
        if missing:
            c, r = missing[0]
            p.outcome(MPHASE_PROGRESSING, REASON_ANALYSIS_NO_DATA,
                      f"canary {revision} at {where}: analysis {c.name!r} has no data ({r.error}); waiting")
            p.requeue(2)
            return True
    if i + 1 < len(steps):
        nxt = steps[i + 1].weight
        revs.update(canaryStep=i + 1, canaryWeight=nxt, stepStartTime=_iso(now))
        revs.pop("stepReadyTime", None)
        p.events.append((EVENT_NORMAL, REASON_CANARY_STEP,
                         f"canary {revision} passed {where}; step {i + 2}/{len(steps)}, weight {nxt}%"))
        s_n, c_n = split(total, nxt)
        p.replicas[stable], p.replicas[revision] = (total if hold_stable else s_n), c_n
        p.outcome(MPHASE_PROGRESSING, REASON_CANARY_STEP, f"canary {revision} at step {i + 2}/{len(steps)}")
        p.requeue(0.5)
        return True
    return promote()
