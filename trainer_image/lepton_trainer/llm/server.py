"""``python -m lepton_trainer.serve --task text-generation``: the OpenAI-compatible runtime.

It loads a causal language model with :func:`lepton_trainer.llm.loader.load` (a Hugging Face
directory, a GGUF file, or what compression wrote) and answers OpenAI's API on ``--port``
(``contract.SERVE_PORT``) with aiohttp:

  POST /v1/chat/completions   chat (the tokenizer's chat template), ``stream: true`` as
                              server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``)
  POST /v1/completions        plain text completion, streamed the same way
  GET  /v1/models             the one model (``LEPTON_MODEL_NAME``)
  GET  /v2/health/live        200 while the process serves HTTP (503 if the engine's loop died)
  GET  /v2/health/ready       200 once the model is loaded and warmed up (also ``/health``)
  GET  /metrics               Prometheus metrics

Requests take ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (0: greedy),
``top_p``, ``seed``, ``stop`` (up to 4 strings), ``stream`` and
``stream_options.include_usage``; answers carry ``usage``, and a stream that asked for it
ends with a chunk holding only ``usage``. Tokens are produced by :mod:`.engine`
(transformers' continuous batching) and each one is streamed as it is produced.

At most ``LEPTON_MAX_SEQUENCES`` requests generate at once; up to
``LEPTON_MAX_QUEUED_REQUESTS`` more wait for a slot, at most ``LEPTON_QUEUE_TIMEOUT_MS``;
past either, 429 with ``Retry-After``. A prompt longer than ``LEPTON_MAX_PROMPT_TOKENS``
(or than the model's context with its ``max_tokens``), a ``max_tokens`` above
``LEPTON_MAX_OUTPUT_TOKENS`` and malformed messages get 400 naming the parameter; a model
other than the served one gets 404; errors use OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``). A client that disconnects cancels
its request: the sequence leaves the batch and its slot and cache blocks are freed.

Metrics carry vLLM's names (``contract.LLM_METRIC_*``, label ``model_name``) so that
dashboards and alerts written for vLLM read this runtime unchanged, plus
``contract.METRIC_SERVE_REQUESTS`` by ``code`` (499: the client went away). KV-cache use
is the engine's own: the share of its paged cache's blocks held by requests.

The server stays live while it waits for the model path and loads; a model that fails to
load or warm up ends the process with status 1. On SIGTERM or SIGINT it turns not-ready,
stops accepting connections, lets running requests finish (``--drain-timeout``) and exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import os
import random
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .. import contract
from . import loader
from .engine import Engine, Sampling

log = logging.getLogger("lepton_trainer.llm.server")

HEALTH_PATH = "/health"
CLIENT_CLOSED = 499
RETRY_AFTER_S = 1
MAX_STOP_STRINGS = 4
MAX_BODY_BYTES = 4 * 1024 * 1024
# Histogram buckets (seconds) spanning a GPU's milliseconds and a small CPU's seconds.
TTFT_BUCKETS = (.001, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (.001, .0025, .005, .01, .025, .05, .075, .1, .15, .2, .3, .4, .5, .75, 1, 2.5, 5, 7.5, 10)
E2E_BUCKETS = (.1, .3, .5, .8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960)
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


# --- errors (OpenAI's shape) ------------------------------------------------------------------

class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def document(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.document(), status=self.status, headers=self.headers)


def _bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


class ClientGone(Exception):
    """The client closed the connection while its answer streamed."""

    def __init__(self, response: web.StreamResponse):
        super().__init__("client went away")
        self.response = response


# --- limits and admission ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Limits:
    """What one server accepts (``serving.generation`` and the admission settings)."""
    max_prompt_tokens: int = 2048
    max_output_tokens: int = 512
    max_sequences: int = 8
    max_queued: int = 32
    queue_timeout_ms: int = 5000


class Admission:
    """``slots`` requests generate at once; up to ``max_waiting`` more wait for a slot, each
    at most ``timeout_s``, first come first served. A freed slot passes straight to the
    oldest waiter."""

    def __init__(self, slots: int, max_waiting: int, timeout_s: float):
        self.slots, self.max_waiting, self.timeout_s = slots, max_waiting, timeout_s
        self.running = 0
        self.queue: collections.deque[asyncio.Future] = collections.deque()
        self.draining = False

    @property
    def waiting(self) -> int:
        return len(self.queue)

    async def enter(self) -> None:
        if self.running < self.slots and not self.queue:
            self.running += 1
            return
        if len(self.queue) >= self.max_waiting:
            raise _busy(f"server busy: {self.running} requests are generating and {len(self.queue)} are "
                        f"waiting, the limit", "queue_full")
        fut = asyncio.get_running_loop().create_future()
        self.queue.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout_s)
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self.leave()                # a slot arrived just as we gave up: pass it on
            else:
                fut.cancel()
                if fut in self.queue:
                    self.queue.remove(fut)
            if isinstance(e, asyncio.TimeoutError):
                raise _busy(f"server busy: no generation slot freed within {self.timeout_s * 1000:g} ms",
                            "queue_timeout") from None
            raise

    def leave(self) -> None:
        while self.queue:
            fut = self.queue.popleft()
            if not fut.done():
                fut.set_result(None)        # the slot moves to this waiter
                return
        self.running -= 1


def _busy(message: str, code: str) -> ApiError:
    return ApiError(429, message, None, code, kind="rate_limit_error",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


# --- requests ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Generation:
    """One parsed request."""
    chat: bool
    prompt_ids: list[int]
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{name} must be a number, got {value!r}", name)
    if value > high or value < low or (low_open and value == low):
        raise _bad(f"{name} must be {'>' if low_open else '>='} {low:g} and <= {high:g}, got {value!r}", name)
    return float(value)


def _max_tokens(body: dict, limits: Limits) -> tuple[int, str]:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _bad(f"{name} must be an integer >= 1, got {value!r}", name)
        if value > limits.max_output_tokens:
            raise _bad(f"{name} is {value}, above this server's limit of {limits.max_output_tokens} "
                       f"output tokens", name, "max_tokens_exceeded")
        return value, name
    return limits.max_output_tokens, "max_tokens"


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > MAX_STOP_STRINGS:
        raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    return tuple(stop)


def _options(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad("stream_options must be an object with a boolean include_usage", "stream_options")
    if body.get("n", 1) != 1:
        raise _bad("only n = 1 is supported", "n")
    if body.get("logprobs") not in (None, False) or body.get("echo") not in (None, False):
        raise _bad("logprobs and echo are not supported", "logprobs")
    return bool(stream), bool(options.get("include_usage", False))


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{i}] must be an object whose role is one of {', '.join(sorted(ROLES))}",
                       f"messages[{i}].role")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m, i)})
    return out


def _prompt(body: dict, tokenizer: Any) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    vocab = len(tokenizer)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                   and 0 <= t < vocab for t in prompt):
        return list(prompt)
    raise _bad("prompt must be a non-empty string, or one list of token ids", "prompt")


def _chat_ids(messages: list[dict[str, str]], tokenizer: Any) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise _bad("this model has no chat template: use /v1/completions", "messages", "no_chat_template")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # noqa: BLE001 - the template refused these messages (jinja raise_exception)
        raise _bad(f"the model's chat template refused these messages: {e}", "messages") from None
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def parse(body: Any, chat: bool, model_name: str, tokenizer: Any, limits: Limits,
          context_tokens: int) -> Generation:
    """A request body as a :class:`Generation`, or :class:`ApiError` (400, 404)."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object", None)
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model is required: the served model's name", "model")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       "model", "model_not_found")
    ids = _chat_ids(_messages(body), tokenizer) if chat else _prompt(body, tokenizer)
    where = "messages" if chat else "prompt"
    if len(ids) > limits.max_prompt_tokens:
        raise _bad(f"the prompt is {len(ids)} tokens, above this server's limit of "
                   f"{limits.max_prompt_tokens}", where, "context_length_exceeded")
    max_tokens, name = _max_tokens(body, limits)
    if len(ids) + max_tokens > context_tokens:
        raise _bad(f"the prompt ({len(ids)} tokens) and {name} ({max_tokens}) exceed the model's context "
                   f"of {context_tokens} tokens", name, "context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad(f"seed must be an integer, got {seed!r}", "seed")
    stream, include_usage = _options(body)
    return Generation(chat, ids, Sampling(max_tokens, temperature, top_p, seed), _stop(body), stream,
                      include_usage)


# --- detokenization ---------------------------------------------------------------------------

class TextStream:
    """Generated token ids as text pieces, each safe to send: text that may still turn into
    a stop string or an incomplete UTF-8 character is held back until it cannot."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], eos_ids: frozenset[int]):
        self.tokenizer, self.stop, self.eos_ids = tokenizer, stop, eos_ids
        self.sent = 0
        self.text = ""
        self.stopped = False            # a stop string was found
        self.eos = False                # the model ended its answer

    def update(self, ids: list[int]) -> str:
        if ids and ids[-1] in self.eos_ids:
            self.eos, ids = True, ids[:-1]
        self.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.text = True, self.text[:min(hits)]
            return self._emit(len(self.text))
        hold = len(self.text) - len(self.text.rstrip("\ufffd"))
        for s in self.stop:
            hold = max(hold, max((k for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0))
        return self._emit(len(self.text) - hold)

    def finish(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece


# --- metrics ----------------------------------------------------------------------------------

class Metrics:
    """The runtime's Prometheus metrics (vLLM's names, label ``model_name``)."""

    def __init__(self, model_name: str, admission: Admission, kv_usage: Callable[[], float]):
        r = self.registry = CollectorRegistry()
        label = contract.LLM_METRIC_MODEL_LABEL
        self.labels = {label: model_name}

        def hist(name: str, doc: str, buckets: tuple) -> Any:
            return Histogram(name, doc, [label], buckets=buckets, registry=r).labels(**self.labels)

        def counter(name: str, doc: str) -> Any:
            return Counter(name.removesuffix("_total"), doc, [label], registry=r).labels(**self.labels)

        def gauge(name: str, doc: str, fn: Callable[[], float]) -> None:
            Gauge(name, doc, [label], registry=r).labels(**self.labels).set_function(fn)
        self.ttft = hist(contract.LLM_METRIC_TTFT, "Time to first token (seconds)", TTFT_BUCKETS)
        self.itl = hist(contract.LLM_METRIC_ITL, "Time between two tokens of one request (seconds)", ITL_BUCKETS)
        self.e2e = hist(contract.LLM_METRIC_E2E, "Request latency, arrival to last token (seconds)", E2E_BUCKETS)
        self.prompt_tokens = counter(contract.LLM_METRIC_PROMPT_TOKENS, "Prompt tokens processed")
        self.generation_tokens = counter(contract.LLM_METRIC_GENERATION_TOKENS, "Tokens generated")
        gauge(contract.LLM_METRIC_RUNNING, "Requests generating", lambda: admission.running)
        gauge(contract.LLM_METRIC_WAITING, "Requests waiting for a generation slot", lambda: admission.waiting)
        gauge(contract.LLM_METRIC_KV_CACHE, "Share of the KV cache in use (0..1)", kv_usage)
        self.success = Counter(contract.LLM_METRIC_SUCCESS.removesuffix("_total"), "Requests finished, by reason",
                               [label, "finished_reason"], registry=r)
        self.requests = Counter(contract.METRIC_SERVE_REQUESTS.removesuffix("_total"),
                                "Requests by HTTP status code", [label, "code"], registry=r)

    def finished(self, reason: str) -> None:
        self.success.labels(**self.labels, finished_reason=reason).inc()

    def answered(self, code: int) -> None:
        self.requests.labels(**self.labels, code=str(code)).inc()


@dataclasses.dataclass
class Outcome:
    finish_reason: str = "length"
    completion_tokens: int = 0


# --- the server -------------------------------------------------------------------------------

class LLMServer:
    """The OpenAI API over one :class:`Engine`."""

    def __init__(self, model_path: Path, name: str, limits: Limits, kv_cache_tokens: int | None = None):
        self.model_path, self.name, self.limits = model_path, name, limits
        self.kv_cache_tokens = kv_cache_tokens
        self.engine: Engine | None = None
        self.tokenizer: Any = None
        self.context_tokens = limits.max_prompt_tokens + limits.max_output_tokens
        self.ready = False
        self.exit_code = 0
        self.created = int(time.time())
        self.admission = Admission(limits.max_sequences, limits.max_queued, limits.queue_timeout_ms / 1000.0)
        self.metrics = Metrics(name, self.admission, lambda: self.engine.kv_cache_usage() if self.engine else 0.0)

    # loading ---------------------------------------------------------------------------------
    def _present(self) -> bool:
        p = self.model_path
        try:
            return p.is_file() or (p.is_dir() and ((p / "config.json").exists() or loader.is_gguf(p)))
        except OSError:
            return False

    def _load(self) -> Engine:
        model, tokenizer = loader.load(self.model_path)
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if context:
            self.context_tokens = min(self.context_tokens, int(context))
        self.tokenizer = tokenizer
        engine = Engine(model, tokenizer, self.limits.max_sequences, self.context_tokens, self.kv_cache_tokens)
        engine.start()
        return engine

    async def load(self, stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Wait for the model path, load the model, warm the engine up, then turn ready."""
        waited = 0.0
        while not self._present():
            if waited % 30 < poll_s:
                log.info("waiting for the model at %s", self.model_path)
            await asyncio.sleep(poll_s)
            waited += poll_s
        try:
            self.engine = await asyncio.get_running_loop().run_in_executor(None, self._load)
            bos = self.tokenizer.bos_token_id
            await asyncio.wait_for(self.engine.warm_up([bos if bos is not None else 0] * 4), 600)
        except Exception:  # noqa: BLE001 - any failure here means this server cannot serve
            log.exception("model %s from %s failed to load or warm up", self.name, self.model_path)
            self.exit_code = 1
            stop.set()
            return
        self.ready = True
        log.info("model %s ready: context %d tokens, %d sequences at once, %d waiting at most", self.name,
                 self.context_tokens, self.limits.max_sequences, self.limits.max_queued)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    # generation ------------------------------------------------------------------------------
    async def generate(self, req: Generation, t0: float, on_piece: Callable[[str], Awaitable[None]]) -> Outcome:
        """Run ``req`` in the engine, handing each safe text piece to ``on_piece``; the request
        is cancelled in the engine if this coroutine ends early (client gone, error)."""
        engine, outcome = self.engine, Outcome()
        queue: asyncio.Queue = asyncio.Queue()
        seed = req.sampling.seed if req.sampling.seed is not None else random.getrandbits(63)
        rid = engine.submit(req.prompt_ids, req.sampling, seed, queue.put_nowait)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        text = TextStream(self.tokenizer, req.stop, engine.eos_ids)
        done = finished = False
        last = None
        try:
            while not done:
                out = await queue.get()
                if out.error:
                    raise ApiError(500, f"generation failed: {out.error}", None, "engine_error", "server_error")
                new = len(out.generated_tokens) - outcome.completion_tokens
                now = time.perf_counter()
                if new > 0:
                    self._observe_tokens(new, now, last, t0)
                    outcome.completion_tokens, last = len(out.generated_tokens), now
                piece = text.update(out.generated_tokens)
                finished = out.is_finished()
                done = text.stopped or finished
                if done:
                    piece += text.finish()
                if piece:
                    await on_piece(piece)
        finally:
            if not finished:        # client gone, error, or a stop string: free the slot now
                engine.cancel(rid)
        outcome.finish_reason = "stop" if text.stopped or text.eos else "length"
        self.metrics.finished(outcome.finish_reason)
        self.metrics.e2e.observe(time.perf_counter() - t0)
        return outcome

    def _observe_tokens(self, new: int, now: float, last: float | None, t0: float) -> None:
        self.metrics.generation_tokens.inc(new)
        if last is None:                # the first token(s): time to first token
            self.metrics.ttft.observe(now - t0)
            new, last = new - 1, now
        for _ in range(new):
            self.metrics.itl.observe((now - last) / new)

    # documents -------------------------------------------------------------------------------
    def _head(self, req: Generation, rid: str, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if req.chat else "text_completion"
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.name,
                "system_fingerprint": None}

    def _choice(self, req: Generation, text: str | None, finish: str | None, chunk: bool) -> dict[str, Any]:
        if not req.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not chunk:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish}

    @staticmethod
    def _usage(req: Generation, outcome: Outcome) -> dict[str, int]:
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": outcome.completion_tokens,
                "total_tokens": len(req.prompt_ids) + outcome.completion_tokens}

    async def _complete(self, request: web.Request, req: Generation, t0: float) -> web.StreamResponse:
        pieces: list[str] = []

        async def collect(piece: str) -> None:
            pieces.append(piece)
        outcome = await self.generate(req, t0, collect)
        rid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        return web.json_response({**self._head(req, rid, False),
                                  "choices": [self._choice(req, "".join(pieces), outcome.finish_reason, False)],
                                  "usage": self._usage(req, outcome)})

    async def _stream(self, request: web.Request, req: Generation, t0: float) -> web.StreamResponse:
        rid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(document: dict[str, Any] | str) -> None:
            data = document if isinstance(document, str) else json.dumps(document, separators=(",", ":"))
            try:
                await response.write(b"data: " + data.encode() + b"\n\n")
            except (ConnectionResetError, RuntimeError):
                raise ClientGone(response) from None

        async def piece(text: str) -> None:
            await send({**self._head(req, rid, True), "choices": [self._choice(req, text, None, True)]})
        if req.chat:
            await send({**self._head(req, rid, True), "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        try:
            outcome = await self.generate(req, t0, piece)
        except ApiError as e:       # the answer has begun: the error goes into the stream
            await send(e.document())
            await send("[DONE]")
            return response
        await send({**self._head(req, rid, True), "choices": [self._choice(req, None if req.chat else "",
                                                                           outcome.finish_reason, True)]})
        if req.include_usage:
            await send({**self._head(req, rid, True), "choices": [], "usage": self._usage(req, outcome)})
        await send("[DONE]")
        return response

    # handlers --------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, f"the body exceeds {MAX_BODY_BYTES} bytes", None, "body_too_large") from None
        except ValueError as e:
            raise _bad(f"the body is not valid JSON: {e}", None, "invalid_json") from None

    async def _serve(self, request: web.Request, chat: bool, t0: float) -> web.StreamResponse:
        if not self.ready or self.admission.draining:
            raise ApiError(503, f"model {self.name!r} is not ready", None, "not_ready", "service_unavailable",
                           {"Retry-After": str(RETRY_AFTER_S)})
        req = parse(await self._body(request), chat, self.name, self.tokenizer, self.limits, self.context_tokens)
        await self.admission.enter()
        try:
            return await (self._stream if req.stream else self._complete)(request, req, t0)
        finally:
            self.admission.leave()

    async def _endpoint(self, request: web.Request, chat: bool) -> web.StreamResponse:
        t0, code = time.perf_counter(), 500
        try:
            response = await self._serve(request, chat, t0)
            code = response.status
            return response
        except ApiError as e:
            code = e.status
            return e.response()
        except ClientGone as e:
            code = CLIENT_CLOSED
            log.info("client %s went away during its stream; its request was cancelled", request.remote)
            return e.response
        except asyncio.CancelledError:
            code = CLIENT_CLOSED
            log.info("client %s went away before its answer; its request was cancelled", request.remote)
            raise
        except Exception as e:  # noqa: BLE001 - nothing a request does stops the server
            log.exception("%s %s failed", request.method, request.path)
            return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, None, "server_error").response()
        finally:
            self.metrics.answered(code)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._endpoint(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._endpoint(request, chat=False)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "lepton",
             "max_model_len": self.context_tokens}]})

    def _engine_dead(self) -> bool:
        return self.ready and self.engine is not None and not self.engine.alive

    async def live(self, request: web.Request) -> web.Response:
        """Live while the process serves HTTP, unless the engine's loop died after loading
        (then the kubelet restarts the container)."""
        dead = self._engine_dead()
        return web.json_response({"live": not dead}, status=503 if dead else 200)

    async def health(self, request: web.Request) -> web.Response:
        ready = self.ready and not self._engine_dead()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.add_routes([
            web.post("/v1/chat/completions", self.chat), web.post("/v1/completions", self.completions),
            web.get("/v1/models", self.models), web.get(contract.HEALTH_LIVE_PATH, self.live),
            web.get(contract.HEALTH_READY_PATH, self.health), web.get(HEALTH_PATH, self.health),
            web.get(contract.METRICS_PATH, self.metrics_page)])
        return app


