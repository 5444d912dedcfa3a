"""Status: conditions, kstatus health, the one status writer and the one event path.

kstatus (sigs.k8s.io/cli-utils) reads ``Reconciling`` and ``Stalled`` as
"abnormal-true" conditions: present and True only while work is in progress or
stuck. ``Ready`` is the "normal-true" summary that Argo CD and Flux health checks
read. ``set_health`` keeps the three consistent; ``set_condition`` moves
``lastTransitionTime`` only when a condition's status changes.

Both planners return an ``Outcome`` (phase, ready, stalled, reason, message);
``apply_outcome`` turns it into ``.status`` fields and conditions. ``write`` is the
only way a reconcile patches ``.status``: a JSON merge patch of what changed since
the status it last wrote, and nothing when nothing changed. ``report_invalid`` is the
one path for a spec that no retry will fix. Everything above ``write`` is pure.

Every write also sets ``status.reconciledAt`` (``RECONCILED_AT``, the RECONCILED printer
column), and a reconcile that finds it older than ``LEPTON_STATUS_HEARTBEAT_SECONDS``
refreshes it even when nothing else changed: the one write a steady object costs per
heartbeat, none in between. A status whose ``reconciledAt`` is older than that was left
behind by an operator that no longer reconciles it (stopped, evicted and not yet back).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import logging
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .. import config
from ..constants import (API_VERSION, COND_READY, COND_RECONCILING, COND_STALLED, EVENT_WARNING, FALSE,
                         PROGRESS_REASONS, REASON_INVALID_SPEC, TRUE)
from . import kube

if TYPE_CHECKING:
    from .loop import Memory

Condition = dict[str, Any]
RECONCILED_AT = "reconciledAt"     # when an operator last wrote or confirmed the status


def now_iso(now: _dt.datetime | None = None) -> str:
    """RFC 3339 UTC timestamp with second precision (the Kubernetes ``Time`` format)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> _dt.datetime | None:
    """Parse a Kubernetes ``Time`` string; None stays None."""
    if not value:
        return None
    return _dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.timezone.utc)


def get_condition(conditions: Iterable[Condition] | None, type_: str) -> Condition | None:
    """The condition of ``type_``, or None."""
    return next((c for c in conditions or () if c.get("type") == type_), None)


def set_condition(conditions: Iterable[Condition] | None, type_: str, status: str, reason: str,
                  message: str = "", observed_generation: int | None = None,
                  now: str | None = None) -> list[Condition]:
    """Return a new condition list with ``type_`` set.

    ``lastTransitionTime`` is kept when the status is unchanged, so a reconcile
    that only refreshes reason or message does not look like a transition.
    """
    if status not in (TRUE, FALSE, "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, got {status!r}")
    old = get_condition(conditions, type_)
    changed = old is None or old.get("status") != status
    new: Condition = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": (now or now_iso()) if changed else old.get("lastTransitionTime"),
    }
    if observed_generation is not None:
        new["observedGeneration"] = observed_generation
    out = [dict(c) for c in conditions or () if c.get("type") != type_]
    out.append(new)
    return sorted(out, key=lambda c: c["type"])


def set_health(conditions: Iterable[Condition] | None, *, ready: bool, reason: str,
               message: str = "", stalled: bool = False, settled: bool = False,
               observed_generation: int | None = None, now: str | None = None) -> list[Condition]:
    """Set Ready, Reconciling and Stalled together, the way kstatus expects.

    - ``ready=True``: Ready=True, Reconciling=False, Stalled=False (kstatus: Current).
    - ``ready=False``: Ready=False and Reconciling=True (kstatus: InProgress).
    - ``stalled=True``: Ready=False, Reconciling=False, Stalled=True (kstatus: Failed);
      used for invalid specs and terminal failures that no retry will fix.
    - ``settled=True`` (with ``ready=False``): Ready=False and nothing in progress, for a
      state that is neither ready nor stuck, such as a suspended job (Argo CD's health
      check: Suspended; kstatus has no such state and reads Ready=False as InProgress).
    """
    if ready and stalled:
        raise ValueError("a resource cannot be both ready and stalled")
    kw = dict(observed_generation=observed_generation, now=now)
    conds = set_condition(conditions, COND_READY, TRUE if ready else FALSE, reason, message, **kw)
    reconciling = not ready and not stalled and not settled
    conds = set_condition(conds, COND_RECONCILING, TRUE if reconciling else FALSE, reason,
                          message if reconciling else "", **kw)
    return set_condition(conds, COND_STALLED, TRUE if stalled else FALSE, reason,
                         message if stalled else "", **kw)


