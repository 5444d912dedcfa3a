"""``python -m lepton_trainer.serve``: a batching inference server for a model directory.

HTTP (aiohttp), Open Inference Protocol v2 REST, the API of KServe and Triton:

  GET  /v2/health/live            200 while the process serves HTTP
  GET  /v2/health/ready           200 once the model is loaded and answered a warm-up request
  GET  /v2                        server metadata
  GET  /v2/models/{name}          model metadata (inputs, outputs, datatypes, shapes)
  GET  /v2/models/{name}/ready    200 when ready, 503 before
  POST /v2/models/{name}/infer    one FP32 input ``input`` of shape [N, *input_shape];
                                  outputs ``logits``, ``probabilities`` (FP32 [N, C]) and
                                  ``predicted_class`` (INT64 [N]); ``outputs`` in the
                                  request selects some of them
  GET  /metrics                   Prometheus metrics (names in contract.py)

Requests are batched dynamically: the first waiting request opens a batch, which closes
when it holds ``--max-batch-size`` rows or ``--max-batch-delay-ms`` has passed; the
batch runs as one forward pass in a worker thread while the event loop keeps
accepting requests, so under load the next batch fills while the current one runs.
``--max-batch-size 1`` turns batching off.

A request with more rows than ``--max-batch-size`` runs as a batch of its own.

A missing model directory is waited for (the server stays live, not ready); a model
that fails to load or to answer the warm-up (one request through the batcher) ends
the process with status 1. Bad input gets 400 with the reason, an unknown model 404,
anything unexpected 500; the server keeps serving. On SIGTERM or SIGINT the server
turns not-ready, stops accepting connections, runs open batches without waiting for
them to fill, lets in-flight requests finish (up to ``--drain-timeout`` seconds) and
exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from . import contract, modelio

log = logging.getLogger("lepton_trainer.serve")

INPUT_NAME = "input"
OUTPUTS = {"logits": "FP32", "probabilities": "FP32", "predicted_class": "INT64"}
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class BadRequest(web.HTTPBadRequest):
    def __init__(self, message: str):
        super().__init__(text=json.dumps({"error": message}), content_type="application/json")


def _error(exc_cls: type[web.HTTPException], message: str) -> web.HTTPException:
    return exc_cls(text=json.dumps({"error": message}), content_type="application/json")


# --- dynamic batching --------------------------------------------------------------------

class Batcher:
    """Collects concurrent requests into batches of at most ``max_rows`` rows and runs each
    batch as one call of ``forward`` in a single worker thread."""

    def __init__(self, forward: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                 max_rows: int, max_delay_s: float, on_batch: Callable[[int], None]):
        self.forward, self.max_rows, self.max_delay_s, self.on_batch = forward, max_rows, max_delay_s, on_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self._task: asyncio.Task | None = None
        self.draining = False     # set on shutdown: open batches run without waiting

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, x: torch.Tensor, wait: bool = True) -> dict[str, torch.Tensor]:
        """Run ``x`` in the next batch; ``wait=False`` closes a batch it opens at once."""
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut, wait))
        return await fut

    async def _collect(self, first) -> tuple[list, Any]:
        loop = asyncio.get_running_loop()
        items, rows, carry = [first], len(first[0]), None
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
            if rows + len(item[0]) > self.max_rows:
                carry = item          # opens the next batch
                break
            items.append(item)
            rows += len(item[0])
        return items, carry

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carry = None
        while True:
            first, carry = carry or await self.queue.get(), None
            items, carry = await self._collect(first)
            items = [it for it in items if not it[1].done()]   # the client went away
            if not items:
                continue
            try:
                x = torch.cat([it[0] for it in items])
                self.on_batch(len(x))
                out = await loop.run_in_executor(self.executor, self.forward, x)
            except Exception as e:  # noqa: BLE001 - the error goes to every caller of the batch
                log.exception("forward pass failed for a batch of %d requests", len(items))
                for _, fut, _ in items:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            start = 0
            for xi, fut, _ in items:
                end = start + len(xi)
                if not fut.done():
                    fut.set_result({k: v[start:end] for k, v in out.items()})
                start = end


# --- request parsing ---------------------------------------------------------------------

def parse_infer(body: bytes, input_shape: list[int], max_rows: int) -> tuple[np.ndarray, list[str], Any]:
    """Validate an OIP v2 infer request; returns (array [N, *input_shape], outputs, id)."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise BadRequest("request body must be a JSON object with an 'inputs' list")
    if len(req["inputs"]) != 1 or not isinstance(req["inputs"][0], dict):
        raise BadRequest(f"expected exactly one input object named {INPUT_NAME!r}, "
                         f"got {len(req['inputs'])} inputs")
    inp = req["inputs"][0]
    if inp.get("name") != INPUT_NAME:
        raise BadRequest(f"unknown input {inp.get('name')!r}; this model has one input named {INPUT_NAME!r}")
    if inp.get("datatype") != "FP32":
        raise BadRequest(f"input {INPUT_NAME!r} has datatype {inp.get('datatype')!r}; this model takes FP32")
    shape = inp.get("shape")
    want = f"[N, {', '.join(map(str, input_shape))}]"
    if (not isinstance(shape, list) or not all(type(d) is int for d in shape)
            or shape[1:] != list(input_shape) or len(shape) != 1 + len(input_shape) or shape[0] < 1):
        raise BadRequest(f"input shape {shape} does not match {want} with N >= 1")
    if shape[0] > max_rows:
        raise BadRequest(f"request too large: {shape[0]} rows, the limit is {max_rows} per request")
    try:
        arr = np.asarray(inp.get("data"))
    except ValueError as e:
        raise BadRequest(f"input data is not a regular array of numbers: {e}") from None
    if arr.dtype.kind not in "iuf":
        raise BadRequest(f"input data must be numbers (FP32), got {arr.dtype.kind!r}-kind values")
    if arr.size != math.prod(shape):
        raise BadRequest(f"input data has {arr.size} values; shape {shape} needs {math.prod(shape)}")
    arr = arr.astype(np.float32).reshape(shape)
    if not np.isfinite(arr).all():
        raise BadRequest("input data contains NaN or infinite values")
    wanted = req.get("outputs")
    if wanted is None:
        names = list(OUTPUTS)
    else:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
            raise BadRequest("'outputs' must be a list of objects with a 'name'")
        names = [o.get("name") for o in wanted]
        unknown = [n for n in names if n not in OUTPUTS]
        if unknown:
            raise BadRequest(f"unknown outputs {unknown}; known: {list(OUTPUTS)}")
    return arr, names, req.get("id")


