"""LeptonModel in steady state: API requests per steady reconcile, and per model to Ready.

Starts the local control plane (hack/localcluster.py, kwok GPU nodes, no real node), runs
the operator as a subprocess, creates a PersistentVolumeClaim and N LeptonModels that
serve ``pvc://<claim>/<path>`` without a compression Job (``compression.method: none``,
1 serving replica on the kwok nodes), waits until every model is Ready, and measures:

- **API requests per model from create to Ready** made by the operator (User-Agent
  ``lepton-operator`` or ``kopf/...``, from the API server's audit log, counted as
  bench/jobs.py counts them), by verb and resource;
- **idle requests**: the operator's requests in a quiet window after every model is
  Ready (``--idle-seconds``), by verb and resource (a request with no object, such as
  the Gateway API discovery GET, is named by its path);
- **reconciles in that window**, from the operator's own
  ``lepton_operator_reconcile_duration_seconds_count{kind="LeptonModel"}`` read before
  and after it (a steady loop reconciles once per resync period, 60 s by default), hence
  **requests per steady reconcile** = idle requests / reconciles, in all and by verb and
  resource.

With ``--source jobref`` the models serve the output of one succeeded LeptonJob
(``source.jobRef``) instead: the source older code read with a GET on every reconcile.
That job's own loop runs beside the models' (its requests, if any, are counted too).

With ``--operator-rev REV`` the operator runs from a ``git worktree`` of REV in a
temporary directory (its ``operator/`` and ``trainer_image/`` first on PYTHONPATH), so
the same bench measures older code. Each run is stored under ``runs.<label>`` of the
output file; the runs of other labels already there are kept.

    .venv/bin/python bench/models.py [--models 100] [--idle-seconds 60] [--label after]
    .venv/bin/python bench/models.py --operator-rev 39290b9 --label before
    .venv/bin/python bench/models.py --source jobref --label after-jobref

Writes bench/results/models.json (or --out, a file name under bench/results).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import kubernetes

from jobs import (RESULTS, ROOT, audit_entries, by_operator, cpu_seconds, describe, free_port, localcluster, stop,
                  peak_rss_mib, quantile)

NAMESPACE = "bench-models"
CLAIM = "models"
SOURCE_JOB = "train"     # the LeptonJob the models serve with --source jobref
RECONCILES = 'lepton_operator_reconcile_duration_seconds_count{kind="LeptonModel"}'


# --- the operator's source ---------------------------------------------------------------

def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def operator_source(rev: str | None) -> Iterator[tuple[Path, dict]]:
    """(the directory holding operator/ and trainer_image/, what it is): this working tree,
    or a worktree of ``rev`` removed afterwards."""
    if rev is None:
        dirty = git("status", "--porcelain", "--", "operator", "trainer_image").splitlines()
        yield ROOT, {"source": "working tree", "head": git("rev-parse", "HEAD"),
                     "uncommitted_operator_files": [line[3:] for line in dirty]}
        return
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = Path(tempfile.mkdtemp(prefix="bench-models-rev-")) / "src"
    git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path, {"source": "git worktree", "rev": rev, "commit": commit,
                     "subject": git("log", "-1", "--format=%s", commit)}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)
        shutil.rmtree(path.parent, ignore_errors=True)


def operator_env(cluster: localcluster.Cluster, src: Path) -> dict[str, str]:
    env = {**cluster.env, "LEPTON_TRAINER_IMAGE": "lepton-trainer:bench", "PYTHONUNBUFFERED": "1"}
    if src != ROOT:   # the worktree's packages before the editable install of this tree
        env["PYTHONPATH"] = os.pathsep.join([str(src / "operator"), str(src / "trainer_image")]
                                            + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def imported_from(env: dict[str, str], src: Path) -> dict[str, str]:
    """Where the operator's process will import its packages from (a check on PYTHONPATH)."""
    out = subprocess.run([sys.executable, "-c", "import lepton_operator, lepton_trainer; "
                          "print(lepton_operator.__file__); print(lepton_trainer.__file__)"],
                         env=env, cwd=src, check=True, capture_output=True, text=True).stdout.split()
    return {"lepton_operator": str(Path(out[0]).parent), "lepton_trainer": str(Path(out[1]).parent)}


def metric(port: int, series: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " "))


def start_operator(cluster: localcluster.Cluster, src: Path, env: dict[str, str], log: Path
                   ) -> tuple[subprocess.Popen, int]:
    """The operator on all namespaces, once its /metrics answers: (process, metrics port)."""
    port = free_port()
    with open(log, "wb") as out:
        op = subprocess.Popen([sys.executable, "-m", "lepton_operator", "--all-namespaces",
                               "--metrics-port", str(port), "--health-port", str(free_port())],
                              stdout=out, stderr=subprocess.STDOUT, cwd=src, env=env)
    deadline = time.monotonic() + 90
    while True:
        try:
            metric(port, RECONCILES)
            return op, port
        except OSError:
            if time.monotonic() > deadline or op.poll() is not None:
                op.kill()
                raise RuntimeError(f"operator did not start; see {log}")
            time.sleep(0.5)


