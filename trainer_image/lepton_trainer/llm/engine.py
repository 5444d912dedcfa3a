"""The generation engine of the language-model runtime: transformers' continuous batching.

:class:`Engine` drives one ``ContinuousBatchingManager`` (``model.init_continuous_batching``,
the library's own engine: a paged KV cache, and a scheduler that adds a request to the
running batch as soon as a slot and cache blocks are free, and drops one the moment it
finishes or is cancelled). Each request streams its tokens to a callback on the event loop
as they are produced.

Sampling is per request and reproducible. The manager decodes greedily (argmax), and three
per-request logits processors run before it: temperature, top-p, and Gumbel noise drawn
from a generator seeded by the request's seed and the token's position. The argmax of
the noised scores is a sample of the softmax (the Gumbel-max trick), so a request with a
seed yields the same tokens whatever else shares its batch, and a greedy request
(temperature 0) gets no noise at all: its tokens are exactly ``generate``'s greedy ones.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
from typing import Any, Callable

import torch

PAGE_TOKENS = 64            # tokens per KV-cache page (small pages waste little on short requests)
GREEDY_KEY = 0              # noise key of a greedy row: no noise, plain argmax


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one request is decoded. ``temperature`` 0 is greedy; ``seed`` (None: drawn at
    random) makes a sampled request reproducible."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _processors() -> list[Any]:
    """The per-request logits processors (temperature, top-p, Gumbel noise), as the
    continuous-batching logits-processor interface wants them."""
    from transformers.generation.continuous_batching.cb_logits_processors import (
        ContinuousBatchingLogitsProcessor, ContinuousBatchingTemperatureLogitsWarper,
        ContinuousBatchingTopPLogitsWarper)
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    class TopP(ContinuousBatchingTopPLogitsWarper):
        """Top-p that skips its sort when no row of the batch asks for it."""
        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            if bool((tensor_arg[: scores.size(0)].view(dtype=torch.float32) >= 1.0).all()):
                return scores
            return super().__call__(scores, tensor_arg)

    class GumbelNoise(ContinuousBatchingLogitsProcessor):
        """Adds Gumbel(0, 1) noise to each sampled row, from a generator seeded by the
        request's seed and the position of the token; greedy rows are left alone."""
        supported_kwargs = {"seed": int}
        ignored_kwargs = ()

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(GREEDY_KEY)

        def prepare_tensor_args(self, requests_with_new_token: list) -> torch.Tensor:
            keys = [GREEDY_KEY if (s := r.state.logit_processor_kwargs.get("seed")) is None
                    else (hash((s, r.state.generated_len())) & 0x7FFFFFFF) | 1 for r in requests_with_new_token]
            return torch.tensor(keys, dtype=torch.int32)

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            keys = tensor_arg[: scores.size(0)].tolist()
            if not any(keys):
                return scores
            noise = torch.zeros_like(scores)
            for row, key in enumerate(keys):
                if key != GREEDY_KEY:
                    gen = torch.Generator(device=scores.device).manual_seed(key)
                    u = torch.rand(scores.size(1), generator=gen, device=scores.device).clamp_(1e-20, 1.0)
                    noise[row] = -torch.log(-torch.log(u))
            return scores + noise

    return [ContinuousBatchingTemperatureLogitsWarper(TemperatureLogitsWarper(1.0)),
            TopP(TopPLogitsWarper(1.0)), GumbelNoise()]


def request_kwargs(sampling: Sampling, seed: int) -> dict[str, Any]:
    """The logits-processor arguments of a request (what :func:`_processors` reads)."""
    if sampling.greedy:
        return {}
    return {"temperature": float(sampling.temperature), "top_p": float(sampling.top_p), "seed": int(seed)}