# --- the server ----------------------------------------------------------------------------

class ModelServer:
    def __init__(self, model_dir: Path, name: str, max_batch_size: int, max_batch_delay_ms: float,
                 max_request_rows: int, labels: dict[str, str]):
        self.model_dir, self.name, self.max_request_rows = model_dir, name, max_request_rows
        self.model: torch.nn.Module | None = None
        self.meta: dict[str, Any] = {}
        self.ready = False
        self.exit_code = 0
        self.registry = CollectorRegistry()
        names = list(labels)
        self.labels = labels
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
        self.batcher = Batcher(self._forward, max_batch_size, max_batch_delay_ms / 1000.0,
                               self.batch_size.observe)

    # model ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(x.to(self.dtype)).float()
        return {"logits": logits, "probabilities": torch.softmax(logits, dim=1),
                "predicted_class": logits.argmax(dim=1)}

    async def load(self, stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Wait for the model directory, load it, warm it up, then turn ready."""
        meta_path = self.model_dir / contract.MODEL_META_FILE
        waited = 0.0
        while not meta_path.exists():
            if waited % 30 < poll_s:
                log.info("waiting for the model directory %s", self.model_dir)
            await asyncio.sleep(poll_s)
            waited += poll_s
        try:
            loop = asyncio.get_running_loop()
            self.model, self.meta = await loop.run_in_executor(None, modelio.load_model, self.model_dir)
            self.dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()),
                              torch.float32)
            self.input_shape = list(self.meta.get("input_shape") or [self.meta["config"]["in_features"]])
            out = await self.batcher.submit(torch.zeros(1, *self.input_shape), wait=False)
            self.num_classes = int(out["logits"].shape[1])
        except Exception:  # noqa: BLE001 - any failure here means this server cannot serve
            log.exception("model %s from %s failed to load or warm up", self.name, self.model_dir)
            self.exit_code = 1
            stop.set()
            return
        self.ready = True
        log.info("model %s ready (%s, %s)", self.name, self.meta.get("arch"),
                 self.meta.get("quantization") or self.meta.get("dtype", "float32"))

    # handlers ------------------------------------------------------------------------
    def _model(self, request: web.Request) -> None:
        if request.match_info["name"] != self.name:
            raise _error(web.HTTPNotFound, f"unknown model {request.match_info['name']!r}; "
                                           f"this server serves {self.name!r}")

    def _require_ready(self) -> None:
        if not self.ready:
            raise _error(web.HTTPServiceUnavailable, f"model {self.name!r} is not ready")

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def health_ready(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.ready}, status=200 if self.ready else 503)

    async def server_meta(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "lepton-serve", "version": "2", "extensions": []})

    async def model_ready(self, request: web.Request) -> web.Response:
        self._model(request)
        return web.json_response({"name": self.name, "ready": self.ready},
                                 status=200 if self.ready else 503)

    async def model_meta(self, request: web.Request) -> web.Response:
        self._model(request)
        self._require_ready()
        classes = self.num_classes
        return web.json_response({
            "name": self.name, "versions": [v for v in [self.labels.get(contract.METRICS_REVISION_LABEL)] if v],
            "platform": "pytorch", "arch": self.meta.get("arch"),
            "quantization": self.meta.get("quantization"), "dtype": self.meta.get("dtype", "float32"),
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *self.input_shape]}],
            "outputs": [{"name": n, "datatype": dt, "shape": [-1, classes] if dt == "FP32" else [-1]}
                        for n, dt in OUTPUTS.items()]})

    async def infer(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        self.inflight.inc()
        code = 500
        try:
            response = await self._infer(request)
            code = response.status
            return response
        except web.HTTPException as e:
            code = e.status
            raise
        finally:
            self.inflight.dec()
            self.latency.observe(time.perf_counter() - t0)
            self.requests.labels(**self.labels, code=str(code)).inc()

    async def _infer(self, request: web.Request) -> web.Response:
        self._model(request)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(f"request too large: the body exceeds {self.max_body_bytes} bytes") from None
        self._require_ready()
        arr, names, req_id = parse_infer(body, self.input_shape, self.max_request_rows)
        out = await self.batcher.submit(torch.from_numpy(arr))
        payload: dict[str, Any] = {"model_name": self.name, "outputs": [
            {"name": n, "datatype": OUTPUTS[n], "shape": list(out[n].shape),
             "data": out[n].reshape(-1).tolist()} for n in names]}
        if req_id is not None:
            payload["id"] = req_id
        return web.json_response(payload)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def make_app(self, max_body_bytes: int) -> web.Application:
        self.max_body_bytes = max_body_bytes
        app = web.Application(client_max_size=max_body_bytes, middlewares=[_errors_as_json])
        app.add_routes([
            web.get(contract.HEALTH_LIVE_PATH, self.live),
            web.get(contract.HEALTH_READY_PATH, self.health_ready),
            web.get("/v2", self.server_meta),
            web.get("/v2/models/{name}", self.model_meta),
            web.get("/v2/models/{name}/ready", self.model_ready),
            web.post("/v2/models/{name}/infer", self.infer),
            web.get(contract.METRICS_PATH, self.metrics),
        ])
        return app


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
    except Exception as e:  # noqa: BLE001
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(e).__name__}: {e}"}, status=500)


# --- entry point ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m lepton_trainer.serve", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=env(contract.ENV_MODEL_DIR), help="model directory (modelio)")
    p.add_argument("--model-name", default=env(contract.ENV_MODEL_NAME, "model"))
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=contract.SERVE_PORT)
    p.add_argument("--max-batch-size", type=int, default=int(env(contract.ENV_MAX_BATCH_SIZE, 32)),
                   help="most rows in one forward pass (1 = no batching)")
    p.add_argument("--max-batch-delay-ms", type=float, default=float(env(contract.ENV_MAX_BATCH_DELAY_MS, 0)),
                   help="longest wait for a batch to fill; 0 batches what queued during the previous batch")
    p.add_argument("--max-request-rows", type=int, default=1024, help="most rows in one request")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest request body")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let requests finish on SIGTERM")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--access-log", action="store_true")
    args = p.parse_args(argv)
    if not args.model_dir:
        p.error(f"--model-dir or {contract.ENV_MODEL_DIR} is required")
    if args.max_batch_size < 1 or args.max_batch_delay_ms < 0 or args.max_request_rows < 1:
        p.error("--max-batch-size and --max-request-rows must be >= 1, --max-batch-delay-ms >= 0")
    return args


async def serve(args: argparse.Namespace) -> int:
    labels = {contract.METRICS_MODEL_LABEL: args.model_name,
              contract.METRICS_MODEL_NAMESPACE_LABEL: os.environ.get(contract.ENV_MODEL_NAMESPACE, ""),
              contract.METRICS_REVISION_LABEL: os.environ.get(contract.ENV_MODEL_REVISION, "")}
    server = ModelServer(Path(args.model_dir), args.model_name, args.max_batch_size,
                         args.max_batch_delay_ms, args.max_request_rows, labels)
    runner = web.AppRunner(server.make_app(args.max_body_bytes), handle_signals=False,
                           shutdown_timeout=args.drain_timeout,
                           access_log=log if args.access_log else None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    log.info("serving %s on %s:%d (max batch %d, max delay %.1f ms)", args.model_name, args.host,
             args.port, args.max_batch_size, args.max_batch_delay_ms)
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
    await runner.cleanup()          # stop listening, then wait for in-flight handlers
    await server.batcher.close()
    log.info("stopped")
    return server.exit_code


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
