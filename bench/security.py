"""bench/results/security.json: what the security review measures, one section per source.

* ``engine``, ``policies``, ``attacks``: every attack the real-node suite (tests/real)
  tried from pods that are not a job's, with its outcome (tests/real/attacks.py).
* ``overload``: a serving pod on the real node driven far past what it admits
  (tests/real, ``test_a_serving_pod_far_past_its_capacity_refuses_instead_of_dying``):
  offered load, admitted, refused, p99 latency of the admitted, peak memory against the
  pod's limit, restarts, and the readiness probes seen meanwhile (``overload``).
* ``checkov``: checkov on the chart and on the children the operator renders
  (tests/chart/test_checkov.py): checks passed, failed without a reason (must be none),
  and each finding that stays, with its reason (``checkov``).

Each writer replaces only its own sections (``update``), so the suites can run apart.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

RESULT = Path(__file__).resolve().parent / "results" / "security.json"


def update(sections: Mapping[str, Any], path: Path = RESULT) -> None:
    """Replace ``sections`` (top-level keys) of the results file, keep every other one;
    the file is replaced whole, so a reader never sees half of it."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def overload(*, clients: int, seconds: float, outcomes: Iterable[int | str], admitted_seconds: Iterable[float],
             peak_memory_bytes: int, memory_limit_bytes: int, restarts: int,
             probes: Iterable[int | str]) -> dict[str, Any]:
    """The overload section: ``outcomes`` holds each request's HTTP status, or the name of
    the error that ended it (a timeout, a reset); ``admitted_seconds`` the latency of each
    request answered 200; ``probes`` each readiness probe's status or error."""
    outcomes, probes = list(outcomes), list(probes)
    latencies = np.asarray(list(admitted_seconds), dtype=float)
    other = Counter(str(o) for o in outcomes if o not in (200, 503))
    return {
        "clients": clients,
        "seconds": seconds,
        "offered": len(outcomes),
        "admitted": outcomes.count(200),
        "refused_503": outcomes.count(503),
        "other": dict(sorted(other.items())),
        "admitted_p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1) if latencies.size else None,
        "peak_memory_bytes": peak_memory_bytes,
        "memory_limit_bytes": memory_limit_bytes,
        "restarts": restarts,
        "probes": len(probes),
        "probes_not_ready": sum(1 for p in probes if p != 200),
    }


def checkov(*, version: str, passed: int, findings: Iterable[tuple[str, str, str, str | None]]) -> dict[str, Any]:
    """The checkov section from its ``passed`` count and its failed checks as
    ``(check id, check name, resource, reason)``; reason None: a failure nothing explains.
    Findings that stay are grouped by check and reason, with the resources they hit."""
    findings = sorted(set(findings), key=lambda f: (f[0], f[2], f[3] or ""))
    unexplained = [f"{check} {resource}: {name}" for check, name, resource, reason in findings if reason is None]
    skipped: dict[tuple[str, str], dict[str, Any]] = {}
    for check, name, resource, reason in findings:
        if reason is not None:
            entry = skipped.setdefault((check, reason), {"check": check, "name": name, "reason": reason,
                                                         "resources": []})
            entry["resources"].append(resource)
    return {
        "checkov_version": version,
        "passed": passed,
        "failed": len(unexplained),
        "failed_without_reason": unexplained,
        "skipped_with_reason": len(findings) - len(unexplained),
        "skipped": list(skipped.values()),
    }
