"""The server's v2 REST protocol against the real tritonclient and against hostile raw HTTP.

One real ``python -m lepton_trainer.serve`` subprocess on the digits MLP serves every
test here; each test ends by checking that the server still answers a good request.
"""
from __future__ import annotations

import json
import socket
import struct
import time

import numpy as np
import pytest
import requests
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from lepton_trainer import modelio
from _models import train_mlp
from _server import MODEL, _starter, wait_until

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_mlp(tmp_path_factory.mktemp("proto") / "model", hidden=256, steps=200)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, model_dir):
    start, servers = _starter(tmp_path_factory.mktemp("proto-srv"))
    server = start(model_dir, "--max-body-bytes", str(16 * 1024 * 1024), "--idle-timeout", "1",
                   "--body-timeout", "5", "--max-request-rows", "1000")
    yield server
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="module")
def client(srv):
    c = httpclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
    yield c
    c.close()


def strict_json(text: str | bytes):
    """json.loads that refuses NaN/Infinity, as strict clients (KServe's) do."""
    def bad(name):
        raise ValueError(f"invalid JSON constant {name}")
    return json.loads(text, parse_constant=bad)


def direct(model_dir, x: np.ndarray) -> np.ndarray:
    model, _ = modelio.load_model(model_dir)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def still_serves(srv) -> None:
    x = [0.5] * 64
    r = srv.infer({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x}]})
    assert r.status_code == 200, r.text


def test_tritonclient_binary_and_json_round_trips(client, srv, model_dir):
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    want = direct(model_dir, x)
    inp = httpclient.InferInput("input", [5, 64], "FP32")
    inp.set_data_from_numpy(x)                               # binary tensors, the default
    res = client.infer(MODEL, [inp])                          # binary outputs, the default
    assert np.allclose(res.as_numpy("logits"), want, atol=1e-5)
    assert res.as_numpy("predicted_class").tolist() == want.argmax(1).tolist()
    assert res.as_numpy("predicted_class").dtype == np.int64
    assert np.allclose(res.as_numpy("probabilities").sum(1), 1.0, atol=1e-5)

    inp = httpclient.InferInput("input", [5, 64], "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    out = [httpclient.InferRequestedOutput("logits", binary_data=False),
           httpclient.InferRequestedOutput("predicted_class", binary_data=True)]
    res2 = client.infer(MODEL, [inp], outputs=out, model_version="1", request_id="abc")
    assert np.array_equal(res2.as_numpy("logits"), res.as_numpy("logits"))
    assert res2.as_numpy("probabilities") is None
    assert res2.get_response()["id"] == "abc"


def test_tritonclient_model_management_calls(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1") and not client.is_model_ready(MODEL, "2")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(MODEL, "1")
    assert meta["versions"] == ["1"] and meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 64]}
    cfg = client.get_model_config(MODEL)
    assert cfg["max_batch_size"] > 0 and cfg["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
    assert [o["name"] for o in cfg["output"]] == ["logits", "probabilities", "predicted_class"]
    stats = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert stats["name"] == MODEL and stats["inference_stats"]["success"]["count"] >= 0
    before = stats["inference_count"]
    inp = httpclient.InferInput("input", [3, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((3, 64), np.float32))
    client.infer(MODEL, [inp])
    assert client.get_inference_statistics(MODEL)["model_stats"][0]["inference_count"] == before + 3
    assert client.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
    with pytest.raises(InferenceServerException, match="not supported"):
        client.load_model(MODEL)
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_config("other")
    with pytest.raises(InferenceServerException, match="unknown version"):
        client.get_model_metadata(MODEL, "7")


def test_non_finite_outputs_never_reach_json(srv, client):
    # a finite FP32 input that overflows inside the model
    big = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [3e38] * 64}]}
    r = srv.infer(big)
    strict_json(r.text)                                           # every answer is valid JSON
    assert r.status_code == 400 and "binary_data" in r.json()["error"], r.text
    # the binary tensor extension carries them exactly
    inp = httpclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(np.full((1, 64), 3e38, np.float32))
    logits = client.infer(MODEL, [inp]).as_numpy("logits")
    assert not np.isfinite(logits).all()
    still_serves(srv)


