"""LeptonJob at scale: API requests per job, apply-to-bound latency, operator peak RSS.

Starts the local control plane (hack/localcluster.py) with enough kwok GPU nodes, runs the
operator as a subprocess, creates N LeptonJobs of W workers (1 GPU each) at once,
and measures:

- **API requests per job** made by the operator (its own client, User-Agent
  ``lepton-operator``, and kopf's watch/patch client, User-Agent ``kopf/...``), read from
  the API server's audit log (one JSON line per request), against the minimum a job needs:
  W worker pods + 1 rendezvous pod + 2 Services created, and 1 status write;
- **create -> all workers bound**: seconds from a job's create request returning to the
  moment every worker pod of that job has a node (median, p95, max over jobs), polled
  every 0.25 s; the jobs are created by 16 concurrent clients, so they all arrive within
  about a second (``kubectl apply`` of 100 documents would itself take tens of seconds);
- **idle requests**: requests made in a quiet window after every job runs (should be 0);
- **operator peak RSS** (VmHWM of the operator process);
- **reconcile latency** p50 and p99, from the operator's own histogram
  ``lepton_operator_reconcile_duration_seconds`` (interpolated within its buckets, as
  PromQL's histogram_quantile does).

    .venv/bin/python bench/jobs.py [--jobs 100] [--workers 4] [--out jobs.json]

Writes bench/results/jobs.json (or --out; bench/reliability.py runs 1,000 jobs of 1 worker).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import kubernetes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))
import localcluster  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NAMESPACE = "bench"
OPERATOR_AGENTS = ("lepton-operator", "kopf/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(op: subprocess.Popen | None) -> None:
    """Stop the operator process: SIGTERM, then SIGKILL after 20 s."""
    if op is None:
        return
    op.terminate()
    try:
        op.wait(20)
    except subprocess.TimeoutExpired:
        op.kill()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def audit_entries(path: str, offset: int = 0) -> tuple[list[dict], int]:
    """Completed requests logged after byte ``offset``; returns (entries, new offset)."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    entries = [json.loads(line) for line in data.splitlines() if line.strip()]
    return [e for e in entries if e.get("stage") == "ResponseComplete"], offset + len(data)


def by_operator(entries: list[dict]) -> list[dict]:
    return [e for e in entries if e.get("userAgent", "").startswith(OPERATOR_AGENTS)]


def describe(entries: list[dict]) -> dict[str, int]:
    counts = collections.Counter()
    for e in entries:
        ref = e.get("objectRef", {})
        what = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        counts[f"{e['verb']} {what}"] += 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def job_manifest(i: int, workers: int) -> dict:
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob",
            "metadata": {"name": f"bench-{i:03d}", "namespace": NAMESPACE},
            "spec": {"workers": {"min": workers, "max": workers}, "resources": {"gpus": 1}}}


