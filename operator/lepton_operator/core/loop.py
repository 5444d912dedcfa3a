"""The per-object reconcile loop shared by LeptonJob and LeptonModel.

Each custom resource gets one asyncio task, driven by kopf's watch events on the resource
(``ReconcileLoops.follow``, called from the kind's ``kopf.on.event`` handler): the first
event (kopf lists every object when it starts, so this covers objects that existed before
the operator) starts the object's loop, every event hands the loop the newest body, and
the DELETED event stops it; ``stop`` stops every loop when the operator stops. No loop
needs a finalizer, so none is put on the objects: deleting one, or the operator's
uninstall, is never blocked, and every child goes with its owner through the garbage
collector. The finalizer an older release's kopf daemons left (``LEGACY_FINALIZERS``) is
removed once, by the loop. While an object is being deleted (it has a
``deletionTimestamp``: another controller's finalizer or a foreground deletion holds it)
its loop reconciles nothing, so it never recreates a child the garbage collector removes.
Leader election (``core.leader``) gates kopf as a whole: a standby runs no kopf, hence no
watch and no loop, and a leader that loses its Lease exits at once.

A loop reconciles, then sleeps until a watch event wakes it (its own object, a child pod
or Deployment, a node's capacity) or until the delay the reconcile asked for, capped by the
resync period and by the time the status's ``reconciledAt`` is due (``status.write``). A burst of watch events is coalesced into one reconcile. What a loop
remembers between reconciles (a ``Memory``) lives as long as its task; what must survive an
operator restart lives in the object's status.

An API error or a lost connection to the API server ends one reconcile, never the
loop: the loop logs it and tries again after ``api_retry_seconds``; a 404 after which the
object itself is gone (its DELETED event was missed while a watch reconnected) ends the
loop. A child the API server refuses as invalid (422: a field the operator copies from the
spec and the Pod or NetworkPolicy API checks, such as a nodeSelector key) is no error to
retry: the object is reported InvalidSpec with the server's message (a condition, a Warning
event and a log line), and its loop waits for the next spec change (a new generation).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Awaitable, Callable, Generic, Mapping, TypeVar

from .. import config, metrics
from ..constants import LEGACY_FINALIZERS
from . import kube, status as st

M = TypeVar("M", bound="Memory")


@dataclasses.dataclass
class Memory:
    """What every loop remembers: the status it last wrote (the base of the next merge
    patch), the messages it has posted as events, the last invalid-spec message, and the
    NetworkPolicies it applied that the index may not show yet (name -> (spec hash,
    monotonic time), see ``objects.policy_changes``)."""
    status: dict[str, Any]
    phases: metrics.PhaseTracker
    said: set[str] = dataclasses.field(default_factory=set)
    invalid_message: str | None = None
    refused: tuple[int | None, str] | None = None   # (generation, why) the API server refused a child
    policies: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict)


Reconcile = Callable[[Mapping[str, Any], M], Awaitable[float | None]]


@dataclasses.dataclass
class Tracked:
    """One object's loop: the newest body its events brought (one dict, updated in place,
    that the loop's reconciles read), the signal that stops it, and its task."""
    key: tuple[str, str]
    body: dict[str, Any]
    stopped: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