@pytest.mark.parametrize("req_id", [float("nan"), 7, {"a": 1}, ["x"], True])
def test_request_id_must_be_a_string(srv, req_id):
    payload = json.dumps({"id": req_id, "inputs": [
        {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]})
    r = srv.infer(payload)
    strict_json(r.text)
    # NaN is not even JSON: it is refused before the id is looked at
    reason = "not valid JSON" if req_id != req_id else "'id' must be a string"
    assert r.status_code == 400 and reason in r.json()["error"]
    still_serves(srv)


def test_deeply_nested_json_is_a_400(srv):
    before = srv.metrics().get("lepton_serve_requests_total[500]", 0)
    r = srv.infer(b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400 and "nests deeper" in r.json()["error"]
    r = srv.infer('{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": '
                  + "[" * 5000 + "0.5" + "]" * 5000 + "}]}")
    assert r.status_code == 400
    assert srv.metrics().get("lepton_serve_requests_total[500]", 0) == before
    still_serves(srv)


def _binary_request(header: dict, blobs: list[bytes]) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize("size,blob,message", [
    (64 * 4, b"\0" * (63 * 4), "byte-size mismatch"),          # fewer bytes than declared
    (63 * 4, b"\0" * (63 * 4), "needs 256"),                   # declared size != shape
    (64 * 4, b"\0" * (65 * 4), "byte-size mismatch"),          # bytes left over
])
def test_malformed_binary_tensors_get_400(srv, size, blob, message):
    body, headers = _binary_request({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                                 "parameters": {"binary_data_size": size}}]}, [blob])
    r = srv.infer(body, headers=headers)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    still_serves(srv)


def test_binary_request_with_bad_header_length(srv):
    r = srv.infer(b"{}", headers={"Inference-Header-Content-Length": "999"})
    assert r.status_code == 400 and "outside the body" in r.json()["error"]
    r = srv.infer(b"{}", headers={"Inference-Header-Content-Length": "x"})
    assert r.status_code == 400 and "must be an integer" in r.json()["error"]


def test_content_type_is_checked(srv):
    ok = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]})
    r = srv.infer(ok, headers={"Content-Type": "text/html"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    assert srv.infer(ok, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200


def _raw(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(data)
    return s


def test_client_gone_mid_upload_is_not_a_server_error(srv):
    before = srv.metrics()
    s = _raw(srv.port, (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
                        f"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n").encode()
             + b'{"inputs": [')
    time.sleep(0.3)
    s.close()
    wait_until(lambda: srv.metrics().get("lepton_serve_requests_total[499]", 0)
               == before.get("lepton_serve_requests_total[499]", 0) + 1, what="the 499 count")
    after = srv.metrics()
    assert after.get("lepton_serve_requests_total[500]", 0) == before.get("lepton_serve_requests_total[500]", 0)
    assert after["lepton_serve_inflight_requests"] == 0
    assert "went away" in srv.log() and "Traceback" not in srv.log()
    still_serves(srv)


def test_slow_and_idle_connections_are_closed(srv):
    """Connections that never complete a request header are closed by the server after
    --idle-timeout (1 s here); the wait below is a deadline, not a measurement."""
    conns = [_raw(srv.port, b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n") for _ in range(20)]
    conns += [_raw(srv.port, b"") for _ in range(5)]                 # connect and say nothing

    def closed(s: socket.socket) -> bool:
        s.settimeout(30)
        try:
            return s.recv(1024) == b""
        except (ConnectionResetError, socket.timeout):
            return False
    assert all(closed(s) for s in conns)
    for s in conns:
        s.close()
    still_serves(srv)


def test_slow_body_gets_408(srv):
    s = _raw(srv.port, (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
                        f"Content-Length: 1000\r\n\r\n").encode() + b'{"inputs"')
    s.settimeout(30)
    reply = s.recv(4096)
    s.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply
    still_serves(srv)


def test_large_json_body_is_served(srv, model_dir):
    """A 1000-row JSON body (over 1 MB) is parsed off the event loop and answered."""
    x = np.random.default_rng(1).random((1000, 64), dtype=np.float32)
    r = srv.infer({"inputs": [{"name": "input", "shape": [1000, 64], "datatype": "FP32",
                               "data": x.reshape(-1).tolist()}], "outputs": [{"name": "predicted_class"}]})
    assert r.status_code == 200
    assert r.json()["outputs"][0]["data"] == direct(model_dir, x).argmax(1).tolist()
    assert requests.get(srv.url + "/v2/health/live", timeout=5).status_code == 200


def test_bytes_element_encoding_round_trips():
    from lepton_trainer import v2
    arr = np.array([b"", b"a", "ü".encode(), b"\0" * 5], dtype=object)
    raw = v2.to_raw(arr, "BYTES")
    assert raw[:4] == struct.pack("<I", 0)
    assert v2.from_raw(raw, "BYTES", [4], "t").tolist() == arr.tolist()
    with pytest.raises(v2.ProtocolError, match="left over"):
        v2.from_raw(raw + b"x", "BYTES", [4], "t")
    with pytest.raises(v2.ProtocolError, match="runs past"):
        v2.from_raw(raw[:-1], "BYTES", [4], "t")