# --- the objects -------------------------------------------------------------------------

def claim_objects(state: Path) -> list[dict]:
    """A hostPath PersistentVolume bound to the claim the models read (no provisioner here)."""
    volume = f"{NAMESPACE}-{CLAIM}"
    access = {"accessModes": ["ReadWriteMany"]}
    return [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
         "spec": {**access, "capacity": {"storage": "1Gi"}, "hostPath": {"path": str(state / "pv")},
                  "claimRef": {"namespace": NAMESPACE, "name": CLAIM}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": CLAIM, "namespace": NAMESPACE},
         "spec": {**access, "storageClassName": "", "volumeName": volume,
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]


def model_manifest(i: int, source: str = "uri") -> dict:
    src = {"uri": f"pvc://{CLAIM}/digits"} if source == "uri" else {"jobRef": {"name": SOURCE_JOB}}
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
            "metadata": {"name": f"model-{i:03d}", "namespace": NAMESPACE},
            "spec": {"source": src, "compression": {"method": "none"}, "serving": {"replicas": 1}}}


def train_source_job(cluster: localcluster.Cluster, timeout: float = 120.0) -> None:
    """The LeptonJob every ``--source jobref`` model serves the output of: one worker,
    whose kwok pod is told to exit 0, so the job succeeds with an outputURI on the claim."""
    job = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob",
           "metadata": {"name": SOURCE_JOB, "namespace": NAMESPACE},
           "spec": {"workers": {"min": 1, "max": 1}, "resources": {"gpus": 1}, "checkpoint": {"claimName": CLAIM}}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(job))
    deadline = time.monotonic() + timeout
    while cluster.kubectl("get", "lj", SOURCE_JOB, "-n", NAMESPACE, "-o", "jsonpath={.status.phase}",
                          check=False) != "Succeeded":
        if time.monotonic() > deadline:
            raise RuntimeError(f"LeptonJob {SOURCE_JOB} did not succeed in {timeout:g}s")
        cluster.kubectl("annotate", "--overwrite", "pods", "-n", NAMESPACE, "-l", f"lepton.ai/job={SOURCE_JOB}",
                        "kwok.lepton.ai/exit-code=0", check=False)
        time.sleep(1)


def is_ready(model: dict) -> bool:
    s = model.get("status") or {}
    return s.get("phase") == "Ready" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in s.get("conditions") or ())


# --- counting ----------------------------------------------------------------------------

def named(entries: list[dict]) -> list[dict]:
    """Entries with an objectRef; one without (a discovery GET) gets its path as resource."""
    return [e if e.get("objectRef") else {**e, "objectRef": {"resource": e.get("requestURI", "?").split("?")[0]}}
            for e in entries]


def counts(entries: list[dict], per: float | None = None) -> dict:
    ops = named(by_operator(entries))
    out = {"total": len(ops), "by_verb_and_resource": describe(ops)}
    if per:
        out["per"] = round(len(ops) / per, 3)
        out["per_by_verb_and_resource"] = {k: round(v / per, 3) for k, v in out["by_verb_and_resource"].items()}
    return out


