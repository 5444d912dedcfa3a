"""``python -m lepton_trainer.serve``: a batching Open Inference Protocol v2 server.

It loads any model :mod:`modelio` loads and answers the v2 API of KServe and Triton over
REST (aiohttp, JSON and Triton's binary tensor extension, on ``--port``) and over gRPC
(``inference.GRPCInferenceService``, on ``--grpc-port``; see :mod:`grpc_server`). Both
share one model, one dynamic batcher and one set of metrics; tritonclient's ``http`` and
``grpc`` clients work unchanged. With ``--task text-generation`` (or ``LEPTON_TASK``) it
hands over to :mod:`lepton_trainer.llm.server`, the OpenAI-compatible runtime for
language models.

REST routes (``{v}`` paths answer for version ``1``, the only one):

  GET  /v2/health/live                          200 while the process serves HTTP
  GET  /v2/health/ready                         200 once the model is loaded and warmed up
  GET  /v2                                      server metadata and extensions
  GET  /v2/models/{name}[/versions/{v}]         inputs and outputs (name, datatype, shape)
  GET  /v2/models/{name}[/versions/{v}]/ready   200 when ready, 503 before
  GET  /v2/models/{name}[/versions/{v}]/config  Triton model configuration
  GET  /v2/models[/{name}[/versions/{v}]]/stats Triton inference statistics
  POST /v2/models/{name}[/versions/{v}]/infer   inference
  POST /v2/repository/index                     the one model and its state
  POST /v2/repository/models/{name}/load|unload 400: this server serves one fixed model
  GET  /metrics                                 Prometheus metrics (names in contract.py)

Requests are batched dynamically: the first waiting request opens a batch, which closes
when it holds ``--max-batch-size`` rows or ``--max-batch-delay-ms`` has passed; the
requests of a batch whose tensors agree in shape past the first dimension run as one
forward pass in a worker thread while the event loop keeps accepting requests. Text
requests to a Hugging Face model run together whatever their token lengths: they are
padded to the longest (masked) and each answer is cut back to its own length. A request
with more rows than ``--max-batch-size`` runs as a batch of its own. If a batched forward
pass fails, its requests are retried one by one so that one bad request fails alone. A
lone request (it finds the server empty) to a model whose forward passes take under a
millisecond runs on the event loop itself: the hand-off to the worker thread and back
would cost more than the forward pass. The event loop is uvloop's when it is installed
(the image installs it), and JSON is read and written with orjson.

Load is shed before it can exhaust the process (:mod:`admission`): at most
``--max-concurrent-requests`` inference requests at once, ``--max-queued-requests``
waiting for a batch, and the memory their bodies and rows need within a budget measured
from the memory limit at start-up; past those a request gets 503 with ``Retry-After``
(gRPC RESOURCE_EXHAUSTED), one that waited for a batch longer than ``--queue-timeout-ms``
or its own deadline is refused uncomputed, and one with more rows than the memory
allows (``max_batch_size`` of the model configuration) gets 413. Refusals are counted
in ``lepton_serve_refused_requests_total`` by reason.

Bad input gets 400 with the reason (malformed JSON, JSON nested deeper than 64 levels,
a non-string ``id``, unknown or missing inputs, datatype, shape or byte-size mismatches);
an output holding NaN or infinity asked for as JSON gets 400 too (JSON cannot carry it:
ask for it with ``binary_data`` or over gRPC). Unknown model or version: 404. A body over
``--max-body-bytes``, or more rows than a request may carry: 413. A Content-Type other
than JSON or octet-stream: 415. A body not received within ``--body-timeout``: 408. A client that disconnects before its
request is read is counted with code ``499`` and logged in one line. Bodies over 64 KiB
are parsed and answered in a worker thread, so health probes stay answered. A connection
that sends no complete request within ``--idle-timeout`` seconds is closed (slow or
idle clients cannot hold connections).

A missing model directory is waited for (the server stays live, not ready); a model
that fails to load or to answer the warm-up (one request through the batcher) ends the
process with status 1. On SIGTERM or SIGINT the server turns not-ready, stops accepting
connections, runs open batches without waiting for them to fill, lets in-flight requests
finish (up to ``--drain-timeout`` seconds) and exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from aiohttp import web, web_log
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import admission, contract, grpc_server, modelio, v2
from .admission import Refused
from .v2 import EXTENSIONS, VERSION, ModelFailed

if sys.version_info >= (3, 11):
    from asyncio import timeout as time_limit
else:                                     # aiohttp's dependency before Python 3.11
    from async_timeout import timeout as time_limit
try:
    import uvloop                         # the faster event loop, when installed (the image has it)
except ImportError:                       # pragma: no cover - the image and .venv install it
    uvloop = None

log = logging.getLogger("lepton_trainer.serve")


class QuietAccessLogger(web_log.AccessLogger):
    """The access log (``--access-log``) without the kubelet's probes and Prometheus's
    scrapes: one line per request a client made."""
    QUIET = frozenset({contract.HEALTH_LIVE_PATH, contract.HEALTH_READY_PATH, "/metrics"})

    def log(self, request, response, time):  # noqa: D102 (aiohttp's signature)
        if request.path not in self.QUIET:
            super().log(request, response, time)

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)
INLINE_NS = 1_000_000               # a lone request runs on the loop if forward passes are shorter
OFFLOAD_BYTES = 64 * 1024           # bodies (and answers) larger than this leave the event loop
CLIENT_CLOSED = 499                 # metric code of a request whose client went away
CONTENT_TYPES = ("application/json", "application/octet-stream")


def _error(exc_cls: type[web.HTTPException], message: str, **kw) -> web.HTTPException:
    return exc_cls(text=json.dumps({"error": message}), content_type="application/json", **kw)


class BadRequest(web.HTTPBadRequest):
    def __init__(self, message: str):
        super().__init__(text=json.dumps({"error": message}), content_type="application/json")


# --- dynamic batching --------------------------------------------------------------------

Tensors = dict[str, torch.Tensor]


def _key(x: Tensors) -> tuple:
    return tuple((k, t.dtype, tuple(t.shape[1:])) for k, t in sorted(x.items()))


def _rows(x: Tensors) -> int:
    return len(next(iter(x.values())))


class Batcher:
    """Collects concurrent requests into batches of at most ``max_rows`` rows and runs each
    batch as one call of ``forward`` per tensor shape, in a single worker thread.

    ``submit`` takes a tensor or a dict of tensors (all with the same first dimension).
    At most ``max_queued`` requests wait for a batch (0: no bound); one more is refused
    (:class:`admission.Refused`, ``queue_full``), and a request whose deadline passes
    before a batch takes it is dropped uncomputed (``deadline``); ``on_refuse`` counts both."""

    def __init__(self, forward: Callable[[Any], dict[str, torch.Tensor]],
                 max_rows: int, max_delay_s: float, on_batch: Callable[[int], None],
                 model: Callable[[], Any] | None = None, max_queued: int = 0,
                 on_refuse: Callable[[str], None] = lambda reason: None,
                 in_server: Callable[[], int] = lambda: 0):
        self.forward, self.max_rows, self.max_delay_s, self.on_batch = forward, max_rows, max_delay_s, on_batch
        self.model = model     # returns the LoadedModel whose batch_key/collate/uncollate apply
        self.on_refuse = on_refuse
        self.in_server = in_server   # requests in the server now, batched or not
        self.lone = False            # set when a request finds the server empty; each batch clears it
        self.queue: asyncio.Queue = asyncio.Queue(max_queued)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._task: asyncio.Task | None = None
        self.draining = False     # set on shutdown: open batches run without waiting
        self.executions = 0
        self.rows_run = 0
        self.compute_ns = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, x, wait: bool = True, deadline: float | None = None) -> dict[str, torch.Tensor]:
        """Run ``x`` in the next batch; ``wait=False`` closes a batch it opens at once.
        ``deadline`` (event-loop time) drops ``x`` uncomputed if no batch took it by then."""
        fut = asyncio.get_running_loop().create_future()
        rows = len(x) if isinstance(x, torch.Tensor) else _rows(x)
        try:
            self.queue.put_nowait((x, fut, wait, rows, deadline))
        except asyncio.QueueFull:
            self.on_refuse("queue_full")
            raise Refused("queue_full", f"server busy: {self.queue.maxsize} requests are waiting "
                                        f"for a batch, the limit") from None
        return await fut

    def _on_loop(self, rows: int, items: int) -> bool:
        """A lone request (it found the server empty, and no other came in since) runs
        on the event loop itself, without the hand-off to the worker thread and back,
        when the forward passes so far took under ``INLINE_NS`` on average, scaled by
        its rows over their average rows: then the hand-off costs more than the forward
        pass, and the loop is blocked for under a millisecond. Under load, batches run
        in the worker thread while the loop takes in the requests of the next one."""
        lone, self.lone = self.lone, False
        if not self.executions or not lone or self.in_server() > items:
            return False
        scale = max(1.0, rows * self.executions / max(1, self.rows_run))
        return self.compute_ns * scale < INLINE_NS * self.executions

    def _expired(self, items: list) -> list:
        """``items`` less those whose client went away or whose deadline passed (answered
        with ``deadline``, never computed)."""
        now, live = asyncio.get_running_loop().time(), []
        for it in items:
            if it[1].done():
                continue
            if it[4] is not None and now > it[4]:
                self.on_refuse("deadline")
                it[1].set_exception(Refused("deadline", "server busy: the request waited past its "
                                                        "deadline before a batch took it"))
                continue
            live.append(it)
        return live

    async def _collect(self, first) -> tuple[list, Any]:
        loop = asyncio.get_running_loop()
        items, rows, carry = [first], first[3], None
        deadline = loop.time() + (self.max_delay_s if first[2] else 0.0)
        while rows < self.max_rows:
            timeout = 0.0 if self.draining else deadline - loop.time()
            try:           # waits in short slices so that a drain closes the batch at once
                item = (self.queue.get_nowait() if timeout <= 0
                        else await asyncio.wait_for(self.queue.get(), min(timeout, 0.05)))
            except asyncio.QueueEmpty:
                break
            except asyncio.TimeoutError:
                continue
            if rows + item[3] > self.max_rows:
                carry = item          # opens the next batch
                break
            items.append(item)
            rows += item[3]
        return items, carry

    def _call(self, x, rows: int):
        t0 = time.perf_counter_ns()
        try:
            return self.forward(x)
        finally:
            self.executions += 1
            self.rows_run += rows
            self.compute_ns += time.perf_counter_ns() - t0

    async def _forward(self, items: list) -> None:
        loop = asyncio.get_running_loop()
        model = self.model() if self.model else None
        if isinstance(items[0][0], torch.Tensor):
            x = torch.cat([it[0] for it in items])
        elif model is not None:
            x = model.collate([it[0] for it in items])
        else:
            x = {k: torch.cat([it[0][k] for it in items]) for k in items[0][0]}
        rows = sum(it[3] for it in items)
        try:
            self.on_batch(rows)
            out = (self._call(x, rows) if self._on_loop(rows, len(items))
                   else await loop.run_in_executor(self.executor, self._call, x, rows))
        except Exception as e:  # noqa: BLE001 - the error goes to the callers
            if len(items) > 1:      # retry alone, so that one bad request fails alone
                log.warning("a batch of %d requests failed (%s); running them one by one", len(items), e)
                for it in items:
                    await self._forward([it])
                return
            log.warning("forward pass failed: %s: %s", type(e).__name__, e)
            if not items[0][1].done():
                items[0][1].set_exception(e)
            return
        start = 0
        for it in items:
            end = start + it[3]
            if not it[1].done():
                part = {k: v[start:end] for k, v in out.items()}
                it[1].set_result(model.uncollate(part, it[0]) if model is not None and len(items) > 1 else part)
            start = end

    async def _run(self) -> None:
        carry = None
        while True:
            first, carry = carry or await self.queue.get(), None
            items, carry = await self._collect(first)
            items = self._expired(items)
            model = self.model() if self.model else None
            groups: dict[Any, list] = collections.defaultdict(list)
            for it in items:
                if isinstance(it[0], torch.Tensor):
                    key = ("t", it[0].dtype, tuple(it[0].shape[1:]))
                else:
                    key = model.batch_key(it[0]) if model is not None else _key(it[0])
                groups[key].append(it)
            for group in groups.values():
                await self._forward(group)


# --- statistics (Triton's format) ------------------------------------------------------------

class Stats:
    def __init__(self):
        self.success = [0, 0]          # count, ns
        self.fail = [0, 0]
        self.inference_count = 0       # rows
        self.last_inference_ms = 0

    def record(self, ok: bool, ns: int, rows: int) -> None:
        bucket = self.success if ok else self.fail
        bucket[0] += 1
        bucket[1] += ns
        if ok:
            self.inference_count += rows
            self.last_inference_ms = int(time.time() * 1000)


# --- the server ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shedding:
    """What the server admits (see :mod:`admission`): requests at once, requests waiting
    for a batch, the longest wait, and the memory limit (None: the cgroup's)."""
    max_concurrent: int = 64
    max_queued: int = 32
    queue_timeout_ms: int = 5000
    memory_limit: int | None = None


class ModelServer:
    def __init__(self, model_dir: Path, name: str, max_batch_size: int, max_batch_delay_ms: float,
                 max_request_rows: int, labels: dict[str, str], model_format: str | None = None,
                 shedding: "Shedding | None" = None):
        self.model_dir, self.name, self.max_request_rows = model_dir, name, max_request_rows
        self.shedding = shedding or Shedding()
        self.model_format = model_format
        self.max_batch_size, self.max_batch_delay_ms = max_batch_size, max_batch_delay_ms
        self.model: modelio.LoadedModel | None = None
        self._why_absent = ""
        self.ready = False
        self.exit_code = 0
        self.stats = Stats()
        self.registry = CollectorRegistry()
        names = list(labels)
        self.labels = labels
        self._by_code: dict[int, Any] = {}     # the request counter's child per status code
        self.requests = Counter(contract.METRIC_SERVE_REQUESTS.removesuffix("_total"),
                                "Inference requests by HTTP status code", names + ["code"],
                                registry=self.registry)
        self.latency = Histogram(contract.METRIC_SERVE_LATENCY, "Inference request latency",
                                 names, buckets=LATENCY_BUCKETS, registry=self.registry).labels(**labels)
        self.inflight = Gauge(contract.METRIC_SERVE_INFLIGHT, "Inference requests in progress",
                              names, registry=self.registry).labels(**labels)
        batch_buckets = sorted({2 ** i for i in range(13) if 2 ** i < max_batch_size} | {max_batch_size})
        self.batch_size = Histogram(contract.METRIC_SERVE_BATCH_SIZE, "Rows per forward pass",
                                    names, buckets=batch_buckets, registry=self.registry).labels(**labels)
        self.refused = Counter(contract.METRIC_SERVE_REFUSED.removesuffix("_total"),
                               "Inference requests refused before they were computed, by reason",
                               names + ["reason"], registry=self.registry)
        for reason in contract.REFUSAL_REASONS:
            self.refused.labels(**labels, reason=reason)
        self.batcher = Batcher(self._forward, max_batch_size, max_batch_delay_ms / 1000.0,
                               self.batch_size.observe, model=lambda: self.model,
                               max_queued=self.shedding.max_queued, on_refuse=self._count_refusal,
                               in_server=lambda: self.admission.requests)
        self.admission = admission.Admission(self.shedding.max_concurrent, self._count_refusal)
        self._limit_gauges(names)
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="decode")

    def _count_refusal(self, reason: str) -> None:
        self.refused.labels(**self.labels, reason=reason).inc()

    def _limit_gauges(self, names: list[str]) -> None:
        def gauge(name: str, doc: str, fn: Callable[[], float]) -> None:
            Gauge(name, doc, names, registry=self.registry).labels(**self.labels).set_function(fn)
        lim = lambda: self.admission.limits  # noqa: E731
        gauge(contract.METRIC_SERVE_QUEUE_DEPTH, "Inference requests waiting for a batch",
              lambda: self.batcher.queue.qsize())
        gauge(contract.METRIC_SERVE_ADMITTED_BYTES, "Memory reserved by the admitted requests",
              lambda: self.admission.bytes)
        gauge(contract.METRIC_SERVE_MEMORY_BUDGET, "Memory the admitted requests may reserve together",
              lambda: lim().budget if lim() else 0)
        gauge(contract.METRIC_SERVE_ROW_BYTES, "Measured memory of one row in flight",
              lambda: lim().row_bytes if lim() else 0)
        gauge(contract.METRIC_SERVE_MAX_REQUEST_ROWS, "Rows one request may carry",
              lambda: self.max_request_rows)

    # model ---------------------------------------------------------------------------
    def _forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.forward(x)

    async def load(self, stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Wait for the model directory, load it, warm it up, then turn ready."""
        waited = 0.0
        while not self._present():
            if waited % 30 < poll_s:
                log.info("waiting for the model directory %s%s", self.model_dir,
                         f" ({self._why_absent})" if self._why_absent else "")
            await asyncio.sleep(poll_s)
            waited += poll_s
        try:
            loop = asyncio.get_running_loop()
            self.model = await loop.run_in_executor(None, modelio.load, self.model_dir, self.model_format)
            await self.infer_arrays(self.model.sample(1), warm_up=True)
            limits = await self._measure()
        except Exception:  # noqa: BLE001 - any failure here means this server cannot serve
            log.exception("model %s from %s failed to load or warm up", self.name, self.model_dir)
            self.exit_code = 1
            stop.set()
            return
        if limits.max_rows < 1:
            log.error("model %s cannot serve one row within its memory: %s", self.name, limits.describe())
            self.exit_code = 1
            stop.set()
            return
        self.admission.calibrate(limits)
        self.max_request_rows = limits.max_rows
        self.batcher.max_rows = min(self.batcher.max_rows, limits.max_rows)
        log.info("admission: %s; at most %d requests at once, %d waiting for a batch, %d ms in the queue",
                 limits.describe(), self.shedding.max_concurrent, self.shedding.max_queued,
                 self.shedding.queue_timeout_ms)
        self.ready = True
        log.info("model %s ready (%s)", self.name,
                 ", ".join(f"{k}={v}" for k, v in self.model.describe().items() if v))

    async def _measure(self) -> admission.Limits:
        """The memory of a row: the resident set's peak growth over one batch (see admission)."""
        rows = min(self.max_request_rows, admission.MEASURE_ROWS)
        sample, m = self.model.sample(rows, seed=1), self.model

        def run() -> dict[str, torch.Tensor]:    # what a batch does, uncounted (no client asked)
            return m.forward(m.collate([m.prepare(sample)]))
        with admission.PeakGrowth() as growth:
            out = await asyncio.get_running_loop().run_in_executor(self.batcher.executor, run)
        io = sum(a.nbytes for a in sample.values() if a.dtype != object) + \
            sum(t.numel() * t.element_size() for t in out.values())
        row_bytes = max(growth.bytes, 2 * io) // rows
        limit, source = admission.memory_limit(self.shedding.memory_limit)
        return admission.Limits.derive(limit, source, admission.rss_bytes(), row_bytes, self.max_request_rows)

    def _present(self) -> bool:
        """A model is there: meta.json for a built-in directory (written last), else any
        file of a known format."""
        self._why_absent = ""
        if not self.model_dir.exists():
            return False
        if self.model_dir.is_file():
            return True
        if self.model_format in (None, "builtin") and (self.model_dir / contract.MODEL_META_FILE).exists():
            return True
        if self.model_format not in (None, "builtin"):
            return any(self.model_dir.iterdir())
        try:
            return modelio.detect_format(self.model_dir) != "builtin"
        except (FileNotFoundError, modelio.FormatError) as e:
            self._why_absent = str(e)
            return False

    async def infer_arrays(self, tensors: dict[str, np.ndarray], warm_up: bool = False,
                           timeout: float | None = None, size: int = 0) -> dict[str, np.ndarray]:
        """The shared core of REST and gRPC: prepare (in the decoder thread when the
        request's ``size`` in bytes is large), batch, run, convert. A request that
        waits for a batch longer than the queue timeout (or ``timeout`` seconds, if
        shorter) is refused uncomputed."""
        loop = asyncio.get_running_loop()
        prepared = await self.offload(size, self.model.prepare, tensors)
        wait = self.shedding.queue_timeout_ms / 1000.0
        if timeout is not None:
            wait = min(wait, timeout)
        try:
            out = await self.batcher.submit(prepared, wait=not warm_up,
                                            deadline=None if warm_up else loop.time() + wait)
        except Refused:
            raise
        except Exception as e:  # noqa: BLE001
            raise ModelFailed(f"the model failed on this request: {type(e).__name__}: {e}") from e
        return {s.name: modelio.to_numpy(out[s.name], s.datatype) for s in self.model.outputs}

    # shared request accounting (REST and gRPC) ------------------------------------------
    def begin(self, may_run_alone: bool = True) -> float:
        """Count a request in; one that finds the server empty may run on the event loop
        (``Batcher``) unless ``may_run_alone`` is false."""
        self.inflight.inc()
        self.batcher.lone = may_run_alone and self.admission.requests == 0
        return time.perf_counter()

    def end(self, t0: float, code: int, rows: int = 0) -> None:
        elapsed = time.perf_counter() - t0
        self.inflight.dec()
        self.latency.observe(elapsed)
        counter = self._by_code.get(code)
        if counter is None:
            counter = self._by_code[code] = self.requests.labels(**self.labels, code=str(code))
        counter.inc()
        if code != CLIENT_CLOSED and code not in (404, 413, 415):
            self.stats.record(code == 200, int(elapsed * 1e9), rows)

    # protocol documents (shared with gRPC) ------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        m = self.model
        return {"name": self.name, "versions": [VERSION], "platform": m.platform,
                **{k: v for k, v in m.describe().items() if k != "format"}, "format": m.format,
                "inputs": [s.to_json() for s in m.inputs], "outputs": [s.to_json() for s in m.outputs]}

    def config(self) -> dict[str, Any]:
        def io(s: v2.TensorSpec) -> dict[str, Any]:
            dt = "TYPE_STRING" if s.datatype == "BYTES" else f"TYPE_{s.datatype}"
            return {"name": s.name, "data_type": dt, "dims": list(s.shape[1:]) or [1],
                    **({"reshape": {"shape": []}} if len(s.shape) == 1 else {})}
        m = self.model
        return {"name": self.name, "platform": m.platform, "backend": "lepton",
                "max_batch_size": self.max_request_rows,     # what a request may carry (admission)
                "input": [io(s) for s in m.inputs], "output": [io(s) for s in m.outputs],
                "dynamic_batching": {"max_queue_delay_microseconds": int(self.max_batch_delay_ms * 1000)},
                "version_policy": {"latest": {"num_versions": 1}}}

    def statistics(self) -> dict[str, Any]:
        s, b = self.stats, self.batcher
        zero = {"count": 0, "ns": 0}
        return {"model_stats": [{
            "name": self.name, "version": VERSION, "last_inference": s.last_inference_ms,
            "inference_count": s.inference_count, "execution_count": b.executions,
            "inference_stats": {
                "success": {"count": s.success[0], "ns": s.success[1]},
                "fail": {"count": s.fail[0], "ns": s.fail[1]},
                "queue": zero, "compute_input": zero,
                "compute_infer": {"count": b.executions, "ns": b.compute_ns},
                "compute_output": zero, "cache_hit": zero, "cache_miss": zero},
            "batch_stats": []}]}

    def check_model(self, name: str, version: str | None) -> None:
        if name != self.name:
            raise LookupError(f"unknown model {name!r}; this server serves {self.name!r}")
        if version not in (None, "", VERSION):
            raise LookupError(f"unknown version {version!r} of model {name!r}; the only version is {VERSION!r}")

    # REST handlers ---------------------------------------------------------------------
    def _model(self, request: web.Request) -> None:
        try:
            self.check_model(request.match_info["name"], request.match_info.get("version"))
        except LookupError as e:
            raise _error(web.HTTPNotFound, str(e)) from None

    def _require_ready(self) -> None:
        if not self.ready:
            raise _error(web.HTTPServiceUnavailable, f"model {self.name!r} is not ready")

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def health_ready(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.ready}, status=200 if self.ready else 503)

    async def server_meta(self, request: web.Request) -> web.Response:
        return web.json_response({"name": v2.SERVER_NAME, "version": v2.PROTOCOL_VERSION,
                                  "extensions": EXTENSIONS})

    async def model_ready(self, request: web.Request) -> web.Response:
        self._model(request)
        return web.json_response({"name": self.name, "ready": self.ready},
                                 status=200 if self.ready else 503)

    async def model_meta(self, request: web.Request) -> web.Response:
        self._model(request)
        self._require_ready()
        return web.json_response(self.metadata())

    async def model_config(self, request: web.Request) -> web.Response:
        self._model(request)
        self._require_ready()
        return web.json_response(self.config())

    async def model_stats(self, request: web.Request) -> web.Response:
        if "name" in request.match_info:
            self._model(request)
        return web.json_response(self.statistics())

    async def repository_index(self, request: web.Request) -> web.Response:
        state = "READY" if self.ready else ("UNAVAILABLE" if self.exit_code else "LOADING")
        return web.json_response([{"name": self.name, "version": VERSION, "state": state, "reason": ""}])

    async def repository_control(self, request: web.Request) -> web.Response:
        raise BadRequest("model control is not supported: this server serves one model, "
                         "loaded at start-up")

    async def infer(self, request: web.Request) -> web.StreamResponse:
        t0 = self.begin()
        code, rows = 500, 0
        try:
            response, rows = await self._infer(request)
            code = response.status
            return response
        except web.HTTPException as e:
            code = e.status
            raise
        except ConnectionResetError as e:
            code = CLIENT_CLOSED
            log.info("client %s went away before its request was read (%s)", request.remote, e)
            return web.Response(status=CLIENT_CLOSED, text="client closed the request")
        except asyncio.CancelledError:
            code = CLIENT_CLOSED
            log.info("client %s went away before its answer (cancelled)", request.remote)
            raise
        finally:
            self.end(t0, code, rows)

    async def offload(self, size: int, fn, *args):
        """``fn(*args)``, in the decoder thread when ``size`` bytes are at stake."""
        if size < OFFLOAD_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)

    async def _read(self, request: web.Request) -> bytes:
        ctype = request.headers.get("Content-Type")
        if ctype is not None and request.content_type not in CONTENT_TYPES \
                and not request.content_type.endswith("+json"):
            raise _error(web.HTTPUnsupportedMediaType,
                         f"Content-Type {request.content_type!r} is not accepted: send "
                         f"application/json, or application/octet-stream with "
                         f"{v2.HEADER_LENGTH} (binary tensors)")
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise self._too_large()
        try:
            if request.content.is_eof():      # the whole body came with the headers
                return await request.read()
            async with time_limit(self.body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large() from None
        except asyncio.TimeoutError:
            raise _error(web.HTTPRequestTimeout,
                         f"the request body did not arrive within {self.body_timeout:g} s") from None
        except Exception as e:  # aiohttp reports a client gone mid-upload in several ways
            if request.transport is None or request.transport.is_closing() or \
                    type(e).__name__ in ("ClientConnectionResetError", "PayloadEncodingError",
                                         "ContentLengthError", "TransferEncodingError", "EofStream"):
                raise ConnectionResetError(str(e) or type(e).__name__) from None
            raise

    def refusal(self, e: Refused) -> web.HTTPException:
        """A refused request's answer: 413 if it can never fit, else 503 and Retry-After."""
        if e.too_large:
            return _error(web.HTTPRequestEntityTooLarge, str(e), max_size=self.max_body_bytes, actual_size=0)
        return _error(web.HTTPServiceUnavailable, str(e), headers={"Retry-After": str(admission.RETRY_AFTER_S)})

    def too_many_rows(self, e: v2.TooManyRows) -> Refused:
        """``e`` as a refusal, counted, with the memory behind the row limit named."""
        self._count_refusal("too_large")
        lim = self.admission.limits
        return Refused("too_large", f"{e} ({lim.describe()})" if lim else str(e))

    def _too_large(self) -> web.HTTPException:
        return _error(web.HTTPRequestEntityTooLarge,
                      f"request too large: the body exceeds {self.max_body_bytes} bytes",
                      max_size=self.max_body_bytes, actual_size=0)

    async def _infer(self, request: web.Request) -> tuple[web.Response, int]:
        self._model(request)
        try:
            ticket = self.admission.enter(request.content_length or 0, request.content_type.endswith("json"))
        except Refused as e:
            raise self.refusal(e) from None
        try:
            return await self._admitted(request, ticket)
        except Refused as e:
            raise self.refusal(e) from None
        finally:
            self.admission.leave(ticket)

    async def _admitted(self, request: web.Request, ticket: admission.Ticket) -> tuple[web.Response, int]:
        body = await self._read(request)
        if request.content_length is None:
            self.admission.add_bytes(ticket, len(body))
        self._require_ready()
        raw_len = request.headers.get(v2.HEADER_LENGTH)
        try:
            header_len = int(raw_len) if raw_len is not None else None
        except ValueError:
            raise BadRequest(f"{v2.HEADER_LENGTH} must be an integer, got {raw_len!r}") from None
        m = self.model
        try:
            req = await self.offload(len(body), v2.parse_rest, body, header_len, m.inputs,
                                     m.outputs, self.max_request_rows)
            self.admission.add_rows(ticket, req.rows)
            out = await self.infer_arrays(req.inputs, timeout=req.timeout_us and req.timeout_us / 1e6,
                                          size=len(body))
            size = sum(a.nbytes for a in out.values() if a.dtype != object)
            tensors = [(n, m_spec.datatype, out[n]) for n in req.outputs
                       for m_spec in m.outputs if m_spec.name == n]
            payload, json_len = await self.offload(8 * size, v2.rest_response, self.name, VERSION,
                                                    req.id, tensors, req.binary)
        except v2.TooManyRows as e:
            raise self.too_many_rows(e) from None
        except v2.ProtocolError as e:
            raise BadRequest(str(e)) from None
        except ModelFailed as e:
            raise _error(web.HTTPInternalServerError, str(e)) from None
        if json_len is None:
            return web.Response(body=payload, content_type="application/json"), req.rows
        return web.Response(body=payload, content_type="application/octet-stream",
                            headers={v2.HEADER_LENGTH: str(json_len)}), req.rows

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def make_app(self, max_body_bytes: int, body_timeout: float = 60.0,
                 header_deadline: "HeaderDeadline | None" = None) -> web.Application:
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout
        middlewares = ([header_deadline.middleware] if header_deadline else []) + [_errors_as_json]
        app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
        routes = [
            web.get(contract.HEALTH_LIVE_PATH, self.live),
            web.get(contract.HEALTH_READY_PATH, self.health_ready),
            web.get("/v2", self.server_meta),
            web.get("/v2/models/stats", self.model_stats),
            web.post("/v2/repository/index", self.repository_index),
            web.post("/v2/repository/models/{name}/load", self.repository_control),
            web.post("/v2/repository/models/{name}/unload", self.repository_control),
            web.get(contract.METRICS_PATH, self.metrics),
        ]
        for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [web.get(base, self.model_meta), web.get(base + "/ready", self.model_ready),
                       web.get(base + "/config", self.model_config),
                       web.get(base + "/stats", self.model_stats), web.post(base + "/infer", self.infer)]
        app.add_routes(routes)
        return app


class HeaderDeadline:
    """Closes a connection that has not completed its first request header within
    ``timeout`` seconds of connecting (aiohttp's keep-alive timeout covers the time
    between requests, but not every version starts it before the first one)."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.pending: set = set()

    def watch(self, transport) -> None:
        self.pending.add(transport)
        asyncio.get_running_loop().call_later(self.timeout, self._expire, transport)

    def _expire(self, transport) -> None:
        if transport in self.pending:
            self.pending.discard(transport)
            transport.close()

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        self.pending.discard(request.transport)       # a complete request header arrived
        return await handler(request)

    def install(self, server: web.Server) -> None:
        """Watch every connection the aiohttp server accepts (its connection manager hook)."""
        made = server.connection_made

        def connection_made(handler, transport) -> None:
            made(handler, transport)
            self.watch(transport)
        server.connection_made = connection_made


@web.middleware
async def _errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    """Any failure becomes a JSON error response; nothing a request does stops the server."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400 or e.content_type == "application/json":
            raise
        return web.json_response({"error": e.reason}, status=e.status,
                                 headers={k: v for k, v in e.headers.items() if k == "Allow"})
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:  # noqa: BLE001
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(e).__name__}: {e}"}, status=500)


