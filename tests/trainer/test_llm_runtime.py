"""The OpenAI-compatible runtime (``serve --task text-generation``) as a real subprocess, on a
tiny random Llama: every endpoint, streaming, stop strings, seeds, each bad input (and the
server serving on after it), the bounded queue, a client that abandons its stream, the
metrics and a clean SIGTERM."""
from __future__ import annotations

import signal
import socket
import threading

import pytest
import torch

from lepton_trainer import contract
from lepton_trainer.llm import loader
from _llm import Runtime, events, tiny_llama
from _server import wait_until

pytestmark = pytest.mark.trainer

LONG = 4000          # output tokens that keep a request generating for seconds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def rt(tiny, tmp_path_factory):
    srv = Runtime(tiny, tmp_path_factory.mktemp("rt") / "server.log", "--max-prompt-tokens", "64",
                  "--max-output-tokens", str(LONG), "--max-sequences", "2").wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def chat(content: str, **kw) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}


def test_models_health_and_metrics_names(rt):
    assert rt.get("/v1/models").json()["data"][0]["id"] == "tiny"
    for path in (contract.HEALTH_LIVE_PATH, contract.HEALTH_READY_PATH, "/health"):
        assert rt.get(path).status_code == 200
    m = rt.metrics()
    for name in (contract.LLM_METRIC_RUNNING, contract.LLM_METRIC_WAITING, contract.LLM_METRIC_KV_CACHE):
        assert name in m


