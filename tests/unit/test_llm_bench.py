"""bench/llm.py: the figures it derives from streamed answers, and its verdict against the goal."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import llm as bench_llm  # noqa: E402

pytestmark = pytest.mark.unit


def test_a_level_counts_tokens_from_usage_or_the_text_and_leaves_errors_out_of_the_latencies():
    results = [
        {"arrivals": [0.5, 0.6, 0.9], "text": "abc", "completion_tokens": 5},      # usage: 5 tokens
        {"arrivals": [0.2, 0.4], "text": "one two three", "completion_tokens": None},  # retokenized: 3
        {"error": "HTTP 429: busy"},
    ]
    out = bench_llm.summarize(results, 2.0, lambda text: len(text.split()))
    assert out["requests"] == 3 and out["errors"] == 1 and out["error_samples"] == ["HTTP 429: busy"]
    assert out["output_tokens"] == 8 and out["output_tokens_per_s"] == 4.0 and out["mean_output_tokens"] == 4.0
    assert out["ttft_p50_ms"] == 500.0 and out["ttft_p99_ms"] == 500.0
    # per request (last - first) / (tokens - 1): 0.4 / 4 = 100 ms and 0.2 / 2 = 100 ms
    assert out["itl_p50_ms"] == 100.0
    assert out["token_count"] == "retokenized+usage"


def test_a_level_where_every_request_failed_has_no_latencies():
    out = bench_llm.summarize([{"error": "x"}, {"error": "x"}], 1.0, len)
    assert out["errors"] == 2 and out["output_tokens_per_s"] == 0 and out["ttft_p99_ms"] is None


def test_the_fastest_variant_is_compared_with_every_other_server_at_the_highest_concurrency():
    def row(tps, p99):
        return {"levels": {"16": {"output_tokens_per_s": tps, "ttft_p99_ms": p99}}}
    servers = {"lepton-none": row(100.0, 900.0), "lepton-int8-weight": row(120.0, 800.0),
               "transformers-serve": row(50.0, 800.0), "llama.cpp": row(200.0, 5000.0),
               "transformers-serve-cb": {"error": "did not start"}}
    v = bench_llm.verdicts(servers)
    assert v["transformers-serve"] == {
        "ours": "lepton-int8-weight", "other": "transformers-serve", "concurrency": 16, "throughput_ratio": 2.4,
        "ours_ttft_p99_ms": 800.0, "other_ttft_p99_ms": 800.0, "goal_2x_at_no_worse_ttft_p99": True}
    assert v["llama.cpp"]["throughput_ratio"] == 0.6 and v["llama.cpp"]["goal_2x_at_no_worse_ttft_p99"] is False
    assert v["transformers-serve-cb"] is None


def test_a_variant_reports_the_perplexities_and_agreement_of_its_gate():
    result = {"passed": True, "reason": "gate passed",
              "gate": {"before": {"perplexity": 10.0}, "after": {"perplexity": 10.5}, "agreement": 0.9}}
    assert bench_llm.fidelity(result) == {"passed": True, "reason": "gate passed", "perplexity_before": 10.0,
                                          "perplexity_after": 10.5, "token_agreement": 0.9}
    assert bench_llm.fidelity({"passed": False, "reason": "unavailable"})["perplexity_after"] is None
