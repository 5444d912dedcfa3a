"""Load shedding: a real server process driven at about ten times what it admits, over REST
and gRPC at once, refuses the excess (503 + Retry-After, RESOURCE_EXHAUSTED), stays alive
and answers its health probe, never computes a request that waited past its deadline, and
keeps its memory under what its settings allow; a request too large for its memory gets
413 / RESOURCE_EXHAUSTED naming the limit."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from lepton_trainer import admission, contract
from _models import train_mlp
from _server import MODEL, _starter

pytestmark = pytest.mark.trainer

CONCURRENT = 16          # --max-concurrent-requests of the overloaded server
MAX_BODY = 1 << 20       # --max-body-bytes of the overloaded server
SHORT_US = 1000          # the short wait some clients allow (µs)
WIDE = 1 << 16           # the wide model's hidden width: 64 * WIDE floats (16 MiB) per row


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak resident set), RssAnon and RssFile of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Wide(torch.nn.Module):
    """A model whose activations take 32 MiB or so per row: memory, not rows, limits it."""

    def __init__(self):
        super().__init__()
        self.width = WIDE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.repeat(1, self.width)).sum(1, keepdim=True)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    torch.jit.save(torch.jit.script(Wide()), str(d / "model.pt"))
    (d / "signature.json").write_text(json.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]}))
    return d


@pytest.fixture(scope="module")
def starter(tmp_path_factory):
    start, servers = _starter(tmp_path_factory.mktemp("shedding"))
    yield start
    for srv in servers:
        if srv.proc.poll() is None:
            assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def overloaded(starter, tmp_path_factory):
    """Batches wait 200 ms to fill: a request that allows itself 1 ms of waiting and arrives
    while a batch fills waits too long, and is dropped uncomputed."""
    model_dir = train_mlp(tmp_path_factory.mktemp("mlp") / "model", steps=200)
    srv = starter(model_dir, "--max-batch-size", "64", "--max-batch-delay-ms", "200",
                  "--queue-timeout-ms", "2000", "--max-concurrent-requests", str(CONCURRENT),
                  "--max-queued-requests", "8", "--max-body-bytes", str(MAX_BODY))
    return srv, proc_status(srv.proc.pid)["VmRSS"]


def _rest_body(rows: int, name: str = "input") -> dict:
    return {"inputs": [{"name": name, "shape": [rows, 64], "datatype": "FP32", "data": [0.25] * (64 * rows)}]}


def _grpc_input(rows: int, name: str = "input") -> grpcaio.InferInput:
    inp = grpcaio.InferInput(name, [rows, 64], "FP32")
    inp.set_data_from_numpy(np.full((rows, 64), 0.25, np.float32))
    return inp


async def _rest_client(session, url: str, rounds: int, seen: list, timeout_us: int | None,
                       name: str) -> None:
    body = _rest_body(1, name) | ({"parameters": {"timeout": timeout_us}} if timeout_us else {})
    for _ in range(rounds):
        async with session.post(f"{url}/v2/models/{MODEL}/infer", json=body) as r:
            seen.append(("rest", r.status, r.headers.get("Retry-After"), await r.text()))


async def _grpc_client(client, rounds: int, seen: list, timeout_us: int | None, name: str) -> None:
    for _ in range(rounds):
        try:
            await client.infer(MODEL, [_grpc_input(1, name)], timeout=timeout_us)
            seen.append(("grpc", "OK", None, ""))
        except InferenceServerException as e:
            seen.append(("grpc", e.status(), None, e.message()))


async def _probe_health(url: str, stop: asyncio.Event, codes: list) -> None:
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.get(url + contract.HEALTH_LIVE_PATH) as r:
                codes.append(r.status)
            await asyncio.sleep(0.05)


async def _overload(srv, clients: int, rounds: int, name: str = "input") -> tuple[list, list]:
    """``clients`` REST and as many gRPC clients, each sending ``rounds`` one-row requests
    back to back, while the health endpoint is probed. Every other client lets its
    requests wait 1 ms at most (Triton's ``timeout`` parameter)."""
    seen, health, stop = [], [], asyncio.Event()
    prober = asyncio.create_task(_probe_health(srv.url, stop, health))
    g = grpcaio.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    conn = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=conn) as session:
            await asyncio.gather(
                *(_rest_client(session, srv.url, rounds, seen, SHORT_US if i % 2 else None, name)
                  for i in range(clients)),
                *(_grpc_client(g, rounds, seen, SHORT_US if i % 2 else None, name) for i in range(clients)))
    finally:
        stop.set()
        await prober
        await g.close()
    return seen, health