def test_greedy_chat_equals_generate_and_counts_usage(rt, tiny):
    r = rt.post("/v1/chat/completions", chat("the quick fox", max_tokens=24, temperature=0))
    assert r.status_code == 200, r.text
    doc = r.json()
    model, tok = loader.load(tiny)
    ids = tok.apply_chat_template([{"role": "user", "content": "the quick fox"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    assert doc["object"] == "chat.completion" and doc["model"] == "tiny"
    assert doc["choices"][0]["message"] == {"role": "assistant",
                                            "content": tok.decode(out, skip_special_tokens=True)}
    assert doc["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(out),
                            "total_tokens": len(ids) + len(out)}
    assert doc["choices"][0]["finish_reason"] == ("stop" if out[-1] == tok.eos_token_id else "length")


def test_completion_stream_equals_the_whole_answer(rt):
    body = {"model": "tiny", "prompt": "servers stream", "max_tokens": 30, "temperature": 0}
    whole = rt.post("/v1/completions", body).json()
    r = rt.post("/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}, stream=True)
    assert r.headers["Content-Type"].startswith("text/event-stream")
    ev = events(r)
    assert ev[-1] == "[DONE]"
    chunks, usage = ev[:-2], ev[-2]
    assert len(chunks) > 2 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


def test_chat_stream_starts_with_the_role_and_has_no_usage_unless_asked(rt):
    ev = events(rt.post("/v1/chat/completions", chat("a dog", max_tokens=8, stream=True), stream=True))
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert ev[-1] == "[DONE]" and all("usage" not in e for e in ev[:-1])
    assert ev[-2]["choices"][0]["finish_reason"] is not None and ev[-2]["choices"][0]["delta"] == {}


def test_a_stop_string_ends_the_answer_before_it(rt):
    body = {"model": "tiny", "prompt": "the lazy dog", "max_tokens": 40, "temperature": 0}
    text = rt.post("/v1/completions", body).json()["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip()
    for stream in (False, True):
        r = rt.post("/v1/completions", {**body, "stop": [stop], "stream": stream}, stream=stream)
        if stream:
            chunks = events(r)[:-1]
            got, reason = "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]
        else:
            got, reason = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
        assert got == text[:text.index(stop)] and reason == "stop"


def test_a_seed_makes_sampling_reproducible(rt):
    body = chat("jumps over", max_tokens=20, temperature=1.0, top_p=0.9)
    a, b, c = (rt.post("/v1/chat/completions", {**body, "seed": s}).json()["choices"][0]["message"]["content"]
               for s in (7, 7, 8))
    assert a == b and a != c


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", chat("hi", model="gpt-4"), 404, "model"),
    ("/v1/chat/completions", chat("word " * 100), 400, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": LONG + 1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "no role"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", chat("hi", temperature=3), 400, "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", "{not json", 400, None),
])
def test_bad_input_gets_an_openai_error_and_the_server_serves_on(rt, path, body, status, param):
    before = rt.metrics().get(f"lepton_serve_requests_total[{status}]", 0)
    r = rt.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert rt.metrics()[f"lepton_serve_requests_total[{status}]"] == before + 1
    ok = rt.post("/v1/chat/completions", chat("still there?", max_tokens=2))
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


@pytest.fixture
def small(tiny, tmp_path):
    """One generation slot, one waiting place, 3 s in the queue at most; started through
    ``LEPTON_TASK`` rather than ``--task``."""
    srv = Runtime(tiny, tmp_path / "server.log", "--max-output-tokens", str(LONG), "--max-sequences", "1",
                  "--max-queued-requests", "1", "--queue-timeout-ms", "3000", via_env=True).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def _abandoned_stream(srv: Runtime) -> socket.socket:
    """A long greedy stream whose first event has arrived; the caller closes the socket."""
    body = ('{"model": "tiny", "prompt": "the quick", "max_tokens": %d, "temperature": 0, "stream": true}' % LONG)
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n{body}").encode())
    received = b""
    while b"data: " not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return sock


def test_a_full_queue_gets_429_and_an_abandoned_stream_frees_its_slot(small):
    sock = _abandoned_stream(small)
    m = small.metrics()
    assert m[contract.LLM_METRIC_RUNNING] == 1 and m[contract.LLM_METRIC_WAITING] == 0
    assert 0 < m[contract.LLM_METRIC_KV_CACHE] < 1            # the engine's own count of its blocks
    waiter: dict = {}
    t = threading.Thread(target=lambda: waiter.update(r=small.post("/v1/completions", {
        "model": "tiny", "prompt": "a", "max_tokens": 2})))
    t.start()
    wait_until(lambda: small.metrics()[contract.LLM_METRIC_WAITING] == 1, what="one request waiting")
    full = small.post("/v1/completions", {"model": "tiny", "prompt": "b", "max_tokens": 2})
    assert full.status_code == 429 and full.headers["Retry-After"] == "1"
    assert full.json()["error"]["code"] == "queue_full"
    t.join()
    assert waiter["r"].status_code == 429 and waiter["r"].json()["error"]["code"] == "queue_timeout"

    sock.close()                 # the client goes away mid-stream
    wait_until(lambda: small.metrics()[contract.LLM_METRIC_RUNNING] == 0, what="the slot to be freed")
    wait_until(lambda: small.metrics()[contract.LLM_METRIC_KV_CACHE] == 0.0, what="its cache blocks freed")
    m = small.metrics()
    assert m["lepton_serve_requests_total[499]"] == 1
    assert m["vllm:generation_tokens_total"] < LONG         # cancelled, not run to its end
    ok = small.post("/v1/completions", {"model": "tiny", "prompt": "c", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_sigterm_lets_the_running_request_finish_then_exits_0(small):
    done: dict = {}
    t = threading.Thread(target=lambda: done.update(r=small.post("/v1/completions", {
        "model": "tiny", "prompt": "the quick", "max_tokens": 600, "temperature": 0})))
    t.start()
    wait_until(lambda: small.metrics()[contract.LLM_METRIC_RUNNING] == 1, what="the request running")
    small.proc.send_signal(signal.SIGTERM)
    t.join()
    assert done["r"].status_code == 200 and done["r"].json()["usage"]["completion_tokens"] > 0
    assert small.proc.wait(timeout=120) == 0, small.log()
