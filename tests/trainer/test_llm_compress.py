"""Compression of language models behind the perplexity gate, on a tiny Llama trained here for a
few seconds on the gate's default sample text (so that its perplexity means something and a
broken model shows it): every method, the gate's verdicts, auto's table, the loader, and the
``compress --task text-generation`` command's result and exit status."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lepton_trainer import compress, contract
from lepton_trainer.llm import compress as llm_compress
from lepton_trainer.llm import gate as llm_gate
from lepton_trainer.llm import loader
from _llm import tokenizer

pytestmark = pytest.mark.trainer

BUDGET_S = 0.2
FEW = {"samples": 4, "maxNewTokens": 8}   # a quicker gate where the test is not about it


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: decoding a tiny model is dominated by per-operator overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(model, ids: torch.Tensor, steps: int = 80, length: int = 128) -> None:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.shape[1] - length, (8,))
        batch = torch.stack([ids[0, s:s + length] for s in starts])
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A Hugging Face directory: a 2-layer Llama with a chat template, trained briefly."""
    from transformers import LlamaConfig, LlamaForCausalLM
    text = llm_gate.sample_text(llm_gate.Gate())
    tok = tokenizer(text, vocab_size=512)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    _train(model, tok(text, return_tensors="pt")["input_ids"])
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _greedy(path: Path, prompts: list[str], max_new_tokens: int = 16) -> list[list[int]]:
    model, tok = loader.load(path)
    return llm_gate.greedy(model, [llm_gate.encode_prompt(tok, p) for p in prompts], max_new_tokens)


