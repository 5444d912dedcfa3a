"""The control plane's own lifecycle: cached tools are not rebuilt, and `down`
leaves no process and no listening port behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))
import localcluster  # noqa: E402

pytestmark = pytest.mark.integration


def test_second_tool_build_builds_nothing():
    result = subprocess.run(["bash", str(ROOT / "hack" / "build-tools.sh"), "all"],
                            capture_output=True, text=True, check=True)
    assert "go build" not in result.stderr and "go install" not in result.stderr, result.stderr
    assert "tools ready" in result.stderr


def test_up_then_down_leaves_no_process_or_port(tmp_path):
    state = tmp_path / "cluster"
    # the control plane's own processes; tests/real covers up and down with the real node
    up = subprocess.run([sys.executable, str(ROOT / "hack" / "localcluster.py"), "up", "--dir", str(state),
                         "--gpu-nodes", "1", "--real-node", "off"], capture_output=True, text=True)
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={state}/kubeconfig" in up.stdout
    cluster = localcluster.Cluster.load(state)
    assert all(cluster.running().values()), cluster.running()
    pids, ports = dict(cluster.pids), dict(cluster.ports)
    assert "kwok-gpu-0" in cluster.kubectl("get", "nodes", "-o", "name")

    down = subprocess.run([sys.executable, str(ROOT / "hack" / "localcluster.py"), "down", "--dir", str(state)],
                          capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert not [name for name, pid in pids.items() if localcluster._alive(pid)]
    listening = [name for name, port in ports.items() if localcluster.port_open(port)]
    assert not listening, f"ports still open after down: {listening}"
