"""The v2 gRPC API of the server, driven by tritonclient's real gRPC client.

tritonclient ships its own generated ``service_pb2`` modules; the server compiles the
vendored Triton .proto files. The two meeting on the wire is what this test shows.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio
from tritonclient.utils import InferenceServerException

from lepton_trainer import modelio
from _models import train_mlp
from _server import MODEL, _starter

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return train_mlp(tmp_path_factory.mktemp("grpc") / "model", hidden=256, steps=200)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, model_dir):
    start, _ = _starter(tmp_path_factory.mktemp("grpc-srv"))
    # a long batch window, so that concurrent REST and gRPC requests share forward passes
    server = start(model_dir, "--max-batch-size", "16", "--max-batch-delay-ms", "300",
                   "--max-request-rows", "16")
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def client(srv):
    c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    yield c
    c.close()


def test_round_trip_matches_the_model_and_rest(client, srv, model_dir):
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    inp = grpcclient.InferInput("input", [4, 64], "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(MODEL, [inp], request_id="r1")
    model, _ = modelio.load_model(model_dir)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.allclose(res.as_numpy("logits"), want, atol=1e-5)
    assert res.as_numpy("predicted_class").tolist() == want.argmax(1).tolist()
    assert res.get_response().id == "r1" and res.get_response().model_version == "1"

    h = httpclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
    hin = httpclient.InferInput("input", [4, 64], "FP32")
    hin.set_data_from_numpy(x)
    assert np.array_equal(h.infer(MODEL, [hin]).as_numpy("logits"), res.as_numpy("logits"))
    h.close()

    only = client.infer(MODEL, [inp], outputs=[grpcclient.InferRequestedOutput("predicted_class")])
    assert only.as_numpy("logits") is None and only.as_numpy("predicted_class").shape == (4,)


def test_metadata_config_statistics_and_index(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready("other")
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities", "predicted_class"]
    cfg = client.get_model_config(MODEL, as_json=True)["config"]
    assert cfg["max_batch_size"] == 16 and cfg["input"][0]["data_type"] == "TYPE_FP32"
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == "300000"
    stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert stats["name"] == MODEL and stats["version"] == "1"
    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": MODEL, "version": "1", "state": "READY"}]
    assert "binary_tensor_data" in client.get_server_metadata(as_json=True)["extensions"]


@pytest.mark.parametrize("name,shape,dtype,message", [
    ("input", [1, 63], "FP32", "does not match [N, 64]"),
    ("input", [1, 64], "FP64", "this model takes FP32"),
    ("pixels", [1, 64], "FP32", "unknown input 'pixels'"),
])
def test_bad_tensors_get_invalid_argument(client, srv, name, shape, dtype, message):
    before = srv.metrics().get("lepton_serve_requests_total[400]", 0)
    inp = grpcclient.InferInput(name, shape, dtype)
    inp.set_data_from_numpy(np.zeros(shape, dtype=np.float64 if dtype == "FP64" else np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, [inp])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and message in e.value.message()
    assert srv.metrics()["lepton_serve_requests_total[400]"] == before + 1
    ok = grpcclient.InferInput("input", [1, 64], "FP32")
    ok.set_data_from_numpy(np.zeros((1, 64), np.float32))
    assert client.infer(MODEL, [ok]).as_numpy("logits").shape == (1, 10)


def test_too_many_rows_is_resource_exhausted_naming_the_limit(client, srv):
    before = srv.metrics()
    inp = grpcclient.InferInput("input", [17, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((17, 64), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer(MODEL, [inp])
    assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "request too large: 17 rows, the limit is 16 rows per request" in e.value.message()
    assert "memory limit" in e.value.message() and "bytes per row" in e.value.message()
    after = srv.metrics()
    assert after["lepton_serve_requests_total[413]"] == before.get("lepton_serve_requests_total[413]", 0) + 1
    assert after["lepton_serve_refused_requests_total[too_large]"] == \
        before["lepton_serve_refused_requests_total[too_large]"] + 1


def test_raw_bytes_that_do_not_match_the_shape(client):
    inp = grpcclient.InferInput("input", [2, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((2, 64), np.float32))
    inp._raw_content = inp._raw_content[:-4]            # one element short on the wire
    with pytest.raises(InferenceServerException, match="byte-size mismatch"):
        client.infer(MODEL, [inp])


def test_unknown_model_is_not_found(client):
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(InferenceServerException) as e:
        client.infer("other", [inp])
    assert e.value.status() == "StatusCode.NOT_FOUND"


async def test_rest_and_grpc_requests_share_the_batcher(srv, model_dir):
    before = srv.metrics()
    x = np.random.default_rng(2).random((8, 64), dtype=np.float32)
    g = grpcaio.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
    h = httpaio.InferenceServerClient(f"127.0.0.1:{srv.port}")

    async def via_grpc(i):
        inp = grpcaio.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x[i:i + 1])
        return (await g.infer(MODEL, [inp])).as_numpy("predicted_class")[0]

    async def via_rest(i):
        inp = httpaio.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x[i:i + 1])
        return (await h.infer(MODEL, [inp])).as_numpy("predicted_class")[0]

    got = await asyncio.gather(*(via_grpc(i) for i in range(4)), *(via_rest(i) for i in range(4, 8)))
    await g.close()
    await h.close()
    model, _ = modelio.load_model(model_dir)
    with torch.no_grad():
        assert got == model(torch.from_numpy(x)).argmax(1).tolist()
    after = srv.metrics()
    passes = after["lepton_serve_batch_size_count"] - before["lepton_serve_batch_size_count"]
    assert after["lepton_serve_batch_size_sum"] - before["lepton_serve_batch_size_sum"] == 8
    assert passes < 8, "no forward pass held more than one request"
    assert after["lepton_serve_requests_total[200]"] - before.get("lepton_serve_requests_total[200]", 0) == 8