@pytest.mark.parametrize("method,dtype,quantization", [
    ("int8-weight", "float32", "Int8WeightOnlyConfig"),
    ("bf16", "bfloat16", None),
    ("fp16", "float16", None),
    ("none", "float32", None),
])
def test_each_method_writes_the_gated_artifact(tiny, tmp_path, method, dtype, quantization):
    out = tmp_path / "artifact"
    result = llm_compress.compress(tiny, out, method, latency_budget_s=BUDGET_S)
    assert result["passed"] is True and result["method"] == method
    assert result["gate"]["type"] == contract.EVALUATION_PERPLEXITY and result["gate"]["passed"] is True
    assert result["gate"]["increase"] <= 0.10 and result["gate"]["agreement"] >= 0.80
    assert result["gate"]["before"]["perplexity"] < 50          # the tiny model learned its text
    assert (result["dtype"], result["quantization"]) == (dtype, quantization)
    assert result["tokens_per_second_batch1_after"] > 0 and result["tokens_per_second_batch4_after"] > 0
    on_disk = json.loads((out / contract.RESULT_FILE).read_text())
    assert on_disk["artifact"] == str(out) and on_disk["bytes_after"] == result["bytes_after"]
    model, _ = loader.load(out)
    assert str(model.dtype) == f"torch.{dtype}"
    assert (type(model.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor") == (quantization is not None)
    # the artifact on disk decodes exactly what the gate measured
    samples = on_disk[llm_compress.SAMPLES_KEY]
    assert _greedy(out, [s["prompt"] for s in samples]) == [s["compressed_tokens"] for s in samples]
    if method == "int8-weight":
        assert result["bytes_after"] < 0.6 * result["bytes_before"]
    if method in ("bf16", "fp16"):
        assert result["bytes_after"] < 0.6 * result["bytes_before"]


def test_int4_weight_runs_or_says_why_not(tiny, tmp_path):
    try:
        result = llm_compress.compress(tiny, tmp_path / "artifact", "int4-weight", evaluation=FEW,
                                       latency_budget_s=BUDGET_S)
    except compress.MethodUnavailable as e:
        assert "torchao" in str(e) and "Int4WeightOnlyConfig" in str(e)
        assert not (tmp_path / "artifact").exists()
    else:
        assert result["quantization"] == "Int4WeightOnlyConfig" and result["gate"]["passed"] is True


def _one_bit(method: str) -> dict:
    """A destructive 'compression': every Linear weight rounded to one bit per row."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis
    from transformers import TorchAoConfig
    return {"quantization_config": TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int1,
                                                                      granularity=PerAxis(0)))}


def test_a_broken_candidate_fails_the_gate_and_writes_no_artifact(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(llm_compress, "load_kwargs", _one_bit)
    term = tmp_path / "termination-log"
    code = compress.main(["--task", "text-generation", "--model-dir", str(tiny), "--artifact-dir",
                          str(tmp_path / "artifact"), "--method", "int8-weight", "--latency-budget", "0.2",
                          "--termination-message-path", str(term)])
    assert code == contract.COMPRESS_EXIT_GATE_FAILED
    assert not (tmp_path / "artifact").exists()
    message = json.loads(term.read_text())
    assert message["passed"] is False and message["reason"].startswith("perplexity gate failed: int8-weight")
    gate = message["gate"]
    assert gate["passed"] is False and gate["after"]["perplexity"] > 1.10 * gate["before"]["perplexity"]
    assert gate["agreement"] < 0.80
    assert llm_compress.SAMPLES_KEY not in message


def test_the_gate_scores_a_broken_model_and_passes_the_original(tiny):
    model, tok = loader.load(tiny)
    evaluator = llm_gate.Evaluator(llm_gate.Gate(samples=4), model, tok)
    same, _ = evaluator.score(model)
    assert same["passed"] and same["increase"] == 0.0 and same["agreement"] == 1.0 and same["exact"] == 1.0
    assert same["prompts"] == 4 and same["before"]["tokens"] == same["after"]["tokens"] > 500
    with torch.no_grad():
        for p in model.model.layers[0].parameters():
            p.mul_(-3.0)
    broken, samples = evaluator.score(model)
    assert not broken["passed"] and broken["increase"] > 0.10
    assert len(samples) == 4 and all(s["original"] != "" for s in samples)


def test_perplexity_of_a_short_text_is_the_exponent_of_the_model_loss(tiny):
    model, tok = loader.load(tiny)
    text = "The kettle had been on the stove for only a few minutes when the power went out."
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = math.exp(float(model(ids, labels=ids).loss))
    got = llm_gate.perplexity(model, tok, text)
    assert got["tokens"] == ids.shape[1] - 1 and got["perplexity"] == pytest.approx(expected, rel=1e-4)
    # a window smaller than the text: every token after the first is scored exactly once
    windowed = llm_gate.perplexity(model, tok, text, window=8, stride=4)
    assert windowed["tokens"] == ids.shape[1] - 1 and windowed["perplexity"] > 0


def test_auto_keeps_the_smallest_that_passes_and_says_why_for_the_others(tiny, tmp_path):
    result = llm_compress.compress(tiny, tmp_path / "artifact", "auto", evaluation=FEW,
                                   latency_budget_s=BUDGET_S)
    rows = result["candidates"]
    assert [r["method"] for r in rows] == list(llm_compress.AUTO_CANDIDATES)
    gated = [r for r in rows if "gate" in r]
    assert gated and all(r["gate"]["passed"] for r in gated)
    best = min(gated, key=lambda r: r["bytes"])
    assert result["method"] == best["method"] and [r["chosen"] for r in rows].count(True) == 1
    assert result["reason"].startswith(f"auto chose {best['method']}: smallest passing candidate ({best['bytes']} bytes)")
    for r in rows:
        if "skipped" in r:   # measured after a smaller one passed: its size alone rules it out
            earlier = [e for e in rows[:rows.index(r)] if e.get("gate", {}).get("passed")]
            assert earlier and min(e["bytes"] for e in earlier) <= r["bytes"]
            assert r["skipped"].startswith("skipped:") and r["rejected"] == r["skipped"]
    int4 = rows[0]
    if "gate" not in int4:
        assert int4["unavailable"] is True and "torchao" in int4["error"] and int4["rejected"] == int4["error"]
    assert (tmp_path / "artifact" / contract.RESULT_FILE).exists()


def test_auto_latency_measures_every_candidate_and_keeps_the_fastest(tiny, tmp_path):
    result = llm_compress.compress(tiny, tmp_path / "artifact", "auto",
                                   params={"candidates": ["int8-weight", "bf16", "none"], "objective": "latency"},
                                   evaluation=FEW, latency_budget_s=BUDGET_S)
    rows = result["candidates"]
    assert all("gate" in r and r["tokens_per_second_batch1"] > 0 for r in rows)
    fastest = max((r for r in rows if r["gate"]["passed"]), key=lambda r: r["tokens_per_second_batch1"])
    assert result["method"] == fastest["method"] and [r["chosen"] for r in rows].count(True) == 1


def test_choose_reports_a_reason_for_every_rejected_row():
    def row(method, size, tps, passed=True):
        return {"method": method, "bytes": size, "tokens_per_second_batch1": tps, "gate": {"passed": passed}}
    rows = [row("a", 100, 5.0), row("b", 50, 1.0), row("c", 10, 9.0, passed=False),
            {"method": "d", "error": "unavailable: no kernel"}, {"method": "e", "bytes": 200, "skipped": "skipped: big"}]
    best, why = llm_compress.choose([dict(r) for r in rows], "size")
    assert best["method"] == "b" and "50 bytes" in why
    table = [dict(r) for r in rows]
    best, why = llm_compress.choose(table, "latency")
    assert best["method"] == "a" and "5.0 output tokens/s" in why
    assert {r["method"]: r.get("rejected") for r in table} == {
        "a": None, "b": None, "c": "gate failed", "d": "unavailable: no kernel", "e": "skipped: big"}
    assert llm_compress.choose([dict(rows[2])], "size") == (None, "no candidate passed the gate")


def test_bad_input_is_refused_with_its_reason(tiny, tmp_path):
    with pytest.raises(ValueError, match="int8-static"):
        llm_compress.compress(tiny, tmp_path / "a", "int8-static")
    with pytest.raises(ValueError, match=r"\['sparsity'\]"):
        llm_compress.compress(tiny, tmp_path / "a", "auto", params={"sparsity": 0.5})
    with pytest.raises(ValueError, match="unknown auto candidates"):
        llm_compress.compress(tiny, tmp_path / "a", "auto", params={"candidates": ["int8"]})
    for bad, match in (({"metric": "accuracy"}, "unknown evaluation fields"), ({"type": "data"}, "type perplexity"),
                       ({"minTokenAgreement": 1.5}, "minTokenAgreement"), ({"maxNewTokens": 0}, "maxNewTokens"),
                       ({"maxPerplexityIncrease": -1}, "maxPerplexityIncrease"),
                       ({"path": str(tmp_path / "missing.txt")}, "does not exist")):
        with pytest.raises(llm_gate.GateError, match=match):
            llm_gate.sample_text(llm_gate.parse(json.dumps(bad)))
    assert not (tmp_path / "a").exists()


def test_gate_defaults_and_files(tmp_path):
    default = llm_gate.parse(None)
    assert (default.max_perplexity_increase, default.min_token_agreement, default.max_new_tokens) == (0.10, 0.80, 16)
    assert len(llm_gate.sample_text(default)) > 3000 and len(llm_gate.sample_prompts(default)) >= 8
    (tmp_path / "p.txt").write_text("first\n\n  second  \nthird\n")
    (tmp_path / "t.txt").write_text("Some text of my own.")
    own = llm_gate.parse({"type": "perplexity", "path": str(tmp_path / "t.txt"),
                          "prompts": str(tmp_path / "p.txt"), "samples": 2})
    assert llm_gate.sample_prompts(own) == ["first", "second"]
    assert llm_gate.sample_text(own) == "Some text of my own."


def test_loader_finds_gguf_files_and_refuses_what_it_cannot_read(tiny, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"GGUF")
    assert loader.is_gguf(tmp_path / "one") and loader.is_gguf(tmp_path / "one" / "m.gguf")
    assert loader.gguf_file(tmp_path / "one") == tmp_path / "one" / "m.gguf"
    assert not loader.is_gguf(tiny) and not loader.is_gguf(tmp_path / "missing")
    with pytest.raises(ValueError, match="2 .gguf files"):
        loader.load(tmp_path / "two")
    with pytest.raises(FileNotFoundError, match="neither"):
        loader.load(tmp_path)
    model, tok = loader.load(tiny, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training and tok.pad_token_id is not None


def test_the_image_entrypoint_hands_a_language_model_over_by_its_task(tiny, tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, contract.ENV_TASK: contract.TASK_TEXT_GENERATION, contract.ENV_MODEL_DIR: str(tiny),
           contract.ENV_ARTIFACT_DIR: str(tmp_path / "artifact"), contract.ENV_COMPRESSION_METHOD: "bf16",
           contract.ENV_COMPRESSION_EVALUATION: json.dumps(FEW), contract.ENV_COMPRESSION_LATENCY_BUDGET: "0.2",
           compress.ENV_TERMINATION_MESSAGE_PATH: str(tmp_path / "termination-log"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lepton_trainer", "compress"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["passed"] is True and message["method"] == "bf16" and message["dtype"] == "bfloat16"
    assert message["gate"]["prompts"] == 4 and message["gate"]["maxNewTokens"] == 8
    assert contract.PROGRESS_PREFIX in proc.stdout and llm_compress.SAMPLES_KEY not in message
    assert json.loads((tmp_path / "artifact" / contract.RESULT_FILE).read_text())["artifact"] == str(tmp_path / "artifact")
