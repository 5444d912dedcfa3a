"""Real processes for the elastic training tests: the rendezvous store and torchrun agents.

Each process runs in its own session with its output in a log file, so a test can
wait on log lines and stop the whole process tree by its process group.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lepton_trainer.rendezvous import WORKER_ENV, torchrun_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A subprocess whose combined output goes to ``log``."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.log = log
        self._out = open(log, "wb")
        self.popen = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT,
                                      env={**ENV, **(env or {})}, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = TIMEOUT, after: int = 0) -> re.Match:
        """First match of ``pattern`` at or after offset ``after`` of the log."""
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.text(), after)
            if match:
                return match
            if self.popen.poll() is not None:
                match = regex.search(self.text(), after)
                if match:
                    return match
                pytest.fail(f"{self.log.name} exited with {self.popen.returncode} before "
                            f"{pattern!r}:\n{self.text()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(f"no {pattern!r} in {self.log.name} within {timeout}s:\n{self.text()[-4000:]}")

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.log.name} still running after {timeout}s:\n{self.text()[-4000:]}")

    def stop(self) -> None:
        """Stop the process group, then any descendant in a session of its own (torchrun
        starts each worker with ``start_new_session``), so a killed agent leaves no orphan."""
        descendants = process_tree(self.popen.pid)[1:]
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(30)
            except ProcessLookupError:
                pass
        for pid in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._out.close()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant at once, as when a pod's container is killed.

    torchrun starts its workers in their own sessions, so a process-group kill would
    leave them running."""
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def procs():
    """Collects started processes and stops them all at the end of the test."""
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def rdzv_endpoint(tmp_path, procs) -> str:
    """A dedicated rendezvous store process (``python -m lepton_trainer.rendezvous``); it is
    ``procs[0]``, with its report endpoint's URL as ``control_url``."""
    port, control = free_port(), free_port()
    store = Proc([sys.executable, "-m", "lepton_trainer.rendezvous", "--port", str(port),
                  "--control-port", str(control), "--host", "127.0.0.1"], tmp_path / "rdzv.log")
    store.control_url = f"http://127.0.0.1:{control}"   # its /v1/forget endpoint
    procs.append(store)
    store.wait_for(r"rendezvous store ready on port")
    return f"127.0.0.1:{port}"


def start_agent(procs: list, tmp_path: Path, name: str, endpoint: str, run_id: str,
                nnodes: tuple[int, int], script: list[str], nproc: int = 1,
                env: dict | None = None, **conf) -> Proc:
    """One torchrun node agent on loopback with the operator's arguments."""
    args = torchrun_args(endpoint=endpoint, run_id=run_id, min_nodes=nnodes[0],
                         max_nodes=nnodes[1], nproc_per_node=nproc, max_restarts=3,
                         local_addr="127.0.0.1", **conf)
    agent = Proc([sys.executable, "-m", "torch.distributed.run", *args, *script],
                 tmp_path / f"{name}.log", {**WORKER_ENV, **(env or {})})
    procs.append(agent)
    return agent
