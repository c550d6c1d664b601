"""Many requests, one model: a worker thread serves them side by side for the server.

Each request gets a slot (an Engine with its own KV cache); the worker takes the running
requests in turn, one step each (a text piece, usually one token), so a new request starts
while others are mid-reply and a finished or cancelled one frees its slot at once. Events go
out through a callback that must not block (the server hands them to its event loop), so a
slow reader never holds up the others.

A slot remembers the tokens it holds: a follow-up turn of the same conversation lands on
that slot and only its new tokens are computed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from garagelm.runtime.generate import Completion, Engine, _common_prefix
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
    def __init__(self, model, tokenizer, ctx_size: int, slots: int = 4):
        self.model, self.tokenizer, self.ctx_size = model, tokenizer, ctx_size
        self.n_slots = slots
        self.engines: list[Engine] = []  # made on demand: each holds a KV cache
        self._free: list[Engine] = []
        self._waiting: list[Request] = []
        self._running: list[tuple[Request, Engine, Any]] = []
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
            engine = Engine(self.model, self.tokenizer, self.ctx_size)
            self.engines.append(engine)
            return engine
        if best is not None:
            self._free.remove(best)
        return best

    def _admit(self) -> None:
        while self._waiting:
            req = self._waiting[0]
            if req.cancelled.is_set():
                self._waiting.pop(0)
                continue
            engine = self._slot_for(req.prompt)
            if engine is None:
                return
            self._waiting.pop(0)
            req.completion.top_logprobs = req.top_logprobs
            gen = engine.complete(req.prompt, req.params, req.completion)
            self._running.append((req, engine, gen))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._running and not self._waiting:
                    self._cv.wait()
                if self._stop:
                    running, self._running = self._running, []
                    for req, _, gen in running:
                        gen.close()
                        req.on_event("error", RuntimeError("the model was unloaded"))
                    return
                self._admit()
                turn = list(self._running)
            for item in turn:
                self._step(*item)

    def _step(self, req: Request, engine: Engine, gen) -> None:
        done = None
        if req.cancelled.is_set():
            gen.close()
            done = ("cancelled", None)
        else:
            seen = len(req.completion.logprobs)
            try:
                piece = next(gen)
                req.on_event("text", (piece, req.completion.logprobs[seen:]))
            except StopIteration:
                extra = req.completion.logprobs[seen:]
                if extra:  # tokens that made no text (an end token) still have logprobs
                    req.on_event("text", ("", extra))
                done = ("done", req.completion)
            except Exception as e:  # a failed request must not take the worker down
                engine.reset()
                done = ("error", e)
        if done is not None:
            with self._cv:
                self._running.remove((req, engine, gen))
                self._free.append(engine)
            if done[0] != "cancelled":
                req.on_event(*done)
