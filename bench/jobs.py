"""LeptonJob at scale, beside Kubeflow's training-operator on the same control plane.

Starts the local control plane (hack/localcluster.py) with enough kwok GPU nodes and, for
each size, runs the operators one after the other on it, each as a subprocess with the
cluster's kubeconfig: ours (``python -m lepton_operator``) on N LeptonJobs of W workers,
then Kubeflow's training-operator v1 (hack/build-tools.sh training-operator, the version
pinned in hack/versions.env) on N PyTorchJobs with ``elasticPolicy`` (min = max = W
workers, c10d rendezvous), 1 GPU per worker in both. Between the two, the first
operator stops and its namespace is deleted until its pods are gone. For each operator:

- **create -> all workers bound**: seconds from a job's create request returning to the
  moment every worker pod of that job has a node (p50, p99, max over jobs), seen on one
  watch of the namespace's pods; the jobs are created by 16 concurrent clients;
- **operator CPU seconds** (user + system, from /proc) from the first create until every
  job reports running, and per job; the control plane's processes' CPU beside it;
- **API requests per job** made by the operator, read from the API server's audit log (its
  User-Agent: ``lepton-operator`` and ``kopf/...`` for ours, ``training-operator...`` for
  Kubeflow's), by verb and resource, and requests in a quiet window after (should be 0);
- **operator peak RSS** (VmHWM);
- **reconcile latency** p50/p99 from each operator's own histogram, interpolated within
  its buckets as PromQL's histogram_quantile does: ours
  ``lepton_operator_reconcile_duration_seconds``, Kubeflow's controller-runtime
  ``controller_runtime_reconcile_time_seconds`` (both time one reconcile call, not the wait
  before it; Kubeflow's wait is ``workqueue_queue_duration_seconds``, recorded beside it).

    .venv/bin/python bench/jobs.py [--jobs 1000 --jobs 5000] [--workers 1] [--operators lepton,kubeflow]

Writes bench/results/jobs.json (or --out): one row per operator per size; with --merge,
rows of other sizes already in the file are kept. --plot writes the PNG beside it.
"""
from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import kubernetes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))
import localcluster  # noqa: E402
from common import CACHE, versions  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GPU = "nvidia.com/gpu"
KUBEFLOW_NAMESPACE = "kubeflow"             # where its cert rotator keeps its Secret (MY_POD_NAMESPACE)
KUBEFLOW_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")   # fixed in its pkg/cert
KUBEFLOW_MODULE = "github.com/kubeflow/training-operator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(op: subprocess.Popen | None) -> None:
    """Stop an operator process: SIGTERM, then SIGKILL after 20 s."""
    if op is None or op.poll() is not None:
        return
    op.terminate()
    try:
        op.wait(20)
    except subprocess.TimeoutExpired:
        op.kill()
        op.wait()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def histogram_quantiles(url: str, metric: str, label: str) -> dict:
    """p50 and p99 of the series of histogram ``metric`` whose labels contain ``label``,
    interpolated within its buckets (PromQL's histogram_quantile)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    counts: dict[float, float] = collections.defaultdict(float)
    for line in text.splitlines():
        if line.startswith(metric + "_bucket{") and label in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            counts[float("inf") if le == "+Inf" else float(le)] += float(line.rsplit(" ", 1)[1])
    buckets = sorted(counts.items())
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
    return {"metric": metric, "observations": int(total), "p50": q(0.5), "p99": q(0.99)}


# ---- what each operator is given and how it is run ------------------------------------------

def lepton_job(name: str, namespace: str, workers: int) -> dict:
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"workers": {"min": workers, "max": workers}, "resources": {"gpus": 1}}}


def pytorch_job(name: str, namespace: str, workers: int) -> dict:
    """An elastic PyTorchJob of ``workers`` workers (min = max), 1 GPU each, c10d rendezvous."""
    container = {"name": "pytorch", "image": "lepton-trainer:bench",
                 "command": ["torchrun", "-m", "lepton_trainer.train"],
                 "resources": {"limits": {GPU: "1"}, "requests": {GPU: "1"}}}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": workers, "maxReplicas": workers},
                     "pytorchReplicaSpecs": {"Worker": {
                         "replicas": workers, "restartPolicy": "OnFailure",
                         "template": {"spec": {
                             "containers": [container],
                             "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]}}}}}}


def wait_http(url: str, op: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline or op.poll() is not None:
                raise RuntimeError(f"operator not ready at {url}; see {log}")
            time.sleep(0.5)


def start_lepton(cluster: localcluster.Cluster, state: Path) -> tuple[subprocess.Popen, str]:
    """Our operator, all namespaces; returns (process, metrics URL)."""
    port = free_port()
    log = state / "lepton-operator.log"
    op = subprocess.Popen([sys.executable, "-m", "lepton_operator", "--all-namespaces",
                           "--metrics-port", str(port), "--health-port", str(free_port())],
                          stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT,
                          env={**cluster.env, "LEPTON_TRAINER_IMAGE": "lepton-trainer:bench"})
    wait_http(f"http://127.0.0.1:{port}/metrics", op, log)
    return op, f"http://127.0.0.1:{port}/metrics"


def kubeflow_binary() -> Path:
    path = CACHE / "bin" / f"training-operator-{versions()['TRAINING_OPERATOR_VERSION']}"
    if not path.exists():
        subprocess.run(["bash", str(ROOT / "hack" / "build-tools.sh"), "training-operator"], check=True)
    return path


def mount_kubeflow_certs(core: kubernetes.client.CoreV1Api, op: subprocess.Popen) -> None:
    """Do what a kubelet's Secret volume does in its Deployment: once its cert rotator has
    filled the Secret, write tls.crt and tls.key where its webhook server reads them."""
    while op.poll() is None:
        data = core.read_namespaced_secret("training-operator-webhook-cert", KUBEFLOW_NAMESPACE).data or {}
        if "tls.crt" in data and "tls.key" in data:
            KUBEFLOW_CERT_DIR.mkdir(parents=True, exist_ok=True)
            for name in ("tls.crt", "tls.key"):
                (KUBEFLOW_CERT_DIR / name).write_bytes(base64.b64decode(data[name]))
            return
        time.sleep(0.5)


def start_kubeflow(cluster: localcluster.Cluster, state: Path) -> tuple[subprocess.Popen, str]:
    """Kubeflow's training-operator out of cluster, PyTorchJob only, no webhook configuration
    installed; returns (process, metrics URL). v1.8.1 has no flag to run without its cert
    rotator, which needs its Secret to exist and its certificate files on disk."""
    metrics, probe = free_port(), free_port()
    if not cluster.kubectl("get", "namespace", KUBEFLOW_NAMESPACE, check=False):
        cluster.create_namespace(KUBEFLOW_NAMESPACE)
    cluster.kubectl("create", "secret", "generic", "training-operator-webhook-cert", "-n", KUBEFLOW_NAMESPACE,
                    check=False)
    shutil.rmtree(KUBEFLOW_CERT_DIR, ignore_errors=True)
    log = state / "training-operator.log"
    op = subprocess.Popen([str(kubeflow_binary()), "--enable-scheme=pytorchjob",
                           f"--metrics-bind-address=127.0.0.1:{metrics}",
                           f"--health-probe-bind-address=127.0.0.1:{probe}",
                           f"--webhook-server-port={free_port()}", "--zap-log-level=info"],
                          stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=state,
                          env={**cluster.env, "MY_POD_NAMESPACE": KUBEFLOW_NAMESPACE})
    mount_kubeflow_certs(kubernetes.client.CoreV1Api(cluster.api_client()), op)
    wait_http(f"http://127.0.0.1:{probe}/readyz", op, log, timeout=300)
    return op, f"http://127.0.0.1:{metrics}/metrics"


OPERATORS = {
    "lepton": {"name": "lepton-operator", "start": start_lepton, "manifest": lepton_job,
               "resource": ("lepton.ai", "v1alpha1", "leptonjobs"), "agents": ("lepton-operator", "kopf/"),
               "job_label": "lepton.ai/job", "role_label": "lepton.ai/role",
               "reconcile": ("lepton_operator_reconcile_duration_seconds", 'kind="LeptonJob"'),
               "kind": "LeptonJob (workers min = max = W, 1 GPU each; its rendezvous store is one more pod)"},
    "kubeflow": {"name": "kubeflow-training-operator", "start": start_kubeflow, "manifest": pytorch_job,
                 "resource": ("kubeflow.org", "v1", "pytorchjobs"), "agents": ("training-operator",),
                 "job_label": "training.kubeflow.org/job-name", "role_label": "training.kubeflow.org/replica-type",
                 "reconcile": ("controller_runtime_reconcile_time_seconds", 'controller="pytorchjob-controller"'),
                 "queue": ("workqueue_queue_duration_seconds", 'name="pytorchjob-controller"'),
                 "kind": "PyTorchJob, elasticPolicy min = max = W (c10d), W Workers, 1 GPU each"},
}


def job_running(op_key: str, job: dict) -> bool:
    status = job.get("status") or {}
    if op_key == "lepton":
        return status.get("phase") == "Running"
    return any(c.get("type") == "Running" and c.get("status") == "True" for c in status.get("conditions") or ())


# ---- measuring one operator -----------------------------------------------------------------

class Watcher(threading.Thread):
    """One watch of a namespaced list (from ``list_fn``), calling ``seen(obj, monotonic time)``
    for every object an event brings; it reconnects from the last resourceVersion."""

    def __init__(self, list_fn, seen):
        super().__init__(daemon=True)
        self.list_fn, self.seen, self.done = list_fn, seen, threading.Event()
        self.rv = json.loads(list_fn(limit=1, _preload_content=False).data)["metadata"]["resourceVersion"]

    def run(self) -> None:
        while not self.done.is_set():
            try:
                resp = self.list_fn(watch=True, resource_version=self.rv, timeout_seconds=3600,
                                    allow_watch_bookmarks=True, _preload_content=False)
                for line in resp:
                    if self.done.is_set():
                        return
                    event = json.loads(line)
                    obj = event["object"]
                    self.rv = obj["metadata"].get("resourceVersion", self.rv)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.seen(obj, time.monotonic())
            except Exception:      # the stream broke: reconnect from the last resourceVersion
                time.sleep(0.5)


class Progress:
    """Per job: when its create returned, when all its workers had a node, when it ran."""

    def __init__(self, op: dict, workers: int):
        self.op, self.workers = op, workers
        self.created: dict[str, float] = {}
        self.bound_pods: dict[str, set[str]] = collections.defaultdict(set)
        self.bound: dict[str, float] = {}
        self.running: dict[str, float] = {}

    def pod(self, pod: dict, now: float) -> None:
        labels = pod["metadata"].get("labels") or {}
        job = labels.get(self.op["job_label"])
        if job is None or labels.get(self.op["role_label"], "").lower() != "worker" \
                or not pod["spec"].get("nodeName"):
            return
        self.bound_pods[job].add(pod["metadata"]["name"])
        if len(self.bound_pods[job]) >= self.workers:
            self.bound.setdefault(job, now)

    def job(self, key: str, job: dict, now: float) -> None:
        if job_running(key, job):
            self.running.setdefault(job["metadata"]["name"], now)

    def latencies(self) -> list[float]:
        return [t - self.created[j] for j, t in self.bound.items() if j in self.created]


def audit_requests(cluster: localcluster.Cluster, agents: tuple[str, ...], start: float, end: float) -> list[dict]:
    """Completed requests by ``agents`` received between wall times ``start`` and ``end``,
    from the audit log and the files it was rotated into."""
    def stamp(t: float) -> str:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    lo, hi = stamp(start), stamp(end)
    needles = [f'"userAgent":"{a}'.encode() for a in agents]
    found = []
    for path in sorted(Path(cluster.audit_log).parent.glob("audit*.log")):
        with open(path, "rb") as f:
            for line in f:
                if any(n in line for n in needles):
                    e = json.loads(line)
                    if e.get("stage") == "ResponseComplete" and lo <= e["requestReceivedTimestamp"] <= hi:
                        found.append(e)
    return found


def describe(entries: list[dict]) -> dict[str, int]:
    counts = collections.Counter()
    for e in entries:
        ref = e.get("objectRef", {})
        what = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        counts[f"{e['verb']} {what}"] += 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def create_all(custom: kubernetes.client.CustomObjectsApi, op: dict, namespace: str, n: int, workers: int,
               progress: Progress) -> float:
    """Create ``n`` jobs from 16 concurrent clients; returns the seconds the creates took."""
    group, version, plural = op["resource"]
    t0 = time.monotonic()

    def create(i: int) -> None:
        body = op["manifest"](f"bench-{i:04d}", namespace, workers)
        custom.create_namespaced_custom_object(group, version, namespace, plural, body)
        progress.created[body["metadata"]["name"]] = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(create, range(n)))
    return time.monotonic() - t0


def wait_until_running(progress: Progress, proc: subprocess.Popen, n: int, timeout: float) -> float:
    """Seconds from now until every job runs (or the timeout, or the operator exited)."""
    t0 = time.monotonic()
    while (len(progress.running) < n or len(progress.bound) < n) and time.monotonic() - t0 < timeout \
            and proc.poll() is None:
        time.sleep(0.5)
    return time.monotonic() - t0


def run_operator(cluster: localcluster.Cluster, key: str, args: argparse.Namespace, n: int, state: Path) -> dict:
    """Start one operator, create ``n`` jobs, measure until they all run, stop it."""
    op, namespace = OPERATORS[key], f"bench-{key}"
    cluster.create_namespace(namespace)
    proc, metrics_url = op["start"](cluster, state)
    watchers: list[Watcher] = []
    try:
        time.sleep(3)   # let it finish its initial listing
        rss0 = peak_rss_mib(proc.pid)
        api = cluster.api_client()
        core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
        progress = Progress(op, args.workers)
        group, version, plural = op["resource"]
        watchers += [Watcher(lambda **kw: core.list_namespaced_pod(namespace, **kw), progress.pod),
                     Watcher(lambda **kw: custom.list_namespaced_custom_object(group, version, namespace, plural, **kw),
                             lambda obj, now: progress.job(key, obj, now))]
        for w in watchers:
            w.start()
        components = {name: pid for name, pid in cluster.pids.items() if name != "prometheus"}
        cpu0 = {"operator": cpu_seconds(proc.pid), **{c: cpu_seconds(pid) for c, pid in components.items()}}
        wall0, t0 = time.time(), time.monotonic()
        created_within = create_all(custom, op, namespace, n, args.workers, progress)
        wait_until_running(progress, proc, n, args.timeout - (time.monotonic() - t0))
        all_running = time.monotonic() - t0
        cpu = {c: round(cpu_seconds(proc.pid if c == "operator" else components[c]) - v, 1) for c, v in cpu0.items()}
        time.sleep(5)   # last status writes
        wall1 = time.time()
        time.sleep(args.idle_seconds)
        wall2 = time.time()
        reconcile = histogram_quantiles(metrics_url, *op["reconcile"])
        queue = histogram_quantiles(metrics_url, *op["queue"]) if "queue" in op else None
        rss = peak_rss_mib(proc.pid)
    finally:
        stop(proc)
        for w in watchers:
            w.done.set()
    active = audit_requests(cluster, op["agents"], wall0, wall1)
    idle = audit_requests(cluster, op["agents"], wall1, wall2)
    return row(key, n, args, progress, active=active, idle=idle, cpu=cpu, rss=(rss0, rss), reconcile=reconcile,
               queue=queue, all_running=all_running, created_within=created_within, namespace=namespace)


def bound_quantile(latencies: list[float], n: int, q: float, waited: float) -> float | str | None:
    """The q-quantile over all ``n`` jobs; a job not bound counts as later than ``waited``."""
    if not latencies:
        return None
    ranked = sorted(latencies) + [float("inf")] * (n - len(latencies))
    value = ranked[min(n - 1, int(q * n))]
    return round(value, 2) if value != float("inf") else f">{waited:.0f}"


def row(key: str, n: int, args: argparse.Namespace, progress: Progress, **m) -> dict:
    op, latencies = OPERATORS[key], progress.latencies()
    in_ns = [e for e in m["active"] if e.get("objectRef", {}).get("namespace") == m["namespace"]
             and e["verb"] not in ("watch", "list")]
    return {
        "operator": op["name"], "jobs": n, "workers_per_job": args.workers, "object": op["kind"],
        "create_to_all_workers_bound_seconds": {
            "jobs_bound": len(latencies),
            "p50": bound_quantile(latencies, n, 0.5, m["all_running"]),
            "p99": bound_quantile(latencies, n, 0.99, m["all_running"]),
            "max": bound_quantile(latencies, n, 1.0, m["all_running"])},
        "finished": len(latencies) == n and len(progress.running) == n,
        "jobs_running": len(progress.running),
        "first_create_to_all_jobs_running_seconds": round(m["all_running"], 1),
        "jobs_created_within_seconds": round(m["created_within"], 1),
        "operator_cpu_seconds": m["cpu"]["operator"],
        "operator_cpu_seconds_per_job": round(m["cpu"]["operator"] / n, 4),
        "cpu_seconds_until_all_running": m["cpu"],
        "api_requests": {"operator_total": len(m["active"]), "per_job": round(len(in_ns) / n, 2),
                         "by_verb_and_resource": describe(m["active"]),
                         "idle_window_seconds": args.idle_seconds, "idle_requests": len(m["idle"])},
        "operator_rss_mib": {"peak": round(m["rss"][1], 1), "before_jobs": round(m["rss"][0], 1)},
        "reconcile_seconds": m["reconcile"],
        **({"queue_wait_seconds": m["queue"]} if m["queue"] else {}),
    }


def delete_namespace(cluster: localcluster.Cluster, namespace: str, timeout: float = 1800) -> float:
    """Delete ``namespace`` and wait until it (and so every pod in it) is gone; returns seconds."""
    t0 = time.monotonic()
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    while cluster.kubectl("get", "namespace", namespace, "--ignore-not-found", "-o", "name", check=False).strip():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"namespace {namespace} still there after {timeout}s")
        time.sleep(2)
    return round(time.monotonic() - t0, 1)


# ---- one run ----------------------------------------------------------------------------------

def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return {"cpu": model, "cpus": os.cpu_count(), "memory_gib": round(mem / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def run_size(n: int, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """One size on a fresh control plane: the operators one after the other."""
    gpus = n * args.workers
    nodes = max(4, -(-gpus // 100))
    state = Path(tempfile.mkdtemp(prefix=f"bench-jobs-{n}-"))
    cluster = localcluster.Cluster(state, gpu_node_count=nodes, gpus_per_node=-(-gpus // nodes))
    meta = {"jobs": n, "workers_per_job": args.workers, "load_average_before": list(os.getloadavg()),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cluster": {"kwok_gpu_nodes": nodes, "gpus_per_node": cluster.gpus_per_node, "kwok_cpu_nodes": 1}}
    rows, t0 = [], time.monotonic()
    cluster.start()
    try:
        cluster.install_crds()
        if "kubeflow" in args.operators:
            cluster.kubectl("apply", "--server-side", "-f", str(kubeflow_crd()))
            cluster.wait_established("crd/pytorchjobs.kubeflow.org")
        for i, key in enumerate(args.operators):
            if i:
                meta[f"seconds_to_delete_bench-{args.operators[i - 1]}"] = delete_namespace(
                    cluster, f"bench-{args.operators[i - 1]}")
            print(f"[jobs {time.strftime('%H:%M:%S')}] {key}: {n} jobs of {args.workers}", file=sys.stderr, flush=True)
            rows.append(run_operator(cluster, key, args, n, state))
            print(json.dumps(rows[-1], indent=1), file=sys.stderr, flush=True)
    finally:
        cluster.stop()
    meta.update(load_average_after=list(os.getloadavg()), seconds=round(time.monotonic() - t0))
    return meta, rows


def kubeflow_crd() -> Path:
    """The PyTorchJob CRD from the training-operator's Go module (its manifests/base/crds)."""
    version = versions()["TRAINING_OPERATOR_VERSION"]
    gomodcache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True,
                                env={**os.environ, "PATH": f"/usr/local/go/bin:{os.environ.get('PATH', '')}"}
                                ).stdout.strip() or str(Path.home() / "go" / "pkg" / "mod")
    path = Path(gomodcache) / f"{KUBEFLOW_MODULE}@{version}" / "manifests" / "base" / "crds" / "kubeflow.org_pytorchjobs.yaml"
    if not path.exists():
        kubeflow_binary()      # building it downloads the module
    return path