def machine(load_before: tuple[float, ...]) -> dict:
    return {"nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "arch": platform.machine(), "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def merge(out: Path, label: str, run: dict, doc: str) -> dict:
    """The results file with ``runs[label]`` replaced and every other run kept."""
    try:
        data = json.loads(out.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        data = {}
    data["description"] = doc
    data.setdefault("runs", {})[label] = run
    return data


# --- the run -----------------------------------------------------------------------------

def measure(args: argparse.Namespace, src: Path, source: dict, state: Path) -> dict:
    load_before = os.getloadavg()
    nodes = max(2, -(-args.models // 100))
    cluster = localcluster.Cluster(state / "cluster", gpu_node_count=nodes, real_node=False)
    cluster.start()
    op = None
    try:
        for crd in sorted((ROOT / "crds").glob("*.yaml")):
            cluster.kubectl("apply", "--server-side", "-f", str(crd))
        cluster.wait_established("crd/leptonmodels.lepton.ai")
        cluster.create_namespace(NAMESPACE)
        cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                              "items": claim_objects(state)}))
        env = operator_env(cluster, src)
        source["imported_from"] = imported_from(env, src)
        op, port = start_operator(cluster, src, env, state / "operator.log")
        time.sleep(3)   # let kopf finish its initial listing
        if args.source == "jobref":
            train_source_job(cluster)
            time.sleep(2)   # the job's last status write
        _, offset = audit_entries(cluster.audit_log)

        custom = kubernetes.client.CustomObjectsApi(cluster.api_client())
        created_at: dict[str, float] = {}

        def create(i: int) -> None:
            body = model_manifest(i, args.source)
            custom.create_namespaced_custom_object("lepton.ai", "v1alpha1", NAMESPACE, "leptonmodels", body)
            created_at[body["metadata"]["name"]] = time.monotonic()

        cpu0 = cpu_seconds(op.pid)
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(args.models)))
        ready_at: dict[str, float] = {}
        phases: collections.Counter = collections.Counter()
        while len(ready_at) < args.models and time.monotonic() - t0 < args.ready_timeout:
            items = custom.list_namespaced_custom_object("lepton.ai", "v1alpha1", NAMESPACE, "leptonmodels")["items"]
            now = time.monotonic()
            phases = collections.Counter((m.get("status") or {}).get("phase", "") for m in items)
            for m in items:
                name = m["metadata"]["name"]
                if is_ready(m) and name not in ready_at and name in created_at:
                    ready_at[name] = now - created_at[name]
            time.sleep(1)
        all_ready = time.monotonic() - t0
        to_ready, offset = audit_entries(cluster.audit_log, offset)
        cpu_to_ready = cpu_seconds(op.pid) - cpu0
        if len(ready_at) < args.models:
            print(f"only {len(ready_at)}/{args.models} models Ready after {args.ready_timeout:g}s: {dict(phases)}",
                  file=sys.stderr)

        time.sleep(args.settle_seconds)   # the last status writes, Deployment status updates
        settle, offset = audit_entries(cluster.audit_log, offset)
        reconciles0, cpu1 = metric(port, RECONCILES), cpu_seconds(op.pid)
        time.sleep(args.idle_seconds)
        reconciles1, cpu2 = metric(port, RECONCILES), cpu_seconds(op.pid)
        idle, _ = audit_entries(cluster.audit_log, offset)
        reconciles = int(reconciles1 - reconciles0)
        latencies = list(ready_at.values())
        in_ns = [e for e in by_operator(to_ready) if e.get("objectRef", {}).get("namespace") == NAMESPACE
                 and e["verb"] not in ("watch", "list")]
        log_text = (state / "operator.log").read_text(errors="replace")
        return {
            "operator": source,
            "config": {"models": args.models, "idle_seconds": args.idle_seconds,
                       "settle_seconds": args.settle_seconds, "kwok_gpu_nodes": nodes,
                       "source": args.source,
                       "model_spec": model_manifest(0, args.source)["spec"], "resync_seconds": "operator default (60)"},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(load_before),
            "models_ready": len(ready_at),
            "create_to_ready_seconds": {
                "first_create_to_all_ready": round(all_ready, 2),
                "median": round(statistics.median(latencies), 2) if latencies else None,
                "p95": round(quantile(latencies, 0.95), 2) if latencies else None,
                "max": round(max(latencies), 2) if latencies else None, "poll_interval": 1.0},
            "create_to_ready_requests": {
                **counts(to_ready, args.models),
                "per_model_in_namespace_excluding_watch_list": round(len(in_ns) / args.models, 3)},
            "settle_requests": counts(settle),
            "steady": {
                "idle_window_seconds": args.idle_seconds,
                "idle_requests": len(by_operator(idle)),
                "reconciles_in_window": reconciles,
                "requests_per_steady_reconcile": round(len(by_operator(idle)) / reconciles, 3) if reconciles else None,
                "requests": counts(idle, reconciles or None),
                "reconcile_requests_per_steady_reconcile": reconcile_share(counts(idle, None), reconciles),
                "operator_cpu_seconds": round(cpu2 - cpu1, 2)},
            "operator_cpu_seconds_to_ready": round(cpu_to_ready, 2),
            "operator_rss_mib_peak": round(peak_rss_mib(op.pid), 1),
            "operator_log_error_lines": sum(("ERROR" in line or "Traceback" in line)
                                            for line in log_text.splitlines()),
        }
    finally:
        stop(op)
        cluster.stop()


def reconcile_share(requests: dict, reconciles: int) -> float | None:
    """Requests per steady reconcile less those no reconcile makes: kopf's watch streams
    (re-opened when the server ends one) and the Gateway API discovery GET, which one task
    makes every 30 s for all models."""
    if not reconciles:
        return None
    made = sum(n for key, n in requests["by_verb_and_resource"].items()
               if not key.startswith("watch ") and "/apis/gateway.networking.k8s.io" not in key)
    return round(made / reconciles, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--settle-seconds", type=float, default=10.0,
                        help="wait after every model is Ready before the idle window")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--source", choices=["uri", "jobref"], default="uri",
                        help=f"spec.source: uri pvc://{CLAIM}/digits, or jobRef to one succeeded LeptonJob")
    parser.add_argument("--operator-rev", metavar="GIT_REV", help="run the operator of this git revision")
    parser.add_argument("--label", help="key of this run under runs (default: the revision, or working-tree)")
    parser.add_argument("--out", default="models.json", help="file name under bench/results")
    args = parser.parse_args()
    label = args.label or args.operator_rev or "working-tree"

    state = Path(tempfile.mkdtemp(prefix="bench-models-"))
    print(f"state, logs and the operator log in {state}", file=sys.stderr)
    with operator_source(args.operator_rev) as (src, source):
        run = measure(args, src, source, state)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / args.out
    out.write_text(json.dumps(merge(out, label, run, __doc__.split("\n\n")[0]), indent=2) + "\n")
    print(json.dumps({label: run}, indent=2))


if __name__ == "__main__":
    main()
