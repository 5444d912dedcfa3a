"""Admission control of :mod:`lepton_trainer.serve`: the server refuses work it cannot
hold instead of running out of memory.

Every inference request (REST and gRPC alike) passes three gates before it is computed:

1. **Concurrency**: at most ``max_concurrent`` requests are admitted at once (from the
   moment their headers arrive until they are answered); one more is refused at once.
2. **Memory**: an admitted request reserves bytes from a budget: its body (times
   ``BODY_FACTOR``: the body and what it decodes to) when it arrives; once it is decoded,
   its rows times the measured bytes per row replace that reservation (what decoding made
   of a JSON body is gone by then, and a binary body is the input tensors, which the bytes
   of a row count twice; the raw text of a JSON body, held until the answer, is left to
   the limit's headroom), so a request of ``max_rows`` rows always fits an idle server,
   as the model configuration promises. A request that could never fit (more
   rows than ``max_rows``, or a body larger than the whole budget) is *too large*; one
   that does not fit now, beside the requests already admitted, is refused as *memory*.
3. **The batch queue** (in :class:`serve.Batcher`): at most ``--max-queued-requests``
   wait for a batch, and a request still waiting after ``--queue-timeout-ms`` (or past its
   gRPC deadline) is dropped before it is computed (*deadline*).

Refusals are transient (REST 503 with ``Retry-After``, gRPC RESOURCE_EXHAUSTED), except
*too large* (REST 413, gRPC RESOURCE_EXHAUSTED, the limit named in the message).

**How the budget is measured.** The memory limit is ``--memory-limit-bytes`` (the
operator passes the container's ``limits.memory``), else the cgroup's ``memory.max``
(v2) or ``memory.limit_in_bytes`` (v1), else the machine's physical memory. After the
model is loaded and warmed up, one batch of ``MEASURE_ROWS`` rows runs while a thread
samples the process's anonymous resident memory (``/proc/self/statm``, resident less
file-backed, every millisecond; file-backed pages such as the libraries and mapped
weights are reclaimed before an OOM kill); the peak growth over it before the batch,
divided by the rows, is the memory of a row (at least twice the bytes of a row's input
and output tensors). The budget is ``HEADROOM`` of the limit less that memory after the
warm-up (the model, the runtime); ``max_rows``, the rows one request may carry, is the configured maximum or
what the budget holds, whichever is smaller.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import threading
import time
from pathlib import Path
from typing import Callable

HEADROOM = 0.85          # share of the memory limit that the process may use in all
BODY_FACTOR = 2          # a body is held while its decoded tensors exist
JSON_BODY_FACTOR = 4     # JSON numbers decode to Python objects before they become an array
MEASURE_ROWS = 8         # rows of the batch that measures the memory of a row
RETRY_AFTER_S = 1        # Retry-After of a transient refusal
SAMPLE_S = 0.001
CGROUP_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
UNLIMITED = 1 << 60      # cgroup v1 writes a huge number for "no limit"


class Refused(Exception):
    """A request the server will not run: ``reason`` is one of contract.REFUSAL_REASONS;
    ``too_large`` marks a request that can never fit (413), the rest may be retried."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    @property
    def too_large(self) -> bool:
        return self.reason == "too_large"


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def _statm() -> tuple[int, int]:
    """(resident, file-backed and shared) bytes of this process (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return int(fields[1]) * page_size(), int(fields[2]) * page_size()


def rss_bytes() -> int:
    """The process's resident memory that only an OOM kill gives back: its resident set
    less the file-backed pages. The pages of the shared libraries and of memory-mapped
    weights are reclaimed by the kernel before the container's limit kills anything, so
    they are not held against the budget."""
    resident, shared = _statm()
    return resident - shared


def memory_limit(explicit: int | None = None) -> tuple[int, str]:
    """The memory this process may use, and where the number came from."""
    if explicit:
        return explicit, "--memory-limit-bytes"
    for name in CGROUP_FILES:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text != "max" and int(text) < UNLIMITED:
            return int(text), name
    return page_size() * os.sysconf("SC_PHYS_PAGES"), "physical memory"


class PeakGrowth:
    """``with PeakGrowth() as g: ...``: afterwards ``g.bytes`` is the most ``rss_bytes``
    grew over its value at entry while the block ran (a thread samples it), or, where the
    block raised the process's own peak (``ru_maxrss``, the whole resident set), that
    peak's growth over the whole resident set at entry, whichever is larger."""

    def __init__(self) -> None:
        self.bytes = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, rss_bytes())
            time.sleep(SAMPLE_S)

    def __enter__(self) -> "PeakGrowth":
        self._before = self._peak = rss_bytes()
        self._resident_before = _statm()[0]
        self._max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        growth = max(self._peak, rss_bytes()) - self._before
        max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if max_after > self._max_before:
            growth = max(growth, max_after - self._resident_before)
        self.bytes = max(0, growth)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What admission works from: the measured numbers and what follows from them."""
    memory_limit: int        # bytes the container may use
    limit_source: str
    baseline: int            # resident set with the model loaded and warmed up
    row_bytes: int           # memory of one row in flight
    budget: int              # bytes admitted requests may reserve together
    max_rows: int            # rows one request may carry

    @classmethod
    def derive(cls, memory_limit: int, limit_source: str, baseline: int, row_bytes: int,
               configured_rows: int) -> "Limits":
        row_bytes = max(1, row_bytes)
        budget = max(0, int(memory_limit * HEADROOM) - baseline)
        return cls(memory_limit, limit_source, baseline, row_bytes, budget,
                   min(configured_rows, budget // row_bytes))

    def describe(self) -> str:
        return (f"memory limit {self.memory_limit} bytes ({self.limit_source}), model and runtime "
                f"{self.baseline} bytes, {self.row_bytes} bytes per row: budget {self.budget} bytes, "
                f"at most {self.max_rows} rows per request")


class Ticket:
    """What one admitted request holds; ``Admission.leave`` gives it back."""
    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class Admission:
    """The concurrency and memory gates (one per server, on its event loop)."""

    def __init__(self, max_concurrent: int, on_refuse: Callable[[str], None]):
        self.max_concurrent, self.on_refuse = max_concurrent, on_refuse
        self.limits: Limits | None = None       # set by calibrate(); until then bytes are not gated
        self.requests = 0
        self.bytes = 0

    def calibrate(self, limits: Limits) -> None:
        self.limits = limits

    def _refuse(self, reason: str, message: str) -> Refused:
        self.on_refuse(reason)
        return Refused(reason, message)

    def enter(self, body_bytes: int, json_body: bool = False) -> Ticket:
        """Admit a request whose body holds ``body_bytes`` (0: not known yet)."""
        if self.requests >= self.max_concurrent:
            raise self._refuse("concurrency", f"server busy: {self.requests} requests in progress, "
                                              f"the limit is {self.max_concurrent}")
        ticket = Ticket()
        self._reserve(ticket, body_bytes * (JSON_BODY_FACTOR if json_body else BODY_FACTOR), "a body of "
                      f"{body_bytes} bytes")
        self.requests += 1
        return ticket

    def add_bytes(self, ticket: Ticket, body_bytes: int) -> None:
        """Reserve the memory of a body whose size was not known on entry."""
        self._reserve(ticket, body_bytes * BODY_FACTOR, f"a body of {body_bytes} bytes")

    def add_rows(self, ticket: Ticket, rows: int) -> None:
        """Reserve the memory of a decoded request's ``rows`` in place of its body's."""
        lim = self.limits
        if lim is None:
            return
        if rows > lim.max_rows:
            raise self._refuse("too_large", f"request too large: {rows} rows, the limit is {lim.max_rows} "
                                            f"rows per request ({lim.describe()})")
        self._release(ticket)
        self._reserve(ticket, rows * lim.row_bytes, f"{rows} rows")

    def _reserve(self, ticket: Ticket, size: int, what: str) -> None:
        lim = self.limits
        if lim is None or size == 0:
            return
        if ticket.bytes + size > lim.budget:
            raise self._refuse("too_large", f"request too large: {what} needs {ticket.bytes + size} bytes "
                                            f"of memory, more than the budget of {lim.budget} bytes "
                                            f"({lim.describe()})")
        if self.bytes + size > lim.budget:
            raise self._refuse("memory", f"server busy: {what} needs {size} bytes of memory and "
                                         f"{lim.budget - self.bytes} of the budget of {lim.budget} "
                                         f"bytes are free")
        ticket.bytes += size
        self.bytes += size

    def _release(self, ticket: Ticket) -> None:
        self.bytes -= ticket.bytes
        ticket.bytes = 0

    def leave(self, ticket: Ticket) -> None:
        self.requests -= 1
        self._release(ticket)