async def test_ten_times_the_load_is_shed_and_the_server_lives(overloaded):
    srv, rss_ready = overloaded
    seen, health = await _overload(srv, clients=5 * CONCURRENT, rounds=3)    # 160 clients at once
    assert srv.proc.poll() is None, srv.log()
    assert health and set(health) == {200}            # probed throughout: never refused
    rest = [s for s in seen if s[0] == "rest"]
    grpc_ = [s for s in seen if s[0] == "grpc"]
    busy = [s for s in rest if s[1] == 503]
    assert busy and all(s[2] == str(admission.RETRY_AFTER_S) and "server busy" in s[3] for s in busy)
    assert {s[1] for s in rest} <= {200, 503}, {s[1] for s in rest}
    assert {s[1] for s in grpc_} <= {"OK", "StatusCode.RESOURCE_EXHAUSTED"}, {s[1] for s in grpc_}
    assert any(s[1] == "StatusCode.RESOURCE_EXHAUSTED" for s in grpc_)
    assert any(s[1] in (200, "OK") for s in seen)

    m = srv.metrics()
    refused = {r: m[f"lepton_serve_refused_requests_total[{r}]"] for r in contract.REFUSAL_REASONS}
    assert refused["concurrency"] > 0 and refused["deadline"] > 0
    by_grpc = [s for s in grpc_ if "Concurrent RPC limit exceeded" in s[3]]   # grpc's own cap
    assert sum(refused.values()) + len(by_grpc) == len([s for s in seen if s[1] not in (200, "OK")])
    # a request dropped at its deadline was never computed: the rows computed after the
    # warm-up are the rows answered
    ok = len([s for s in seen if s[1] in (200, "OK")])     # grpc's own refusals count nowhere in ours
    assert m["lepton_serve_batch_size_sum"] - 1 == ok == m["lepton_serve_requests_total[200]"]
    assert m["lepton_serve_queue_depth"] == 0 and m["lepton_serve_admitted_bytes"] == 0
    assert m["lepton_serve_inflight_requests"] == 0
    # memory: what the server holds beside the model is bounded by its settings (at most
    # CONCURRENT bodies of MAX_BODY bytes, decoded), plus room for the runtime's own growth
    bound = rss_ready + CONCURRENT * MAX_BODY * admission.JSON_BODY_FACTOR + (256 << 20)
    assert proc_status(srv.proc.pid)["VmHWM"] <= bound
    assert srv.infer(_rest_body(1)).status_code == 200          # and it still serves


def test_the_model_config_states_the_limits(overloaded):
    srv, _ = overloaded
    cfg = srv.get(f"/v2/models/{MODEL}/config").json()
    m = srv.metrics()
    assert cfg["max_batch_size"] == 64 == m["lepton_serve_max_request_rows"]
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 200_000
    assert m["lepton_serve_row_bytes"] >= 2 * 4 * (64 + 10 + 10 + 2)  # two copies of a row's tensors


@pytest.fixture(scope="module")
def tight(starter, wide_dir):
    """The wide model under a memory limit that holds about eight of its rows beside the
    model and the runtime (their anonymous memory, measured on a first server without a
    limit: file-backed pages are reclaimed before a container's limit kills anything)."""
    probe = starter(wide_dir, "--max-batch-size", "64", name=MODEL)
    row_bytes = probe.metrics()["lepton_serve_row_bytes"]
    baseline = proc_status(probe.proc.pid)["RssAnon"]
    assert probe.stop() == 0, probe.log()
    assert row_bytes >= 64 * WIDE * 4, "the measured memory of a row misses its activations"
    limit = int((baseline + 8 * row_bytes) / admission.HEADROOM)
    srv = starter(wide_dir, "--max-batch-size", "64", "--memory-limit-bytes", str(limit), name=MODEL)
    return srv, limit


