"""The v2 gRPC API (``inference.GRPCInferenceService``) of :mod:`lepton_trainer.serve`.

The service comes from Triton's ``grpc_service.proto`` and ``model_config.proto``,
vendored in ``protos/``; ``grpc.protos_and_services`` (grpcio-tools) compiles them when
the gRPC server first starts (:func:`load_protos`), so no generated code is kept in the
repository. The servicer runs on the REST server's event loop (``grpc.aio``) and shares
its model, dynamic batcher, statistics and Prometheus metrics; a gRPC status is counted
under the HTTP code of the same meaning (OK 200, INVALID_ARGUMENT 400, NOT_FOUND 404,
UNAVAILABLE 503, INTERNAL 500, CANCELLED 499; RESOURCE_EXHAUSTED 503 when the server is
busy, 413 when the request can never fit).

Inference passes the server's admission (concurrency, memory, the batch queue) like a
REST request; grpc itself admits at most ``RPC_HEADROOM`` RPCs more than the server's
concurrency limit. Inputs over 64 KiB are decoded in the server's decoder thread, off
the event loop. A request waits for a batch no longer than its deadline or Triton's
``timeout`` parameter (µs), if either is shorter than the server's queue timeout.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer (typed ``contents`` or ``raw_input_contents`` in; ``raw_output_contents``
out, as Triton answers), ModelConfig, ModelStatistics, RepositoryIndex. Repository
load/unload answer INVALID_ARGUMENT (one fixed model); the rest (streaming, shared
memory, trace, logging) answer UNIMPLEMENTED.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING

import grpc
from google.protobuf import json_format

from . import v2
from .admission import Refused

if TYPE_CHECKING:
    from .serve import ModelServer

log = logging.getLogger("lepton_trainer.grpc")

# The modules grpc_tools generates from protos/grpc_service.proto and the
# model_config.proto it includes; set by load_protos().
pb = services = config_pb = None


def load_protos() -> None:
    """Compile the vendored .proto files, once per process.

    Done when the gRPC server starts rather than at import, so that a process which also
    holds another copy of the ``inference`` protobuf package (tritonclient's generated
    modules, in the tests) can still import this module and :mod:`lepton_trainer.serve`."""
    global pb, services, config_pb
    if pb is None:
        pb, services = grpc.protos_and_services("lepton_trainer/protos/grpc_service.proto")
        config_pb = sys.modules["lepton_trainer.protos.model_config_pb2"]


HTTP_CODE = {grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400,
             grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.UNAVAILABLE: 503,
             grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.CANCELLED: 499,
             grpc.StatusCode.RESOURCE_EXHAUSTED: 413}


# RPCs beyond the server's limit on concurrent inference requests that grpc itself admits
# (metadata, health, statistics) before it answers RESOURCE_EXHAUSTED on its own.
RPC_HEADROOM = 16


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, http: int | None = None):
        super().__init__(message)
        self.code, self.http = code, http or HTTP_CODE.get(code, 500)


def refused(e: "Refused") -> Abort:
    """A refusal as RESOURCE_EXHAUSTED, counted as 413 (never fits) or 503 (busy)."""
    return Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), 413 if e.too_large else 503)


class InferenceServicer:
    """The implemented RPCs; :func:`servicer` adds the generated base class, whose
    methods answer UNIMPLEMENTED for the rest."""

    def __init__(self, server: "ModelServer"):
        self.s = server

    # health and metadata -----------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.s.ready)

    async def _check(self, request, context, need_ready: bool = True) -> None:
        try:
            self.s.check_model(request.name, request.version)
        except LookupError as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        if need_ready and not self.s.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"model {self.s.name!r} is not ready")

    async def ModelReady(self, request, context):
        try:                     # an unknown model or version is simply not ready
            self.s.check_model(request.name, request.version)
        except LookupError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.s.ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=v2.SERVER_NAME, version=v2.PROTOCOL_VERSION,
                                         extensions=v2.EXTENSIONS)

    async def ModelMetadata(self, request, context):
        await self._check(request, context)
        meta = self.s.metadata()
        tensors = lambda specs: [pb.ModelMetadataResponse.TensorMetadata(**s) for s in specs]  # noqa: E731
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"],
                                        platform=meta["platform"], inputs=tensors(meta["inputs"]),
                                        outputs=tensors(meta["outputs"]))

    async def ModelConfig(self, request, context):
        await self._check(request, context)
        cfg = json_format.ParseDict(self.s.config(), config_pb.ModelConfig(), ignore_unknown_fields=True)
        return pb.ModelConfigResponse(config=cfg)

    async def ModelStatistics(self, request, context):
        if request.name:
            await self._check(request, context, need_ready=False)
        return json_format.ParseDict(self.s.statistics(), pb.ModelStatisticsResponse(),
                                     ignore_unknown_fields=True)

    async def RepositoryIndex(self, request, context):
        state = "READY" if self.s.ready else "LOADING"
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(
            name=self.s.name, version=v2.VERSION, state=state, reason="")])

    async def RepositoryModelLoad(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model control is not supported: this "
                            "server serves one model, loaded at start-up")

    RepositoryModelUnload = RepositoryModelLoad

    # inference -----------------------------------------------------------------------------
    def _inputs(self, request) -> tuple[dict, int]:
        m = self.s.model
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise v2.ProtocolError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs")
        arrays = {}
        for i, t in enumerate(request.inputs):
            spec = v2.check_input(t.name, t.datatype, list(t.shape), m.inputs, self.s.max_request_rows)
            if t.name in arrays:
                raise v2.ProtocolError(f"input {t.name!r} appears twice")
            shape = list(t.shape)
            arrays[t.name] = (v2.from_raw(raw[i], spec.datatype, shape, t.name) if raw
                              else v2.parse_contents(t.name, spec.datatype, shape, t.contents))
        missing = [s.name for s in m.inputs if s.name not in arrays]
        if missing:
            raise v2.ProtocolError(f"missing inputs {missing}; this model's inputs: {[s.name for s in m.inputs]}")
        rows = {a.shape[0] for a in arrays.values()}
        if len(rows) != 1:
            raise v2.ProtocolError(f"inputs disagree on the batch size (first dimension): {sorted(rows)}")
        return arrays, rows.pop()

    @staticmethod
    def _timeout(request, context) -> float | None:
        """Seconds the request may wait: its deadline, or Triton's ``timeout`` parameter."""
        waits = [context.time_remaining()]
        if "timeout" in request.parameters:
            us = v2.timeout_parameter(request.parameters["timeout"].int64_param)
            waits.append(us and us / 1e6)
        waits = [w for w in waits if w is not None]
        return min(waits) if waits else None

    async def _infer(self, request, context):
        try:
            self.s.check_model(request.model_name, request.model_version)
        except LookupError as e:
            raise Abort(grpc.StatusCode.NOT_FOUND, str(e)) from None
        if not self.s.ready:
            raise Abort(grpc.StatusCode.UNAVAILABLE, f"model {self.s.name!r} is not ready")
        size = request.ByteSize()
        try:
            ticket = self.s.admission.enter(size)
        except Refused as e:
            raise refused(e) from None
        try:
            return await self._admitted(request, context, ticket, size)
        except Refused as e:
            raise refused(e) from None
        finally:
            self.s.admission.leave(ticket)

    async def _admitted(self, request, context, ticket, size: int):
        """Decode (in the decoder thread when large), reserve the rows' memory, run."""
        m = self.s.model
        known = [o.name for o in m.outputs]
        names = [o.name for o in request.outputs] or known
        unknown = [n for n in names if n not in known]
        try:
            if unknown:
                raise v2.ProtocolError(f"unknown outputs {unknown}; known: {known}")
            arrays, rows = await self.s.offload(size, self._inputs, request)
            self.s.admission.add_rows(ticket, rows)
            out = await self.s.infer_arrays(arrays, timeout=self._timeout(request, context), size=size)
        except v2.TooManyRows as e:
            raise refused(self.s.too_many_rows(e)) from None
        except v2.ProtocolError as e:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except v2.ModelFailed as e:
            raise Abort(grpc.StatusCode.INTERNAL, str(e)) from None
        specs = {s.name: s for s in m.outputs}
        response = pb.ModelInferResponse(model_name=self.s.name, model_version=v2.VERSION, id=request.id)
        for n in names:
            arr = out[n]
            response.outputs.add(name=n, datatype=specs[n].datatype, shape=list(arr.shape))
            response.raw_output_contents.append(v2.to_raw(arr, specs[n].datatype))
        return response, rows

    async def ModelInfer(self, request, context):
        # the metrics are recorded before the status goes out, so a client that reads
        # them right after its answer sees its own request counted. grpc.aio hands the
        # servicer one RPC at a time, so one that finds the server empty may still have
        # many behind it: its batch runs in the worker thread, and the event loop takes
        # in the next RPCs meanwhile, which then batch.
        t0 = self.s.begin(may_run_alone=False)
        try:
            response, rows = await self._infer(request, context)
        except Abort as e:
            self.s.end(t0, e.http)
            await context.abort(e.code, str(e))
        except asyncio.CancelledError:
            self.s.end(t0, HTTP_CODE[grpc.StatusCode.CANCELLED])
            raise
        except Exception as e:  # noqa: BLE001 - an internal error answers INTERNAL, the server goes on
            log.exception("ModelInfer failed")
            self.s.end(t0, 500)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")
        self.s.end(t0, 200, rows)
        return response


def servicer(server: "ModelServer") -> InferenceServicer:
    """The servicer of ``server``'s model (compiles the .proto files on first use)."""
    load_protos()
    cls = type("InferenceServicer", (InferenceServicer, services.GRPCInferenceServiceServicer), {})
    return cls(server)


async def start(server: "ModelServer", host: str, port: int) -> grpc.aio.Server:
    limit = server.max_body_bytes
    aio = grpc.aio.server(maximum_concurrent_rpcs=server.shedding.max_concurrent + RPC_HEADROOM,
                          options=[("grpc.max_receive_message_length", limit),
                                   ("grpc.max_send_message_length", -1),
                                   ("grpc.so_reuseport", 0)])
    impl = servicer(server)
    services.add_GRPCInferenceServiceServicer_to_server(impl, aio)
    address = f"{'[::]' if host in ('0.0.0.0', '::') else host}:{port}"
    if aio.add_insecure_port(address) == 0:
        raise OSError(f"cannot bind the gRPC port {address}")
    await aio.start()
    return aio
