"""Prefill + decode: token ids in, token ids (and text) out.

`Engine` owns one sequence's KV cache and remembers which tokens it holds, so a chat that
re-sends the whole conversation each turn only computes the new tokens.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from garagelm.errors import GarageError
from garagelm.quant.attention import AVAILABLE as decode_kernel_available
from garagelm.quant.ggml_linear import MAX_KERNEL_ROWS, GGMLLinear
from garagelm.runtime.cache import KVCache
from garagelm.runtime.sampling import Sampler, SamplingParams
from garagelm.runtime.tokenizer import Tokenizer


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the previous call
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    time_to_first_token: float = 0.0

    @property
    def prompt_tps(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generate_tps(self) -> float:
        # The first token comes out of the prefill; decode speed counts the ones after it.
        n = self.generated_tokens - 1
        return n / self.generate_seconds if n > 0 and self.generate_seconds > 0 else 0.0


@dataclass
class Completion:
    """Filled in while a generation runs; read after iterating."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (end token or stop string) or "length"
    stats: Stats = field(default_factory=Stats)
    # Set top_logprobs (0..20) to record, per generated token, (id, logprob, [(id, logprob)...])
    # from the model's own distribution (log-softmax of the raw logits, before any sampling rule).
    top_logprobs: int | None = None
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        ctx_size: int,
        prefill_chunk: int = 512,
        kv_dtype: torch.dtype | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        self.ctx_size = ctx_size
        self.prefill_chunk = prefill_chunk
        # f16 keys/values (as llama.cpp keeps them) halve the bytes each decode step reads;
        # float32 where the attention kernel is not built.
        if kv_dtype is None:
            kv_dtype = torch.float16 if decode_kernel_available else torch.float32
        self.cache = KVCache(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, ctx_size, dtype=kv_dtype
        )
        self.cached: list[int] = []  # tokens whose keys/values the cache holds, in order
        self.last_logits: torch.Tensor | None = None  # what the latest yielded token was drawn from
        self._kernel_model = any(isinstance(m, GGMLLinear) for m in model.modules())

    def reset(self) -> None:
        self.cached = []

    @torch.inference_mode()
    def _forward(self, ids: list[int], start: int) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long)
        with _decode_threads(len(ids), self._kernel_model):
            logits = self.model(x, cache=self.cache, start=start, last_only=True)
        self.cached = self.cached[:start] + ids
        return logits[0, -1]

    def tokens(self, prompt: list[int], params: SamplingParams, stats: Stats | None = None) -> Iterator[int]:
        """Yield sampled token ids after `prompt` until an end token, max_tokens or a full context."""
        stats = stats if stats is not None else Stats()
        if len(prompt) >= self.ctx_size:
            raise GarageError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.ctx_size}; "
                "shorten it or raise --ctx-size"
            )
        if not prompt:
            raise GarageError("the prompt is empty")
        t0 = time.perf_counter()
        reuse = _common_prefix(self.cached, prompt)
        reuse = min(reuse, len(prompt) - 1)  # always evaluate at least one token for logits
        self.cached = self.cached[:reuse]
        stats.prompt_tokens, stats.cached_tokens = len(prompt), reuse
        pos = reuse
        while pos < len(prompt):
            chunk = prompt[pos : pos + self.prefill_chunk]
            logits = self._forward(chunk, pos)
            pos += len(chunk)
        stats.prompt_seconds = time.perf_counter() - t0
        stats.time_to_first_token = stats.prompt_seconds
        sampler = Sampler(params)
        history = list(prompt)
        limit = params.max_tokens if params.max_tokens is not None else self.ctx_size
        t1 = time.perf_counter()
        while True:
            tok = sampler(logits, history)
            stats.generated_tokens += 1
            if stats.generated_tokens == 1:
                t1 = time.perf_counter()
                stats.time_to_first_token = t1 - t0
            self.last_logits = logits
            yield tok
            history.append(tok)
            if tok in self.tokenizer.eog_ids or stats.generated_tokens >= limit:
                break
            if len(history) >= self.ctx_size:
                break
            logits = self._forward([tok], len(history) - 1)
            stats.generate_seconds = time.perf_counter() - t1

    def complete(self, prompt: list[int], params: SamplingParams, completion: Completion) -> Iterator[str]:
        """Yield text pieces as they are produced; stop strings are held back and never emitted."""
        stream = self.tokenizer.stream()
        stops = [s for s in params.stop if s]
        pending = ""
        limit = params.max_tokens if params.max_tokens is not None else self.ctx_size
        for tok in self.tokens(prompt, params, completion.stats):
            completion.token_ids.append(tok)
            if completion.top_logprobs is not None:
                completion.logprobs.append(_logprobs(self.last_logits, tok, completion.top_logprobs))
            if tok in self.tokenizer.eog_ids:
                completion.finish_reason = "stop"
                break
            pending += stream.push(tok)
            hit = _first_stop(pending, stops)
            if hit is not None:
                completion.text += pending[:hit]
                yield pending[:hit]
                completion.finish_reason = "stop"
                return
            keep = _partial_stop(pending, stops)
            out, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
            if out:
                completion.text += out
                yield out
        else:
            n = completion.stats.generated_tokens
            completion.finish_reason = "length" if n >= limit or self._full() else "stop"
        pending += stream.flush()
        if pending:
            completion.text += pending
            yield pending

    def _full(self) -> bool:
        return len(self.cached) + 1 >= self.ctx_size


@contextlib.contextmanager
def _decode_threads(n_tokens: int, kernel_model: bool):
    """Decode steps of a quantized model run torch's tiny ops on one thread: its idle OpenMP
    workers spin and would steal the cores the kernels' own threads need. A float model keeps
    torch's threads, which do its products."""
    if n_tokens > MAX_KERNEL_ROWS or not kernel_model:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _logprobs(logits: torch.Tensor, tok: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    lp = torch.log_softmax(logits.float(), -1)
    best = torch.topk(lp, top) if top > 0 else None
    alts = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return tok, float(lp[tok]), alts


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
