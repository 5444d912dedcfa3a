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
from case_counts import register_collector  # noqa: E402


def pytest_configure(config):
    register_collector(config)


# Under ``make test`` (pytest-xdist, ``--dist loadfile``) each module is a unit of work, so a
# module's fixtures (a control plane, a trained model) are built once, in one worker; a
# worker that runs modules needing the control plane starts its own. The longest modules
# are handed out first (``--no-loadscope-reorder`` keeps this order), so that none of them
# starts last and runs alone.
LONGEST_FIRST: tuple[str, ...] = (
    "tests/real/test_real_llm.py", "tests/real/test_real_node.py", "tests/integration/test_chaos.py",
    "tests/trainer/test_elastic.py",
    "tests/e2e/test_contract.py", "tests/trainer/test_compress.py", "tests/trainer/test_train.py",
    "tests/integration/test_job_failures.py", "tests/integration/test_model_rollout_ends.py",
    "tests/trainer/test_real_model.py", "tests/integration/test_operator_ha.py",
    "tests/integration/test_autoscale_prometheus.py", "tests/integration/test_model_rollout.py",
    "tests/chart/test_chart_install.py", "tests/trainer/test_rendezvous.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


REAL_NODE_TESTS = "tests/real/"     # one real node per machine: its modules share it, in one worker


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadfile``, the real-node modules are one unit of work (they share the
    session's real node, and a second worker could not start another on this machine)."""
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return REAL_NODE_TESTS if scope.startswith(REAL_NODE_TESTS) else scope
    return Scheduling(config, log)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A running control plane: etcd, kube-apiserver, kube-controller-manager,
    kube-scheduler, kwok GPU nodes and Prometheus (see hack/localcluster.py)."""
    fixed = os.environ.get("LEPTON_TEST_CLUSTER_DIR")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    state_dir = Path(f"{fixed}-{worker}" if fixed and worker else fixed or tmp_path_factory.mktemp("cluster"))
    c = localcluster.Cluster(state_dir)
    try:
        c.start()
    except Exception as exc:  # a broken control plane is a failure, never a skip
        pytest.fail(f"the local control plane did not start: {exc}", pytrace=False)
    os.environ["PATH"] = f"{c.bin_dir}{os.pathsep}{os.environ['PATH']}"
    yield c
    c.stop()
