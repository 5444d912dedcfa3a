"""LeptonModel rollout decisions (pure): what each revision should run and what status says.

``plan(spec, observed)`` takes the spec and one frozen ``ModelObserved`` (the previous
status, the resolved source, the compression outcome, the Deployments, the time, the
canary analysis results and the autoscaler's sample; ``model.observe`` builds it) and
returns a ``Plan``: the size (``model.autoscale``), replicas per revision, Deployments to
delete, the whole new status, the ``Outcome``, events, the writes (``core.execute``) and
when to look again. The revisions are decided (``revisions``) in named
steps: wait for the source; compress behind the gate; deploy the first revision or
run the canary (start the step, wait for its pods within the deadline, pause, judge
the analysis, advance or promote, or roll back); abandon a canary the spec left;
clean up; summarise.

The observation runs the analysis queries only when ``analysis_due`` says the canary's
current step is waiting for them, so they run once per reconcile; a plan that reaches
the analysis without results names the revision in ``analyze`` and asks to be
called again soon.

Revisions live in ``status.revisions``: ``stable`` (and ``stableURI``, its model
directory), ``canary`` with ``canaryStep``/``canaryWeight`` and the step's start and
ready times, and ``failed`` (with ``failedReason``/``failedMessage``): the revision the
gate rejected or the analysis rolled back, not retried until the spec changes.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import math
from typing import Any, Callable, Iterable, Mapping

from lepton_trainer import contract

from ..constants import (ANNOTATION_ABORT, ANNOTATION_RESUME, COND_COMPRESSED, COND_SOURCE_AVAILABLE, EVENT_NORMAL,
                         EVENT_WARNING, FALSE, MPHASE_COMPRESSING, MPHASE_DEGRADED, MPHASE_DEPLOYING, MPHASE_FAILED,
                         MPHASE_PAUSED, MPHASE_PENDING, MPHASE_PROGRESSING, MPHASE_READY, MPHASE_ROLLING_BACK,
                         REASON_ABORTED, REASON_ANALYSIS_ERROR, REASON_ANALYSIS_FAILED, REASON_ANALYSIS_INCONCLUSIVE,
                         REASON_ANALYSIS_NO_DATA, REASON_CANARY_STEP, REASON_COMPRESSED, REASON_COMPRESSING,
                         REASON_COMPRESSION_FAILED, REASON_DEPLOYING, REASON_GATE_FAILED, REASON_PODS_NOT_READY,
                         REASON_PROGRESS_DEADLINE, REASON_PROMOTED, REASON_RESUMED_BY_PERSON, REASON_ROLLED_BACK,
                         REASON_COMPRESSION_POD_PENDING, REASON_SERVING, REASON_SOURCE_AVAILABLE, REASON_SOURCE_FAILED,
                         REASON_SOURCE_NOT_FOUND,
                         REASON_WAITING_FOR_SOURCE, REASON_WAITING_FOR_TRAFFIC, TRUE)
from ..core import status as st
from ..core.execute import Action, Effects
from ..core.objects import policy_changes
from ..core.status import Outcome
from ..scaling import prometheus
from . import autoscale, objects, progress
from .objects import split
from .spec import ERROR, FAILED, INCONCLUSIVE, SUCCESSFUL, ModelSpec, PvcPath, artifact_path, parse_uri


@dataclasses.dataclass(frozen=True)
class SourceState:
    uri: str | None = None
    reason: str | None = None
    message: str = ""
    stalled: bool = False
    identity: str = ""              # the run that made it (job uid and completion time)


def source_from_job(job_name: str, namespace: str, job: Mapping[str, Any] | None) -> SourceState:
    """The model source from its LeptonJob: its outputURI once it succeeded, identified by
    the run (a new successful run of a same-named job is a new source)."""
    if job is None:
        return SourceState(None, REASON_SOURCE_NOT_FOUND,
                           f"source.jobRef: LeptonJob {job_name!r} not found in namespace {namespace!r}; "
                           "waiting for it to be created")
    s = job.get("status") or {}
    phase = s.get("phase") or "Pending"
    if phase == "Failed":
        why = (st.get_condition(s.get("conditions"), "Ready") or {})
        detail = f" ({why.get('reason')}: {why.get('message')})" if why.get("reason") else ""
        return SourceState(None, REASON_SOURCE_FAILED, f"source LeptonJob {job_name!r} failed{detail}", stalled=True)
    if phase != "Succeeded":
        return SourceState(None, REASON_WAITING_FOR_SOURCE,
                           f"waiting for LeptonJob {job_name!r} to succeed (phase {phase})")
    if not s.get("outputURI"):
        return SourceState(None, REASON_SOURCE_FAILED,
                           f"LeptonJob {job_name!r} succeeded but records no outputURI "
                           "(give the job spec.output or spec.checkpoint)", stalled=True)
    meta = job.get("metadata") or {}
    return SourceState(s["outputURI"], identity=f"{meta.get('uid', '')}@{s.get('completionTime', '')}")


def read_result(pod: Mapping[str, Any]) -> tuple[str, dict | None]:
    """(state, result) of a compression pod from its termination message.

    state is "running", "succeeded", "gate-failed" (the exit status the compression
    program gives a failed gate) or "failed"; result is the parsed JSON object, or a
    dict ``{"message": text}`` when the message is not JSON.
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
        code = term.get("exitCode")
        state_ = ("succeeded" if code == 0 else "gate-failed" if code == contract.COMPRESS_EXIT_GATE_FAILED
                  else "failed")
        return state_, result
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        return phase.lower(), None
    return "running", None