# --- entry point ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m lepton_trainer.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=env(contract.ENV_MODEL_DIR), help="model directory (modelio)")
    p.add_argument("--model-format", default=env(contract.ENV_MODEL_FORMAT) or None,
                   choices=modelio.FORMATS, help="default: detected from the directory")
    p.add_argument("--model-name", default=env(contract.ENV_MODEL_NAME, "model"))
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=contract.SERVE_PORT)
    p.add_argument("--grpc-port", type=int, default=int(env(contract.ENV_GRPC_PORT, contract.GRPC_PORT)),
                   help="v2 gRPC port; 0 turns gRPC off")
    p.add_argument("--max-batch-size", type=int, default=int(env(contract.ENV_MAX_BATCH_SIZE, 32)),
                   help="most rows in one forward pass (1 = no batching)")
    p.add_argument("--max-batch-delay-ms", type=float, default=float(env(contract.ENV_MAX_BATCH_DELAY_MS, 0)),
                   help="longest wait for a batch to fill; 0 batches what queued during the previous batch")
    p.add_argument("--max-request-rows", type=int, default=None,
                   help="most rows in one request (default: --max-batch-size); fewer if the memory "
                        "limit holds fewer")
    p.add_argument("--max-concurrent-requests", type=int,
                   default=int(env(contract.ENV_MAX_CONCURRENT_REQUESTS, Shedding.max_concurrent)),
                   help="inference requests admitted at once (REST and gRPC together); more get 503")
    p.add_argument("--max-queued-requests", type=int,
                   default=int(env(contract.ENV_MAX_QUEUED_REQUESTS, Shedding.max_queued)),
                   help="requests waiting for a batch; more get 503")
    p.add_argument("--queue-timeout-ms", type=int,
                   default=int(env(contract.ENV_QUEUE_TIMEOUT_MS, Shedding.queue_timeout_ms)),
                   help="a request that waits longer for a batch is refused uncomputed")
    p.add_argument("--memory-limit-bytes", type=int, default=int(env(contract.ENV_MEMORY_LIMIT_BYTES, 0)) or None,
                   help="the memory the server may use (default: the cgroup's limit)")
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024, help="largest request body")
    p.add_argument("--idle-timeout", type=float, default=15.0,
                   help="seconds a connection may stay without a complete request (headers)")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds to receive a request body")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let requests finish on SIGTERM")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--access-log", action="store_true")
    args = p.parse_args(argv)
    if not args.model_dir:
        p.error(f"--model-dir or {contract.ENV_MODEL_DIR} is required")
    if args.max_request_rows is None:
        args.max_request_rows = args.max_batch_size
    if args.max_batch_size < 1 or args.max_batch_delay_ms < 0 or args.max_request_rows < 1:
        p.error("--max-batch-size and --max-request-rows must be >= 1, --max-batch-delay-ms >= 0")
    if min(args.max_concurrent_requests, args.max_queued_requests, args.queue_timeout_ms) < 1:
        p.error("--max-concurrent-requests, --max-queued-requests and --queue-timeout-ms must be >= 1")
    if args.idle_timeout <= 0 or args.body_timeout <= 0:
        p.error("--idle-timeout and --body-timeout must be > 0")
    return args


