"""Conditions and health, kstatus-compatible (pure: no API client, no clock unless asked).

kstatus (sigs.k8s.io/cli-utils) reads ``Reconciling`` and ``Stalled`` as
"abnormal-true" conditions: present and True only while work is in progress or
stuck. ``Ready`` is the "normal-true" summary that Argo CD and Flux health checks
read. ``set_health`` keeps the three consistent; ``set_condition`` moves
``lastTransitionTime`` only when a condition's status changes.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Iterable

from .constants import COND_READY, COND_RECONCILING, COND_STALLED, FALSE, TRUE

Condition = dict[str, Any]


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


def is_true(conditions: Iterable[Condition] | None, type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return bool(cond) and cond.get("status") == TRUE


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
               message: str = "", stalled: bool = False,
               observed_generation: int | None = None, now: str | None = None) -> list[Condition]:
    """Set Ready, Reconciling and Stalled together, the way kstatus expects.

    - ``ready=True``: Ready=True, Reconciling=False, Stalled=False (kstatus: Current).
    - ``ready=False``: Ready=False and Reconciling=True (kstatus: InProgress).
    - ``stalled=True``: Ready=False, Reconciling=False, Stalled=True (kstatus: Failed);
      used for invalid specs and terminal failures that no retry will fix.
    """
    if ready and stalled:
        raise ValueError("a resource cannot be both ready and stalled")
    kw = dict(observed_generation=observed_generation, now=now)
    conds = set_condition(conditions, COND_READY, TRUE if ready else FALSE, reason, message, **kw)
    reconciling = not ready and not stalled
    conds = set_condition(conds, COND_RECONCILING, TRUE if reconciling else FALSE, reason,
                          message if reconciling else "", **kw)
    return set_condition(conds, COND_STALLED, TRUE if stalled else FALSE, reason,
                         message if stalled else "", **kw)


def status_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning ``old`` into ``new``: changed keys, and None for removed ones."""
    old = old or {}
    patch = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new})
    return patch
