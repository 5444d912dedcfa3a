"""The language-model gate (``type: perplexity``): perplexity on a text sample and greedy-token
agreement with the original model on sample prompts.

The gate comes as a JSON object (``LEPTON_COMPRESSION_EVALUATION``, keys
``contract.LLM_EVALUATION_FIELDS``)::

  {"type": "perplexity", "path": "/models/sample.txt", "prompts": "/models/prompts.txt",
   "maxPerplexityIncrease": 0.10, "minTokenAgreement": 0.80, "maxNewTokens": 16, "samples": 12}

``path``      a UTF-8 text file; unset: the default sample shipped with this package
              (``sample.txt``, plain English prose). Perplexity is measured over its first
              ``PERPLEXITY_MAX_TOKENS`` tokens with a sliding window of ``PERPLEXITY_WINDOW``
              tokens moved by ``PERPLEXITY_STRIDE`` (every token is scored once, with up to
              ``PERPLEXITY_WINDOW - PERPLEXITY_STRIDE`` tokens of context before it).
``prompts``   a UTF-8 file, one prompt per line; unset: the default prompts shipped with this
              package (``prompts.txt``). A tokenizer with a chat template wraps each prompt as
              one user message with the generation prompt (as a chat completion does);
              otherwise the prompt is the raw text.
``maxPerplexityIncrease``  the largest relative rise that passes (0.10: the compressed
              model's perplexity may be at most 1.10 times the original's).
``minTokenAgreement``  the least agreement that passes, 0..1: the original decodes
              ``maxNewTokens`` tokens greedily for every prompt; the compressed model reads the
              same prompt and continuation in one forward pass (teacher forcing) and its
              greedy choice at each position is compared with the original's token. The
              agreement is the fraction of positions, over all prompts, where they are equal.
``maxNewTokens`` tokens decoded per prompt (default 16).
``samples``   how many prompts of the file are used (the first ones; default: all).

The compressed model's own greedy continuations (free-running, as a server decodes them)
are recorded too, with the fraction of prompts whose continuation equals the original's
(``exact``).
"""
from __future__ import annotations

import dataclasses
import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .. import contract, gates

DEFAULT_MAX_PERPLEXITY_INCREASE = 0.10
DEFAULT_MIN_TOKEN_AGREEMENT = 0.80
DEFAULT_MAX_NEW_TOKENS = 16
PERPLEXITY_MAX_TOKENS = 1024
PERPLEXITY_WINDOW = 512
PERPLEXITY_STRIDE = 256
SAMPLE_TEXT = "sample.txt"       # the default sample text, shipped in this package
SAMPLE_PROMPTS = "prompts.txt"   # the default sample prompts, shipped in this package


class GateError(ValueError):
    """The evaluation object or one of its files is invalid."""


@dataclasses.dataclass(frozen=True)
class Gate:
    path: str | None = None
    prompts: str | None = None
    max_perplexity_increase: float = DEFAULT_MAX_PERPLEXITY_INCREASE
    min_token_agreement: float = DEFAULT_MIN_TOKEN_AGREEMENT
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    samples: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"type": contract.EVALUATION_PERPLEXITY, "path": self.path, "prompts": self.prompts,
                "maxPerplexityIncrease": self.max_perplexity_increase,
                "minTokenAgreement": self.min_token_agreement, "maxNewTokens": self.max_new_tokens,
                "samples": self.samples}