@dataclasses.dataclass(frozen=True)
class CompressionState:
    state: str                      # Running | Succeeded | Failed
    result: Mapping[str, Any] | None
    gate_failed: bool = False       # Failed because the gate said no (not a crash)
    pending: str = ""               # Running, but its pod waits for the scheduler: why
    progress: Mapping[str, Any] | None = None   # Running: the program's last progress record (model.progress)


def unschedulable(pod: Mapping[str, Any]) -> str:
    """The scheduler's reason a Pending pod has no node ("" when it has one or is not Pending)."""
    s = pod.get("status") or {}
    if s.get("phase") not in (None, "Pending"):
        return ""
    c = next((c for c in s.get("conditions") or () if c.get("type") == "PodScheduled"), None)
    if c is None or c.get("status") != FALSE:
        return ""
    return f"{c.get('reason') or 'Unschedulable'}: {c.get('message') or 'no node fits it'}"


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
    if done is not None:
        return CompressionState("Succeeded", done)
    if "Complete" in conds:      # a Job that ends well but says nothing has no verdict
        return CompressionState("Failed", {"message": "the compression Job completed without a verdict: its pod "
                                                      "wrote no result to its termination message"})
    gate = next((r for s, r in outcomes if s == "gate-failed" and r), None)
    if gate is not None:        # the gate's verdict is final: no retry changes it
        return CompressionState("Failed", gate, gate_failed=True)
    if "Failed" in conds:
        failed = next((r for s, r in outcomes if s == "failed" and r), None)
        return CompressionState("Failed", failed or {"message": conds["Failed"].get("message", "the Job failed")})
    newest = max(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), default=None)
    why = unschedulable(newest) if newest is not None else ""
    return CompressionState("Running", None, pending=f"its pod {newest['metadata'].get('name')} is Pending ({why})"
                            if why else "")


def verdict(comp: CompressionState, artifact: str | None = None) -> tuple[str, str] | None:
    """(reason, message) when compression did not give a servable artifact, else None.

    The compression program's own verdict (``passed`` and ``reason``, and its gate exit
    status) decides; nothing here re-derives it from the numbers. Only a result that says
    ``passed: true`` promotes: a result without a verdict (a Job that completed and said
    nothing), or one naming another artifact directory (``artifact``, as the program saw
    it) than the one it was given, is a failure.
    """
    result = comp.result or {}
    text = _text(result) or json.dumps(result, sort_keys=True)[:512]
    if comp.state == "Failed":
        return (REASON_GATE_FAILED, text) if comp.gate_failed else (REASON_COMPRESSION_FAILED,
                                                                    f"compression failed: {text}")
    if result.get(contract.RESULT_PASSED) is False:
        return REASON_GATE_FAILED, text
    if result.get(contract.RESULT_PASSED) is not True:
        return REASON_COMPRESSION_FAILED, f"compression gave no verdict (no {contract.RESULT_PASSED!r} in its result: {text})"
    named = result.get(contract.RESULT_ARTIFACT)
    if artifact is not None and named is not None and named != artifact:
        return REASON_COMPRESSION_FAILED, f"the compression result names artifact {named!r}, not {artifact!r}"
    return None


def _perplexity_summary(result: Mapping[str, Any]) -> str:
    """A language model's gate in a line: the method chosen, perplexity before and after and
    the token agreement (the whole table is in status.compression)."""
    gate = result.get(contract.RESULT_GATE)
    if not isinstance(gate, Mapping) or gate.get("type") != contract.EVALUATION_PERPLEXITY:
        return ""
    before, after = gate.get("before") or {}, gate.get("after") or {}
    return (f"; {result.get(contract.RESULT_METHOD)}: perplexity {before.get('perplexity')} -> "
            f"{after.get('perplexity')}, token agreement {gate.get('agreement')}")


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
    """All pods of a Deployment of at least ``want`` are updated and ready (never while they
    crash): one still larger than ``want`` (an autoscaler scaling it down) is ready when all
    its pods are."""
    return (view is not None and view.current and view.replicas >= want
            and view.ready >= view.replicas and view.updated >= view.replicas)


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
    # What goes out (``core.execute``), and what the loop keeps of it:
    actions: list[Action] = dataclasses.field(default_factory=list)
    applied: "Applied | None" = None
    policies_applied: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict)
    autoscaler: autoscale.AutoscalerMemory = dataclasses.field(default_factory=autoscale.AutoscalerMemory)
    tick: autoscale.Tick | None = None

    @property
    def effects(self) -> Effects:
        return Effects(self.status, self.actions, self.events)

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

    def settle(self, phase: str, reason: str, message: str, ready: bool = False, stalled: bool = False,
               settled: bool = False) -> None:
        self.status["phase"] = phase
        self.outcome = Outcome(phase, reason, message, ready=ready, stalled=stalled, settled=settled)

    def requeue(self, seconds: float) -> None:
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


_CANARY_KEYS = ("canary", "canaryStep", "canaryWeight", "stepStartTime", "stepReadyTime", "pausedReason",
                "pausedMessage", "stepRequests", "stepRequestsSince")


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


