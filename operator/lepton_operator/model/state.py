"""LeptonModel rollout decisions (pure): what each revision should run and what status says.

``plan`` takes the spec, the previous status, the resolved source, the compression
outcome, the total replicas wanted, the observed Deployments, the time and the canary
analysis results, and returns a ``Plan``: replicas per revision, Deployments to delete,
the new status, the ``Outcome``, events, and when to look again. It reads as named
steps: wait for the source; compress behind the gate; deploy the first revision or
run the canary (start the step, wait for its pods within the deadline, pause, judge
the analysis, advance or promote, or roll back); abandon a canary the spec left;
clean up; summarise.

The caller runs the analysis queries only when ``analysis_due`` says the canary's
current step is waiting for them, so they run once per reconcile; a plan that reaches
the analysis without results names the revision in ``analyze`` and asks to be
called again soon.

Revisions live in ``status.revisions``: ``stable`` (and ``stableURI``, its model
directory), ``canary`` with ``canaryStep``/``canaryWeight`` and the step's start and
ready times, and ``failed`` (with ``failedReason``/``failedMessage``): the revision the
gate rejected or the analysis rolled back, not retried until the spec changes.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from typing import Any, Callable, Iterable, Mapping

from ..constants import (COND_COMPRESSED, EVENT_NORMAL, EVENT_WARNING, FALSE, MPHASE_COMPRESSING,
                         MPHASE_DEGRADED, MPHASE_DEPLOYING, MPHASE_FAILED, MPHASE_PENDING,
                         MPHASE_PROGRESSING, MPHASE_READY, MPHASE_ROLLING_BACK, REASON_ANALYSIS_FAILED,
                         REASON_ANALYSIS_NO_DATA, REASON_CANARY_STEP, REASON_COMPRESSED,
                         REASON_COMPRESSING, REASON_COMPRESSION_FAILED, REASON_DEPLOYING,
                         REASON_GATE_FAILED, REASON_PODS_NOT_READY, REASON_PROMOTED, REASON_ROLLED_BACK,
                         REASON_SERVING, REASON_SOURCE_FAILED, REASON_SOURCE_NOT_FOUND,
                         REASON_WAITING_FOR_SOURCE, TRUE)
from ..core import status as st
from ..core.status import Outcome
from .objects import split
from .spec import ModelSpec, PvcPath, artifact_path, parse_uri


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


def read_result(pod: Mapping[str, Any]) -> tuple[str, dict | None]:
    """(state, result) of a compression pod from its termination message.

    state is "running", "succeeded" or "failed"; result is the parsed JSON object, or
    a dict ``{"message": text}`` when the message is not JSON.
    """
    for cs in (pod.get("status") or {}).get("containerStatuses") or ():
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if not term:
            continue
        text = (term.get("message") or "").strip()
        try:
            result = json.loads(text) if text else None
        except ValueError:
            result = {"message": text[-1024:]}
        if result is not None and not isinstance(result, dict):
            result = {"message": text[-1024:]}
        return ("succeeded" if term.get("exitCode") == 0 else "failed"), result
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        return phase.lower(), None
    return "running", None


@dataclasses.dataclass(frozen=True)
class CompressionState:
    state: str                      # Running | Succeeded | Failed
    result: Mapping[str, Any] | None


def compression_state(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]],
                      read: Callable[[Mapping[str, Any]], tuple[str, dict | None]] | None = None
                      ) -> CompressionState:
    """Outcome of a compression Job from its conditions and its pods' termination messages
    (read by ``read``, ``read_result`` unless given)."""
    read_result_ = read or read_result
    conds = {c.get("type"): c for c in (job.get("status") or {}).get("conditions") or () if c.get("status") == TRUE}
    outcomes = [read_result_(p) for p in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""),
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
    outcome: Outcome = Outcome(MPHASE_PENDING, REASON_DEPLOYING)
    conditions: list[tuple[str, str, str, str]] = dataclasses.field(default_factory=list)
    events: list[st.Event] = dataclasses.field(default_factory=list)
    requeue_after: float | None = None
    analyze: str | None = None

    @property
    def ready(self) -> bool:
        return self.outcome.ready

    @property
    def stalled(self) -> bool:
        return self.outcome.stalled

    @property
    def reason(self) -> str:
        return self.outcome.reason

    @property
    def message(self) -> str:
        return self.outcome.message

    def settle(self, phase: str, reason: str, message: str, ready: bool = False, stalled: bool = False) -> None:
        self.status["phase"] = phase
        self.outcome = Outcome(phase, reason, message, ready=ready, stalled=stalled)

    def requeue(self, seconds: float) -> None:
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


_CANARY_KEYS = ("canary", "canaryStep", "canaryWeight", "stepStartTime", "stepReadyTime")


def _iso(t: float) -> str:
    return st.now_iso(_dt.datetime.fromtimestamp(t, _dt.timezone.utc))


def _since(stamp: str | None, now: float) -> float:
    parsed = st.parse_time(stamp)
    return now - parsed.timestamp() if parsed else 0.0


def _steps(spec: ModelSpec) -> tuple:
    return spec.rollout.steps if spec.rollout.strategy == "canary" else ()


def _pause_left(spec: ModelSpec, revs: Mapping[str, Any], now: float) -> float:
    """Seconds the canary's current step still pauses after its pods became ready."""
    return _steps(spec)[revs.get("canaryStep", 0)].pause_seconds - _since(revs["stepReadyTime"], now)