def _number(obj: dict, key: str, default: float, low: float, high: float | None) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (
            high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise GateError(f"{key} must be a number {bound}, got {value!r}")
    return float(value)


def _integer(obj: dict, key: str, default: int | None, low: int, high: int) -> int | None:
    value = obj.get(key, default)
    if value is None:
        return None
    if type(value) is not int or not low <= value <= high:
        raise GateError(f"{key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def parse(obj: Any) -> Gate:
    """The gate from the evaluation object (a dict or its JSON; None or empty: the defaults)."""
    if obj in (None, "", {}):
        return Gate()
    obj = gates.json_object(obj, GateError)
    unknown = sorted(set(obj) - set(contract.LLM_EVALUATION_FIELDS))
    if unknown:
        raise GateError(f"unknown evaluation fields {unknown} for a language model; known: "
                        f"{list(contract.LLM_EVALUATION_FIELDS)}")
    if obj.get("type", contract.EVALUATION_PERPLEXITY) != contract.EVALUATION_PERPLEXITY:
        raise GateError(f"a language model's gate is type {contract.EVALUATION_PERPLEXITY}, "
                        f"got {obj['type']!r}")
    return Gate(path=str(obj["path"]) if obj.get("path") else None,
                prompts=str(obj["prompts"]) if obj.get("prompts") else None,
                max_perplexity_increase=_number(obj, "maxPerplexityIncrease", DEFAULT_MAX_PERPLEXITY_INCREASE,
                                                0.0, None),
                min_token_agreement=_number(obj, "minTokenAgreement", DEFAULT_MIN_TOKEN_AGREEMENT, 0.0, 1.0),
                max_new_tokens=_integer(obj, "maxNewTokens", DEFAULT_MAX_NEW_TOKENS, 1, 4096),
                samples=_integer(obj, "samples", None, 1, 100_000))


def _read_text(path: str | None, default: str) -> str:
    if path is None:
        return resources.files(__package__).joinpath(default).read_text(encoding="utf-8")
    p = Path(path)
    if not p.is_file():
        raise GateError(f"the gate's file {p} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise GateError(f"the gate's file {p} is not UTF-8 text: {e}") from None


def sample_text(gate: Gate) -> str:
    """The text whose perplexity is measured: the gate's file, else the default sample."""
    text = _read_text(gate.path, SAMPLE_TEXT)
    if not text.strip():
        raise GateError(f"the perplexity sample {gate.path or SAMPLE_TEXT} is empty")
    return text


def sample_prompts(gate: Gate) -> list[str]:
    """The prompts (non-empty lines) of the gate's file, else the default ones; the first
    ``samples`` of them."""
    prompts = [line.strip() for line in _read_text(gate.prompts, SAMPLE_PROMPTS).splitlines() if line.strip()]
    if not prompts:
        raise GateError(f"the prompts file {gate.prompts or SAMPLE_PROMPTS} holds no prompt")
    return prompts[:gate.samples] if gate.samples else prompts


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids a prompt is decoded from: one user message through the tokenizer's chat
    template (with the generation prompt) when it has one, else the raw text."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt)["input_ids"]


@torch.inference_mode()
def perplexity(model: Any, tokenizer: Any, text: str, max_tokens: int = PERPLEXITY_MAX_TOKENS,
               window: int = PERPLEXITY_WINDOW, stride: int = PERPLEXITY_STRIDE) -> dict[str, Any]:
    """Perplexity of ``text`` (its first ``max_tokens`` tokens) by a sliding window: each
    window scores only the tokens the previous one did not (transformers' documented method)."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    window = min(window, getattr(model.config, "max_position_embeddings", window) or window)
    n = ids.shape[1]
    if n < 2:
        raise GateError("the perplexity sample must hold at least two tokens")
    nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        target = ids[:, begin:end].clone()
        target[:, :-(end - prev_end)] = -100          # context only: scored by the previous window
        loss = model(ids[:, begin:end], labels=target).loss
        count = int((target[:, 1:] != -100).sum())   # the model shifts labels by one
        nll += float(loss) * count
        scored += count
        prev_end = end
        if end == n:
            break
    return {"perplexity": round(math.exp(nll / scored), 4), "tokens": scored}


@torch.inference_mode()
def greedy(model: Any, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The greedy continuation of each prompt (batch 1, at most ``max_new_tokens`` tokens;
    shorter when the model ends it)."""
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                           do_sample=False, num_beams=1)
        out.append(y[0, len(ids):].tolist())
    return out


@torch.inference_mode()
def agreement(model: Any, prompt_ids: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of the reference's tokens that ``model`` predicts greedily when it reads the
    prompt and the reference continuation before each of them (teacher forcing)."""
    same, total = 0, 0
    for ids, ref in zip(prompt_ids, reference):
        if not ref:
            continue
        x = torch.tensor([ids + ref[:-1]])
        logits = model(x).logits[0, len(ids) - 1:]
        same += int((logits.argmax(-1) == torch.tensor(ref)).sum())
        total += len(ref)
    return same / total if total else 1.0


class Evaluator:
    """The gate's reference, measured once on the original model; :meth:`score` gates a
    compressed one against it."""

    def __init__(self, gate: Gate, model: Any, tokenizer: Any):
        self.gate, self.tokenizer = gate, tokenizer
        self.text = sample_text(gate)
        self.prompts = sample_prompts(gate)
        self.prompt_ids = [encode_prompt(tokenizer, p) for p in self.prompts]
        self.before = perplexity(model, tokenizer, self.text)
        self.reference = greedy(model, self.prompt_ids, gate.max_new_tokens)

    def score(self, model: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """(the gate's verdict for the result, the prompts with both models' greedy answers)."""
        after = perplexity(model, self.tokenizer, self.text)
        agree = agreement(model, self.prompt_ids, self.reference)
        answers = greedy(model, self.prompt_ids, self.gate.max_new_tokens)
        exact = sum(a == r for a, r in zip(answers, self.reference)) / len(self.reference)
        increase = after["perplexity"] / self.before["perplexity"] - 1.0
        g = self.gate
        verdict = {
            "type": contract.EVALUATION_PERPLEXITY, "before": self.before, "after": after,
            "increase": round(increase, 4), "agreement": round(agree, 4), "exact": round(exact, 4),
            "maxPerplexityIncrease": g.max_perplexity_increase, "minTokenAgreement": g.min_token_agreement,
            "maxNewTokens": g.max_new_tokens, "prompts": len(self.prompts),
            "passed": bool(increase <= g.max_perplexity_increase and agree >= g.min_token_agreement),
        }
        decode = self.tokenizer.decode
        samples = [{"prompt": p, "original": decode(r, skip_special_tokens=True),
                    "compressed": decode(a, skip_special_tokens=True), "compressed_tokens": a}
                   for p, r, a in zip(self.prompts, self.reference, answers)]
        return verdict, samples


def describe(verdict: dict[str, Any]) -> str:
    """One line for logs and the result's reason."""
    return (f"perplexity {verdict['before']['perplexity']} -> {verdict['after']['perplexity']} "
            f"({verdict['increase']:+.1%}, at most {verdict['maxPerplexityIncrease']:+.0%}), token agreement "
            f"{verdict['agreement']:.1%} (at least {verdict['minTokenAgreement']:.0%}) over "
            f"{verdict['prompts']} prompts")
