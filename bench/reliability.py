"""LeptonJob reliability in numbers: chaos, hypothesis, HA takeover, scale from zero, load.

Runs, each on its own local control plane (hack/localcluster.py):

- the chaos suite (tests/integration/test_chaos.py): rounds, objects churned, faults and
  invariant violations (must be 0);
- the property suites (tests/unit/test_properties.py, tests/integration/test_spec_properties.py):
  hypothesis cases run;
- the HA suite (tests/integration/test_operator_ha.py): seconds from SIGKILL of the leading
  replica to the standby leading;
- scale from zero (``--zero-runs`` times, median): a job whose pool has no node, from
  apply to its gang's Pending pods, and from the node appearing to the job Running; then
  a worker of it fails (exit 1), and the time to its replacement Running;
- load (bench/jobs.py --jobs 1000 --workers 1 --operators lepton): operator RSS, reconcile
  p50/p99 and API requests per job.

    .venv/bin/python bench/reliability.py [--jobs 1000] [--zero-runs 5] [--parts suites,zero,load]

Writes bench/results/reliability.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))
import localcluster  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PY = sys.executable


def pytest(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    proc = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True)
    return proc.returncode, proc.stdout[-3000:]


def suites(tmp: Path) -> dict:
    chaos, hyp, ha = tmp / "chaos.json", tmp / "hypothesis.json", tmp / "ha.json"
    rc_chaos, out_chaos = pytest(["tests/integration/test_chaos.py"], {"LEPTON_CHAOS_RESULT": str(chaos)})
    rc_props, _ = pytest(["tests/unit/test_properties.py", "tests/integration/test_spec_properties.py"],
                         {"LEPTON_HYPOTHESIS_COUNTS": str(hyp)})
    rc_ha, out_ha = pytest(["-s", "tests/integration/test_operator_ha.py"], {"LEPTON_HA_COUNTS": str(ha)})
    takeover = next((float(word.split("=")[1]) for line in out_ha.splitlines() for word in line.split()
                     if word.startswith("takeover_seconds=")), None)
    result = json.loads(chaos.read_text()) if chaos.exists() else {"violations": None, "error": out_chaos}
    return {"chaos": {**result, "passed": rc_chaos == 0},
            "hypothesis_cases": {**(json.loads(hyp.read_text()) if hyp.exists() else {}), "passed": rc_props == 0},
            "ha": {"takeover_seconds": takeover, "passed": rc_ha == 0}}


def scale_from_zero(runs: int) -> dict:
    state = Path(tempfile.mkdtemp(prefix="bench-zero-"))
    cluster = localcluster.Cluster(state, gpu_node_count=1, gpus_per_node=8)
    cluster.start()
    op = None
    try:
        cluster.install_crds()
        ns = cluster.create_namespace("zero")
        health = localcluster.free_port()
        op = subprocess.Popen([PY, "-m", "lepton_operator", "--all-namespaces", "--health-port", str(health),
                               "--metrics-port", str(localcluster.free_port())], cwd=ROOT,
                              stdout=open(state / "operator.log", "wb"), stderr=subprocess.STDOUT,
                              env={**cluster.env, "LEPTON_TRAINER_IMAGE": "lepton-trainer:bench"})
        wait(lambda: _ok(f"http://127.0.0.1:{health}/healthz"), 60)
        to_pending, to_running, replaced = [], [], []
        for i in range(runs):
            pool, job = f"pool-{i}", f"zero-{i}"
            manifest = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob", "metadata": {"name": job, "namespace": ns},
                        "spec": {"workers": {"min": 2, "max": 2}, "resources": {"gpus": 1},
                                 "nodeSelector": {"bench.lepton.ai/pool": pool}}}
            t0 = time.monotonic()
            cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
            wait(lambda: len(_pods(cluster, ns, job, "Pending")) == 2, 60)
            to_pending.append(time.monotonic() - t0)
            node = localcluster.gpu_node(f"kwok-{pool}", 8)
            node["metadata"]["labels"]["bench.lepton.ai/pool"] = pool
            t1 = time.monotonic()
            cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
            wait(lambda: json.loads(cluster.kubectl("get", "lj", job, "-n", ns, "-o", "json"))
                 .get("status", {}).get("phase") == "Running", 120)
            to_running.append(time.monotonic() - t1)
            pod = f"{job}-worker-0"
            old = json.loads(cluster.kubectl("get", "pod", pod, "-n", ns, "-o", "json"))["metadata"]["uid"]
            t2 = time.monotonic()
            cluster.kubectl("annotate", "pod", pod, "-n", ns, "kwok.lepton.ai/exit-code=1")
            wait(lambda: any(p["metadata"]["name"] == pod and p["metadata"]["uid"] != old
                             for p in _pods(cluster, ns, job, "Running")), 120)
            replaced.append(time.monotonic() - t2)
            cluster.kubectl("delete", "lj", job, "-n", ns, "--wait=true")
        return {"runs": runs,
                "apply_to_gang_pending_seconds": {"median": round(statistics.median(to_pending), 2),
                                                  "all": [round(x, 2) for x in to_pending]},
                "node_appears_to_running_seconds": {"median": round(statistics.median(to_running), 2),
                                                    "all": [round(x, 2) for x in to_running]},
                "failed_worker_to_replacement_running_seconds": {"median": round(statistics.median(replaced), 2),
                                                                 "all": [round(x, 2) for x in replaced]}}
    finally:
        if op is not None:
            op.terminate()
            op.wait(20)
        cluster.stop()


def _pods(cluster, ns: str, job: str, phase: str) -> list:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", ns, "-l", f"lepton.ai/job={job},lepton.ai/role=worker",
                                      "-o", "json"))["items"]
    return [p for p in pods if p["status"].get("phase") == phase]


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def wait(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError("timed out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--zero-runs", type=int, default=5)
    parser.add_argument("--parts", default="suites,zero,load",
                        help="what to run; the others keep their numbers from the last reliability.json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench-reliability-"))
    out = RESULTS / "reliability.json"
    result: dict = json.loads(out.read_text()) if out.exists() and parts != {"suites", "zero", "load"} else {}
    result.update({"machine": f"{os.cpu_count()} CPUs", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if "suites" in parts:
        result.update(suites(tmp))
    if "zero" in parts:
        result["scale_from_zero"] = scale_from_zero(args.zero_runs)
    if "load" in parts:
        subprocess.run([PY, str(ROOT / "bench" / "jobs.py"), "--jobs", str(args.jobs), "--workers", "1",
                        "--operators", "lepton", "--out", "reliability-load.json"],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        [load] = json.loads((RESULTS / "reliability-load.json").read_text())["rows"]
        result["load"] = {"jobs": load["jobs"], "operator_rss_mib": load["operator_rss_mib"],
                          "reconcile_seconds": load["reconcile_seconds"],
                          "api_requests_per_job": load["api_requests"]["per_job"],
                          "idle_requests": load["api_requests"]["idle_requests"],
                          "first_create_to_all_jobs_running_seconds": load["first_create_to_all_jobs_running_seconds"]}
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
