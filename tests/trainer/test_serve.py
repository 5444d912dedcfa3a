"""``python -m lepton_trainer.serve`` as a real subprocess on a loopback port."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from types import SimpleNamespace

import aiohttp
import pytest
import torch

from lepton_trainer import contract, data, modelio, serve
from _models import train_mlp
from _server import MODEL, Server, _starter, wait_until  # noqa: F401

pytestmark = pytest.mark.trainer


def body(x: torch.Tensor, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}], **extra}


def outputs(resp) -> dict:
    return {o["name"]: o for o in resp["outputs"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_mlp(tmp_path_factory.mktemp("serve") / "model", hidden=256, steps=200)


@pytest.fixture
def start(tmp_path):
    _start, servers = _starter(tmp_path)
    yield _start
    for srv in servers:
        if srv.proc.poll() is None:      # still running: it must shut down cleanly
            assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def shared(tmp_path_factory, model_dir):
    """One server for the request-validation tests (limits: 16 rows, 100000 bytes)."""
    _start, servers = _starter(tmp_path_factory.mktemp("shared"))
    yield _start(model_dir, "--max-request-rows", "16", "--max-body-bytes", "100000")
    assert servers[0].stop() == 0, servers[0].log()


def test_ready_only_after_load_and_warm_up(start, tmp_path):
    model_dir = tmp_path / "later"
    srv = start(model_dir, ready=False)          # the model directory does not exist yet
    assert srv.get(contract.HEALTH_LIVE_PATH).status_code == 200
    assert srv.get(contract.HEALTH_READY_PATH).status_code == 503
    assert srv.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": False}
    x = data.load_digits().x_test[:3]
    r = srv.infer(body(x))
    assert r.status_code == 503 and "not ready" in r.json()["error"]

    train_mlp(model_dir, steps=200)
    wait_until(lambda: srv.get(contract.HEALTH_READY_PATH).status_code == 200, what="ready")
    assert srv.get(f"/v2/models/{MODEL}/ready").status_code == 200
    m = srv.metrics()
    # the warm-up went through the real batching path before readiness, and is not a client request
    assert m["lepton_serve_batch_size_count"] == 1 and m["lepton_serve_batch_size_sum"] == 1
    assert m["lepton_serve_row_bytes"] > 0 and m["lepton_serve_max_request_rows"] == 32
    assert m["lepton_serve_requests_total[503]"] == 1 and "lepton_serve_requests_total[200]" not in m

    r = srv.infer(body(x, id="req-1"))
    assert r.status_code == 200, r.text
    model, _ = modelio.load_model(model_dir)
    expected = model(x)
    got = outputs(r.json())
    assert r.json()["id"] == "req-1" and got["logits"]["shape"] == [3, 10]
    assert torch.allclose(torch.tensor(got["logits"]["data"]).reshape(3, 10), expected, atol=1e-4)
    assert got["predicted_class"]["data"] == expected.argmax(1).tolist()
    assert got["predicted_class"]["datatype"] == "INT64"


def test_a_model_that_cannot_load_stops_the_server_never_ready(start, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / contract.MODEL_META_FILE).write_text(json.dumps({"arch": "resnet9000", "config": {}}))
    srv = start(bad, ready=False)
    assert srv.proc.wait(timeout=60) == 1
    assert "unknown architecture" in srv.log()


def test_metadata(shared):
    srv = shared
    meta = srv.get(f"/v2/models/{MODEL}").json()
    assert meta["name"] == MODEL and meta["platform"] == "pytorch"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "logits": ("FP32", [-1, 10]), "probabilities": ("FP32", [-1, 10]), "predicted_class": ("INT64", [-1])}
    assert srv.get("/v2/models/other").status_code == 404
    assert srv.get("/v2/models/other/ready").status_code == 404


async def test_concurrent_requests_are_batched(start, model_dir):
    srv = start(model_dir, "--max-batch-size", "8", "--max-batch-delay-ms", "200")
    x = data.load_digits().x_test[:32]
    model, _ = modelio.load_model(model_dir)
    expected = model(x).argmax(1).tolist()
    async with aiohttp.ClientSession() as session:
        async def one(i):
            async with session.post(f"{srv.url}/v2/models/{MODEL}/infer", json=body(x[i:i + 1])) as r:
                assert r.status == 200
                return outputs(await r.json())["predicted_class"]["data"][0]
        got = await asyncio.gather(*(one(i) for i in range(32)))
    assert got == expected                        # each caller gets its own row back
    m = srv.metrics()
    batches = m["lepton_serve_batch_size_count"] - 1          # minus the warm-up
    assert m["lepton_serve_batch_size_sum"] - 1 == 32
    assert batches < 32, "no forward pass held more than one request"
    assert m["lepton_serve_batch_size_bucket[8.0]"] == m["lepton_serve_batch_size_count"]  # <= max
    assert m["lepton_serve_requests_total[200]"] == 32
    assert m["lepton_serve_request_duration_seconds_count"] == 32
    assert m["lepton_serve_inflight_requests"] == 0


def _ok(n=1, **over):
    inp = {"name": "input", "shape": [n, 64], "datatype": "FP32", "data": [0.5] * (64 * n)}
    return {"inputs": [inp | over]}


@pytest.mark.parametrize("payload,message", [
    (b"{not json", "not valid JSON"),
    (b'"a string"', "JSON object with an 'inputs' list"),
    ({"inputs": []}, "missing inputs ['input']"),
    (_ok(name="pixels"), "unknown input 'pixels'"),
    (_ok(datatype="FP64"), "datatype 'FP64'"),
    (_ok(datatype="INT32"), "datatype 'INT32'"),
    (_ok(shape=[1, 63]), "does not match [N, 64]"),
    (_ok(shape=[64]), "does not match [N, 64]"),
    (_ok(shape=[2, 64]), "needs 128"),
    (_ok(data=["0.5"] * 64), "must be numbers"),
    (_ok(data=[[0.5] * 64, [0.5]]), "not a regular array"),
    (b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[NaN' + b',0.5' * 63 + b']}]}',
     "NaN or infinite"),
    (_ok() | {"outputs": [{"name": "embeddings"}]}, "unknown outputs ['embeddings']"),
])
def test_bad_input_gets_400_with_the_reason(shared, payload, message):
    srv = shared
    before = srv.metrics().get("lepton_serve_requests_total[400]", 0)
    r = srv.infer(payload)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert srv.infer(_ok()).status_code == 200      # the server is unharmed
    assert srv.metrics()["lepton_serve_requests_total[400]"] == before + 1


def test_too_large_body_and_unknown_model(shared):
    srv = shared
    before = srv.metrics()
    r = srv.infer(b"[" + b"0.5," * 60000 + b"0]")
    assert r.status_code == 413 and "exceeds 100000 bytes" in r.json()["error"]
    r = srv.infer(_ok(), name="nope")
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    r = srv.get(f"/v2/models/{MODEL}/infer")
    assert r.status_code == 405 and r.json()["error"] and r.headers["Allow"] == "POST"
    assert srv.infer(_ok(3)).status_code == 200
    r = srv.infer(_ok(n=17))
    assert r.status_code == 413 and "request too large: 17 rows, the limit is 16 rows" in r.json()["error"]
    assert "memory limit" in r.json()["error"]
    m = srv.metrics()
    assert m["lepton_serve_requests_total[413]"] == before.get("lepton_serve_requests_total[413]", 0) + 2
    assert m["lepton_serve_refused_requests_total[too_large]"] == \
        before["lepton_serve_refused_requests_total[too_large]"] + 1
    assert m["lepton_serve_requests_total[404]"] == before.get("lepton_serve_requests_total[404]", 0) + 1


def _refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return False
    except OSError:
        return True


async def test_sigterm_drains_in_flight_requests(start, model_dir):
    # a batch stays open for up to 60 s, so the request is surely in flight at SIGTERM
    srv = start(model_dir, "--max-batch-size", "64", "--max-batch-delay-ms", "60000")
    x = data.load_digits().x_test[:2]
    async with aiohttp.ClientSession() as session:
        pending = asyncio.create_task(session.post(f"{srv.url}/v2/models/{MODEL}/infer", json=body(x)))
        await asyncio.to_thread(wait_until, lambda: srv.metrics()["lepton_serve_inflight_requests"] == 1,
                                what="the request to be in flight")
        srv.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(wait_until, lambda: _refuses(srv.port), what="the listener to close")
        resp = await asyncio.wait_for(pending, 60)
        assert resp.status == 200
        assert outputs(await resp.json())["logits"]["shape"] == [2, 10]
    assert srv.proc.wait(timeout=60) == 0
    assert "shutting down" in srv.log() and "stopped" in srv.log()


async def _batched(max_rows: int, delay_s: float, sizes: list[int], forward=None):
    seen: list[int] = []
    batcher = serve.Batcher(forward or (lambda x: {"y": x * 2}), max_rows, delay_s, seen.append)
    batcher.start()
    try:
        outs = await asyncio.gather(*(batcher.submit(torch.full((n, 2), float(i)))
                                      for i, n in enumerate(sizes)), return_exceptions=True)
    finally:
        await batcher.close()
    return outs, seen


async def test_batcher_respects_the_size_limit_and_returns_each_callers_rows():
    outs, seen = await _batched(4, 0.2, [1, 1, 3, 1, 6, 2, 1])
    assert sum(seen) == 15
    assert all(s <= 4 for s in seen if s != 6) and 6 in seen    # an oversize request runs alone
    assert max(s for s in seen if s != 6) > 1
    for i, (n, out) in enumerate(zip([1, 1, 3, 1, 6, 2, 1], outs)):
        assert torch.equal(out["y"], torch.full((n, 2), 2.0 * i))


async def test_batch_size_one_never_batches():
    _, seen = await _batched(1, 0.2, [1] * 8)
    assert seen == [1] * 8


async def test_a_failing_forward_fails_its_callers_and_the_batcher_goes_on():
    calls = []

    def forward(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"y": x}

    seen: list[int] = []
    batcher = serve.Batcher(forward, 8, 0.0, seen.append)
    batcher.start()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(torch.zeros(1, 2))
        assert torch.equal((await batcher.submit(torch.ones(2, 2)))["y"], torch.ones(2, 2))
    finally:
        await batcher.close()


def test_serves_a_compressed_artifact(start, model_dir, tmp_path):
    from lepton_trainer import compress
    art = tmp_path / "int8"
    compress.compress(model_dir, art, "int8", 0.05, {}, latency_iters=5)
    srv = start(art)
    assert srv.get(f"/v2/models/{MODEL}").json()["quantization"].startswith("int8-dynamic:")
    x = data.load_digits().x_test[:16]
    r = srv.infer(body(x))
    assert r.status_code == 200, r.text
    model, _ = modelio.load_model(art)
    assert outputs(r.json())["predicted_class"]["data"] == model(x).argmax(1).tolist()


def test_the_access_log_leaves_out_probes_and_scrapes(caplog):
    """With --access-log, one line per client request; the kubelet's probes and the
    scrapes, every few seconds each, are not logged."""
    logger = logging.getLogger("test.access")
    access = serve.QuietAccessLogger(logger, '%r %s')
    response = SimpleNamespace(status=200, body_length=2, headers={})
    with caplog.at_level(logging.INFO, logger="test.access"):
        for path in (contract.HEALTH_READY_PATH, contract.HEALTH_LIVE_PATH, "/metrics", "/v2/models/m/infer"):
            request = SimpleNamespace(path=path, method="POST", version=SimpleNamespace(major=1, minor=1),
                                      path_qs=path, remote="10.0.0.1", headers={}, rel_url=path)
            access.log(request, response, 0.001)
    assert [r.getMessage() for r in caplog.records] == ["POST /v2/models/m/infer HTTP/1.1 200"]
