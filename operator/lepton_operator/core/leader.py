"""Leader election on a ``coordination.k8s.io/v1`` Lease: of several operator replicas, one
reconciles and the others wait to take over.

The protocol is client-go's (``k8s.io/client-go/tools/leaderelection``, which
controller-runtime's ``--leader-elect`` uses), with its standard timings:

- A candidate reads the Lease every ``retry_period`` (2 s). It takes the Lease when no
  one holds it (no Lease yet, or one its leader released), or when the record the Lease
  shows has not changed for ``leaseDurationSeconds`` (15 s) *on the candidate's own
  clock*, counted from when it first saw that record: no two machines' clocks are ever
  compared. Every write carries the resourceVersion it read, so of two candidates that
  try at once one wins and the other gets 409.
- The leader renews ``renewTime`` every ``retry_period``. A leader that has not renewed
  for ``renew_deadline`` (10 s, counted from when it sent its last successful renewal) or
  that sees another holder in the Lease stops leading at once: the operator exits with
  status 1 and its Deployment restarts it as a candidate. A watchdog thread enforces the
  deadline however long a request hangs. Since ``renew_deadline`` < lease duration, an
  old leader has stopped before any candidate may take its place.
- A leader that stops cleanly (SIGTERM) releases the Lease (no holder), so a standby
  takes over at its next retry instead of a lease duration later.

A standby thus takes over from a leader that died without releasing about one lease
duration after the leader's last renewal: 13 to 19 s after the kill with the defaults.

The elector calls the API server through ``core.kube`` with three verbs on leases, the
ones ``LEASE_VERBS`` names (the chart's Role grants exactly these). Each process gets a
fresh identity (``<pod or host name>_<random>``), so a restarted container never mistakes
its previous run's Lease for its own.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import http.server
import logging
import socket
import threading
import time
import uuid
from typing import Any, Callable, Protocol

from . import kube

API_VERSION = "coordination.k8s.io/v1"
KIND = "Lease"
LEASE_VERBS = ("get", "create", "update")   # what the elector does to leases (RBAC)

LEASE_DURATION = 15.0    # seconds a standby waits on an unchanged record before taking over
RENEW_DEADLINE = 10.0    # seconds the leader keeps trying to renew before it stops leading
RETRY_PERIOD = 2.0       # seconds between two attempts, by the leader and by standbys

log = logging.getLogger("lepton_operator.leader")


def new_identity(name: str = "") -> str:
    """A Lease holder identity unique to this process: ``name`` (the pod's, else the host's)
    and a random suffix."""
    return f"{name or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def micro_time(now: _dt.datetime) -> str:
    """A Kubernetes ``MicroTime`` (RFC 3339 with microseconds, UTC)."""
    return now.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass(frozen=True)
class LeaseConfig:
    """Which Lease, who this candidate is, and the timings (seconds)."""
    name: str
    namespace: str
    identity: str
    lease_duration: float = LEASE_DURATION
    renew_deadline: float = RENEW_DEADLINE
    retry_period: float = RETRY_PERIOD

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > self.retry_period > 0:
            raise ValueError("leader election needs lease duration > renew deadline > retry period > 0, got "
                             f"{self.lease_duration}, {self.renew_deadline}, {self.retry_period}")

    @property
    def request_timeout(self) -> float:
        """Seconds one API request may take before the attempt counts as failed."""
        return max(self.retry_period, self.renew_deadline / 2)


class LeaseAPI(Protocol):
    """The three calls on leases the elector makes (``LEASE_VERBS``)."""

    def get(self, name: str, namespace: str) -> dict[str, Any] | None: ...        # None: not found
    def create(self, lease: dict[str, Any]) -> dict[str, Any] | None: ...         # None: exists (409)
    def update(self, lease: dict[str, Any]) -> dict[str, Any] | None: ...         # None: conflict (409)


@dataclasses.dataclass
class KubeLeases:
    """``LeaseAPI`` through ``core.kube``, each request bounded by ``timeout`` seconds."""
    timeout: float

    def get(self, name: str, namespace: str) -> dict[str, Any] | None:
        return kube.get(API_VERSION, KIND, name, namespace, timeout=self.timeout)

    def create(self, lease: dict[str, Any]) -> dict[str, Any] | None:
        return kube.create(lease, timeout=self.timeout)

    def update(self, lease: dict[str, Any]) -> dict[str, Any] | None:
        return kube.replace(lease, timeout=self.timeout)


def _record(lease: dict[str, Any]) -> tuple:
    spec = lease.get("spec") or {}
    return (spec.get("holderIdentity") or "", spec.get("renewTime"), spec.get("acquireTime"),
            spec.get("leaseDurationSeconds"), spec.get("leaseTransitions"))


class LeaderElector:
    """One candidate for one Lease.

    ``acquire`` blocks until this candidate leads; ``keep_leading`` then renews in the
    background and calls ``on_lost`` once if leadership ends; ``release`` hands the Lease
    over on a clean stop. ``try_acquire_or_renew`` is one attempt (for tests: ``clock``
    is the monotonic clock that measures every duration, ``now`` the wall clock written
    into the Lease).
    """

    def __init__(self, config: LeaseConfig, api: LeaseAPI | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], _dt.datetime] = lambda: _dt.datetime.now(_dt.timezone.utc)):
        self.config = config
        self.api = api if api is not None else KubeLeases(config.request_timeout)
        self.clock, self.now = clock, now
        self.observed: tuple | None = None     # the last record read from the Lease
        self.observed_at = 0.0                 # clock() when that record was first seen
        self.renewed_at: float | None = None   # clock() at the send of the last successful write
        self.attempted_at: float | None = None  # clock() at the end of the last attempt
        self.lost_to: str | None = None        # another holder seen while leading
        self._holder_said: str | None = None
        self._error_said: str | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def where(self) -> str:
        return f"{self.config.namespace}/{self.config.name}"

    @property
    def leading(self) -> bool:
        """This candidate renewed within the renew deadline and has seen no other holder."""
        return (self.renewed_at is not None and self.lost_to is None
                and self.clock() - self.renewed_at < self.config.renew_deadline)

    # --- one attempt ------------------------------------------------------------------

    def try_acquire_or_renew(self) -> bool:
        """Read the Lease and, where the protocol allows, write this candidate in as its
        holder (creating the Lease if there is none). True: this candidate holds it now."""
        c = self.config
        sent = self.clock()
        try:
            lease = self.api.get(c.name, c.namespace)
            if lease is None:
                written = self.api.create(self._lease(None, ""))
            else:
                record = _record(lease)
                if record != self.observed:
                    self.observed, self.observed_at = record, self.clock()
                holder = record[0]
                duration = float(record[3] or c.lease_duration)
                if holder and holder != c.identity:
                    if self.renewed_at is not None and self.lost_to is None:
                        self.lost_to = holder
                    if self.clock() < self.observed_at + duration:
                        self._say_holder(holder)
                        return False
                written = self.api.update(self._lease(lease, holder))
        except kube.RETRYABLE as exc:
            self._say_error(kube.describe(exc))
            return False
        finally:
            self.attempted_at = self.clock()
        if written is None:           # another candidate wrote first (409)
            return False
        self._error_said = None
        self.observed, self.observed_at = _record(written), self.clock()
        self.renewed_at = sent
        return True

    def _lease(self, current: dict[str, Any] | None, holder: str) -> dict[str, Any]:
        """The Lease with this candidate as holder: a renewal keeps ``acquireTime`` and
        ``leaseTransitions``, a takeover sets the one and increments the other."""
        c, now = self.config, micro_time(self.now())
        lease = dict(current or {"apiVersion": API_VERSION, "kind": KIND,
                                 "metadata": {"name": c.name, "namespace": c.namespace}})
        spec = dict(lease.get("spec") or {})
        if holder != c.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if current else 0)
        spec.update(holderIdentity=c.identity, leaseDurationSeconds=int(c.lease_duration), renewTime=now)
        lease["spec"] = spec
        return lease

    def _say_holder(self, holder: str) -> None:
        if holder != self._holder_said:
            self._holder_said = holder
            log.info("standby: Lease %s is held by %s; taking over if it is not renewed for %gs",
                     self.where, holder, self.config.lease_duration)

    def _say_error(self, message: str) -> None:
        if message != self._error_said:
            self._error_said = message
            log.warning("Lease %s: %s; retrying every %gs", self.where, message, self.config.retry_period)

    # --- the loops ----------------------------------------------------------------------

    def acquire(self) -> bool:
        """Block until this candidate holds the Lease (True) or ``stop`` is called (False)."""
        start = self.clock()
        log.info("standby: %s waits for Lease %s", self.config.identity, self.where)
        while not self._stop.is_set():
            if self.try_acquire_or_renew():
                log.info("leading: acquired Lease %s as %s after %.1fs", self.where, self.config.identity,
                         self.clock() - start)
                return True
            self._stop.wait(self.config.retry_period)
        return False

    def keep_leading(self, on_lost: Callable[[str], None]) -> None:
        """Renew every retry period in a background thread. A watchdog thread calls
        ``on_lost(reason)`` once when the renew deadline passes without a renewal, or when
        another holder shows in the Lease."""
        self._threads = [threading.Thread(target=self._renew, name="lease-renew", daemon=True),
                         threading.Thread(target=self._watch, args=(on_lost,), name="lease-watchdog",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.config.retry_period):
            self.try_acquire_or_renew()

    def _watch(self, on_lost: Callable[[str], None]) -> None:
        step = min(0.25, self.config.retry_period / 4)
        while not self._stop.wait(step):
            if self.lost_to is not None:
                reason = f"Lease {self.where} is now held by {self.lost_to}"
            elif self.renewed_at is None or self.clock() - self.renewed_at >= self.config.renew_deadline:
                reason = (f"Lease {self.where} not renewed for {self.config.renew_deadline:g}s"
                          + (f" (last error: {self._error_said})" if self._error_said else ""))
            else:
                continue
            self._stop.set()
            on_lost(reason)
            return

    def stop(self) -> None:
        """End ``acquire`` and the renewal threads."""
        self._stop.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=self.config.request_timeout + 1)

    def release(self) -> bool:
        """Stop renewing and, if this candidate still holds the Lease, release it (no holder,
        a lease duration of 1 s) so that a standby takes over at its next attempt.
        True: released."""
        self.stop()
        if self.renewed_at is None:
            return False
        try:
            lease = self.api.get(self.config.name, self.config.namespace)
            if lease is None or _record(lease)[0] != self.config.identity:
                return False
            spec = dict(lease.get("spec") or {})
            spec.pop("holderIdentity", None)
            now = micro_time(self.now())
            spec.update(leaseDurationSeconds=1, acquireTime=now, renewTime=now)
            released = self.api.update({**lease, "spec": spec}) is not None
        except kube.RETRYABLE as exc:
            log.warning("could not release Lease %s: %s", self.where, kube.describe(exc))
            return False
        if released:
            log.info("released Lease %s", self.where)
        return released


class StandbyHealth:
    """``/healthz`` for a standby, on the port kopf's liveness endpoint takes once this
    replica leads: 200 while the candidate has attempted within a lease duration (plus a
    request's time), 503 otherwise. ``close`` frees the port."""

    def __init__(self, port: int, elector: LeaderElector, host: str = "0.0.0.0"):
        self.elector = elector
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                ok = self.path.split("?")[0] == "/healthz" and outer.alive()
                body = b'{"standby": true}' if ok else b'{"standby": true, "alive": false}'
                self.send_response(200 if ok else (404 if not self.path.startswith("/healthz") else 503))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="standby-health", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        e = self.elector
        limit = e.config.lease_duration + e.config.request_timeout
        return e.attempted_at is None or e.clock() - e.attempted_at < limit

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
