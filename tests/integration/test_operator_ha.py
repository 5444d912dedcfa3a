"""Operator restarts and high availability on a real control plane.

These tests start and SIGKILL their own operator processes, so they run on a control
plane of their own (one kwok GPU node), where the session's operator (the ``operator``
fixture) cannot reconcile beside them.

- A restarted operator reads the failures already counted back from the job's status and
  counts none of them twice.
- A restarted operator reads the workers that were active back from the job's status: one
  deleted while no operator ran is counted once, as an uncounted restart.
- A status nobody reconciles says so: ``reconciledAt`` (the RECONCILED column) is refreshed
  every heartbeat while an operator runs, and stops, growing old, once none does.
- Two replicas with ``--leader-elect``: one reconciles, the other waits; SIGKILL the
  leader and the standby takes over and reconciles a new job. The takeover time is
  printed (``takeover_seconds``).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import localcluster
from case_counts import register
from waiting import started_cluster, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
LEASE_NAMESPACE = "kube-system"
TAKEOVER_LIMIT = 60.0          # generous: the protocol's worst case is about 19 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SUMMARY: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    register(request.config, "tests/integration/test_operator_ha.py", lambda: (SUMMARY, len(SUMMARY)),
             "high availability", "LEPTON_HA_COUNTS")


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory):
    c = started_cluster(tmp_path_factory.mktemp("ha-cluster"), gpu_node_count=1)
    yield c
    c.stop()


@dataclass
class Operator:
    name: str
    proc: subprocess.Popen
    log_path: Path
    metrics_port: int
    health_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def leading(self) -> bool:
        return "leading: acquired Lease" in self.log()

    def metric(self, name: str) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=3) as resp:
                text = resp.read().decode()
        except OSError:
            return float("nan")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#")
                   and line[len(name)] in " {")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)


@pytest.fixture
def operators(own_cluster, tmp_path):
    """Starts operator processes against ``own_cluster``; stops what is left at the end."""
    started: list[Operator] = []

    def start(name: str, leader_elect: bool = True, **settings: str) -> Operator:
        metrics_port, health_port = free_port(), free_port()
        log_path = tmp_path / f"operator-{name}.log"
        env = {**own_cluster.env, "LEPTON_TRAINER_IMAGE": "lepton-trainer:test", "LEPTON_RESYNC_SECONDS": "30",
               "PYTHONUNBUFFERED": "1", "LEPTON_LEADER_ELECTION_NAMESPACE": LEASE_NAMESPACE,
               "LEPTON_LEADER_ELECTION_IDENTITY": f"operator-{name}", **settings}
        args = [sys.executable, "-m", "lepton_operator", "--all-namespaces",
                "--metrics-port", str(metrics_port), "--health-port", str(health_port)]
        if leader_elect:
            args.append("--leader-elect")
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        op = Operator(name, proc, log_path, metrics_port, health_port)
        started.append(op)

        def up():
            assert proc.poll() is None, f"operator {name} exited:\n{op.log()[-4000:]}"
            return op.healthy()
        wait_for(f"operator {name}'s /healthz", up, timeout=60)
        return op

    yield start
    for op in started:
        op.kill()
        print(f"operator {op.name} log: {op.log_path}")


def job(name: str, namespace: str, workers: int = 1, **spec) -> dict:
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob", "metadata": {"name": name, "namespace": namespace},
            "spec": {"workers": {"min": workers, "max": workers, "replicas": workers}, "resources": {"gpus": 1},
                     **spec}}


def get(cluster, namespace: str, *what: str) -> dict:
    out = cluster.kubectl("-n", namespace, "get", *what, "-o", "json", check=False)
    return json.loads(out) if out else {}


def running_workers(cluster, namespace: str, name: str) -> list[dict]:
    pods = get(cluster, namespace, "pods", "-l", f"lepton.ai/job={name},lepton.ai/role=worker").get("items", [])
    return [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]


def wait_job_running(cluster, namespace: str, name: str, workers: int, timeout: float = 90) -> list[dict]:
    def check():
        pods = running_workers(cluster, namespace, name)
        phase = (get(cluster, namespace, "leptonjob", name).get("status") or {}).get("phase")
        return len(pods) == workers and phase == "Running" and pods
    return wait_for(f"{namespace}/{name} Running with {workers} workers", check, timeout)


def lease(cluster) -> dict:
    return (get(cluster, LEASE_NAMESPACE, "lease", "lepton-operator").get("spec")) or {}


def test_a_restarted_operator_counts_no_failure_twice(own_cluster, operators):
    """The worst moment of a SIGKILL: the failure is counted in the status (with its pod's
    uid) but the failed pod was not deleted yet. A new process must delete and replace it
    without counting it again."""
    c, ns = own_cluster, own_cluster.create_namespace("restart-memory")
    first = operators("first", leader_elect=False)
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump(job("r1", ns, workers=2, backoffLimit=3)))
    wait_job_running(c, ns, "r1", 2)
    first.kill()

    c.kubectl("-n", ns, "annotate", "--overwrite", "pod", "r1-worker-1", "kwok.lepton.ai/exit-code=1")
    failed = wait_for("r1-worker-1 Failed", lambda: (p := get(c, ns, "pod", "r1-worker-1"))
                      and p["status"].get("phase") == "Failed" and p, timeout=60)
    uid = failed["metadata"]["uid"]
    # What the killed operator had made durable before its DELETE.
    c.kubectl("-n", ns, "patch", "leptonjob", "r1", "--subresource=status", "--type=merge", "-p", json.dumps(
        {"status": {"restarts": {"counted": 1, "uncounted": 0}, "restartCount": 1, "countedPodUIDs": [uid]}}))

    operators("second", leader_elect=False)
    seen_counts = set()

    def replaced():
        status = get(c, ns, "leptonjob", "r1").get("status") or {}
        seen_counts.add((status.get("restarts") or {}).get("counted"))
        pods = running_workers(c, ns, "r1")
        return (len(pods) == 2 and uid not in {p["metadata"]["uid"] for p in pods}
                and "countedPodUIDs" not in status and status.get("phase") == "Running" and status)
    status = wait_for("the failed worker replaced and its uid dropped", replaced, timeout=90)
    assert seen_counts == {1}, f"counted went through {seen_counts}"
    assert status["restarts"] == {"counted": 1, "uncounted": 0} and status["restartCount"] == 1


def test_a_worker_deleted_while_no_operator_ran_is_counted_once(own_cluster, operators):
    """The status lists the active workers; one deleted while no operator ran is replaced
    and counted once, as an uncounted restart, by the next operator."""
    c, ns = own_cluster, own_cluster.create_namespace("restart-vanished")
    first = operators("first", leader_elect=False)
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump(job("r2", ns, workers=2, backoffLimit=3)))
    pods = wait_job_running(c, ns, "r2", 2)
    uids = sorted(p["metadata"]["uid"] for p in pods)
    wait_for("both workers listed in the status",
             lambda: (get(c, ns, "leptonjob", "r2").get("status") or {}).get("activeWorkerUIDs") == uids, timeout=30)
    first.kill()
    gone = next(p["metadata"]["uid"] for p in pods if p["metadata"]["name"] == "r2-worker-1")
    c.kubectl("-n", ns, "delete", "pod", "r2-worker-1", "--grace-period=0", "--force")

    operators("second", leader_elect=False)
    seen_counts = set()

    def replaced():
        status = get(c, ns, "leptonjob", "r2").get("status") or {}
        seen_counts.add((status.get("restarts") or {}).get("uncounted"))
        now = running_workers(c, ns, "r2")
        listed = status.get("activeWorkerUIDs") or []
        return (len(now) == 2 and gone not in {p["metadata"]["uid"] for p in now} and gone not in listed
                and sorted(listed) == sorted(p["metadata"]["uid"] for p in now)
                and status.get("phase") == "Running" and status)
    status = wait_for("the deleted worker replaced", replaced, timeout=90)
    assert seen_counts <= {0, 1}, f"uncounted went through {seen_counts}"
    assert status["restarts"] == {"counted": 0, "uncounted": 1} and status["restartCount"] == 1


def test_two_replicas_one_leads_and_the_standby_takes_over_after_a_sigkill(own_cluster, operators):
    c, ns = own_cluster, own_cluster.create_namespace("ha")
    a, b = operators("a"), operators("b")
    leader_op = wait_for("one replica leading", lambda: next((op for op in (a, b) if op.leading()), None), timeout=60)
    standby = b if leader_op is a else a
    assert lease(c)["holderIdentity"].startswith(f"operator-{leader_op.name}_")

    c.kubectl("apply", "-f", "-", input=yaml.safe_dump(job("before", ns)))
    wait_job_running(c, ns, "before", 1)
    assert leader_op.metric("lepton_operator_leader") == 1 and standby.metric("lepton_operator_leader") == 0
    assert leader_op.metric("lepton_operator_reconciles_total") > 0
    assert standby.metric("lepton_operator_reconciles_total") == 0, "the standby reconciled"
    assert not standby.leading() and "standby: Lease" in standby.log()
    assert standby.healthy()

    leader_op.kill()
    killed = time.monotonic()
    wait_for("the standby leading", standby.leading, timeout=TAKEOVER_LIMIT, interval=0.1)
    takeover = time.monotonic() - killed
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump(job("after", ns)))
    wait_job_running(c, ns, "after", 1)
    reconciled = time.monotonic() - killed
    line = f"takeover_seconds={takeover:.1f} new_job_running_seconds_after_kill={reconciled:.1f}"
    SUMMARY.append(f"HA (tests/integration/test_operator_ha.py): {line}")
    print(line)
    assert takeover < TAKEOVER_LIMIT
    assert lease(c)["holderIdentity"].startswith(f"operator-{standby.name}_")
    assert lease(c)["leaseTransitions"] >= 1
    assert standby.metric("lepton_operator_leader") == 1
    assert len(running_workers(c, ns, "before")) == 1        # the first job was left as it was

    # A clean stop releases the Lease for the next replica.
    assert standby.stop() == 0
    assert "holderIdentity" not in lease(c), lease(c)
    assert "released Lease" in standby.log()
    assert "Traceback" not in standby.log(), standby.log()[-3000:]


HEARTBEAT = 2          # LEPTON_STATUS_HEARTBEAT_SECONDS of the operators below


def reconciled(cluster, namespace: str, name: str) -> tuple[str | None, dict]:
    """``kubectl get lj`` as a user reads it (the RECONCILED cell), read after the status
    behind it (so the cell is never older than that status)."""
    status = get(cluster, namespace, "leptonjob", name).get("status") or {}
    header, row = cluster.kubectl("-n", namespace, "get", "leptonjob", name).splitlines()[:2]
    return dict(zip(header.split(), row.split())).get("RECONCILED"), status


def age_seconds(cell: str) -> int:
    """kubectl's age (``7s``, ``2m5s``, ``3m``) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", cell or "")
    assert parts and any(parts.groups()), f"not an age: {cell!r}"
    h, m, s = (int(g or 0) for g in parts.groups())
    return 3600 * h + 60 * m + s


