"""Continuous batching: many requests, one model, shared decode steps (for the server).

Each request gets a slot (an Engine with its own KV cache). A worker thread runs steps: every
running request advances by one token in a single batched model call (each weight read once for
all of them), and a new request's prompt tokens fill the rows left in the same steps (chunked
prefill), so requests join and leave the batch between steps. Events go out through a callback
that must not block (the server hands them to its event loop), so a slow reader never holds up
the others; a cancelled request leaves the batch at the next step and frees its slot.

A slot remembers the tokens it holds: a follow-up turn of the same conversation lands on
that slot and only its new tokens are computed. So that a reply is the same whichever slot and
cached prefix serve it, slots run prompts through the decode step itself (every position then
has one arithmetic, int8 activations included); a model without a decode plan computes in
float32 throughout (no bf16 prefill).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from garagelm.quant.ggml_linear import MAX_KERNEL_ROWS
from garagelm.runtime.generate import Completion, Engine, Generation, _common_prefix, _decode_threads
from garagelm.runtime.sampling import SamplingParams


@dataclass
class Request:
    """One generation. on_event(kind, payload) gets ("text", (piece, new logprob entries)),
    then ("done", Completion) or ("error", exception), from the worker thread."""

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[str, Any], None]
    top_logprobs: int | None = None
    completion: Completion = field(default_factory=Completion)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(self, model, tokenizer, ctx_size: int, slots: int = 4, kv_cache: str | None = None):
        self.model, self.tokenizer, self.ctx_size = model, tokenizer, ctx_size
        self.kv_cache = kv_cache  # a KV cache type name, None for the engine's default
        self.n_slots = slots
        self.engines: list[Engine] = []  # made on demand: each holds a KV cache
        self._free: list[Engine] = []
        self._waiting: list[Request] = []
        self._running: list[_Running] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="garage-scheduler", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> Request:
        with self._cv:
            if self._stop:
                raise RuntimeError("the scheduler is closed")
            self._waiting.append(req)
            self._cv.notify()
        return req

    @property
    def busy(self) -> int:
        """Requests waiting or running."""
        with self._cv:
            return len(self._waiting) + len(self._running)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)
        for req in self._waiting:
            req.on_event("error", RuntimeError("the model was unloaded"))

    def _slot_for(self, prompt: list[int]) -> Engine | None:
        """The free slot holding the longest prefix of `prompt`; a new one while under the limit."""
        best = max(self._free, key=lambda e: _common_prefix(e.cached, prompt), default=None)
        if best is not None and (
            _common_prefix(best.cached, prompt) > 0 or len(self.engines) >= self.n_slots
        ):
            self._free.remove(best)
            return best
        if len(self.engines) < self.n_slots:
            engine = Engine(
                self.model, self.tokenizer, self.ctx_size, kv_dtype=self.kv_cache, stepwise_prefill=True
            )
            self.engines.append(engine)
            return engine
        if best is not None:
            self._free.remove(best)
        return best

    def _admit(self) -> None:
        """Move waiting requests into free slots (under the lock); their prompts start next step."""
        while self._waiting:
            req = self._waiting[0]
            if req.cancelled.is_set():
                self._waiting.pop(0)
                continue
            engine = self._slot_for(req.prompt)
            if engine is None:
                break
            self._waiting.pop(0)
            self._running.append(_Running(req, engine))

    def _loop(self) -> None:
        # A slot may reuse keys and values that an earlier request computed, and a reply must not
        # depend on which prefix was reused. With a decode plan, prompts go through the decode
        # step (stepwise_prefill): every position is computed by one arithmetic (int8
        # activations, as llama.cpp), wherever it came from. Without one, float32 products
        # throughout (bf16 prefill would round a reused prefix differently from a fresh one).
        from garagelm.quant.ggml_linear import exact_products

        # (a probe with a 16-position cache: whether slots step prompts does not depend on its size,
        # and a full-context one would hold a whole slot's memory for the worker's lifetime)
        probe = Engine(self.model, self.tokenizer, 16, kv_dtype=self.kv_cache, stepwise_prefill=True)
        stepwise = probe.stepwise
        del probe
        with contextlib.nullcontext() if stepwise else exact_products():
            self._steps()

    def _steps(self) -> None:
        logits: dict[int, torch.Tensor] = {}  # id(request) -> logits for its next token
        while True:
            with self._cv:
                while not self._stop and not self._running and not self._waiting:
                    self._cv.wait()
                if self._stop:
                    for item in self._running:
                        item.req.on_event("error", RuntimeError("the model was unloaded"))
                    self._running = []
                    return
                self._admit()
                running = list(self._running)
            batch = []
            for item in running:
                req = item.req
                if req.cancelled.is_set():
                    logits.pop(id(req), None)
                    self._release(item, None)
                    continue
                try:  # whatever one request does wrong ends that request, never the worker
                    if item.gen is None:  # a newcomer: its state (a grammar may take a while)
                        req.completion.top_logprobs = req.top_logprobs
                        item.gen = Generation(item.engine, req.prompt, req.params, req.completion)
                        if item.engine.stepwise:  # its prompt goes into the coming steps
                            item.todo = item.gen.begin()
                        else:
                            logits[id(req)] = item.gen.start()
                    if item.todo:  # still reading its prompt
                        batch.append(item)
                        continue
                    seen = len(req.completion.logprobs)
                    piece = item.gen.accept(logits.pop(id(req)))
                    if piece or len(req.completion.logprobs) > seen:
                        req.on_event("text", (piece, req.completion.logprobs[seen:]))
                except Exception as e:
                    logits.pop(id(req), None)
                    item.engine.reset()
                    self._release(item, ("error", e))
                    continue
                if item.gen.finished:
                    self._release(item, ("done", req.completion))
                else:
                    batch.append(item)
            try:
                self._decode(batch, logits)
            except Exception as e:  # a failed step ends those requests, never the worker
                for item in batch:
                    logits.pop(id(item.req), None)
                    item.engine.reset()
                    self._release(item, ("error", e))

    def _decode(self, batch: list[_Running], logits: dict) -> None:
        """One step: a row for each sequence that is decoding, then prompt tokens of the newcomers
        in the room left (chunked prefill), so a prompt does not hold the others up for a whole
        prefill, and a step's groups of rows are full."""
        step = MAX_KERNEL_ROWS  # rows the packed kernels take at once
        rows = [(item, [item.gen.last]) for item in batch if not item.todo]
        reading = [item for item in batch if item.todo]
        if reading:
            room = -(-len(rows) // step) * step - len(rows)  # the last group's free rows
            room += step if room < step // 2 else 0  # too few: one more group
            for item in reading:
                if room == 0:
                    break
                take = item.todo[:room]
                rows.append((item, take))
                room -= len(take)
        # (item, token, whether its logits are needed): a decoding row's are, and those of a
        # prompt's last token
        flat = [
            (item, tok, k == len(toks) - 1 and len(toks) == max(len(item.todo), 1))
            for item, toks in rows
            for k, tok in enumerate(toks)
        ]
        for i in range(0, len(flat), step):
            group = flat[i : i + step]
            ids = [tok for _, tok, _ in group]
            caches = [item.engine.cache for item, _, _ in group]
            positions = []
            for item, tok, _ in group:  # consecutive rows of one sequence take consecutive positions
                positions.append(len(item.engine.cached))
                item.engine.cached.append(tok)
            out_rows = [r for r, (_, _, wanted) in enumerate(group) if wanted]
            with torch.inference_mode(), _decode_threads(len(ids), group[0][0].engine._kernel_model):
                out = self.model.decode_batch(ids, caches, positions, rows_out=out_rows)
            for r, row in zip(out_rows, out):
                logits[id(group[r][0].req)] = row
        for item, toks in rows:
            if item.todo:
                item.todo = item.todo[len(toks) :]
                if not item.todo:
                    item.gen.prefilled()

    def _release(self, item: _Running, event) -> None:
        with self._cv:
            if item in self._running:
                self._running.remove(item)
            self._free.append(item.engine)
        if event is not None:
            try:
                item.req.on_event(*event)
            except Exception:  # a listener that fails must not take the worker down
                pass


@dataclass(eq=False)
class _Running:
    req: Request
    engine: Engine
    gen: Generation | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens not yet computed
