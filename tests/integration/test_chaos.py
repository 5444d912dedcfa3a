"""Chaos on a real control plane: the operator is SIGKILLed at random points while jobs
churn around it, and the API server, etcd, a node and a rendezvous pod fail under it.

The test runs its own control plane (8 kwok GPU nodes of 8 GPUs) and its own operator
process, which it kills and starts again. Each of ``LEPTON_CHAOS_ROUNDS`` rounds (20)
does a few random things to the jobs, kills the operator at a random moment, does a few
more while it is down, and starts it again. At least ``LEPTON_CHAOS_JOBS`` (30) jobs live
at a time; over the run they are created, scaled, made to fail with counted (exit 1) and
uncounted (exit 137) codes, evicted through the Eviction API, and deleted. With the
operator running and no restart of it: one kube-apiserver restart, one etcd restart, one
node deleted under running jobs, and one rendezvous pod deleted.

The test keeps a ledger of every failure it causes and checks:

- by sampling during the churn and after each round: never more than ``max`` active
  workers of a job, never two active pods with the same worker index;
- at the end, once the operator has caught up: each job's counted and uncounted restarts
  equal the ledger exactly; jobs pushed past ``backoffLimit`` have Failed, no other job
  has; each job's status matches its pods; no child is left without its job; every
  checkpoint PVC is still there; the operator logged no unhandled exception.

The workers the deleted node takes with it are read from the pods bound to it once it is
gone, of every job (the one whose rendezvous store was deleted included: losing a node is
an uncounted restart whatever the store did), and again at every later sample: under load
the scheduler may still bind a new worker to the node after it went, and that worker is
lost too. Pod GC removes them tens of seconds later, after several samples.

Its numbers (rounds, objects churned, faults, violations) are printed and written to
``$LEPTON_CHAOS_RESULT`` when set (bench/reliability.py reads them). What it cannot show:
kwok pods run nothing, so a failure is an exit code set by the test, never a crashed
trainer; tests/real shows real workers lost and replaced.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import pytest

import localcluster
from case_counts import register
from conftest import Kube, free_port
from lepton_operator.job.state import STORE_LOSS_WINDOW_SECONDS
from waiting import started_cluster, wait_for, wait_healthy

pytestmark = pytest.mark.integration
ROUNDS = int(os.environ.get("LEPTON_CHAOS_ROUNDS", "20"))
JOBS = int(os.environ.get("LEPTON_CHAOS_JOBS", "30"))
SEED = int(os.environ.get("LEPTON_CHAOS_SEED", str(int(time.time()))))
NS = "chaos"
WORKERS = "lepton.ai/role=worker"


@pytest.fixture(scope="module")
def chaos_cluster(tmp_path_factory):
    c = started_cluster(tmp_path_factory.mktemp("chaos-cluster"), gpu_node_count=8, gpus_per_node=8)
    c.create_namespace(NS)
    yield c
    c.stop()


@dataclass
class OperatorProc:
    """The operator as a process the test can SIGKILL and start again."""
    cluster: localcluster.Cluster
    log_dir: object
    proc: subprocess.Popen | None = None
    starts: int = 0
    metrics_port: int = 0

    def start(self, jobs: int = 0) -> None:
        """Start it, and wait until it has reconciled each of the ``jobs`` jobs once: a worker
        that vanishes before the new process has seen it active is not known to have been
        active (which workers are active is the process's memory, not the job's status)."""
        self.starts += 1
        health, self.metrics_port = free_port(), free_port()
        env = {**self.cluster.env, "LEPTON_TRAINER_IMAGE": "lepton-trainer:test", "LEPTON_RESYNC_SECONDS": "30",
               "PYTHONUNBUFFERED": "1", "LEPTON_API_RETRY_SECONDS": "1"}
        log = self.log_dir / f"operator-{self.starts}.log"
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lepton_operator", "--all-namespaces", "--metrics-port", str(self.metrics_port),
                 "--health-port", str(health)], stdout=logf, stderr=subprocess.STDOUT, env=env)
        wait_healthy(self.proc, health, log)
        wait_for(f"all {jobs} jobs reconciled", lambda: self.jobs_reconciled() >= jobs, timeout=60)

    def jobs_reconciled(self) -> float:
        """Jobs this process has reconciled at least once: its ``lepton_operator_jobs`` gauge
        counts each job by phase from its first reconcile on."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("lepton_operator_jobs{"))

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("operator-*.log")))