async def serve(args: argparse.Namespace) -> int:
    labels = {contract.METRICS_MODEL_LABEL: args.model_name,
              contract.METRICS_MODEL_NAMESPACE_LABEL: os.environ.get(contract.ENV_MODEL_NAMESPACE, ""),
              contract.METRICS_REVISION_LABEL: os.environ.get(contract.ENV_MODEL_REVISION, "")}
    server = ModelServer(Path(args.model_dir), args.model_name, args.max_batch_size,
                         args.max_batch_delay_ms, args.max_request_rows, labels, args.model_format,
                         Shedding(args.max_concurrent_requests, args.max_queued_requests,
                                  args.queue_timeout_ms, args.memory_limit_bytes))
    # keepalive_timeout closes connections idle between requests; HeaderDeadline closes
    # those that never complete their first request header (slow or idle clients).
    deadline = HeaderDeadline(args.idle_timeout)
    runner = web.AppRunner(server.make_app(args.max_body_bytes, args.body_timeout, deadline),
                           handle_signals=False, shutdown_timeout=args.drain_timeout,
                           keepalive_timeout=args.idle_timeout,
                           access_log=log if args.access_log else None, access_log_class=QuietAccessLogger)
    await runner.setup()
    deadline.install(runner.server)
    await web.TCPSite(runner, args.host, args.port).start()
    grpc_aio = None
    if args.grpc_port:
        grpc_aio = await grpc_server.start(server, args.host, args.grpc_port)
    log.info("serving %s on %s:%d (REST) and %s (gRPC); max batch %d, max delay %.1f ms", args.model_name,
             args.host, args.port, args.grpc_port or "off", args.max_batch_size, args.max_batch_delay_ms)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server.batcher.start()
    loader = asyncio.create_task(server.load(stop))
    await stop.wait()
    log.info("shutting down: draining in-flight requests")
    server.ready = False
    server.batcher.draining = True
    loader.cancel()
    if grpc_aio is not None:
        await asyncio.gather(grpc_aio.stop(args.drain_timeout), runner.cleanup())
    else:
        await runner.cleanup()          # stop listening, then wait for in-flight handlers
    await server.batcher.close()
    server.decoder.shutdown(wait=False)
    log.info("stopped")
    return server.exit_code


def task_of(argv: list[str]) -> tuple[str, list[str]]:
    """The task (``--task`` or ``contract.ENV_TASK``; default predict) and ``argv`` without ``--task``."""
    task_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    task_parser.add_argument("--task", choices=contract.TASKS,
                             default=os.environ.get(contract.ENV_TASK) or contract.TASK_PREDICT)
    known, rest = task_parser.parse_known_args(argv)
    return known.task, rest


def main(argv: list[str] | None = None) -> int:
    """Serve a model: the OIP v2 server, or for ``--task text-generation`` (or
    ``LEPTON_TASK=text-generation``) the OpenAI-compatible runtime of :mod:`llm.server`."""
    task, argv = task_of(sys.argv[1:] if argv is None else argv)
    if task == contract.TASK_TEXT_GENERATION:
        from .llm import server as runtime
    else:
        runtime = sys.modules[__name__]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = runtime.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if uvloop is not None:
        return uvloop.run(runtime.serve(args))
    return asyncio.run(runtime.serve(args))


if __name__ == "__main__":
    sys.exit(main())
