"""Install the chart into a real control plane and run the operator with the chart's
ServiceAccount token: the RBAC the chart grants must be enough for a LeptonJob's whole
life, and for the leader-election Lease the chart configures, and the API server must
never answer the operator with 403.

This module starts its own control plane, so that no other operator instance (the
integration suite runs one with admin rights) reconciles the same objects.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from waiting import wait_for, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))
import localcluster  # noqa: E402

pytestmark = pytest.mark.integration
RELEASE_NS = "lepton-system"




@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory):
    c = localcluster.Cluster(tmp_path_factory.mktemp("chart-cluster"))
    try:
        c.start()
    except Exception as exc:
        pytest.fail(f"the local control plane did not start: {exc}", pytrace=False)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def installed(own_cluster):
    c = own_cluster
    result = subprocess.run(
        [str(localcluster.tool_path("helm")), "install", "lepton", str(ROOT / "charts" / "lepton-operator"),
         "-n", RELEASE_NS, "--create-namespace", "--kubeconfig", c.kubeconfig],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return c


@pytest.fixture(scope="module")
def operator_as_service_account(installed, tmp_path_factory):
    c = installed
    token = c.kubectl("create", "token", "lepton-lepton-operator", "-n", RELEASE_NS, "--duration=2h").strip()
    tmp = tmp_path_factory.mktemp("sa")
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": c.server,
                                                "certificate-authority": str(c.pki / "ca.crt")}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "sa"}}]}))
    log_path = tmp / "operator.log"
    health = localcluster.free_port()
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lepton_operator", "--all-namespaces", "--kubeconfig", str(kubeconfig),
             "--metrics-port", str(localcluster.free_port()), "--health-port", str(health)],
            stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**c.env, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1",
                 # what the chart's Deployment sets (its pod stays Pending here: no node takes it)
                 "LEPTON_LEADER_ELECTION": "true", "LEPTON_LEADER_ELECTION_NAME": "lepton-lepton-operator",
                 "POD_NAMESPACE": RELEASE_NS, "POD_NAME": "lepton-lepton-operator-test"})

    wait_healthy(proc, health, log_path, "the operator to become healthy", timeout=120)
    yield c, log_path, proc
    proc.terminate()
    proc.wait(timeout=20)


def test_chart_installs_crds_service_account_and_deployment(installed):
    c = installed
    for crd in (ROOT / "crds").glob("*.yaml"):
        name = yaml.safe_load(crd.read_text())["metadata"]["name"]
        assert c.kubectl("get", "crd", name, "-o", "name").strip() == f"customresourcedefinition.apiextensions.k8s.io/{name}"
    dep = json.loads(c.kubectl("get", "deployment", "lepton-lepton-operator", "-n", RELEASE_NS, "-o", "json"))
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "lepton-lepton-operator"
    c.kubectl("get", "serviceaccount", "lepton-lepton-operator", "-n", RELEASE_NS)


def test_chart_rbac_is_enough_for_a_job_lifecycle(operator_as_service_account):
    c, log_path, _ = operator_as_service_account
    ns = c.create_namespace("rbac-check")
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "rbac-ckpt"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                  "hostPath": {"path": "/tmp/lepton-rbac-ckpt"}, "claimRef": {"namespace": ns, "name": "ckpt"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ckpt", "namespace": ns},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": "rbac-ckpt",
                  "resources": {"requests": {"storage": "1Gi"}}}},
        {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob", "metadata": {"name": "rbac", "namespace": ns},
         "spec": {"workers": {"min": 2, "max": 3, "replicas": 2}, "resources": {"gpus": 1},
                  "checkpoint": {"claimName": "ckpt"}, "networkPolicy": {"enabled": True}}},
    ]))

    def workers(n):
        pods = json.loads(c.kubectl("get", "pods", "-n", ns, "-l", "lepton.ai/job=rbac,lepton.ai/role=worker",
                                    "-o", "json"))["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        return len(live) == n and all(p["status"].get("phase") == "Running" for p in live) and live

    def phase():
        return json.loads(c.kubectl("get", "lj", "rbac", "-n", ns, "-o", "json")).get("status", {}).get("phase")

    def policies():
        items = json.loads(c.kubectl("get", "networkpolicies", "-n", ns, "-l", "lepton.ai/job=rbac",
                                     "-o", "json"))["items"]
        return sorted(p["metadata"]["name"] for p in items if not p["metadata"].get("deletionTimestamp"))

    wait_for("2 running workers", lambda: workers(2))
    wait_for("phase Running", lambda: phase() == "Running")
    assert c.kubectl("get", "secret", "rbac-rdzv", "-n", ns, "-o", "name").strip() == "secret/rbac-rdzv"
    wait_for("the job's NetworkPolicies", lambda: policies() == ["rbac-rdzv", "rbac-workers"])
    c.kubectl("patch", "lj", "rbac", "-n", ns, "--type=merge", "-p", '{"spec": {"networkPolicy": {"enabled": false}}}')
    wait_for("the NetworkPolicies to be deleted", lambda: policies() == [])
    c.kubectl("scale", "lj/rbac", "-n", ns, "--replicas=3")
    wait_for("3 running workers", lambda: workers(3))
    c.kubectl("delete", "lj", "rbac", "-n", ns)
    wait_for("the job's pods to be gone", lambda: workers(0) == [] or not json.loads(
        c.kubectl("get", "pods", "-n", ns, "-o", "json"))["items"])
    assert c.kubectl("get", "pvc", "ckpt", "-n", ns, "-o", "name").strip() == "persistentvolumeclaim/ckpt"
    lease = json.loads(c.kubectl("get", "lease", "lepton-lepton-operator", "-n", RELEASE_NS, "-o", "json"))
    assert lease["spec"]["holderIdentity"].startswith("lepton-lepton-operator-test_")
    log = log_path.read_text()
    assert "Forbidden" not in log and " 403" not in log, log[-3000:]


def test_helm_uninstall_with_objects_left_blocks_no_deletion(operator_as_service_account):
    """Uninstall first, objects still there: they and their children stay, and deleting them
    and their namespace later completes, since they carry no finalizer. The chart's RBAC lets
    the operator remove the finalizer an older release left. Runs last: it uninstalls."""
    c, _, proc = operator_as_service_account
    ns = c.create_namespace("uninstall-first")

    def obj(kind: str, name: str) -> dict | None:
        out = c.kubectl("get", kind, name, "-n", ns, "-o", "json", check=False)
        return json.loads(out) if out else None

    def running_workers() -> list[str]:
        pods = json.loads(c.kubectl("get", "pods", "-n", ns, "-l", "lepton.ai/job=left,lepton.ai/role=worker",
                                    "-o", "json"))["items"]
        return [p["metadata"]["uid"] for p in pods if p["status"].get("phase") == "Running"]

    job = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonJob", "metadata": {"name": "left", "namespace": ns},
           "spec": {"workers": {"min": 1, "max": 1, "replicas": 1}, "resources": {"gpus": 1}}}
    older = {**job, "metadata": {"name": "older", "namespace": ns, "finalizers": ["lepton.ai/finalizer"]}}
    model = {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel", "metadata": {"name": "leftm", "namespace": ns},
             "spec": {"source": {"jobRef": {"name": "left"}}, "compression": {"method": "none"}}}
    c.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([job, older, model]))
    workers = wait_for("left's worker Running", running_workers)
    wait_for("older's finalizer removed", lambda: not obj("lj", "older")["metadata"].get("finalizers"))
    for kind, name in (("lj", "left"), ("lm", "leftm")):
        wait_for(f"{name} reconciled", lambda: (obj(kind, name).get("status") or {}).get("observedGeneration"))
        assert not obj(kind, name)["metadata"].get("finalizers")

    proc.terminate()                  # the operator's pod goes with the release
    assert proc.wait(timeout=30) == 0
    result = subprocess.run([str(localcluster.tool_path("helm")), "uninstall", "lepton", "-n", RELEASE_NS, "--wait",
                             "--kubeconfig", c.kubeconfig], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert obj("lj", "left") and obj("lm", "leftm") and running_workers() == workers

    for namespace in (ns, RELEASE_NS):
        c.kubectl("delete", "namespace", namespace, "--wait=false")
    for namespace in (ns, RELEASE_NS):
        wait_for(f"namespace {namespace} gone", lambda: not c.kubectl("get", "namespace", namespace, "-o", "name",
                                                                      check=False).strip(), timeout=180)
