"""Polling for eventually-true conditions in tests against real processes."""
from __future__ import annotations

import time
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