def analysis_due(spec: ModelSpec, status: Mapping[str, Any], revision: str | None, now: float) -> str | None:
    """The canary revision whose current step waits for its analysis now, else None."""
    revs = status.get("revisions") or {}
    if (not spec.rollout.analysis or not _steps(spec) or revision is None or revs.get("canary") != revision
            or not revs.get("stepReadyTime")):
        return None
    return revision if _pause_left(spec, revs, now) <= 0 else None


@dataclasses.dataclass
class _Model:
    """The inputs of one plan, and what the steps have decided so far."""
    spec: ModelSpec
    name: str
    plan: Plan
    revs: dict[str, Any]                # status.revisions, updated in place
    source: SourceState
    revision: str | None                # the revision the spec asks for (None: no source yet)
    comp: CompressionState | None
    total: int
    deployments: Mapping[str, DeploymentView]
    now: float
    analysis: list | None
    hold_stable: bool
    prev_phase: str | None = None
    busy: bool = False                  # a rollout step, compression or source wait decides the outcome

    @property
    def stable(self) -> str | None:
        return self.revs.get("stable")


def _drop_canary(revs: dict[str, Any]) -> None:
    for k in _CANARY_KEYS:
        revs.pop(k, None)


def _fail_revision(m: _Model, reason: str, message: str) -> None:
    """The revision is not rolled out (gate or compression failure); stable keeps serving."""
    m.revs.update(failed=m.revision, failedReason=reason, failedMessage=message)
    _drop_canary(m.revs)
    m.plan.events.append((EVENT_WARNING, reason, message))


# --- the steps, in order --------------------------------------------------------------

def wait_for_source(m: _Model) -> None:
    """No source yet: Pending (or Failed when it will never come); a stable revision keeps
    serving meanwhile."""
    if m.revision is not None:
        return
    m.busy = True
    p, stable, source = m.plan, m.stable, m.source
    phase = (MPHASE_FAILED if source.stalled else MPHASE_PENDING) if not stable else (
        MPHASE_DEGRADED if source.stalled else p.status.get("phase", MPHASE_PENDING))
    p.settle(phase, source.reason or REASON_WAITING_FOR_SOURCE, source.message, stalled=source.stalled)
    p.requeue(5)


def _is_new(m: _Model) -> bool:
    return m.revision is not None and m.revision != m.stable and m.revision != m.revs.get("failed")