# --- entry point ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m lepton_trainer.serve --task text-generation",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=env(contract.ENV_MODEL_DIR),
                   help="a Hugging Face directory, a .gguf file or a directory holding one")
    p.add_argument("--model-name", default=env(contract.ENV_MODEL_NAME, "model"))
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=contract.SERVE_PORT)
    d = Limits()
    for flag, name, default, doc in (
            ("--max-prompt-tokens", contract.ENV_MAX_PROMPT_TOKENS, d.max_prompt_tokens, "longest prompt"),
            ("--max-output-tokens", contract.ENV_MAX_OUTPUT_TOKENS, d.max_output_tokens, "largest max_tokens"),
            ("--max-sequences", contract.ENV_MAX_SEQUENCES, d.max_sequences, "requests generating at once"),
            ("--max-queued-requests", contract.ENV_MAX_QUEUED_REQUESTS, d.max_queued, "requests waiting"),
            ("--queue-timeout-ms", contract.ENV_QUEUE_TIMEOUT_MS, d.queue_timeout_ms, "longest wait for a slot")):
        p.add_argument(flag, type=int, default=int(env(name, default)), help=f"{doc} (env {name})")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="tokens the KV cache holds (default: max sequences x (prompt + output limits))")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let requests finish on SIGTERM")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--access-log", action="store_true")
    args = p.parse_args(argv)
    if not args.model_dir:
        p.error(f"--model-dir or {contract.ENV_MODEL_DIR} is required")
    if min(args.max_prompt_tokens, args.max_output_tokens, args.max_sequences, args.max_queued_requests,
           args.queue_timeout_ms) < 1:
        p.error("the token, sequence, queue and timeout limits must be >= 1")
    return args


async def serve(args: argparse.Namespace) -> int:
    from ..serve import QuietAccessLogger

    class Quiet(QuietAccessLogger):
        QUIET = QuietAccessLogger.QUIET | {HEALTH_PATH}
    limits = Limits(args.max_prompt_tokens, args.max_output_tokens, args.max_sequences,
                    args.max_queued_requests, args.queue_timeout_ms)
    server = LLMServer(Path(args.model_dir), args.model_name, limits, args.kv_cache_tokens)
    runner = web.AppRunner(server.make_app(), handle_signals=False, shutdown_timeout=args.drain_timeout,
                           handler_cancellation=True, access_log=log if args.access_log else None,
                           access_log_class=Quiet)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    log.info("serving %s over the OpenAI API on %s:%d", args.model_name, args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = asyncio.create_task(server.load(stop))
    await stop.wait()
    log.info("shutting down: draining running requests")
    server.ready, server.admission.draining = False, True
    loading.cancel()
    await runner.cleanup()              # stop listening, then wait for running handlers
    await loop.run_in_executor(None, server.close)
    log.info("stopped")
    return server.exit_code
