"""What a running compression Job is doing: the last progress record in its pod's log (pure).

The compression program prints one machine-readable line per step
(``contract.PROGRESS_PREFIX`` and a JSON object: candidate k of n, method, activity, since).
While a compression pod is Running, ``model.observe`` reads the tail of its log
(``TAIL_LINES`` lines, ``LIMIT_BYTES`` bytes at most) at most once every
``LEPTON_COMPRESSION_PROGRESS_SECONDS``, and nothing when no pod is compressing; the plan
shows the last record in ``status.compression.progress`` and in the Compressed
condition's message. A status write follows a change of record; no event does.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from lepton_trainer import contract

TAIL_LINES = 40               # the progress line is followed by a few lines at most (the auto table row)
LIMIT_BYTES = 32 * 1024
ACTIVITY_LIMIT = 300          # characters of the activity kept in status


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 10_000 else None


def record(line: str) -> dict[str, Any] | None:
    """The progress record of one log line, or None when it is not a well-formed one."""
    head, sep, body = line.partition(contract.PROGRESS_PREFIX)
    if not sep or head.strip():
        return None
    try:
        raw = json.loads(body)
    except ValueError:
        return None
    if not isinstance(raw, dict):
        return None
    candidate, of = _count(raw.get("candidate")), _count(raw.get("of"))
    activity = raw.get("activity")
    if candidate is None or of is None or not isinstance(activity, str) or not activity:
        return None
    return {"candidate": candidate, "of": of, "method": str(raw.get("method") or "")[:64],
            "activity": activity[:ACTIVITY_LIMIT], "since": str(raw.get("since") or "")[:40]}


def last(text: str) -> dict[str, Any] | None:
    """The last well-formed progress record in ``text`` (a log's tail), or None."""
    for line in reversed(text.splitlines()):
        found = record(line)
        if found is not None:
            return found
    return None


def describe(p: Mapping[str, Any]) -> str:
    """One line for a condition message: ``candidate 2 of 5 (int8): gating (since ...)``."""
    where = (f"candidate {p['candidate']} of {p['of']} ({p['method']})" if p.get("candidate")
             else "original model" if p.get("of") else "")
    since = f" (since {p['since']})" if p.get("since") else ""
    return f"{where}: {p['activity']}{since}" if where else f"{p['activity']}{since}"


def due(last_read: float | None, now: float, interval: float) -> bool:
    """Whether the log is read again now (``last_read``: monotonic time of the last read)."""
    return last_read is None or now - last_read >= interval
