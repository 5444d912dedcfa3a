"""Reports of lost workers to a job's rendezvous store (``POST /v1/forget``).

A worker that was active and is gone or going is reported to its job's store at once,
so that the others re-form without waiting out its keep-alive (see
``lepton_trainer.rendezvous``). Reports wait on the network (DNS, the store's pod),
never on the API client's threads nor on the reconcile: they run on a small pool of
their own, and a report that does not arrive leaves the keep-alive to drop the workers.
Each report carries the store's token (the job's ``<job>-rdzv`` Secret) as a bearer token;
a store of an older job, without the Secret, gets none and needs none.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging

from lepton_trainer import contract, rendezvous

from .. import metrics
from . import objects

REPORT_TIMEOUT = 3.0          # seconds for one report of lost workers to a rendezvous store

_log = logging.getLogger("lepton_operator")


@dataclasses.dataclass
class LostWorkerReports:
    """Sends reports in the background; one per operator, shared by the jobs' loops."""
    executor: concurrent.futures.ThreadPoolExecutor = dataclasses.field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="rdzv-report"))
    tasks: set[asyncio.Task] = dataclasses.field(default_factory=set)

    def report(self, namespace: str, job: str, uid: str, addrs: tuple[str, ...], min_nodes: int,
               token: str | None = None) -> None:
        """Tell the job's store (on its Service) that the agents at ``addrs`` are gone;
        ``token``: the store's (None: send none)."""
        task = asyncio.create_task(self._send(namespace, job, uid, list(addrs), min_nodes, token))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, namespace: str, job: str, uid: str, addrs: list[str], min_nodes: int,
                    token: str | None) -> None:
        url = f"http://{objects.rdzv_name(job)}.{namespace}.svc:{contract.RDZV_CONTROL_PORT}"
        call = functools.partial(rendezvous.forget, url, uid, addrs, min_nodes, timeout=REPORT_TIMEOUT, token=token)
        try:
            answer = await asyncio.get_running_loop().run_in_executor(self.executor, call)
        except Exception as exc:  # noqa: BLE001 (any failure of a best-effort report)
            metrics.RDZV_REPORTS.labels("failed").inc()
            _log.info("Lost workers %s not reported to %s (%s): the others re-form after the "
                      "keep-alive timeout", ", ".join(addrs), url, exc)
            return
        forgotten = answer.get("forgotten") or []
        metrics.RDZV_REPORTS.labels("forgotten" if forgotten else "unknown").inc()
        if forgotten:
            _log.info("Lost workers %s reported: the rendezvous store dropped %s (round %s)",
                      ", ".join(addrs), ", ".join(forgotten), answer.get("round"))
