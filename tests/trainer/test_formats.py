"""Model formats behind one loader (modelio): detection, signatures, serving, and what
loading refuses to run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from torch import nn

from lepton_trainer import modelio
from _models import train_mlp
from _server import _starter

pytestmark = pytest.mark.trainer


class TwoInTwoOut(nn.Module):
    """FP32 features and INT64 ids in; a dict of two outputs of different types out."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.emb = nn.Embedding(10, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.lin(x) + self.emb(ids).sum(1)
        return {"score": h, "best": h.argmax(1)}


SIGNATURE = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                        {"name": "ids", "datatype": "INT64", "shape": [-1, 2]}],
             "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1, 3]},
                         {"name": "best", "datatype": "INT64", "shape": [-1]}]}


def _example(n=3, seed=0):
    g = np.random.default_rng(seed)
    return {"x": g.random((n, 4), dtype=np.float32), "ids": g.integers(0, 10, (n, 2))}


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return TwoInTwoOut().eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, module):
    d = tmp_path_factory.mktemp("export")
    batch = torch.export.Dim("batch", min=1, max=1024)
    ex = _example()
    ep = torch.export.export(module, (torch.from_numpy(ex["x"]), torch.from_numpy(ex["ids"])),
                             dynamic_shapes={"x": {0: batch}, "ids": {0: batch}})
    torch.export.save(ep, str(d / "model.pt2"))
    return d


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, module):
    d = tmp_path_factory.mktemp("script")
    torch.jit.save(torch.jit.script(module), str(d / "model.pt"))
    (d / "signature.json").write_text(json.dumps(SIGNATURE))
    return d


