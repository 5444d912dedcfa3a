"""The real-node suite's cluster: the local control plane plus a real node (kubelet,
kube-proxy, containerd, CNI bridge, CoreDNS) running the images hack/images.py builds,
with the operator installed by its Helm chart and running in-cluster from its image.

The cluster starts once for the suite. Where the machine cannot run containers
(``realnode.unsupported_reason()``) every test is skipped with that reason; on a machine
that can, a cluster that does not start fails the suite.
"""
from __future__ import annotations

import subprocess
import time

import pytest
from realenv import RELEASE_NS, ROOT, localcluster, record

import realnode  # noqa: E402  (hack/, on sys.path through realenv)


@pytest.fixture(scope="session")
def real_cluster(tmp_path_factory):
    reason = realnode.unsupported_reason()
    if reason:
        pytest.skip(f"this machine cannot run containers: {reason}")
    c = localcluster.Cluster(tmp_path_factory.mktemp("real-cluster"), gpu_node_count=1, real_node=True)
    try:
        c.start()
    except Exception as exc:
        pytest.fail(f"the local control plane with a real node did not start: {exc}", pytrace=False)
    record("cluster", dict(c.timings))
    yield c
    c.stop()


@pytest.fixture(scope="session")
def operator(real_cluster):
    """``helm install`` of the chart, pointed at the locally built images and at the local
    Prometheus; waits until the operator's Deployment is available."""
    c = real_cluster
    repo, tag = c.images["operator"].rsplit(":", 1)
    t0 = time.monotonic()
    result = subprocess.run(
        [str(localcluster.tool_path("helm")), "install", "lepton", str(ROOT / "charts" / "lepton-operator"),
         "-n", RELEASE_NS, "--create-namespace", "--kubeconfig", c.kubeconfig, "--wait", "--timeout", "5m",
         "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
         "--set", f"trainerImage={c.images['trainer']}",
         "--set", f"prometheus.url={c.prometheus_url}",
         "--set", "resyncSeconds=10"],
        capture_output=True, text=True)
    if result.returncode != 0:
        pods = c.kubectl("get", "pods", "-A", "-o", "wide", check=False)
        events = c.kubectl("get", "events", "-n", RELEASE_NS, check=False)
        pytest.fail(f"helm install failed: {result.stderr}\n{pods}\n{events}", pytrace=False)
    record("helm_install_seconds", round(time.monotonic() - t0, 1))
    return c


