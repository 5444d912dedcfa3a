"""The Prometheus client: answers become numbers; outages, errors and empty results are no data.

A local aiohttp server plays the Prometheus HTTP API so each failure mode can be
produced on demand; tests/integration run the same client against a real Prometheus.
"""

import asyncio
import socket

import pytest
from aiohttp import web

from lepton_operator.scaling.prometheus import Prometheus, parse_response

pytestmark = pytest.mark.unit


def vector(*values):
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"i": str(i)}, "value": [1700000000.0, v]} for i, v in enumerate(values)]}}


@pytest.mark.parametrize("payload,value,error", [
    (vector("3.5"), 3.5, None),
    ({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "7"]}}, 7.0, None),
    (vector(), None, "empty result"),
    (vector("1", "2"), None, "2 series returned; aggregate"),
    (vector("NaN"), None, "value is NaN"),
    (vector("+Inf"), None, "value is +Inf"),
    ({"status": "error", "errorType": "bad_data", "error": "parse error"}, None, "bad_data: parse error"),
    ({"status": "success", "data": {"resultType": "matrix", "result": []}}, None, "unsupported result type"),
])
def test_parse_response(payload, value, error):
    r = parse_response("q", payload)
    assert r.value == value
    assert (r.error is None) if error is None else (error in r.error)


@pytest.fixture
async def fake_prom():
    """A local server; ``state['mode']`` picks how it answers."""
    state = {"mode": "ok", "queries": []}

    async def query(request):
        form = await request.post()
        state["queries"].append(form["query"])
        if state["mode"] == "slow":
            await asyncio.sleep(2)
        if state["mode"] == "500":
            return web.Response(status=500, text="boom")
        if state["mode"] == "html":
            return web.Response(status=200, text="<html>")
        if state["mode"] == "bad":
            return web.json_response({"status": "error", "errorType": "bad_data", "error": "syntax"},
                                     status=400)
        return web.json_response(vector("42"))

    app = web.Application()
    app.router.add_post("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/", state
    await runner.cleanup()


async def test_query_value_and_failure_modes(fake_prom):
    url, state = fake_prom
    prom = Prometheus(url, timeout=0.5)
    try:
        r = await prom.query('sum(rate(x{model="m"}[1m]))')
        assert r.ok and r.value == 42.0
        assert state["queries"] == ['sum(rate(x{model="m"}[1m]))']
        for mode, msg in [("slow", "did not answer within 0.5s"), ("500", "HTTP 500"),
                          ("html", "without JSON"), ("bad", "bad_data: syntax")]:
            state["mode"] = mode
            r = await prom.query("up")
            assert r.value is None and msg in r.error, (mode, r)
        state["mode"] = "ok"
        assert await prom.value("up") == 42.0   # the session recovers after failures
    finally:
        await prom.close()


async def test_unreachable_is_no_data():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed again when the block ends: nothing listens
    prom = Prometheus(f"http://127.0.0.1:{port}", timeout=1)
    try:
        r = await prom.query("up")
        assert r.value is None and "unreachable" in r.error
    finally:
        await prom.close()