def _records(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in status.get("analysis") or ()}


def _next_measurement(check, record: Mapping[str, Any] | None, ready_at: float) -> float | None:
    """When ``check`` is measured next (None: it has its ``count`` Successful measurements)."""
    if record is None:
        return ready_at
    if record.get("successful", 0) >= check.count:
        return None
    last = st.parse_time(record.get("lastTime"))
    return (last.timestamp() if last else ready_at) + check.interval_seconds


def analysis_due(spec: ModelSpec, status: Mapping[str, Any], revision: str | None, now: float) -> list:
    """The analysis checks of the canary ``revision`` whose next measurement is due now
    (its step's pods are ready, its pause is over, and it is not paused for a person)."""
    revs = status.get("revisions") or {}
    if (not spec.rollout.analysis or not _steps(spec) or revision is None or revs.get("canary") != revision
            or not revs.get("stepReadyTime") or revs.get("pausedReason") or _pause_left(spec, revs, now) > 0):
        return []
    ready_at = st.parse_time(revs["stepReadyTime"]).timestamp() + _steps(spec)[revs.get("canaryStep", 0)].pause_seconds
    records = _records(status)
    return [c for c in spec.rollout.analysis
            if (due := _next_measurement(c, records.get(c.name), ready_at)) is not None and due <= now]


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
    namespace: str = ""
    decision: str | None = None         # a person's "resume" or "abort" of a paused rollout
    traffic: float | None = None        # requests the canary served in this step (minRequests)
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
    """No source yet: Pending, or Failed when it will never come. With a revision already
    serving, a missing or failed source stops nothing: SourceAvailable=False says so and
    the serving revision's health decides Ready."""
    p, stable, source = m.plan, m.stable, m.source
    if m.revision is not None:
        p.conditions.append((COND_SOURCE_AVAILABLE, TRUE, REASON_SOURCE_AVAILABLE, f"source {source.uri}"))
        return
    p.conditions.append((COND_SOURCE_AVAILABLE, FALSE, source.reason or REASON_WAITING_FOR_SOURCE,
                         source.message + (f"; revision {stable} keeps serving" if stable else "")))
    p.requeue(5)
    if stable:
        return
    m.busy = True
    p.settle(MPHASE_FAILED if source.stalled else MPHASE_PENDING, source.reason or REASON_WAITING_FOR_SOURCE,
             source.message, stalled=source.stalled)


def _method(m: _Model) -> str:
    """The compression method of the revision being rolled out (``auto``: the one chosen)."""
    chosen = (m.plan.status.get("compression") or {}).get(contract.RESULT_METHOD)
    return chosen if m.spec.compression.runs_job and chosen else m.spec.compression.method


def _is_new(m: _Model) -> bool:
    return m.revision is not None and m.revision != m.stable and m.revision != m.revs.get("failed")


def _compressing(m: _Model, comp: CompressionState | None) -> None:
    """The revision's compression Job runs (or waits for its pod): say so, with the
    program's last progress record in the message and in ``status.compression.progress``."""
    p, revision = m.plan, m.revision
    m.busy = True
    reason = REASON_COMPRESSION_POD_PENDING if comp is not None and comp.pending else REASON_COMPRESSING
    detail = (f": {comp.pending}" if comp is not None and comp.pending
              else f": {progress.describe(comp.progress)}" if comp is not None and comp.progress else "")
    p.settle(MPHASE_COMPRESSING, reason, f"compressing revision {revision} ({m.spec.compression.method}){detail}")
    p.conditions.append((COND_COMPRESSED, FALSE, reason, p.message))
    if comp is not None and comp.progress:
        p.status["compression"] = {"revision": revision, "state": "Running", "progress": dict(comp.progress)}
    p.requeue(2)


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
        _compressing(m, comp)
        return None
    result = dict(comp.result or {})
    rejected = verdict(comp, objects.artifact_in_container(target))
    if rejected:
        reason, message = rejected
        message += (f"; revision {revision} is not rolled out"
                    + (f", revision {m.stable} keeps serving" if m.stable else ""))
        p.status["compression"] = {**result, "revision": revision, "state": "Failed"}
        p.conditions.append((COND_COMPRESSED, FALSE, reason, message))
        _fail_revision(m, reason, message)
        return None
    known = p.status.get("compression") or {}
    if (known.get("revision"), known.get("state")) != (revision, "Succeeded"):
        p.events.append((EVENT_NORMAL, REASON_COMPRESSED, f"revision {revision} compressed: "
                         + ", ".join(f"{k}={v}" for k, v in sorted(result.items()) if isinstance(v, (int, float)))
                         + _perplexity_summary(result)))
    p.status["compression"] = {**result, "revision": revision, "state": "Succeeded"}
    p.conditions.append((COND_COMPRESSED, TRUE, REASON_COMPRESSED, f"revision {revision} compressed"))
    return target


def roll_out(m: _Model, target: PvcPath | None) -> None:
    """Deploy the first revision outright; roll a later one out next to the stable one."""
    if target is None or m.busy or not _is_new(m):
        return
    m.plan.model_dirs[m.revision] = target
    if not m.stable:
        m.revs.update(stable=m.revision, stableURI=target.uri, stableMethod=_method(m))
        m.plan.events.append((EVENT_NORMAL, REASON_DEPLOYING, f"deploying revision {m.revision}"))
        return
    m.busy = canary(m, target)


