"""bench/results/operations.json: day-2 operations on the real node, one section each.

The real-node suite (tests/real/test_real_node.py) writes each section when the test that
measures it passes its checks; a section keeps the shape it was measured on and the time
(``at``), and a run that did not reach a test leaves that test's section as it was.

* ``lighthouse_lost``: the Lighthouse (``<job>-rdzv``) of a running ``perStep`` job
  deleted; seconds until both replica groups, in their same processes, take their first
  step with the new one, the groups restarted and failures counted for it (none may be),
  and where the time went.
* ``store_unreachable``: a job's c10d store placed on a node that runs nothing (a kwok
  node: its pod is Running and Ready, its address goes nowhere); seconds from its workers
  running until the job says Ready=False, the condition, and the restarts counted (none
  may be) and uncounted.
* ``promotion_under_load``: a new revision promoted while a client sends a steady stream
  through the model's Service; requests sent and failed, and the fewest ready serving pods
  seen across the promotion against the number before it.
* ``llm_canary``: two revisions of a language model through a canary judged on time to
  first token relative to the stable revision (tests/real/test_real_llm.py): the ratio of
  the one promoted and of the one rolled back, against the limit, and the requests.
* ``drain``: ``kubectl drain`` of the operator's node (one replica, so no
  PodDisruptionBudget: the operator is evicted and its replacement waits, Pending);
  seconds until a status the evicted operator left shows its age past the heartbeat
  (``status.reconciledAt``, the RECONCILED column), and from the uncordon until an
  operator reconciles it again.

The file is written through ``security.update`` (bench/security.py): one section replaced,
the others kept, the file replaced whole.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import security

RESULT = Path(__file__).resolve().parent / "results" / "operations.json"
SECTIONS = ("lighthouse_lost", "store_unreachable", "promotion_under_load", "llm_canary", "drain")


def record(section: str, path: Path = RESULT, **values: Any) -> dict[str, Any]:
    """Replace ``section`` of the results file with ``values`` and the time; the section
    as written."""
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}: one of {', '.join(SECTIONS)}")
    entry = {**values, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    security.update({section: entry}, path)
    return entry