def compress(m: _Model) -> PvcPath | None:
    """The new revision's model directory once compression passed its gate (the source
    itself when there is nothing to compress); None while it runs or after it failed."""
    if not _is_new(m):
        return None
    p, spec, revision = m.plan, m.spec, m.revision
    target = parse_uri(m.source.uri)
    if not spec.compression.runs_job:
        return target
    target = artifact_path(target, m.name, revision)
    comp = m.comp
    if comp is None or comp.state == "Running":
        m.busy = True
        p.settle(MPHASE_COMPRESSING, REASON_COMPRESSING, f"compressing revision {revision} ({spec.compression.method})")
        p.conditions.append((COND_COMPRESSED, FALSE, REASON_COMPRESSING, p.message))
        p.requeue(2)
        return None
    result = dict(comp.result or {})
    verdict = gate_verdict(result, spec.compression.max_accuracy_drop)
    if verdict or comp.state == "Failed":
        reason, message = verdict or (REASON_COMPRESSION_FAILED, f"compression failed: {_text(result) or result}")
        message += (f"; revision {revision} is not rolled out"
                    + (f", revision {m.stable} keeps serving" if m.stable else ""))
        p.status["compression"] = {**result, "revision": revision, "state": "Failed"}
        p.conditions.append((COND_COMPRESSED, FALSE, reason, message))
        _fail_revision(m, reason, message)
        return None
    if (p.status.get("compression") or {}).get("revision") != revision:
        p.events.append((EVENT_NORMAL, REASON_COMPRESSED, f"revision {revision} compressed: "
                         + ", ".join(f"{k}={v}" for k, v in sorted(result.items()) if isinstance(v, (int, float)))))
    p.status["compression"] = {**result, "revision": revision, "state": "Succeeded"}
    p.conditions.append((COND_COMPRESSED, TRUE, REASON_COMPRESSED, f"revision {revision} compressed"))
    return target


def roll_out(m: _Model, target: PvcPath | None) -> None:
    """Deploy the first revision outright; roll a later one out next to the stable one."""
    if target is None or m.busy or not _is_new(m):
        return
    m.plan.model_dirs[m.revision] = target
    if not m.stable:
        m.revs.update(stable=m.revision, stableURI=target.uri)
        m.plan.events.append((EVENT_NORMAL, REASON_DEPLOYING, f"deploying revision {m.revision}"))
        return
    m.busy = canary(m, target)


def abandon_canary(m: _Model) -> None:
    """The spec is back at the stable revision: drop the canary in flight."""
    if m.revision is not None and m.revision == m.stable and m.revs.get("canary"):
        m.plan.events.append((EVENT_NORMAL, REASON_ROLLED_BACK,
                              f"canary {m.revs['canary']} abandoned: the spec is back at revision {m.stable}"))
        _drop_canary(m.revs)


def clean_up(m: _Model) -> None:
    """The stable revision runs ``total``; a failed one is held at zero; others go."""
    p, stable, canary_rev, failed = m.plan, m.stable, m.revs.get("canary"), m.revs.get("failed")
    if stable and stable not in p.replicas:
        p.replicas[stable] = m.total
    if failed and failed in m.deployments:
        p.replicas.setdefault(failed, 0)
    p.delete = [r for r in m.deployments if r not in p.replicas and r not in (stable, canary_rev, failed)]


def summarise(m: _Model) -> None:
    """Rolling back or degraded after a failed revision; Ready only when every pod of the
    stable revision is updated and ready."""
    p, stable, failed = m.plan, m.stable, m.revs.get("failed")
    if failed and failed == m.revision:
        rolled_back = failed in m.deployments and m.deployments[failed].ready > 0
        p.settle(MPHASE_ROLLING_BACK if rolled_back else MPHASE_DEGRADED if stable else MPHASE_FAILED,
                 m.revs.get("failedReason", REASON_ROLLED_BACK), m.revs.get("failedMessage", ""), stalled=True)
        if rolled_back:
            p.requeue(1)
    elif not m.busy:
        view = m.deployments.get(stable)
        want = p.replicas.get(stable, m.total) if not m.hold_stable else (view.replicas if view else m.total)
        if is_ready(view, want):
            p.settle(MPHASE_READY, REASON_SERVING, f"revision {stable} serving with {want} ready replicas", ready=True)
        else:
            was_ready = m.prev_phase in (MPHASE_READY, MPHASE_DEGRADED)
            p.settle(MPHASE_DEGRADED if was_ready else MPHASE_DEPLOYING, REASON_PODS_NOT_READY,
                     f"{view.ready if view else 0}/{want} serving pods of revision {stable} are ready")
            p.requeue(2)
    p.status["replicas"] = sum(v.ready for v in m.deployments.values())


