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
from garagelm.quant.dense import DenseLinear
from garagelm.quant.ggml_linear import MAX_KERNEL_ROWS, GGMLLinear
from garagelm.runtime.cache import KVCache, kv_type
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
        kv_dtype: torch.dtype | str | None = None,
        stepwise_prefill: bool = False,
    ):
        """stepwise_prefill: prompts go through the decode step, up to MAX_KERNEL_ROWS tokens at a
        time, where the model has one: every position is then computed by the same arithmetic
        whether it came in a prompt, in a reply or after a reused prefix (a server slot's need:
        a reply must not depend on which prefix its slot held)."""
        self.model, self.tokenizer = model, tokenizer
        self.stepwise_prefill = stepwise_prefill
        cfg = model.config
        self.ctx_size = ctx_size
        self.prefill_chunk = prefill_chunk
        # f16 keys/values (as llama.cpp keeps them) halve the bytes each decode step reads;
        # float32 where the attention kernel is not built.
        # kv_dtype may also name a type ("f16", "q8_0": half the bytes again, as llama.cpp's
        # -ctk/-ctv q8_0, for long contexts).
        if kv_dtype is None:
            kv_dtype = torch.float16 if decode_kernel_available else torch.float32
        elif isinstance(kv_dtype, str):
            kv_dtype = kv_type(kv_dtype)
        self.cache = KVCache(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, ctx_size, dtype=kv_dtype
        )
        self.cached: list[int] = []  # tokens whose keys/values the cache holds, in order
        self._kernel_model = any(isinstance(m, (GGMLLinear, DenseLinear)) for m in model.modules())

    def reset(self) -> None:
        self.cached = []

    @torch.inference_mode()
    def _forward(self, ids: list[int], start: int) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long)
        with _decode_threads(len(ids), self._kernel_model):
            logits = self.model(x, cache=self.cache, start=start, last_only=True)
        self.cached = self.cached[:start] + ids
        return logits[0, -1]

    def prefill(self, prompt: list[int], stats: Stats) -> torch.Tensor:
        """Bring the cache to `prompt` (reusing the prefix it holds); logits after its last token."""
        t0 = time.perf_counter()
        pos = len(prompt) - len(self.begin(prompt, stats))
        stepwise = self.stepwise
        while pos < len(prompt):
            chunk = prompt[pos : pos + (MAX_KERNEL_ROWS if stepwise else self.prefill_chunk)]
            logits = self._step_rows(chunk, pos) if stepwise else self._forward(chunk, pos)
            pos += len(chunk)
        stats.prompt_seconds = time.perf_counter() - t0
        return logits

    def begin(self, prompt: list[int], stats: Stats) -> list[int]:
        """Check `prompt` and keep the prefix of it the cache holds: the tokens still to compute
        (at least the last one, whose logits come next). The server's scheduler computes them
        in its own steps (stepwise engines); prefill() computes them here."""
        if len(prompt) >= self.ctx_size:
            raise GarageError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.ctx_size}; "
                "shorten it or raise --ctx-size"
            )
        if not prompt:
            raise GarageError("the prompt is empty")
        reuse = _common_prefix(self.cached, prompt)
        reuse = min(reuse, len(prompt) - 1)  # always evaluate at least one token for logits
        self.cached = self.cached[:reuse]
        stats.prompt_tokens, stats.cached_tokens = len(prompt), reuse
        return prompt[reuse:]

    @property
    def stepwise(self) -> bool:
        """Whether prompts go through the decode step (stepwise_prefill, and the model has one)."""
        return self.stepwise_prefill and self.model.planned(MAX_KERNEL_ROWS, [self.cache])

    @torch.inference_mode()
    def _step_rows(self, ids: list[int], start: int) -> torch.Tensor:
        """Consecutive tokens of this sequence as the rows of one decode step; last logits."""
        with _decode_threads(len(ids), self._kernel_model):
            positions = list(range(start, start + len(ids)))
            logits = self.model.decode_batch(ids, [self.cache] * len(ids), positions, rows_out=[len(ids) - 1])
        self.cached = self.cached[:start] + ids
        return logits[-1]

    def tokens(self, prompt: list[int], params: SamplingParams, stats: Stats | None = None) -> Iterator[int]:
        """Yield sampled token ids after `prompt` until an end token, max_tokens or a full context."""
        gen = Generation(self, prompt, params, Completion(stats=stats if stats is not None else Stats()))
        logits = gen.start()
        while True:
            gen.accept(logits)
            yield gen.last
            if gen.finished:
                return
            logits = self._forward([gen.last], len(self.cached))

    def complete(self, prompt: list[int], params: SamplingParams, completion: Completion) -> Iterator[str]:
        """Yield text pieces as they are produced; stop strings are held back and never emitted."""
        gen = Generation(self, prompt, params, completion)
        logits = gen.start()
        while True:
            piece = gen.accept(logits)
            if piece:
                yield piece
            if gen.finished:
                return
            logits = self._forward([gen.last], len(self.cached))


