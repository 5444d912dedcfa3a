"""Polling for eventually-true conditions in tests against real processes."""
from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0, interval: float = 0.25):
    """Poll ``check`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def wait_healthy(proc: subprocess.Popen, health_port: int, log_path: Path, what: str = "the operator's /healthz",
                 timeout: float = 60.0) -> None:
    """Wait until an operator process answers /healthz; fail with its log if it exits."""
    def up() -> bool:
        assert proc.poll() is None, f"the operator exited:\n{Path(log_path).read_text(errors='replace')[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False
    wait_for(what, up, timeout)


def started_cluster(state_dir: Path, **kwargs: Any):
    """A local control plane of a test module's own (hack/localcluster.py) with the
    repository's CRDs; a control plane that does not start fails the test, never skips it."""
    import pytest

    import localcluster
    c = localcluster.Cluster(state_dir, **kwargs)
    try:
        c.start()
    except Exception as exc:
        pytest.fail(f"the local control plane did not start: {exc}", pytrace=False)
    c.install_crds()
    return c
