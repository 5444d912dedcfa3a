"""Helpers of the real-node suite (tests/real)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))
sys.path.insert(0, str(ROOT / "bench"))
import localcluster  # noqa: E402
import security  # noqa: E402,F401  (bench/security.py: the sections of bench/results/security.json)

RELEASE_NS = "lepton-system"
TIMINGS = os.environ.get("LEPTON_REALNODE_TIMINGS")  # bench/realnode.py collects these


def record(name: str, value) -> None:
    """Keep a measurement for bench/realnode.py (a no-op unless it asked for them)."""
    if not TIMINGS:
        return
    path = Path(TIMINGS)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = value
    path.write_text(json.dumps(data, indent=2))


def pod_logs(c: localcluster.Cluster, ns: str, pod: str, previous: bool = False) -> str:
    args = ["logs", "-n", ns, pod, "--all-containers"]
    if previous:
        args.append("--previous")
    return c.kubectl(*args, check=False)


def dump(c: localcluster.Cluster, ns: str) -> str:
    """What a failing wait prints: the namespace's objects, events and the operator's log."""
    out = [c.kubectl("get", "lj,lm,pods,svc,jobs,deploy", "-n", ns, "-o", "wide", check=False),
           c.kubectl("get", "events", "-n", ns, "--sort-by=.lastTimestamp", check=False)[-4000:],
           c.kubectl("logs", "-n", RELEASE_NS, "deploy/lepton-lepton-operator", "--tail=60", check=False)]
    return "\n".join(out)