def abandon_canary(m: _Model) -> None:
    """The spec is back at the stable revision: drop the canary in flight."""
    if m.revision is not None and m.revision == m.stable and m.revs.get("canary"):
        m.plan.events.append((EVENT_NORMAL, REASON_ROLLED_BACK,
                              f"canary {m.revs['canary']} abandoned: the spec is back at revision {m.stable}"))
        _drop_canary(m.revs)


def _retire(m: _Model) -> None:
    """The revision a promotion replaced serves on with the pods it has until every pod of
    the new stable revision is ready; then it goes (so a promotion never drops ready
    capacity below what the old stable had)."""
    p, retiring, stable = m.plan, m.revs.get("retiring"), m.stable
    if not retiring:
        return
    if retiring == stable:
        m.revs.pop("retiring")
        return
    if retiring not in m.deployments:                 # nothing left to retire
        m.revs.pop("retiring")
        p.replicas.pop(retiring, None)
        return
    if is_ready(m.deployments.get(stable), p.replicas.get(stable, m.total)):
        m.revs.pop("retiring")
        p.replicas.pop(retiring, None)
        p.events.append((EVENT_NORMAL, REASON_PROMOTED, f"revision {retiring} retired: every pod of "
                                                        f"revision {stable} is ready"))
        return
    # (never more pods than the stable revision is asked for: an autoscaler may lower it meanwhile)
    p.replicas.setdefault(retiring, min(m.deployments[retiring].replicas, max(m.total, 1)))
    p.requeue(1)


def clean_up(m: _Model) -> None:
    """The stable revision runs ``total``; a failed one is held at zero; others go."""
    p, stable, canary_rev, failed = m.plan, m.stable, m.revs.get("canary"), m.revs.get("failed")
    if stable and stable not in p.replicas:
        p.replicas[stable] = m.total
    if failed and failed in m.deployments:
        p.replicas.setdefault(failed, 0)
    _retire(m)
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
            _not_ready(m, f"{view.ready if view else 0}/{want} serving pods of revision {stable} are ready")
    if p.status.get("phase") != MPHASE_DEGRADED or p.reason != REASON_PODS_NOT_READY:
        p.status.pop("degradedSince", None)
    p.status["replicas"] = sum(v.ready for v in m.deployments.values())


def _not_ready(m: _Model, message: str) -> None:
    """Serving pods not ready. Before the revision was ever Ready: Deploying. After: Degraded,
    in progress (pods restart, a node goes) until ``rollout.progressDeadlineSeconds`` have
    passed since it stopped being Ready, then stalled: Argo CD and kstatus agree on both
    (Progressing / InProgress, then Degraded / Failed), as they do for a Deployment."""
    p = m.plan
    if m.prev_phase not in (MPHASE_READY, MPHASE_DEGRADED):
        p.settle(MPHASE_DEPLOYING, REASON_PODS_NOT_READY, message)
        p.requeue(2)
        return
    since = p.status.setdefault("degradedSince", _iso(m.now))
    deadline = m.spec.rollout.progress_deadline_seconds
    left = deadline - _since(since, m.now)
    if left > 0:
        p.settle(MPHASE_DEGRADED, REASON_PODS_NOT_READY, f"{message} (not ready since {since})")
        p.requeue(min(2.0, left))
    else:
        p.settle(MPHASE_DEGRADED, REASON_PODS_NOT_READY,
                 f"{message}, not ready since {since}: more than rollout.progressDeadlineSeconds={deadline}",
                 stalled=True)
        p.requeue(2)


def revisions(spec: ModelSpec, name: str, prev: Mapping[str, Any], source: SourceState, revision: str | None,
         comp: CompressionState | None, total: int, deployments: Mapping[str, DeploymentView], now: float,
         analysis: list | None = None, hold_stable: bool = False, decision: str | None = None,
         traffic: float | None = None, namespace: str = "") -> Plan:
    """Decide replicas per revision and the status. ``analysis``: (check, QueryResult)
    pairs measured now for the checks ``analysis_due`` named. ``hold_stable``: an HPA owns
    the stable size, so a canary is added next to it instead of taking replicas from it.
    ``decision``: "resume" or "abort" from a person, for a paused rollout. ``traffic``:
    requests the canary served in its step, when ``rollout.minRequests`` asks."""
    status = copy.deepcopy(dict(prev))      # the steps edit it; the last written status stays as it was
    revs = status.setdefault("revisions", {})
    p = Plan(status)
    if revs.get("stable") and revs.get("stableURI"):
        p.model_dirs[revs["stable"]] = parse_uri(revs["stableURI"])
    if source.uri:
        status["sourceURI"] = source.uri
    m = _Model(spec, name, p, revs, source, revision, comp, total, deployments, now, analysis, hold_stable,
               prev_phase=prev.get("phase"), namespace=namespace, decision=decision, traffic=traffic)
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
        m.plan.status.pop("analysis", None)      # the last rollout's records judge nothing here
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
    """The canary becomes stable at full size; the old stable keeps the pods it has until
    every pod of the new one is ready (``clean_up``): surge first, retire after."""
    stable = m.stable
    _drop_canary(m.revs)
    m.revs.update(stable=m.revision, stableURI=target.uri, stableMethod=_method(m), retiring=stable)
    old = m.deployments.get(stable)
    kept = old.replicas if old is not None else m.plan.replicas.get(stable, 0)
    m.plan.replicas[stable] = min(kept, max(m.total, 1))     # (an autoscaler may have lowered the total)
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