def cb_config(max_sequences: int, context_tokens: int, kv_cache_tokens: int | None = None) -> Any:
    """The continuous-batching configuration: ``max_sequences`` decoded at once, a KV cache
    for ``kv_cache_tokens`` (default: every sequence at its longest, ``context_tokens``).
    Prefix caching is off, so a finished request's blocks are free at once and the cache's
    use is what running requests hold."""
    from transformers import ContinuousBatchingConfig
    tokens = kv_cache_tokens or max_sequences * context_tokens
    return ContinuousBatchingConfig(
        page_size=PAGE_TOKENS, num_blocks=max(1, math.ceil(tokens / PAGE_TOKENS)),
        max_batch_tokens=max(256, min(context_tokens, 2048)), max_requests_per_batch=max_sequences,
        use_cuda_graph=False, use_async_batching=False, auto_switch_to_flash=False,
        allow_block_sharing=False, scheduler_type="fifo")


class Engine:
    """One model's continuous-batching manager, fed from an asyncio event loop."""

    def __init__(self, model: Any, tokenizer: Any, max_sequences: int, context_tokens: int,
                 kv_cache_tokens: int | None = None):
        from transformers import GenerationConfig
        from transformers.generation.continuous_batching.cb_logits_processors import (
            ContinuousBatchingLogitsProcessorList)
        from transformers.generation.logits_process import LogitsProcessorList

        self.model, self.tokenizer = model, tokenizer
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = frozenset(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        config = GenerationConfig(do_sample=False, max_new_tokens=1, top_k=None, top_p=None, temperature=None,
                                  eos_token_id=sorted(self.eos_ids) or -1,
                                  pad_token_id=tokenizer.pad_token_id)
        self.manager = model.init_continuous_batching(
            generation_config=config,
            continuous_batching_config=cb_config(max_sequences, context_tokens, kv_cache_tokens))
        processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList(_processors()))
        processors.tensors_required = len(processors.logits_processor)
        self.manager.logit_processor = processors
        self._ids = iter(range(1, 1 << 62))
        self._lock = threading.Lock()

    def start(self) -> None:
        with torch.inference_mode():
            self.manager.start()

    def stop(self) -> None:
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=30)

    @property
    def alive(self) -> bool:
        return self.manager.is_running() and self.manager.background_thread_status.fatal_error is None

    def submit(self, prompt_ids: list[int], sampling: Sampling, seed: int,
               on_output: Callable[[Any], None]) -> str:
        """Queue a request; ``on_output`` gets a ``GenerationOutput`` on the running event loop
        for every token (``generated_tokens`` so far) and once it finishes or fails."""
        with self._lock:
            rid = f"r{next(self._ids)}"
        self.manager.register_result_handler(rid, on_output)
        added = self.manager.add_request(prompt_ids, request_id=rid, max_new_tokens=sampling.max_tokens,
                                         streaming=True, **request_kwargs(sampling, seed))
        if added is None:
            self._forget(rid)
            raise RuntimeError("the generation engine is not accepting requests")
        return rid

    def cancel(self, rid: str) -> None:
        """Stop a request: its sequence leaves the batch and its cache blocks are freed."""
        self.manager.cancel_request(rid)
        self._forget(rid)

    def _forget(self, rid: str) -> None:
        router = self.manager.output_router       # a cancelled request gets no final output
        with router._lock:
            router.result_handlers.pop(rid, None)

    def kv_cache_usage(self) -> float:
        """The fraction of the paged KV cache in use (0 before the first request)."""
        processor = self.manager.batch_processor
        if processor is None:
            return 0.0
        return max(0.0, min(1.0, 1.0 - float(processor.cache.compute_free_capacity(relative=True))))

    async def warm_up(self, prompt_ids: list[int]) -> None:
        """One greedy token through the engine (builds the cache and the batch processor)."""
        done: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_output(out: Any) -> None:
            if out.is_finished() and not done.done():
                done.set_result(out)
        self.submit(prompt_ids, Sampling(max_tokens=1, temperature=0.0), 0, on_output)
        out = await done
        if out.error:
            raise RuntimeError(f"warm-up failed: {out.error}")