@dataclass
class Chaos:
    k: Kube
    rng: random.Random
    counted: Counter = field(default_factory=Counter)      # job -> failures the test caused that count
    uncounted: Counter = field(default_factory=Counter)    # job -> disruptions that do not
    limits: dict = field(default_factory=dict)             # job -> backoffLimit
    maxes: dict = field(default_factory=dict)              # job -> workers.max
    replicas: dict = field(default_factory=dict)           # job -> workers.replicas
    touched: set = field(default_factory=set)              # pod uids the test failed, evicted or orphaned
    stranded: set = field(default_factory=set)             # jobs with workers on the deleted node
    spared: set = field(default_factory=set)               # jobs whose rendezvous store the test deleted
    dead_node: str | None = None                           # the node the test deleted
    failed_at: dict = field(default_factory=dict)          # job -> when the test last failed a worker, counted
    stats: Counter = field(default_factory=Counter)
    violations: list = field(default_factory=list)
    serial: int = 0

    # --- reads -------------------------------------------------------------------------
    def pods(self) -> list[dict]:
        return json.loads(self.k.kubectl("get", "pods", "-l", WORKERS, "-o", "json"))["items"]

    def jobs(self) -> dict[str, dict]:
        return {j["metadata"]["name"]: j for j in json.loads(self.k.kubectl("get", "lj", "-o", "json"))["items"]}

    def quiet(self) -> list[str]:
        """Live jobs none of whose workers the test failed (counted) within the store-loss window
        (``state.STORE_LOSS_WINDOW_SECONDS``, with kwok's lag under load on top): a worker
        that fails that close to its store's replacement, before it or after, counts as the
        store's loss, so only such a job's store is the test's to delete."""
        now = time.monotonic()
        return [j for j in self.live() if now - self.failed_at.get(j, -1e9) > STORE_LOSS_WINDOW_SECONDS + 30]

    def live(self) -> list[str]:
        """Jobs that may still take failures: not expected to fail, not gone, and not one
        whose rendezvous store was deleted (a worker that fails soon after its store went
        away is counted as the store's loss, not its own: see state.lost_store)."""
        return [j for j in self.maxes if self.counted[j] <= self.limits[j] and j not in self.spared]

    def on_node(self, node: str) -> list[dict]:
        """The workers lost with ``node`` that the operator counts: bound to it and active,
        not failed, evicted or deleted yet, of a job not expected to fail, below the job's
        replicas (one above them is the operator's to delete)."""
        return [p for p in self.pods() if p["spec"].get("nodeName") == node
                and p["status"].get("phase") in ("Pending", "Running")
                and not p["metadata"].get("deletionTimestamp") and p["metadata"]["uid"] not in self.touched
                and (job := p["metadata"]["labels"]["lepton.ai/job"]) in self.maxes
                and self.counted[job] <= self.limits[job]
                and int(p["metadata"]["labels"]["lepton.ai/worker-index"]) < self.replicas[job]]

    def strand(self) -> int:
        """Ledger the workers bound to the deleted node that are not in it yet (see
        ``on_node``) as uncounted restarts; how many there were."""
        on_node = self.on_node(self.dead_node) if self.dead_node else []
        for p in on_node:
            self.touched.add(p["metadata"]["uid"])
            self.uncounted[p["metadata"]["labels"]["lepton.ai/job"]] += 1
            self.stranded.add(p["metadata"]["labels"]["lepton.ai/job"])
        self.stats["workers on the deleted node"] += len(on_node)
        return len(on_node)

    def running(self, phases: tuple[str, ...] = ("Running",)) -> list[dict]:
        """Workers the test may fail: of a live job, not touched yet, and not about to go
        because the job was scaled below their index."""
        live = set(self.live())
        return [p for p in self.pods() if p["status"].get("phase") in phases
                and not p["metadata"].get("deletionTimestamp") and p["metadata"]["uid"] not in self.touched
                and (job := p["metadata"]["labels"]["lepton.ai/job"]) in live
                and int(p["metadata"]["labels"]["lepton.ai/worker-index"]) < self.replicas[job]]

    # --- actions -----------------------------------------------------------------------
    def create(self) -> None:
        self.serial += 1
        name = f"c{self.serial}"
        top = self.rng.choice((1, 2, 2, 3))
        limit = self.rng.choice((1, 1000, 1000, 1000))
        replicas = self.rng.randint(1, top)
        self.k.apply(self.k.manifest(name, workers={"min": 1, "max": top, "replicas": replicas},
                                     backoffLimit=limit, checkpoint={"claimName": "ckpt", "subPath": name}))
        self.maxes[name], self.limits[name], self.replicas[name] = top, limit, replicas
        self.stats["created"] += 1

    def scale(self) -> None:
        # Not a job with workers on the deleted node: scaled below such a worker's index
        # before pod GC removes it, it would be the operator's to delete, not a restart.
        names = [j for j in self.live() if j not in self.stranded]
        if not names:
            return
        name = self.rng.choice(names)
        # Down only: a job scaled up may find no GPUs, and its new workers then wait.
        self.replicas[name] = self.rng.randint(1, self.replicas[name])
        self.k.kubectl("scale", "lj", name, f"--replicas={self.replicas[name]}")
        self.stats["scaled"] += 1

    def fail(self, counted: bool) -> None:
        pods = self.running()
        if not pods:
            return
        pod = self.rng.choice(pods)
        job = pod["metadata"]["labels"]["lepton.ai/job"]
        self.touched.add(pod["metadata"]["uid"])
        self.k.kwok_exit(pod["metadata"]["name"], 1 if counted else 137)
        if counted:
            self.failed_at[job] = time.monotonic()
        (self.counted if counted else self.uncounted)[job] += 1
        self.stats["counted failures" if counted else "uncounted failures"] += 1

    def evict(self) -> None:
        pods = self.running()
        if not pods:
            return
        pod = self.rng.choice(pods)
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction",
                    "metadata": {"name": pod["metadata"]["name"], "namespace": NS}}
        out = self.k.run("create", "--raw", f"/api/v1/namespaces/{NS}/pods/{pod['metadata']['name']}/eviction",
                         "-f", "-", input=json.dumps(eviction))
        # an answer lost under load (a timeout) may still have evicted it: the pod says
        if out.returncode == 0 or self._going(pod):
            self.touched.add(pod["metadata"]["uid"])
            self.uncounted[pod["metadata"]["labels"]["lepton.ai/job"]] += 1
            self.stats["evicted"] += 1

    def _going(self, pod: dict) -> bool:
        now = self.k.get("pod", pod["metadata"]["name"])
        return now is None or now["metadata"]["uid"] != pod["metadata"]["uid"] \
            or bool(now["metadata"].get("deletionTimestamp"))

    def delete_job(self) -> None:
        name = self.rng.choice([j for j in self.maxes if j not in self.spared])
        self.k.kubectl("delete", "lj", name, "--wait=false")
        for ledger in (self.counted, self.uncounted, self.maxes, self.limits, self.replicas):
            ledger.pop(name, None)
        self.stats["deleted"] += 1

    def churn(self, steps: int, disruptions: bool) -> None:
        """Random actions; evictions only while the operator runs (a pod that vanishes while
        it is down was never seen active by the new process, see the module notes)."""
        for _ in range(steps):
            roll = self.rng.random()
            if len(self.maxes) < JOBS or roll < 0.1:
                self.create()
            elif roll < 0.3:
                self.scale()
            elif roll < 0.55:
                self.fail(counted=True)
            elif roll < 0.75:
                self.fail(counted=False)
            elif roll < 0.85 and disruptions:
                self.evict()
            elif roll < 0.95:
                self.delete_job()
                self.create()
        while len(self.maxes) < JOBS:
            self.create()

    # --- invariants --------------------------------------------------------------------
    def sample(self, when: str) -> None:
        self.stats["samples"] += 1
        self.strand()
        active: dict[str, Counter] = {}
        for p in self.pods():
            if p["status"].get("phase") in ("Pending", "Running") and not p["metadata"].get("deletionTimestamp"):
                labels = p["metadata"]["labels"]
                active.setdefault(labels["lepton.ai/job"], Counter())[labels["lepton.ai/worker-index"]] += 1
        for job, indices in active.items():
            if job in self.maxes and sum(indices.values()) > self.maxes[job]:
                self.violations.append(f"{when}: {job} has {sum(indices.values())} active workers, max "
                                       f"{self.maxes[job]}")
            for index, n in indices.items():
                if n > 1:
                    self.violations.append(f"{when}: {job} has {n} active pods with worker index {index}")