def _json_number(v: float | None) -> float | str | None:
    """A value as status can hold it: JSON has no infinity, so ±Inf is written as a string."""
    if v is None or math.isfinite(v):
        return v
    return "+Inf" if v > 0 else "-Inf"


def _show(v: float | str | None) -> str:
    return "no value" if v is None else v if isinstance(v, str) else f"{v:g}"


def _measure(m: _Model) -> dict[str, dict[str, Any]]:
    """Fold this reconcile's measurements into the step's records in ``status.analysis``."""
    records = _records(m.plan.status)
    for check, result in m.analysis or ():
        verdict_, value = check.judge(result)
        r = records.setdefault(check.name, {"name": check.name, "threshold": check.bound_text(),
                                            "successful": 0, "failed": 0, "inconclusive": 0, "errors": 0,
                                            "consecutiveErrors": 0})
        key = {SUCCESSFUL: "successful", FAILED: "failed", INCONCLUSIVE: "inconclusive", ERROR: "errors"}[verdict_]
        r[key] += 1
        r["consecutiveErrors"] = r["consecutiveErrors"] + 1 if verdict_ == ERROR else 0
        r.update(query=result.query, verdict=verdict_, value=_json_number(value), lastTime=_iso(m.now),
                 passed=r["successful"] >= check.count)
        if result.error and verdict_ != SUCCESSFUL:
            r["error"] = result.error
        else:
            r.pop("error", None)
    m.plan.status["analysis"] = [records[c.name] for c in m.spec.rollout.analysis if c.name in records]
    return records


def _end(m: _Model, step: _Step, reason: str, message: str) -> bool:
    """A rollout that cannot get a verdict ends as ``rollout.onInconclusive`` says: rolled
    back, or paused for a person with the commands that resume or abort it."""
    if m.spec.rollout.on_inconclusive == "rollback":
        return _roll_back(m, reason, f"canary {m.revision} rolled back at {step.where}: {message}")
    ns = f" -n {m.namespace}" if m.namespace else ""
    text = (f"canary {m.revision} paused at {step.where}: {message}; waiting for a person: "
            f"kubectl annotate --overwrite lm/{m.name}{ns} {ANNOTATION_RESUME}={m.revision} to count the step "
            f"as passed, or {ANNOTATION_ABORT}={m.revision} to roll back")
    m.revs.update(pausedReason=reason, pausedMessage=text)
    m.plan.events.append((EVENT_WARNING, reason, text))
    m.plan.settle(MPHASE_PAUSED, reason, text, settled=True)
    return True


def _served(m: _Model) -> int:
    """Requests the canary served in its step, whole and never fewer than shown before in
    the same step (Prometheus's ``increase`` extrapolates, and moves both ways); kept in
    ``revisions.stepRequests``."""
    revs = m.revs
    served = math.floor(m.traffic or 0)
    if revs.get("stepRequestsSince") == revs.get("stepReadyTime"):
        served = max(served, int(revs.get("stepRequests") or 0))
    revs.update(stepRequests=served, stepRequestsSince=revs.get("stepReadyTime"))
    return served


def _judge(m: _Model, step: _Step) -> bool | None:
    """The analysis verdict for this step: ended (rolled back or paused: the return of
    ``_end`` / ``_roll_back``), waiting (True), or passed (None)."""
    p, revision, spec = m.plan, m.revision, m.spec
    if spec.rollout.min_requests and _served(m) < spec.rollout.min_requests:
        p.settle(MPHASE_PROGRESSING, REASON_WAITING_FOR_TRAFFIC,
                 f"canary {revision} at {step.where}: {_served(m)} of {spec.rollout.min_requests} requests "
                 "served; its analysis waits for that much traffic")
        p.requeue(2)
        return True
    records = _measure(m)
    for c in spec.rollout.analysis:
        r = records.get(c.name)
        if r is None:
            continue
        value = _show(r.get("value"))
        if r["failed"] > c.failure_limit:
            return _roll_back(m, REASON_ANALYSIS_FAILED,
                              f"canary {revision} rolled back at {step.where}: analysis {c.name!r} = {value}, "
                              f"must be {c.bound_text()} (query: {r['query']}; {r['failed']} failed "
                              f"measurement(s), failureLimit {c.failure_limit})")
        if r["consecutiveErrors"] > c.consecutive_error_limit:
            return _end(m, step, REASON_ANALYSIS_ERROR,
                        f"analysis {c.name!r} failed {r['consecutiveErrors']} times in a row "
                        f"(consecutiveErrorLimit {c.consecutive_error_limit}): {r.get('error')}")
        if r["inconclusive"] > c.inconclusive_limit:
            return _end(m, step, REASON_ANALYSIS_INCONCLUSIVE,
                        f"analysis {c.name!r} had no value {r['inconclusive']} times "
                        f"(inconclusiveLimit {c.inconclusive_limit}): {r.get('error')}")
    if all(records.get(c.name, {}).get("passed") for c in spec.rollout.analysis):
        return None
    waiting = [(c, records.get(c.name)) for c in spec.rollout.analysis if not records.get(c.name, {}).get("passed")]
    c, r = waiting[0]
    if r is not None and r.get("verdict") in (INCONCLUSIVE, ERROR):
        p.settle(MPHASE_PROGRESSING, REASON_ANALYSIS_NO_DATA,
                 f"canary {revision} at {step.where}: analysis {c.name!r} has no data ({r.get('error')}); "
                 f"measuring again in {c.interval_seconds}s")
    else:
        done = r["successful"] if r else 0
        p.settle(MPHASE_PROGRESSING, REASON_CANARY_STEP,
                 f"canary {revision} at {step.where}: analysing ({done}/{c.count} measurements of {c.name!r})")
    ready_at = st.parse_time(m.revs["stepReadyTime"]).timestamp() + _steps(spec)[step.index].pause_seconds
    nxt = [t for c, r in waiting if (t := _next_measurement(c, r, ready_at)) is not None]
    p.requeue(max(min(nxt) - m.now, 0.05) if nxt else 1)
    if m.analysis is None:
        p.analyze = revision
    return True