def test_a_status_nobody_reconciles_says_its_age(own_cluster, operators):
    """What a user sees when the operator stops (its pod evicted by a drain, deleted,
    crashed): the status stays as it was left (Running, Ready), but RECONCILED, the age of
    ``status.reconciledAt``, grows past the heartbeat instead of staying under it; the next
    operator refreshes it on its first reconcile."""
    c, ns = own_cluster, own_cluster.create_namespace("heartbeat")
    first = operators("first", leader_elect=False, LEPTON_STATUS_HEARTBEAT_SECONDS=str(HEARTBEAT))
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump(job("hb", ns, workers=1)))
    wait_job_running(c, ns, "hb", 1)
    _, before = reconciled(c, ns, "hb")
    # Nothing changes, yet the stamp moves with each heartbeat: someone is reconciling.
    _, status = wait_for("a heartbeat", lambda: (r := reconciled(c, ns, "hb"))[1].get("reconciledAt")
                         not in (None, before.get("reconciledAt")) and r, timeout=30)
    assert status["phase"] == "Running" and status["observedGeneration"] == before["observedGeneration"]

    assert first.stop() == 0
    _, left = reconciled(c, ns, "hb")
    cell, status = wait_for("RECONCILED to grow past three heartbeats",
                            lambda: (r := reconciled(c, ns, "hb")) and age_seconds(r[0]) > 3 * HEARTBEAT and r,
                            timeout=60)
    assert status == left, "a status changed with no operator running"
    assert status["phase"] == "Running" and status["workersReady"] == "1/1"
    assert next(x for x in status["conditions"] if x["type"] == "Ready")["status"] == "True"

    operators("second", leader_elect=False, LEPTON_STATUS_HEARTBEAT_SECONDS=str(HEARTBEAT))
    cell, status = wait_for("the next operator's stamp", lambda: (r := reconciled(c, ns, "hb"))[1]
                            .get("reconciledAt") != left["reconciledAt"] and r, timeout=60)
    assert age_seconds(cell) <= 3 * HEARTBEAT and status["phase"] == "Running"