SUMMARY: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    register(request.config, "tests/integration/test_chaos.py", lambda: (SUMMARY, len(SUMMARY)), "chaos",
             "LEPTON_CHAOS_COUNTS")


def test_chaos(chaos_cluster, tmp_path):
    k = Kube(chaos_cluster, NS)
    k.pvc("ckpt")
    rng = random.Random(SEED)
    chaos = Chaos(k, rng)
    op = OperatorProc(chaos_cluster, tmp_path)
    op.start()
    chaos.churn(JOBS, disruptions=False)
    wait_for("the first jobs running", lambda: len(chaos.running()) >= JOBS // 2, timeout=120)
    # ROUNDS operator kills, with the four other faults between them (the operator running).
    faults = {ROUNDS // 4: "rendezvous", ROUNDS // 2 + 1: "kube-apiserver", (3 * ROUNDS) // 4 + 2: "etcd",
              ROUNDS + 2: "node"}
    for rnd in range(ROUNDS + len(faults)):
        fault = faults.get(rnd)
        chaos.churn(rng.randint(2, 5), disruptions=True)
        chaos.sample(f"round {rnd}, operator up")
        if fault is None:
            time.sleep(rng.uniform(0, 1.5))            # a random point of its work
            op.kill()
            chaos.stats["operator kills"] += 1
            chaos.churn(rng.randint(1, 4), disruptions=False)
            op.start(jobs=len(chaos.maxes))
        elif fault == "rendezvous":
            job = rng.choice(chaos.quiet() or chaos.live())
            chaos.spared.add(job)
            k.kubectl("delete", "pod", f"{job}-rdzv", "--wait=false", check=False)
            chaos.stats["rendezvous pods deleted"] += 1
        elif fault == "node":
            node = rng.choice(chaos_cluster.gpu_nodes)
            chaos_cluster.kubectl("delete", "node", node, "--wait=false")
            chaos.dead_node = node
            time.sleep(2)      # a worker the scheduler was binding to it as it went lands there too
            chaos.strand()
            chaos.stats["nodes deleted"] += 1
        else:
            chaos_cluster.crash_and_restart(fault)
            chaos.stats[f"{fault} restarts"] += 1
        time.sleep(rng.uniform(0.5, 2.0))
        chaos.sample(f"round {rnd}, after {fault or 'an operator kill'}")

    # The operator catches up: every ledger entry is in a status, the right jobs Failed
    # (workers still landing on the deleted node go into the ledger as they are seen).
    def caught_up() -> bool:
        chaos.strand()
        return not _behind(chaos)
    if not _eventually(caught_up, 240):
        chaos.violations += [f"end: {line}" for line in _behind(chaos)]
    chaos.sample("end")

    # Status matches pods; no orphans; PVC intact; no unhandled exception.
    def consistent() -> bool:
        jobs, pods = chaos.jobs(), chaos.pods()
        for name, job in jobs.items():
            status = job.get("status") or {}
            if status.get("phase") in ("Failed", "Succeeded"):
                continue
            running = [p for p in pods if p["metadata"]["labels"]["lepton.ai/job"] == name
                       and p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
            if (status.get("workers") or {}).get("running") != len(running):
                return False
        return True
    if not _eventually(consistent, 120):
        chaos.violations.append("end: a job's status.workers.running does not match its Running pods")
    names = set(chaos.jobs())

    def orphans() -> list[str]:
        children = json.loads(k.kubectl("get", "pods,services", "-l", "lepton.ai/job", "-o", "json"))["items"]
        return [f"{c['kind']} {c['metadata']['name']}" for c in children
                if c["metadata"]["labels"]["lepton.ai/job"] not in names]
    if not _eventually(lambda: not orphans(), 120):
        chaos.violations.append(f"end: children without a job: {orphans()[:10]}")
    if k.get("pvc", "ckpt") is None:
        chaos.violations.append("end: the checkpoint PVC is gone")
    logs = op.logs()
    for marker in ("Traceback", "failed with an exception"):
        if marker in logs:
            line = next(x for x in logs.splitlines() if marker in x)
            chaos.violations.append(f"operator log: {line[:300]}")
    op.kill()

    result = {"seed": SEED, "rounds": ROUNDS, "jobs_at_a_time": JOBS, **dict(chaos.stats),
              "operator_starts": op.starts, "violations": len(chaos.violations)}
    SUMMARY.append(f"chaos (tests/integration/test_chaos.py): {json.dumps(result)}")
    print("chaos: " + json.dumps(result))
    if os.environ.get("LEPTON_CHAOS_RESULT"):
        with open(os.environ["LEPTON_CHAOS_RESULT"], "w") as f:
            json.dump({**result, "violation_list": chaos.violations}, f, indent=2)
    assert not chaos.violations, f"seed {SEED}: " + "\n".join(chaos.violations[:20])


def _behind(chaos: Chaos) -> list[str]:
    """Jobs whose status does not (yet) match the ledger. A job past its backoffLimit fails
    on the failure that crossed it; disruptions the test caused in the same moment may then
    never be counted (a finished job counts nothing more), so for a Failed job only the
    counted failures must match, and the uncounted ones may fall short."""
    jobs, out = chaos.jobs(), []
    for name in chaos.maxes:
        status = (jobs.get(name) or {}).get("status") or {}
        restarts = status.get("restarts") or {}
        want_failed = chaos.counted[name] > chaos.limits[name]
        uncounted_ok = (restarts.get("uncounted") == chaos.uncounted[name] if not want_failed
                        else (restarts.get("uncounted") or 0) <= chaos.uncounted[name])
        if restarts.get("counted") != chaos.counted[name] or not uncounted_ok \
                or (status.get("phase") == "Failed") != want_failed:
            out.append(f"{name}: status {restarts} phase {status.get('phase')}; ledger counted {chaos.counted[name]} "
                       f"uncounted {chaos.uncounted[name]}, backoffLimit {chaos.limits[name]}")
    return out


def _eventually(check, timeout: float) -> bool:
    try:
        wait_for("a check", lambda: check() or None, timeout=timeout)
        return True
    except Exception:
        return False