def _paused(m: _Model, step: _Step) -> bool | None:
    """A rollout paused for a person: a resume counts the step as passed (None), an abort
    rolls back; otherwise it stays paused, with no deadline: a person decides."""
    if not m.revs.get("pausedReason"):
        return None
    if m.decision == "abort":
        return _roll_back(m, REASON_ABORTED, f"canary {m.revision} rolled back at {step.where}: aborted by "
                                             f"{ANNOTATION_ABORT}={m.revision}")
    if m.decision == "resume":
        m.revs.pop("pausedReason", None)
        m.revs.pop("pausedMessage", None)
        m.plan.events.append((EVENT_NORMAL, REASON_RESUMED_BY_PERSON,
                              f"canary {m.revision} resumed at {step.where} by {ANNOTATION_RESUME}={m.revision}"))
        return None
    m.plan.settle(MPHASE_PAUSED, m.revs["pausedReason"], m.revs.get("pausedMessage", ""), settled=True)
    return True


def canary(m: _Model, target: PvcPath) -> bool:
    """Advance the rollout of the new revision next to the stable one; True while it is in
    progress. Steps: start, a person's decision on a paused step, the step's deadline,
    wait for the canary's pods, pause, judge the analysis, then the next step or
    promotion. ``progressDeadlineSeconds`` (plus the step's pause) bounds the whole step,
    analysis included."""
    p, spec, revision, revs = m.plan, m.spec, m.revision, m.revs
    steps = _steps(spec)
    step = _start(m)
    p.replicas[m.stable], p.replicas[revision] = step.stable_n, step.canary_n
    p.model_dirs[revision] = target
    person = _paused(m, step)
    if person is not None:
        return person
    resumed = m.decision == "resume" and not revs.get("pausedReason") and revs.get("stepReadyTime")
    pods_ready = is_ready(m.deployments.get(revision), step.canary_n)
    limit = spec.rollout.progress_deadline_seconds + (steps[step.index].pause_seconds if steps else 0)
    if not resumed and _since(revs.get("stepStartTime"), m.now) > limit:
        if not pods_ready:
            view = m.deployments.get(revision)
            return _roll_back(m, REASON_PODS_NOT_READY,
                              f"canary {revision} rolled back at {step.where}: {view.ready if view else 0}/"
                              f"{step.canary_n} pods ready after {spec.rollout.progress_deadline_seconds}s")
        return _end(m, step, REASON_PROGRESS_DEADLINE,
                    f"no verdict within progressDeadlineSeconds={spec.rollout.progress_deadline_seconds}"
                    + (f" (plus the {steps[step.index].pause_seconds}s pause)" if steps and steps[step.index].pause_seconds else ""))
    if not pods_ready:
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
    if spec.rollout.analysis and not resumed:
        judged = _judge(m, step)
        if judged is not None:
            return judged
    if step.index + 1 < len(steps):
        nxt = steps[step.index + 1].weight
        revs.update(canaryStep=step.index + 1, canaryWeight=nxt, stepStartTime=_iso(m.now))
        revs.pop("stepReadyTime", None)
        p.status.pop("analysis", None)
        p.events.append((EVENT_NORMAL, REASON_CANARY_STEP,
                         f"canary {revision} passed {step.where}; step {step.index + 2}/{len(steps)}, weight {nxt}%"))
        s_n, c_n = split(m.total, nxt)
        p.replicas[m.stable], p.replicas[revision] = (m.total if m.hold_stable else s_n), c_n
        p.settle(MPHASE_PROGRESSING, REASON_CANARY_STEP, f"canary {revision} at step {step.index + 2}/{len(steps)}")
        p.requeue(0.5)
        return True
    return _promote(m, target)


