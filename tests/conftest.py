"""Shared fixtures. ``cluster`` is the real local control plane (hack/localcluster.py).

The cluster starts once per test session, on free loopback ports, in a temporary
directory, and stops at the end. When it cannot start, every test that needs it
fails with the reason; nothing is skipped silently.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))

import localcluster  # noqa: E402  (hack/ is not a package)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A running control plane: etcd, kube-apiserver, kube-controller-manager,
    kube-scheduler, kwok GPU nodes and Prometheus (see hack/localcluster.py)."""
    state_dir = Path(os.environ.get("LEPTON_TEST_CLUSTER_DIR") or tmp_path_factory.mktemp("cluster"))
    c = localcluster.Cluster(state_dir)
    try:
        c.start()
    except Exception as exc:  # a broken control plane is a failure, never a skip
        pytest.fail(f"the local control plane did not start: {exc}", pytrace=False)
    os.environ["PATH"] = f"{c.bin_dir}{os.pathsep}{os.environ['PATH']}"
    yield c
    c.stop()