def plan(spec: ModelSpec, name: str, prev: Mapping[str, Any], source: SourceState, revision: str | None,
         comp: CompressionState | None, total: int, deployments: Mapping[str, DeploymentView], now: float,
         analysis: list | None = None, hold_stable: bool = False) -> Plan:
    """Decide replicas per revision and the status. ``analysis``: (check, QueryResult)
    pairs for the canary step ``analysis_due`` named. ``hold_stable``: an HPA owns the
    stable size, so a canary is added next to it instead of taking replicas from it."""
    status = dict(prev)
    revs = dict(status.get("revisions") or {})
    status["revisions"] = revs
    p = Plan(status)
    if revs.get("stable") and revs.get("stableURI"):
        p.model_dirs[revs["stable"]] = parse_uri(revs["stableURI"])
    if source.uri:
        status["sourceURI"] = source.uri
    m = _Model(spec, name, p, revs, source, revision, comp, total, deployments, now, analysis, hold_stable,
               prev_phase=prev.get("phase"))
    wait_for_source(m)
    roll_out(m, compress(m))
    abandon_canary(m)
    clean_up(m)
    summarise(m)
    return p


# --- the canary, in steps ---------------------------------------------------------------

@dataclasses.dataclass
class _Step:
    """The canary's current step."""
    index: int
    weight: int
    stable_n: int
    canary_n: int
    where: str


def _start(m: _Model) -> _Step:
    """Begin the rollout of ``revision`` at its first step, or find the step it is at."""
    steps, revs, revision = _steps(m.spec), m.revs, m.revision
    if revs.get("canary") != revision:
        first = steps[0].weight if steps else 100
        revs.update(canary=revision, canaryStep=0, canaryWeight=first, stepStartTime=_iso(m.now))
        revs.pop("stepReadyTime", None)
        m.plan.events.append((EVENT_NORMAL, REASON_CANARY_STEP,
                              f"rolling out revision {revision} next to {m.stable}: "
                              + (f"step 1/{len(steps)}, weight {first}%" if steps else "replace once ready")))
    i = revs.get("canaryStep", 0)
    weight = steps[i].weight if steps else 100
    if steps:
        stable_n, canary_n = split(m.total, weight)
        if m.hold_stable:
            stable_n = m.total
    else:
        stable_n, canary_n = m.total, max(m.total, 1)
    where = f"step {i + 1}/{len(steps)} (weight {weight}%)" if steps else "replace"
    return _Step(i, weight, stable_n, canary_n, where)


def _promote(m: _Model, target: PvcPath) -> bool:
    stable = m.stable
    _drop_canary(m.revs)
    m.revs.update(stable=m.revision, stableURI=target.uri)
    m.plan.replicas.pop(stable, None)
    m.plan.replicas[m.revision] = m.total
    m.plan.events.append((EVENT_NORMAL, REASON_PROMOTED, f"revision {m.revision} promoted to stable "
                                                         f"(replaces {stable})"))
    return False


def _roll_back(m: _Model, reason: str, message: str) -> bool:
    _drop_canary(m.revs)
    m.revs.update(failed=m.revision, failedReason=reason, failedMessage=message)
    m.plan.replicas[m.stable], m.plan.replicas[m.revision] = m.total, 0
    m.plan.events.append((EVENT_WARNING, REASON_ROLLED_BACK, message))
    return False