# --- the observation a plan is made from ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Applied:
    """What the loop has applied and need not apply again while it stands."""
    deployment: tuple | None = None     # (generation, revision) whose Deployment template was applied
    service: int | None = None          # generation the Service was applied for
    route: tuple | None = None          # (generation, backends) of the last applied HTTPRoute
    revision_services: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class ModelObserved:
    """Everything one plan reads; ``model.observe.observe`` builds it (a test, directly).

    ``deployments``: the serving Deployments by revision (the index's fields); ``comp``:
    the compression outcome of ``revision`` when it needs one, with ``create_compression``
    when its Job must be created; ``analysis``: (check, QueryResult) pairs measured now for
    the checks ``analysis_due`` named; ``traffic``: requests the canary served in its step,
    when ``rollout.minRequests`` asks; ``decision``: "resume" or "abort" from a person, for
    a paused rollout; ``sample``: the builtin autoscaler's metric, when its tick is due;
    ``gateway``: the cluster serves HTTPRoutes; ``policies``: the model's NetworkPolicies
    the index shows (name -> spec hash; None: not known, nothing is applied)."""
    meta: Mapping[str, Any]
    status: Mapping[str, Any]
    source: SourceState
    revision: str | None = None
    comp: CompressionState | None = None
    create_compression: bool = False
    compression_jobs: tuple[tuple[str, str], ...] = ()    # (name, revision) of each compression Job
    deployments: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    now: float = 0.0
    monotonic: float = 0.0
    analysis: list | None = None
    traffic: float | None = None
    decision: str | None = None
    sample: prometheus.QueryResult | None = None
    autoscaler: autoscale.AutoscalerMemory = dataclasses.field(default_factory=autoscale.AutoscalerMemory)
    gateway: bool = False
    applied: Applied = dataclasses.field(default_factory=Applied)
    policies: Mapping[str, str] | None = None
    policies_applied: Mapping[str, tuple[str, float]] = dataclasses.field(default_factory=dict)
    prometheus_url: str = ""


# --- the plan ---------------------------------------------------------------------------

def plan(spec: ModelSpec, observed: ModelObserved) -> Plan:
    """The whole next step of a model: its size, revisions, status, events and writes."""
    status = copy.deepcopy(dict(observed.status))
    total, tick = _size(spec, observed, status)
    meta = observed.meta
    views = {r: deployment_view(d) for r, d in observed.deployments.items()}
    p = revisions(spec, meta["name"], status, observed.source, observed.revision, observed.comp, total, views,
                  observed.now, analysis=observed.analysis, hold_stable=_hpa_owned(spec),
                  decision=observed.decision, traffic=observed.traffic, namespace=meta["namespace"])
    p.autoscaler, p.tick = (tick.memory if tick else _autoscaler(spec, observed)), tick
    if tick is not None:
        p.events[:0] = tick.events
    if spec.autoscaling is not None and spec.autoscaling.engine == "builtin":
        p.requeue(autoscale.delay(spec.autoscaling, p.autoscaler, observed.monotonic))
    owner = objects.owner(meta)
    if observed.create_compression:
        src = parse_uri(observed.source.uri)
        p.actions.append(Action.create(objects.compression_job(
            owner, spec, observed.revision, src, artifact_path(src, meta["name"], observed.revision))))
    _delete_superseded(observed, p)
    _serving_writes(spec, observed, owner, p)
    _report(spec, observed, p, total)
    return p


def _delete_superseded(observed: ModelObserved, p: Plan) -> None:
    """Delete the compression Jobs of revisions the spec no longer asks for (a Job still
    pending or running would write an artifact nobody uses); the stable revision's Job
    stays, as the record of how it was made."""
    if observed.revision is None:
        return
    keep = {observed.revision, p.status["revisions"].get("stable")}
    namespace = observed.meta["namespace"]
    for name, revision in observed.compression_jobs:
        if revision not in keep:
            p.actions.append(Action.delete("batch/v1", "Job", name, namespace))
            p.events.append((EVENT_NORMAL, "CompressionSuperseded",
                             f"deleted compression Job {name}: revision {revision} is no longer asked for"))


def _hpa_owned(spec: ModelSpec) -> bool:
    return spec.autoscaling is not None and spec.autoscaling.engine != "builtin"


def _autoscaler(spec: ModelSpec, observed: ModelObserved) -> autoscale.AutoscalerMemory:
    if spec.autoscaling is None or spec.autoscaling.engine != "builtin":
        return observed.autoscaler
    return autoscale.start(spec, observed.autoscaler, observed.status)


def _size(spec: ModelSpec, observed: ModelObserved, status: dict[str, Any]) -> tuple[int, autoscale.Tick | None]:
    """(total replicas, the builtin autoscaler's tick): static, the builtin autoscaler's
    (its fields join ``status``), or the HPA's (read from the stable Deployment)."""
    a = spec.autoscaling
    if a is None:
        return spec.serving.replicas, None
    if a.engine == "builtin":
        memory = autoscale.start(spec, observed.autoscaler, observed.status)
        if observed.sample is None:
            return memory.total, None
        tick = autoscale.decide(spec, memory, status, observed.sample, observed.monotonic)
        status["autoscaling"] = tick.status
        return tick.memory.total, tick
    stable = observed.deployments.get((status.get("revisions") or {}).get("stable"))
    return (stable or {}).get("spec", {}).get("replicas") or spec.floor, None