def reconcile_quantiles(metrics_port: int) -> dict:
    """p50 and p99 of LeptonJob reconciles from the operator's histogram buckets."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    buckets = []
    for line in text.splitlines():
        if line.startswith("lepton_operator_reconcile_duration_seconds_bucket{") and 'kind="LeptonJob"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0

    def q(f: float) -> float | str | None:
        if not total:
            return None
        rank, lo, below = f * total, 0.0, 0.0
        for le, count in buckets:
            if count >= rank:
                if le == float("inf"):
                    return f">{lo:g}"           # above the top bucket: only a bound is known
                return round(lo + (le - lo) * (rank - below) / max(count - below, 1e-9), 4)
            lo, below = le, count
        return lo
    return {"reconciles": int(total), "p50": q(0.5), "p99": q(0.99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--out", default="jobs.json", help="file name under bench/results")
    args = parser.parse_args()

    gpus_needed = args.jobs * args.workers
    pods_needed = args.jobs * (args.workers + 1)
    nodes = max(4, -(-pods_needed // 100))
    state = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    cluster = localcluster.Cluster(state, gpu_node_count=nodes, gpus_per_node=-(-gpus_needed // nodes))
    cluster.start()
    op = None
    try:
        for crd in sorted((ROOT / "crds").glob("*.yaml")):
            cluster.kubectl("apply", "--server-side", "-f", str(crd))
        cluster.kubectl("wait", "--for=condition=Established", "crd/leptonjobs.lepton.ai", "--timeout=60s")
        cluster.create_namespace(NAMESPACE)
        metrics_port = free_port()
        log = open(state / "operator.log", "wb")
        op = subprocess.Popen([sys.executable, "-m", "lepton_operator", "--all-namespaces",
                               "--metrics-port", str(metrics_port), "--health-port", str(free_port())],
                              stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**cluster.env, "LEPTON_TRAINER_IMAGE": "lepton-trainer:bench"})
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or op.poll() is not None:
                    raise RuntimeError("operator did not start; see " + str(state / "operator.log"))
                time.sleep(0.5)
        time.sleep(3)   # let kopf finish its initial listing
        _, offset = audit_entries(cluster.audit_log)
        startup_rss = peak_rss_mib(op.pid)

        api = cluster.api_client()
        custom, core = kubernetes.client.CustomObjectsApi(api), kubernetes.client.CoreV1Api(api)
        created_at: dict[str, float] = {}

        def create(i: int) -> None:
            body = job_manifest(i, args.workers)
            custom.create_namespaced_custom_object("lepton.ai", "v1alpha1", NAMESPACE, "leptonjobs", body)
            created_at[body["metadata"]["name"]] = time.monotonic()

        cpu0 = {"operator": cpu_seconds(op.pid),
                **{name: cpu_seconds(pid) for name, pid in cluster.pids.items() if name != "prometheus"}}
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:   # all jobs arrive within ~a second
            list(pool.map(create, range(args.jobs)))
        created_span = max(created_at.values()) - t0
        bound_at: dict[str, float] = {}
        while len(bound_at) < args.jobs and time.monotonic() - t0 < 600:
            pods = core.list_namespaced_pod(NAMESPACE, label_selector="lepton.ai/role=worker").items
            now = time.monotonic()
            per_job = collections.Counter(p.metadata.labels["lepton.ai/job"] for p in pods if p.spec.node_name)
            for job, n in per_job.items():
                if n >= args.workers and job not in bound_at:
                    bound_at[job] = now - created_at[job]
            time.sleep(0.25)

        def all_running() -> bool:
            jobs = json.loads(cluster.kubectl("get", "lj", "-n", NAMESPACE, "-o", "json"))["items"]
            return sum(j.get("status", {}).get("phase") == "Running" for j in jobs) == args.jobs
        while not all_running() and time.monotonic() - t0 < 600:
            time.sleep(1)
        running_after = time.monotonic() - t0
        cpu = {name: round(cpu_seconds(op.pid if name == "operator" else cluster.pids[name]) - c, 1)
               for name, c in cpu0.items()}
        time.sleep(5)  # last status writes
        active, offset = audit_entries(cluster.audit_log, offset)
        time.sleep(args.idle_seconds)
        idle, _ = audit_entries(cluster.audit_log, offset)
        active_ops, idle_ops = by_operator(active), by_operator(idle)
        per_job_ns = [e for e in active_ops if e.get("objectRef", {}).get("namespace") == NAMESPACE
                      and e["verb"] not in ("watch", "list")]
        minimum = args.workers + 1 + 2 + 1
        latencies = list(bound_at.values())
        result = {
            "jobs": args.jobs, "workers_per_job": args.workers,
            "cluster": {"kwok_gpu_nodes": nodes, "gpus_per_node": cluster.gpus_per_node,
                        "machine": f"{platform.machine()} {os.cpu_count()} CPUs"},
            "api_requests": {
                "operator_total": len(active_ops),
                "per_job": round(len(per_job_ns) / args.jobs, 2),
                "minimum_per_job": minimum,
                "minimum_is": f"{args.workers} worker pods + 1 rendezvous pod + 2 Services created, 1 status write",
                "by_verb_and_resource": describe(active_ops),
                "idle_window_seconds": args.idle_seconds,
                "idle_requests": len(idle_ops),
            },
            "create_to_all_workers_bound_seconds": {
                "jobs_bound": len(latencies),
                "median": round(statistics.median(latencies), 2) if latencies else None,
                "p95": round(quantile(latencies, 0.95), 2) if latencies else None,
                "max": round(max(latencies), 2) if latencies else None,
                "poll_interval": 0.25,
            },
            "first_create_to_all_jobs_running_seconds": round(running_after, 2),
            "jobs_created_within_seconds": round(created_span, 2),
            "cpu_seconds_until_all_running": cpu,
            "operator_rss_mib": {"peak": round(peak_rss_mib(op.pid), 1), "before_jobs": round(startup_rss, 1)},
            "reconcile_seconds": reconcile_quantiles(metrics_port),
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        stop(op)
        cluster.stop()


if __name__ == "__main__":
    main()