def test_memory_sets_the_rows_a_request_may_carry(tight):
    srv, limit = tight
    m = srv.metrics()
    rows = int(m["lepton_serve_max_request_rows"])
    assert 1 <= rows < 64 and rows == m["lepton_serve_memory_budget_bytes"] // m["lepton_serve_row_bytes"]
    assert srv.get(f"/v2/models/{MODEL}/config").json()["max_batch_size"] == rows
    r = srv.infer(_rest_body(rows + 1, "x"))
    assert r.status_code == 413
    assert f"{rows + 1} rows, the limit is {rows} rows per request" in r.json()["error"]
    assert f"memory limit {limit} bytes (--memory-limit-bytes)" in r.json()["error"]
    assert srv.infer(_rest_body(rows, "x")).status_code == 200


async def test_grpc_too_many_rows_for_the_memory_is_resource_exhausted(tight):
    srv, limit = tight
    rows = int(srv.metrics()["lepton_serve_max_request_rows"])
    g = grpcaio.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    try:
        with pytest.raises(InferenceServerException) as e:
            await g.infer(MODEL, [_grpc_input(rows + 1, "x")])
        cfg = await g.get_model_config(MODEL, as_json=True)
    finally:
        await g.close()
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert f"the limit is {rows} rows per request" in e.value.message()
    assert f"memory limit {limit} bytes" in e.value.message()
    assert int(cfg["config"]["max_batch_size"]) == rows


async def test_rows_in_flight_stay_within_the_memory_limit(tight):
    srv, limit = tight
    rows = int(srv.metrics()["lepton_serve_max_request_rows"])
    seen, health = await _overload(srv, clients=5 * rows, rounds=2, name="x")
    assert srv.proc.poll() is None, srv.log()
    assert health and set(health) == {200}
    assert any(s[1] in (200, "OK") for s in seen)
    m = srv.metrics()
    assert m["lepton_serve_refused_requests_total[memory]"] > 0
    assert {s[1] for s in seen} <= {200, 503, "OK", "StatusCode.RESOURCE_EXHAUSTED"}
    status = proc_status(srv.proc.pid)
    assert status["VmHWM"] - status["RssFile"] <= limit        # never past its memory limit (anonymous)


def test_admission_gates_concurrency_and_memory_and_names_the_limits():
    refused = []
    gate = admission.Admission(max_concurrent=2, on_refuse=refused.append)
    limits = admission.Limits.derive(memory_limit=1000, limit_source="test", baseline=350, row_bytes=100,
                                      configured_rows=64)
    assert (limits.budget, limits.max_rows) == (500, 5)          # 85% of 1000, less 350; 500 // 100
    gate.calibrate(limits)
    a = gate.enter(body_bytes=50)                                  # reserves 2 * 50
    assert gate.bytes == 100
    gate.add_rows(a, 3)                                            # then 300 in its place
    assert gate.bytes == 300
    b = gate.enter(body_bytes=0)
    with pytest.raises(admission.Refused) as busy:                 # a third request at once
        gate.enter(body_bytes=0)
    assert busy.value.reason == "concurrency" and not busy.value.too_large
    with pytest.raises(admission.Refused) as memory:               # fits alone, not beside a
        gate.add_rows(b, 3)
    assert memory.value.reason == "memory" and not memory.value.too_large
    with pytest.raises(admission.Refused) as large:                # never fits
        gate.add_rows(b, 6)
    assert large.value.too_large and "the limit is 5 rows per request" in str(large.value)
    assert "memory limit 1000 bytes (test)" in str(large.value)
    gate.leave(a)
    gate.add_rows(b, 5)                                            # the whole budget, now free
    gate.leave(b)
    c = gate.enter(body_bytes=200)                                 # the most rows, with a body beside
    gate.add_rows(c, 5)                                            # them, fit an idle server
    assert gate.bytes == 500
    gate.leave(c)
    assert (gate.bytes, gate.requests) == (0, 0)
    assert refused == ["concurrency", "memory", "too_large"]
