"""The per-object loops follow watch events (``core.loop.ReconcileLoops.follow``): the first
event starts an object's loop, later ones hand it the newest body, DELETED stops it; an
object being deleted is not reconciled; ``stop`` ends every loop, cancelling one that
does not finish in time. No API server is involved: the reconcile is the test's."""
from __future__ import annotations

import asyncio
import logging

import pytest

from lepton_operator import config
from lepton_operator.core.loop import ReconcileLoops
from lepton_operator.model.observe import new_memory

pytestmark = pytest.mark.unit
LOG = logging.getLogger("test")


@pytest.fixture(autouse=True)
def _settings():
    before = config.get()
    config.configure(config.from_env({}))
    yield
    config.configure(before)


def body(generation: int, uid: str = "u1", name: str = "m", **meta) -> dict:
    return {"apiVersion": "lepton.ai/v1alpha1", "kind": "LeptonModel",
            "metadata": {"name": name, "namespace": "ns", "uid": uid, "generation": generation, **meta}}


async def settle(seconds: float = 0.3) -> None:
    await asyncio.sleep(seconds)


def test_events_start_feed_and_stop_one_loop():
    seen: list[int] = []
    stopped: list[str] = []

    async def reconcile(live, memory):
        seen.append(live["metadata"]["generation"])
        return None

    async def scenario():
        loops = ReconcileLoops("LeptonModel", new_memory, coalesce_seconds=0.01)
        loops.follow(None, body(1), LOG, reconcile, on_stop=lambda: stopped.append("m"))
        await settle()
        assert seen == [1] and list(loops.tracked) == ["u1"]
        loops.follow("MODIFIED", body(2), LOG, reconcile, on_stop=lambda: stopped.append("again"))
        await settle()
        assert seen == [1, 2], "the running loop reconciles the newest body; no second loop starts"
        task = loops.tracked["u1"].task
        loops.follow("DELETED", body(2), LOG, reconcile)
        await asyncio.wait_for(task, 2)
        assert stopped == ["m"] and loops.tracked == {} and loops.wakeups == {}
        loops.wake("ns", "m")              # a late wake-up for a deleted object is a no-op
        assert seen == [1, 2]

    asyncio.run(scenario())


def test_a_burst_of_events_is_one_reconcile():
    seen: list[int] = []

    async def reconcile(live, memory):
        seen.append(live["metadata"]["generation"])
        return None

    async def scenario():
        loops = ReconcileLoops("LeptonModel", new_memory, coalesce_seconds=0.2)
        loops.follow(None, body(1), LOG, reconcile)
        await settle(0.05)
        for generation in (2, 3, 4):
            loops.follow("MODIFIED", body(generation), LOG, reconcile)
        await settle(0.6)
        assert seen == [1, 4]
        await loops.stop()

    asyncio.run(scenario())


def test_an_object_being_deleted_is_not_reconciled():
    seen: list[int] = []

    async def reconcile(live, memory):
        seen.append(live["metadata"]["generation"])
        return None

    async def scenario():
        loops = ReconcileLoops("LeptonModel", new_memory, coalesce_seconds=0.01)
        loops.follow(None, body(1, deletionTimestamp="2026-01-01T00:00:00Z", finalizers=["example.com/keep"]),
                     LOG, reconcile)
        await settle()
        assert seen == [] and list(loops.tracked) == ["u1"]
        await loops.stop()
        assert loops.tracked == {}

    asyncio.run(scenario())


def test_stop_cancels_a_reconcile_that_does_not_finish():
    finished: list[str] = []

    async def slow(live, memory):
        await asyncio.sleep(30)
        return None

    async def quick(live, memory):
        finished.append(live["metadata"]["uid"])
        return None

    async def scenario():
        loops = ReconcileLoops("LeptonModel", new_memory, coalesce_seconds=0.01, stop_timeout=0.2)
        loops.follow(None, body(1, uid="slow"), LOG, slow)
        loops.follow(None, body(1, uid="quick", name="q"), LOG, quick)
        await settle()
        tasks = [t.task for t in loops.tracked.values()]
        await asyncio.wait_for(loops.stop(), 2)
        assert all(t.done() for t in tasks) and loops.tracked == {}
        assert [t.cancelled() for t in tasks] == [True, False]
        assert finished == ["quick"]

    asyncio.run(scenario())
