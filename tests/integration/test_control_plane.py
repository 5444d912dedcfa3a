"""Smoke tests of the local control plane itself: each shows one real mechanism that
the operator's tests depend on, and that a mock of the API server could not show."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
import uuid

import pytest
import yaml
from waiting import wait_for

pytestmark = pytest.mark.integration




@pytest.fixture
def ns(cluster):
    name = cluster.create_namespace(f"smoke-{uuid.uuid4().hex[:6]}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def apply(cluster, *objs):
    return cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))


def get_json(cluster, *args):
    return json.loads(cluster.kubectl("get", *args, "-o", "json"))


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def test_deployment_pods_run_on_gpu_nodes(cluster, ns):
    apply(cluster, {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": ns},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                     "tolerations": [GPU_TOLERATION],
                     "containers": [{"name": "c", "image": "example/web:1",
                                     "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}}})

    def running():
        pods = get_json(cluster, "pods", "-n", ns, "-l", "app=web")["items"]
        ok = len(pods) == 3 and all(p["status"].get("phase") == "Running" for p in pods)
        return ok and pods
    pods = wait_for("3 running pods", running)
    assert {p["spec"]["nodeName"] for p in pods} <= set(cluster.gpu_nodes)
    dep = wait_for("deployment available", lambda: (
        d := get_json(cluster, "deployment", "web", "-n", ns))["status"].get("readyReplicas") == 3 and d)
    assert dep["status"]["availableReplicas"] == 3


def test_unsatisfiable_gpu_request_stays_pending(cluster, ns):
    too_many = cluster.gpus_per_node + 1
    apply(cluster, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "greedy", "namespace": ns},
                    "spec": {"tolerations": [GPU_TOLERATION], "containers": [{
                        "name": "c", "image": "x", "resources": {"limits": {"nvidia.com/gpu": str(too_many)}}}]}})
    events = wait_for("a FailedScheduling event", lambda: [
        e for e in get_json(cluster, "events", "-n", ns)["items"]
        if e["involvedObject"]["name"] == "greedy" and e["reason"] == "FailedScheduling"])
    assert "Insufficient nvidia.com/gpu" in events[0]["message"]
    pod = get_json(cluster, "pod", "greedy", "-n", ns)
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_crd_schema_bounds_and_cel_rules_reject_bad_objects(cluster, ns):
    group = f"smoke{uuid.uuid4().hex[:6]}.lepton.ai"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {"spec": {
                         "type": "object",
                         "x-kubernetes-validations": [{"rule": "self.min <= self.max",
                                                       "message": "min must not exceed max"}],
                         "properties": {"min": {"type": "integer", "minimum": 1},
                                        "max": {"type": "integer", "maximum": 10}}}}}}}]}}
    apply(cluster, crd)
    cluster.wait_established(f"crd/widgets.{group}")

    def create(spec):
        obj = {"apiVersion": f"{group}/v1", "kind": "Widget",
               "metadata": {"name": f"w{uuid.uuid4().hex[:6]}", "namespace": ns}, "spec": spec}
        return subprocess.run(["kubectl", "--kubeconfig", cluster.kubeconfig, "create", "-f", "-"],
                              input=json.dumps(obj), capture_output=True, text=True, env=cluster.env)
    try:
        assert create({"min": 2, "max": 3}).returncode == 0
        bad_cel = create({"min": 5, "max": 3})
        assert bad_cel.returncode != 0 and "min must not exceed max" in bad_cel.stderr
        bad_bound = create({"min": 1, "max": 11})
        assert bad_bound.returncode != 0
        assert "spec.max" in bad_bound.stderr and "less than or equal to 10" in bad_bound.stderr
    finally:
        cluster.kubectl("delete", "crd", f"widgets.{group}", "--wait=false", check=False)


def test_garbage_collector_deletes_owned_children(cluster, ns):
    apply(cluster, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner", "namespace": ns}})
    uid = get_json(cluster, "configmap", "owner", "-n", ns)["metadata"]["uid"]
    apply(cluster, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "child", "namespace": ns,
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}})
    cluster.kubectl("delete", "configmap", "owner", "-n", ns)
    wait_for("the child to be garbage-collected",
               lambda: cluster.kubectl("get", "configmap", "child", "-n", ns, check=False) == "")


def test_rbac_denies_a_service_account_without_permission(cluster, ns):
    cluster.kubectl("create", "serviceaccount", "reader", "-n", ns)
    cluster.kubectl("create", "role", "read-configmaps", "--verb=get,list", "--resource=configmaps", "-n", ns)
    cluster.kubectl("create", "rolebinding", "reader", "--role=read-configmaps",
                    f"--serviceaccount={ns}:reader", "-n", ns)
    token = cluster.kubectl("create", "token", "reader", "-n", ns).strip()

    def as_reader(*args):
        return subprocess.run(["kubectl", "--server", cluster.server, "--certificate-authority",
                               str(cluster.pki / "ca.crt"), "--token", token, "-n", ns, *args],
                              capture_output=True, text=True, env={"PATH": cluster.env["PATH"]})
    allowed = wait_for("the role binding to take effect", lambda: (
        r := as_reader("get", "configmaps")).returncode == 0 and r)
    assert allowed.returncode == 0
    denied = as_reader("get", "secrets")
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr and f"system:serviceaccount:{ns}:reader" in denied.stderr


EXPORTER = textwrap.dedent("""
    import sys, time
    from prometheus_client import Gauge, start_http_server
    Gauge("smoke_answer", "a value the test controls").set(float(sys.argv[2]))
    start_http_server(int(sys.argv[1]), addr="127.0.0.1")
    print("ready", flush=True)
    time.sleep(600)
""")


def test_prometheus_scrapes_a_target_the_test_starts(cluster):
    port = __import__("localcluster").free_port()
    proc = subprocess.Popen([sys.executable, "-c", EXPORTER, str(port), "42"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        cluster.add_scrape_target("smoke", f"127.0.0.1:{port}", {"suite": "smoke"})

        def query():
            url = f"{cluster.prometheus_url}/api/v1/query?" + urllib.parse.urlencode(
                {"query": 'smoke_answer{suite="smoke"}'})
            with urllib.request.urlopen(url, timeout=5) as resp:
                result = json.load(resp)["data"]["result"]
            return result and result[0]
        sample = wait_for("Prometheus to return the scraped sample", query)
        assert float(sample["value"][1]) == 42.0
        assert sample["metric"]["instance"] == f"127.0.0.1:{port}"
    finally:
        cluster.remove_scrape_target("smoke")
        proc.kill()
        proc.wait()