def _serving_writes(spec: ModelSpec, observed: ModelObserved, owner: Mapping[str, Any], p: Plan) -> None:
    """Service, Deployments (created with replicas, then replicas by patch), cleanup, the
    HTTPRoute, the HPA or ScaledObject, the NetworkPolicies; what they leave applied."""
    meta, applied = observed.meta, observed.applied
    namespace, name, generation = meta["namespace"], meta["name"], meta.get("generation")
    if applied.service != generation:
        p.actions.append(Action.apply(objects.service(owner, spec)))
        applied = dataclasses.replace(applied, service=generation)
    applied = _deployment_writes(spec, observed, owner, p, applied)
    for rev in p.delete:
        if rev in observed.deployments:
            # and its Gateway API backend Service, if one was made
            p.actions.append(Action.delete("apps/v1", "Deployment", objects.deployment_name(name, rev), namespace,
                                           then=(Action.delete("v1", "Service", objects.deployment_name(name, rev),
                                                               namespace),)))
        applied = dataclasses.replace(applied, revision_services=applied.revision_services - {rev})
    p.applied = _route(spec, observed, owner, p, applied)
    revs, a = p.status["revisions"], spec.autoscaling
    if _hpa_owned(spec) and revs.get("stable"):
        target = objects.deployment_name(name, revs["stable"])
        obj = (objects.hpa(owner, a, target, spec.floor) if a.engine == "hpa"
               else objects.scaled_object(owner, a, target, observed.prometheus_url, spec.floor,
                                           spec.serving.runtime_metrics))
        p.actions.append(Action.apply(obj, missing_api=obj["apiVersion"]))
    p.policies_applied = dict(observed.policies_applied)
    if observed.policies is not None:
        to_apply, to_delete = policy_changes(objects.network_policies(owner, spec), observed.policies,
                                             p.policies_applied, observed.monotonic)
        p.actions += [Action.apply(o) for o in to_apply]
        p.actions += [Action.delete("networking.k8s.io/v1", "NetworkPolicy", n, namespace) for n in to_delete]


def _deployment_writes(spec: ModelSpec, observed: ModelObserved, owner: Mapping[str, Any], p: Plan,
                       applied: Applied) -> Applied:
    """Create each revision's Deployment with its replicas; apply the wanted revision's
    template once per generation; patch replicas that differ (not the stable one an HPA
    owns)."""
    meta, revs = observed.meta, p.status["revisions"]
    generation = meta.get("generation")
    for rev, replicas in p.replicas.items():
        current = observed.deployments.get(rev)
        if current is None:
            if replicas > 0 and rev in p.model_dirs:
                p.actions.append(Action.create(objects.deployment(owner, spec, rev, p.model_dirs[rev], replicas)))
                applied = dataclasses.replace(applied, deployment=(generation, rev))
            continue
        if rev == observed.revision and applied.deployment != (generation, rev) and rev in p.model_dirs:
            p.actions.append(Action.apply(objects.deployment(owner, spec, rev, p.model_dirs[rev], None)))
            applied = dataclasses.replace(applied, deployment=(generation, rev))
        if _hpa_owned(spec) and rev == revs.get("stable") and not revs.get("canary"):
            continue     # the HPA / ScaledObject owns the stable Deployment's replicas
        if current["spec"].get("replicas") != replicas:
            p.actions.append(Action.patch("apps/v1", "Deployment", current["metadata"]["name"], meta["namespace"],
                                          {"spec": {"replicas": replicas}}))
    return applied


def _route(spec: ModelSpec, observed: ModelObserved, owner: Mapping[str, Any], p: Plan,
           applied: Applied) -> Applied:
    """Weight stable and canary exactly with an HTTPRoute where the Gateway API exists."""
    revs = p.status["revisions"]
    stable = revs.get("stable")
    if not stable or not observed.gateway:
        return applied
    backends = [(stable, 100)]
    if revs.get("canary"):
        weight = int(revs.get("canaryWeight", 0))
        backends = [(stable, 100 - weight), (revs["canary"], weight)]
    for rev, _ in backends:
        if rev not in applied.revision_services:
            p.actions.append(Action.apply(objects.revision_service(owner, rev, spec)))
            applied = dataclasses.replace(applied, revision_services=applied.revision_services | {rev})
    generation = observed.meta.get("generation")
    if applied.route != (generation, backends):
        p.actions.append(Action.apply(objects.http_route(owner, backends)))
        applied = dataclasses.replace(applied, route=(generation, backends))
    return applied


def _report(spec: ModelSpec, observed: ModelObserved, p: Plan, total: int) -> None:
    """The status to write: the plan's, with the outcome, its conditions and the serving facts."""
    new, meta = p.status, observed.meta
    generation = meta.get("generation")
    st.apply_outcome(new, p.outcome, generation)
    new["url"] = objects.url(meta["name"], meta["namespace"])
    new["desiredReplicas"] = total
    new["trafficRouting"] = "HTTPRoute" if observed.gateway and new["revisions"].get("stable") else "ReplicaRatio"
    a = spec.autoscaling
    if a is not None:
        new["autoscaling"] = {**(new.get("autoscaling") or {}), "floor": spec.floor,
                              "floorFrom": "spec.serving.replicas" if spec.floor > a.min_replicas
                              else "autoscaling.minReplicas"}
    for cond_type, status_, reason, message in p.conditions:
        new["conditions"] = st.set_condition(new["conditions"], cond_type, status_, reason, message,
                                             observed_generation=generation)
    if a is not None and a.engine == "builtin" and p.autoscaler.condition:
        new["conditions"] = st.set_condition(new["conditions"], *p.autoscaler.condition,
                                             observed_generation=generation)