def merge_patch(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``: changed keys,
    objects diffed key by key, None for removed keys; empty when nothing changed."""
    old = old or {}
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if before == value and key in old:
            continue
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            patch[key] = merge_patch(before, value)
        else:
            patch[key] = value
    patch.update({k: None for k in old if k not in new})
    return patch


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a planner concluded, in the one shape both resources report."""
    phase: str
    reason: str
    message: str = ""
    ready: bool = False
    stalled: bool = False
    settled: bool = False     # not ready, but nothing is in progress (see ``set_health``)


def apply_outcome(status: dict[str, Any], outcome: Outcome, generation: int | None,
                  now: str | None = None) -> dict[str, Any]:
    """Write ``outcome`` into ``status`` (phase, health conditions, observedGeneration)."""
    status["phase"] = outcome.phase
    status["conditions"] = set_health(status.get("conditions"), ready=outcome.ready, reason=outcome.reason,
                                      message=outcome.message, stalled=outcome.stalled,
                                      settled=outcome.settled, observed_generation=generation, now=now)
    status["observedGeneration"] = generation
    return status


# Conditions whose False means something the user should hear about (with Ready).
_WATCHED = (COND_READY, "SourceAvailable", "MetricsAvailable", "Compressed")


def transition_events(old: Iterable[Condition] | None, new: Iterable[Condition]) -> list["Event"]:
    """An event for each watched condition whose status or reason changed: every wait and
    every decision shows once, when it starts, not on every reconcile. Ready turning
    False while Stalled, or another condition turning False, is a Warning, unless its
    reason is progress (``PROGRESS_REASONS``: compressing, waiting for the source job)."""
    events: list[Event] = []
    stalled = (get_condition(new, COND_STALLED) or {}).get("status") == TRUE
    for type_ in _WATCHED:
        now, before = get_condition(new, type_), get_condition(old, type_) or {}
        if now is None or (now.get("status"), now.get("reason")) == (before.get("status"), before.get("reason")):
            continue
        bad = (now.get("status") == FALSE and (type_ != COND_READY or stalled)
               and now.get("reason") not in PROGRESS_REASONS)
        events.append((EVENT_WARNING if bad else "Normal", now.get("reason", type_),
                       f"{type_}={now.get('status')}: {now.get('message', '')}"))
    return events


# --- I/O: the status writer, events, invalid specs ------------------------------------------

Event = tuple[str, str, str]     # (type, reason, message)


def heartbeat_due_in(status: Mapping[str, Any], heartbeat: float, now: _dt.datetime | None = None) -> float:
    """Seconds until ``status.reconciledAt`` is ``heartbeat`` seconds old (0 or less: due;
    a status without it, or with one that does not parse, is due now)."""
    try:
        stamp = parse_time(status.get(RECONCILED_AT))
    except (TypeError, ValueError):
        stamp = None
    if stamp is None:
        return 0.0
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return heartbeat - (now - stamp).total_seconds()


def stamped(old: Mapping[str, Any], new: dict[str, Any], heartbeat: float,
            now: _dt.datetime | None = None) -> dict[str, Any]:
    """The merge patch from ``old`` to ``new``, with ``reconciledAt`` set in ``new`` to
    ``now`` when anything else changed or the old stamp is due; else ``new`` keeps the old
    stamp and the patch is empty."""
    if RECONCILED_AT in old:
        new.setdefault(RECONCILED_AT, old[RECONCILED_AT])
    patch = merge_patch(old, new)
    if patch or heartbeat_due_in(old, heartbeat, now) <= 0:
        new[RECONCILED_AT] = now_iso(now)
        patch = merge_patch(old, new)
    return patch


async def write(body: Mapping[str, Any], memory: "Memory", new: dict[str, Any]) -> None:
    """Patch ``.status`` to ``new`` (only what changed since ``memory.status``, stamped, see
    the module doc). The memory keeps a copy: the caller may go on changing ``new`` (a
    reconcile that writes early, before its deletes, then lets the autoscaler add to the
    same status) and write again."""
    meta = body["metadata"]
    patch = stamped(memory.status, new, config.get().status_heartbeat_seconds)
    if patch:
        await kube.aio(kube.patch_status, API_VERSION, body["kind"], meta["name"], meta["namespace"], patch)
        memory.status = copy.deepcopy(new)
    memory.phases.set((meta["namespace"], meta["name"]), new.get("phase"))


_log = logging.getLogger("lepton_operator")


async def emit(body: Mapping[str, Any], memory: "Memory", events: Iterable[Event],
               logger: logging.Logger | None = None, once: bool = False) -> None:
    """Post each event on ``body`` and log it once at info (warning for a Warning event),
    on the operator's own logger, which the default verbosity shows. ``once``: skip a
    message this object's loop has already posted. ``logger`` is accepted for the
    callers' symmetry with kopf and not needed."""
    meta = body["metadata"]
    for type_, reason, message in events:
        if once:
            if message in memory.said:
                continue
            memory.said.add(message)
        (_log.warning if type_ == EVENT_WARNING else _log.info)(
            "%s %s/%s %s: %s", body.get("kind"), meta.get("namespace"), meta.get("name"), reason, message)
        await kube.aio(kube.emit_event, dict(body), type_, reason, message)


async def report_invalid(body: Mapping[str, Any], memory: "Memory", problems: list[str],
                         default_phase: str, logger: logging.Logger) -> None:
    """A spec no retry will fix: Ready=False, Stalled=True reason InvalidSpec naming every
    problem, and one Warning event and log line per distinct message."""
    message = "invalid spec: " + "; ".join(problems)
    new = dict(memory.status)
    outcome = Outcome(new.get("phase") or default_phase, REASON_INVALID_SPEC, message, stalled=True)
    await write(body, memory, apply_outcome(new, outcome, body["metadata"].get("generation")))
    if memory.invalid_message != message:
        memory.invalid_message = message
        await emit(body, memory, [(EVENT_WARNING, REASON_INVALID_SPEC, message)], logger)
