"""The per-object reconcile loop shared by LeptonJob and LeptonModel.

Each custom resource gets one kopf daemon. It reconciles, then sleeps until a watch
event wakes it (its own object, a child pod or Deployment, a node's capacity) or until
the delay the reconcile asked for, capped by the resync period. A burst of watch events
is coalesced into one reconcile. What a loop remembers between reconciles (a
``Memory``) is kept by object uid, so it survives kopf restarting the daemon; what
must survive an operator restart lives in the object's status.

An API error or a lost connection to the API server ends one reconcile, never the
loop: the loop logs it and tries again after ``api_retry_seconds``. A child the API
server refuses as invalid (422: a field the operator copies from the spec and the Pod or
NetworkPolicy API checks, such as a nodeSelector key) is no error to retry: the object
is reported InvalidSpec with the server's message (a condition, a Warning event and a
log line), and its loop waits for the next spec change (a new generation).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Awaitable, Callable, Generic, TypeVar

import kopf

from .. import config, metrics
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


@dataclasses.dataclass
class ReconcileLoops(Generic[M]):
    """The wake-up events and memories of all loops of one kind."""
    kind: str
    new_memory: Callable[[dict[str, Any]], M]     # from the status last written
    pending_phase: str = "Pending"                # the phase of an object that never ran
    coalesce_seconds: float = 0.1
    wakeups: dict[tuple[str, str], asyncio.Event] = dataclasses.field(default_factory=dict)
    memory: dict[str, M] = dataclasses.field(default_factory=dict)

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

    async def run(self, body: kopf.Body, uid: str, stopped: kopf.DaemonStopped, logger: logging.Logger,
                  reconcile: Callable[[M], Awaitable[float | None]]) -> None:
        """Reconcile until the daemon is stopped; ``reconcile`` returns the next delay or None."""
        settings = config.get()
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        wake = self.wakeups.setdefault(key, asyncio.Event())
        memory = self.memory.setdefault(uid, self.new_memory(dict(body.get("status") or {})))
        try:
            while not stopped:
                wake.clear()
                generation = body["metadata"].get("generation")
                try:
                    if memory.refused is not None and memory.refused[0] == generation:
                        # The same spec would be refused again: report it (a no-op once
                        # written) and wait for the next change.
                        await st.report_invalid(body, memory, [memory.refused[1]], self.pending_phase, logger)
                        delay = None
                    else:
                        with metrics.reconcile(self.kind):
                            delay = await reconcile(memory)
                except kube.Refused as exc:
                    memory.refused, delay = (generation, exc.problem), 0
                except kube.RETRYABLE as exc:
                    delay = settings.api_retry_seconds
                    logger.warning("API request failed (%s); retrying in %gs", kube.describe(exc), delay)
                timeout = settings.resync_seconds if delay is None else max(min(delay, settings.resync_seconds), 0.05)
                try:
                    await asyncio.wait_for(wake.wait(), timeout=timeout)
                    await asyncio.sleep(self.coalesce_seconds)
                except asyncio.TimeoutError:
                    pass
        finally:
            if stopped:
                self.wakeups.pop(key, None)
                self.memory.pop(uid, None)
                memory.phases.forget(key)