def _judge(m: _Model, step: _Step) -> bool | None:
    """The analysis verdict for this step: roll back (False), wait (True), or pass (None)."""
    p, revision = m.plan, m.revision
    if m.analysis is None:
        p.analyze = revision
        p.settle(MPHASE_PROGRESSING, REASON_CANARY_STEP, f"canary {revision} at {step.where}: analysing")
        p.requeue(0.05)
        return True
    p.status["analysis"] = [
        {"name": c.name, "query": r.query, "value": r.value, "threshold": c.bound_text(),
         "passed": r.ok and not c.failed(r.value), **({"error": r.error} if r.error else {})}
        for c, r in m.analysis]
    bad = [(c, r) for c, r in m.analysis if r.ok and c.failed(r.value)]
    if bad:
        c, r = bad[0]
        return _roll_back(m, REASON_ANALYSIS_FAILED,
                          f"canary {revision} rolled back at {step.where}: analysis {c.name!r} = {r.value:g}, "
                          f"must be {c.bound_text()} (query: {r.query})")
    missing = [(c, r) for c, r in m.analysis if not r.ok]
    if missing:
        c, r = missing[0]
        p.settle(MPHASE_PROGRESSING, REASON_ANALYSIS_NO_DATA,
                 f"canary {revision} at {step.where}: analysis {c.name!r} has no data ({r.error}); waiting")
        p.requeue(2)
        return True
    return None


def canary(m: _Model, target: PvcPath) -> bool:
    """Advance the rollout of the new revision next to the stable one; True while it is in
    progress. Steps: start, wait for the canary's pods (rolled back past the progress
    deadline), pause, judge the analysis, then the next step or promotion."""
    p, spec, revision, revs = m.plan, m.spec, m.revision, m.revs
    steps = _steps(spec)
    step = _start(m)
    p.replicas[m.stable], p.replicas[revision] = step.stable_n, step.canary_n
    p.model_dirs[revision] = target
    if not is_ready(m.deployments.get(revision), step.canary_n):
        if _since(revs.get("stepStartTime"), m.now) > spec.rollout.progress_deadline_seconds:
            view = m.deployments.get(revision)
            return _roll_back(m, REASON_PODS_NOT_READY,
                              f"canary {revision} rolled back at {step.where}: {view.ready if view else 0}/"
                              f"{step.canary_n} pods ready after {spec.rollout.progress_deadline_seconds}s")
        p.settle(MPHASE_PROGRESSING, REASON_CANARY_STEP, f"canary {revision} at {step.where}: waiting for its pods")
        p.requeue(1)
        return True
    if not steps:
        return _promote(m, target)
    revs.setdefault("stepReadyTime", _iso(m.now))
    left = _pause_left(spec, revs, m.now)
    if left > 0:
        p.settle(MPHASE_PROGRESSING, REASON_CANARY_STEP, f"canary {revision} at {step.where}: pausing {left:.0f}s")
        p.requeue(left)
        return True
    if spec.rollout.analysis:
        verdict = _judge(m, step)
        if verdict is not None:
            return verdict
    if step.index + 1 < len(steps):
        nxt = steps[step.index + 1].weight
        revs.update(canaryStep=step.index + 1, canaryWeight=nxt, stepStartTime=_iso(m.now))
        revs.pop("stepReadyTime", None)
        p.events.append((EVENT_NORMAL, REASON_CANARY_STEP,
                         f"canary {revision} passed {step.where}; step {step.index + 2}/{len(steps)}, weight {nxt}%"))
        s_n, c_n = split(m.total, nxt)
        p.replicas[m.stable], p.replicas[revision] = (m.total if m.hold_stable else s_n), c_n
        p.settle(MPHASE_PROGRESSING, REASON_CANARY_STEP, f"canary {revision} at step {step.index + 2}/{len(steps)}")
        p.requeue(0.5)
        return True
    return _promote(m, target)