class Generation:
    """One reply being produced: sampling, stop rules, text and logprobs, one token at a time.

    The caller runs the model: `start()` prefills and gives the first logits; each `accept(logits)`
    takes the next token and returns the text it completes; while not `finished`, the caller
    computes the logits after `last` (alone, or batched with other sequences by the server).
    """

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, completion: Completion):
        self.engine, self.prompt, self.params, self.completion = engine, prompt, params, completion
        self.sampler = Sampler(params)
        self.history = list(prompt)
        self.stream = engine.tokenizer.stream()
        self.stops = [s for s in params.stop if s]
        self.pending = ""
        self.limit = params.max_tokens if params.max_tokens is not None else engine.ctx_size
        self.finished = False
        self.last = -1
        self._t0 = self._t1 = 0.0
        self.constraint = None
        if params.grammar is not None:
            from garagelm.runtime.constrain import Constraint

            self.constraint = Constraint(engine.tokenizer, params.grammar)

    def start(self) -> torch.Tensor:
        """Prefill here: the logits for the first token."""
        self._t0 = time.perf_counter()
        return self.engine.prefill(self.prompt, self.completion.stats)

    def begin(self) -> list[int]:
        """Or leave the prefill to the caller: the prompt tokens it still has to compute (in order,
        appending each to engine.cached), calling prefilled() after the last."""
        self._t0 = time.perf_counter()
        return self.engine.begin(self.prompt, self.completion.stats)

    def prefilled(self) -> None:
        self.completion.stats.prompt_seconds = time.perf_counter() - self._t0

    def accept(self, logits: torch.Tensor) -> str:
        """Sample the next token from `logits`; return the text that is now safe to show."""
        c, stats = self.completion, self.completion.stats
        if self.constraint is not None:
            tok = self.sampler(self.constraint.mask(logits), self.history)
            if tok not in self.engine.tokenizer.eog_ids:
                self.constraint.accept(tok)
        else:
            tok = self.sampler(logits, self.history)
        self.last = tok
        stats.generated_tokens += 1
        now = time.perf_counter()
        if stats.generated_tokens == 1:
            self._t1 = now
            stats.time_to_first_token = now - self._t0
        else:
            stats.generate_seconds = now - self._t1
        c.token_ids.append(tok)
        if c.top_logprobs is not None:
            c.logprobs.append(_logprobs(logits, tok, c.top_logprobs))
        self.history.append(tok)
        if tok in self.engine.tokenizer.eog_ids:
            c.finish_reason = "stop"
            return self._finish()
        self.pending += self.stream.push(tok)
        hit = _first_stop(self.pending, self.stops)
        if hit is not None:
            out = self.pending[:hit]
            c.text += out
            self.pending, self.finished, c.finish_reason = "", True, "stop"
            return out
        if self.constraint is not None and self.constraint.done:  # the format is complete
            c.finish_reason = "stop"
            return self._finish()
        if stats.generated_tokens >= self.limit or len(self.history) >= self.engine.ctx_size:
            c.finish_reason = "length"
            return self._finish()
        keep = _partial_stop(self.pending, self.stops)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        c.text += out
        return out

    def _finish(self) -> str:
        out = self.pending + self.stream.flush()
        self.completion.text += out
        self.pending, self.finished = "", True
        return out


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