def versions_used() -> dict:
    v = versions()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "operator"], capture_output=True, text=True, cwd=ROOT).stdout:
        head += "+changes"      # the operator's files differ from the commit
    return {"kubernetes": v["K8S_VERSION"], "etcd": v["ETCD_VERSION"], "kwok": v["KWOK_VERSION"],
            "training_operator": v["TRAINING_OPERATOR_VERSION"], "lepton_operator_commit": head,
            "kopf": __import__("importlib.metadata").metadata.version("kopf")}


NOTES = [
    "Both operators run out of cluster as subprocesses with the admin kubeconfig, one after the other on the "
    "same control plane and kwok GPU nodes (ours first); between them the first one stops and its namespace is "
    "deleted until its pods are gone.",
    "Kubeflow's training-operator runs with the flags of its own Deployment (manifests/base: one controller "
    "thread, controller-runtime's client-side limit of 20 requests/s, burst 30) plus --enable-scheme=pytorchjob. "
    "No ValidatingWebhookConfiguration is installed. v1.8.1 has no flag to start without its cert rotator "
    "(cmd/training-operator.v1: only --webhook-server-port, --webhook-service-name, --webhook-secret-name), "
    "which needs its Secret (kubeflow/training-operator-webhook-cert, created empty) and the certificate files "
    "in /tmp/k8s-webhook-server/serving-certs, which the bench writes from the Secret as a kubelet's Secret "
    "volume would; it logs 'Webhook not found' and starts its controllers.",
    "Our LeptonJob makes one more pod than the PyTorchJob (its rendezvous store, on the kwok CPU node) and one "
    "ClusterIP Service beside the workers' headless one; the PyTorchJob's rendezvous is on worker 0 (c10d).",
    "Reconcile latency is each operator's histogram of one reconcile call: ours includes waiting for a thread of "
    "its API client pool (every job's loop shares it); controller-runtime's does not include the work queue's "
    "wait, recorded as queue_wait_seconds.",
]


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("create -> all workers bound p99 (s)", lambda r: r["create_to_all_workers_bound_seconds"]["p99"]),
              ("create -> all workers bound p50 (s)", lambda r: r["create_to_all_workers_bound_seconds"]["p50"]),
              ("operator CPU seconds per job", lambda r: r["operator_cpu_seconds_per_job"]),
              ("API requests per job", lambda r: r["api_requests"]["per_job"]),
              ("operator peak RSS (MiB)", lambda r: r["operator_rss_mib"]["peak"]),
              ("first create -> all jobs running (s)", lambda r: r["first_create_to_all_jobs_running_seconds"])]
    sizes = sorted({r["jobs"] for r in result["rows"]})
    names = list(dict.fromkeys(r["operator"] for r in result["rows"]))
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (title, value) in zip(axes.flat, panels):
        for j, name in enumerate(names):
            ys = [float(str(next((value(r) for r in result["rows"] if r["operator"] == name and r["jobs"] == s),
                                 0) or 0).lstrip(">")) for s in sizes]     # ">600": a lower bound
            bars = ax.bar([i + (j - (len(names) - 1) / 2) * 0.38 for i in range(len(sizes))], ys, 0.36, label=name)
            ax.bar_label(bars, fmt=lambda v: f"{v:,.0f}" if v >= 1000 else f"{v:.3g}", fontsize=8)
        ax.set_xticks(range(len(sizes)), [f"{s:,} jobs" for s in sizes])
        ax.set_title(title, fontsize=10)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"LeptonJob vs Kubeflow PyTorchJob (elastic), {result['machine']['cpus']} CPUs, "
                 f"W = {result['rows'][0]['workers_per_job']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, action="append", help="a size; repeat for several (default 1000)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--operators", default="lepton,kubeflow", help="comma-separated, run in this order")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per operator until all jobs run")
    parser.add_argument("--out", default="jobs.json", help="file name under bench/results")
    parser.add_argument("--merge", action="store_true", help="keep the rows of other sizes already in --out")
    parser.add_argument("--plot", action="store_true", help="write the PNG beside --out")
    args = parser.parse_args()
    args.operators = args.operators.split(",")
    out = RESULTS / args.out
    old = json.loads(out.read_text()) if args.merge and out.exists() else {}
    result = {"what": __doc__.split("\n\n")[0], "machine": machine(), "versions": versions_used(),
              "notes": NOTES, **({"findings": old["findings"]} if "findings" in old else {}),
              "sizes": old.get("sizes", []), "rows": old.get("rows", [])}
    for n in args.jobs or [1000]:
        meta, rows = run_size(n, args)
        result["sizes"] = [s for s in result["sizes"] if s["jobs"] != n] + [meta]
        result["rows"] = [r for r in result["rows"] if r["jobs"] != n] + rows
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, out.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