@dataclasses.dataclass
class ReconcileLoops(Generic[M]):
    """The loops of one kind: their wake-up events and the tracked objects (by uid)."""
    kind: str
    new_memory: Callable[[dict[str, Any]], M]     # from the status last written
    pending_phase: str = "Pending"                # the phase of an object that never ran
    coalesce_seconds: float = 0.1
    stop_timeout: float = 5.0                     # seconds a stopping loop may finish its reconcile
    wakeups: dict[tuple[str, str], asyncio.Event] = dataclasses.field(default_factory=dict)
    tracked: dict[str, Tracked] = dataclasses.field(default_factory=dict)

    def wake(self, namespace: str | None, name: str | None = None) -> None:
        """Wake one object's loop, or every loop in ``namespace`` when ``name`` is None."""
        if name is not None:
            event = self.wakeups.get((namespace or "", name))
            if event is not None:
                event.set()
            return
        for (ns, _), event in self.wakeups.items():
            if ns == namespace:
                event.set()

    def follow(self, event_type: str | None, body: Mapping[str, Any], logger: logging.Logger,
               reconcile: Reconcile[M], on_stop: Callable[[], None] | None = None) -> None:
        """Follow one watch event of an object: start its loop on the first, hand the loop
        the newest body, stop it on DELETED (``on_stop`` runs when it has stopped), and wake
        it. ``reconcile(body, memory)`` returns the next delay or None."""
        meta = body["metadata"]
        uid, key = meta["uid"], (meta.get("namespace") or "", meta["name"])
        tracked = self.tracked.get(uid)
        if event_type == "DELETED":
            if tracked is not None:
                tracked.stopped.set()
                self.wake(*key)
            return
        if tracked is None:
            tracked = self.tracked[uid] = Tracked(key, dict(body))
            tracked.task = asyncio.create_task(self._run(uid, tracked, logger, reconcile, on_stop),
                                               name=f"{self.kind} {key[0]}/{key[1]}")
        else:
            tracked.body.clear()
            tracked.body.update(body)
        self.wake(*key)

    async def stop(self) -> None:
        """Stop every loop (the operator stops): each may finish the reconcile it is in for
        ``stop_timeout`` seconds, then it is cancelled."""
        for tracked in self.tracked.values():
            tracked.stopped.set()
        for event in self.wakeups.values():
            event.set()
        tasks = [t.task for t in self.tracked.values() if t.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.stop_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _run(self, uid: str, tracked: Tracked, logger: logging.Logger, reconcile: Reconcile[M],
                   on_stop: Callable[[], None] | None) -> None:
        """Reconcile ``tracked`` until it is stopped."""
        settings, body = config.get(), tracked.body
        wake = self.wakeups.setdefault(tracked.key, asyncio.Event())
        memory = self.new_memory(dict(body.get("status") or {}))
        try:
            while not tracked.stopped.is_set():
                wake.clear()
                delay = await self._step(body, memory, logger, reconcile)
                if delay is _GONE:
                    logger.info("%s %s/%s is gone; its loop ends", self.kind, *tracked.key)
                    tracked.stopped.set()
                    break
                timeout = settings.resync_seconds if delay is None else max(min(delay, settings.resync_seconds), 0.05)
                beat = st.heartbeat_due_in(memory.status, settings.status_heartbeat_seconds)
                if beat > 0:         # wake when the status's stamp is due (not again while it is overdue)
                    timeout = min(timeout, beat + 0.05)
                try:
                    await asyncio.wait_for(wake.wait(), timeout=timeout)
                    await asyncio.sleep(self.coalesce_seconds)
                except asyncio.TimeoutError:
                    pass
        finally:
            if self.tracked.get(uid) is tracked:
                del self.tracked[uid]
            if not any(t.key == tracked.key for t in self.tracked.values()):
                self.wakeups.pop(tracked.key, None)      # no newer object of the same name uses it
                memory.phases.forget(tracked.key)
            if on_stop is not None and tracked.stopped.is_set():
                on_stop()

    async def _step(self, body: Mapping[str, Any], memory: M, logger: logging.Logger,
                    reconcile: Reconcile[M]) -> float | None | object:
        """One pass: release a legacy finalizer, then reconcile unless the object is being
        deleted. The next delay (None: when something changes), or ``_GONE``."""
        settings = config.get()
        generation = body["metadata"].get("generation")
        try:
            if set(body["metadata"].get("finalizers") or ()) & set(LEGACY_FINALIZERS):
                await kube.aio(kube.remove_finalizers, dict(body), LEGACY_FINALIZERS)
            if body["metadata"].get("deletionTimestamp"):
                return None
            if memory.refused is not None and memory.refused[0] == generation:
                # The same spec would be refused again: report it (a no-op once
                # written) and wait for the next change.
                await st.report_invalid(body, memory, [memory.refused[1]], self.pending_phase, logger)
                return None
            with metrics.reconcile(self.kind):
                return await reconcile(body, memory)
        except kube.Refused as exc:
            memory.refused = (generation, exc.problem)
            return 0
        except kube.RETRYABLE as exc:
            if kube.is_not_found(exc) and await _gone(body):
                return _GONE
            logger.warning("API request failed (%s); retrying in %gs", kube.describe(exc), settings.api_retry_seconds)
            return settings.api_retry_seconds
        except Exception:     # a fault in one reconcile never ends the loop
            logger.exception("reconcile failed; retrying in %gs", settings.resync_seconds)
            return settings.resync_seconds


_GONE = object()     # what ``_step`` returns when the object no longer exists


async def _gone(body: Mapping[str, Any]) -> bool:
    """The object no longer exists, or one with the same name but another uid stands in its place."""
    meta = body["metadata"]
    try:
        current = await kube.aio(kube.get, body["apiVersion"], body["kind"], meta["name"], meta.get("namespace"))
    except kube.RETRYABLE:
        return False
    return current is None or current["metadata"].get("uid") != meta.get("uid")