@pytest.fixture(scope="module")
def hf_classifier(tmp_path_factory):
    """A tiny BERT sequence classifier saved by transformers (safetensors, no tokenizer)."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=3, max_position_embeddings=32)
    d = tmp_path_factory.mktemp("hf")
    BertForSequenceClassification(cfg).eval().save_pretrained(d, safe_serialization=True)
    return d


def _want(module, ex):
    with torch.no_grad():
        out = module(torch.from_numpy(ex["x"]), torch.from_numpy(ex["ids"]))
    return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize("fixture,fmt", [("exported", "torch.export"), ("scripted", "torchscript")])
def test_graph_formats_load_with_their_signature(request, module, fixture, fmt):
    path = request.getfixturevalue(fixture)
    assert modelio.detect_format(path) == fmt
    m = modelio.load(path)
    assert m.format == fmt
    assert [s.to_json() for s in m.inputs] == SIGNATURE["inputs"]
    assert [s.to_json() for s in m.outputs] == SIGNATURE["outputs"]
    ex = _example(5, seed=3)
    got, want = m.run(ex), _want(module, ex)
    assert np.allclose(got["score"], want["score"], atol=1e-6) and np.array_equal(got["best"], want["best"])


def test_huggingface_without_tokenizer_takes_token_ids(hf_classifier):
    from transformers import AutoModelForSequenceClassification
    assert modelio.detect_format(hf_classifier) == "huggingface"
    m = modelio.load(hf_classifier)
    assert [(s.name, s.datatype) for s in m.inputs] == [("input_ids", "INT64"), ("attention_mask", "INT64")]
    assert [s.to_json() for s in m.outputs] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    ids = np.array([[1, 5, 7, 2], [1, 9, 2, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]])
    ref = AutoModelForSequenceClassification.from_pretrained(hf_classifier).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    assert np.array_equal(m.run({"input_ids": ids, "attention_mask": mask})["logits"], want)


def test_builtin_directory_keeps_its_classifier_outputs(tmp_path):
    d = train_mlp(tmp_path / "m", hidden=32, steps=300)
    m = modelio.load(d)
    assert m.format == "builtin" and [o.name for o in m.outputs] == ["logits", "probabilities", "predicted_class"]


def test_what_cannot_be_loaded_says_why(tmp_path, scripted):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(modelio.FormatError, match="cannot tell the format"):
        modelio.detect_format(empty)
    pickled = tmp_path / "bin"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(modelio.FormatError, match="only safetensors"):
        modelio.detect_format(pickled)
    nosig = tmp_path / "nosig"
    nosig.mkdir()
    (nosig / "model.pt").write_bytes((scripted / "model.pt").read_bytes())
    with pytest.raises(modelio.FormatError, match="needs signature.json"):
        modelio.load(nosig)
    with pytest.raises(modelio.FormatError, match="unknown model format"):
        modelio.load(scripted, "tflite")


def test_remote_code_in_a_hugging_face_directory_never_runs(tmp_path, hf_classifier):
    """A directory whose config points at its own Python module: loading refuses it and
    the module is never imported (trust_remote_code=False, local files only)."""
    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "ran"
    cfg = json.loads((hf_classifier / "config.json").read_text())
    cfg.update(model_type="evil-bert", auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                                                 "AutoModel": "modeling_evil.EvilModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes((hf_classifier / "model.safetensors").read_bytes())
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(Exception):
        modelio.load(d)
    assert not marker.exists()


def test_a_multi_input_export_is_served_over_http(tmp_path, exported, module):
    start, servers = _starter(tmp_path)
    srv = start(exported, name="two")
    try:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
        meta = c.get_model_metadata("two")
        assert meta["platform"] == "pytorch" and meta["inputs"] == SIGNATURE["inputs"]
        ex = _example(4, seed=5)
        inputs = []
        for name, dt in (("x", "FP32"), ("ids", "INT64")):
            i = httpclient.InferInput(name, list(ex[name].shape), dt)
            i.set_data_from_numpy(ex[name].astype(np.float32 if dt == "FP32" else np.int64))
            inputs.append(i)
        res = c.infer("two", inputs)
        want = _want(module, ex)
        assert np.allclose(res.as_numpy("score"), want["score"], atol=1e-6)
        assert res.as_numpy("best").tolist() == want["best"].tolist()
        # the two inputs must agree on the batch size
        bad = [httpclient.InferInput("x", [2, 4], "FP32"), httpclient.InferInput("ids", [3, 2], "INT64")]
        bad[0].set_data_from_numpy(ex["x"][:2])
        bad[1].set_data_from_numpy(ex["ids"][:3].astype(np.int64))
        with pytest.raises(Exception, match="disagree on the batch size"):
            c.infer("two", bad)
        # INT64 data as JSON must be integers
        r = srv.infer({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.1] * 4},
                                  {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [0.5, 1]}]})
        assert r.status_code == 400 and "must be integers" in r.json()["error"]
        c.close()
    finally:
        assert srv.stop() == 0, srv.log()


def _onnx_model(path, batch="N"):
    """y = x @ W + b and its argmax, built with onnx.helper (no exporter involved)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    g = np.random.default_rng(0)
    w, b = g.standard_normal((4, 3)).astype(np.float32), g.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"]),
         helper.make_node("ArgMax", ["y"], ["best"], axis=1, keepdims=0)],
        "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3]),
         helper.make_tensor_value_info("best", TensorProto.INT64, [batch])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return w, b


def test_onnx_is_served_with_its_graph_signature(tmp_path):
    import tritonclient.grpc as grpcclient
    d = tmp_path / "onnx"
    d.mkdir()
    w, b = _onnx_model(d / "model.onnx")
    assert modelio.detect_format(d) == "onnx"
    m = modelio.load(d)
    assert [s.to_json() for s in m.inputs] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert [s.to_json() for s in m.outputs] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]},
                                                {"name": "best", "datatype": "INT64", "shape": [-1]}]
    x = np.random.default_rng(1).random((5, 4), dtype=np.float32)
    start, _ = _starter(tmp_path)
    srv = start(d, name="affine")
    try:
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc_port}")
        i = grpcclient.InferInput("x", [5, 4], "FP32")
        i.set_data_from_numpy(x)
        res = c.infer("affine", [i])
        assert np.allclose(res.as_numpy("y"), x @ w + b, atol=1e-5)
        assert res.as_numpy("best").tolist() == (x @ w + b).argmax(1).tolist()
        assert c.get_model_metadata("affine", as_json=True)["platform"] == "onnxruntime_onnx"
        c.close()
    finally:
        assert srv.stop() == 0, srv.log()
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    _onnx_model(fixed / "model.onnx", batch=1)
    with pytest.raises(modelio.FormatError, match="first dimension must be dynamic"):
        modelio.load(fixed)
