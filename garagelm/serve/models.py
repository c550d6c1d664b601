"""Models the server holds: loaded on first use, unloaded after an idle keep-alive."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from garagelm.errors import GarageError
from garagelm.runtime.batching import Scheduler
from garagelm.runtime.load import LoadedModel

DEFAULT_KEEP_ALIVE = 300.0  # seconds, as Ollama
GRACE = 2.0  # seconds between handing a model to a request and its submitting work


class ModelNotFound(GarageError):
    pass


class NotEnoughMemory(GarageError):
    pass


@dataclass
class Held:
    name: str
    path: Path
    loaded: LoadedModel
    scheduler: Scheduler
    ctx_size: int
    size: int  # bytes of the model file
    expires_at: float = 0.0
    info: dict = field(default_factory=dict)
    # a request that just got the model may not have submitted yet: the reaper waits this long
    grace_until: float = 0.0


class ModelPool:
    def __init__(
        self, ctx_size: int | None = None, slots: int = 4, max_loaded: int = 2, kv_cache: str | None = None
    ):
        self.ctx_size, self.slots, self.max_loaded = ctx_size, slots, max_loaded
        self.kv_cache = kv_cache  # None: the engine's default (f16)
        self.held: dict[str, Held] = {}
        self._lock = threading.Lock()

    @staticmethod
    def canonical(name: str) -> str:
        return name if ":" in name else f"{name}:latest"

    def get(self, name: str, keep_alive: float | None = None) -> Held:
        """The model, loading it if needed (blocking: call from a worker thread)."""
        from garagelm.store.local import find, parse_name

        key = self.canonical(name)
        with self._lock:
            held = self.held.get(key)
            if held is None:
                try:
                    parse_name(key)
                    stored = find(key)
                except GarageError as e:
                    raise ModelNotFound(f"model {name!r} is not usable: {e}") from None
                if stored is None:
                    raise ModelNotFound(f"model {name!r} not found; pull it first: garage pull {name}")
                self._make_room(stored)
                held = self._load(key, stored.path)
                held.info = dict(stored.manifest)
                self.held[key] = held
            self.touch(held, keep_alive)
            held.grace_until = time.time() + GRACE
            return held

    def _load(self, name: str, path: Path) -> Held:
        from garagelm.runtime.load import load_model

        loaded = load_model(path)
        ctx = min(self.ctx_size or loaded.context_length, loaded.context_length)
        scheduler = Scheduler(loaded.model, loaded.tokenizer, ctx, slots=self.slots, kv_cache=self.kv_cache)
        return Held(name, path, loaded, scheduler, ctx, path.stat().st_size)

    def touch(self, held: Held, keep_alive: float | None) -> None:
        ttl = DEFAULT_KEEP_ALIVE if keep_alive is None else keep_alive
        held.expires_at = time.time() + ttl if ttl >= 0 else float("inf")  # negative: keep forever

    def _make_room(self, stored) -> None:
        """Unload idle models (least recently kept first) until the new one fits: within
        --max-loaded, and within the memory this computer has free by the store's fit estimate
        (weights + a KV cache per request slot + runtime + margin)."""
        from garagelm.store.fit import entry_from_gguf, estimate
        from garagelm.store.hardware import detect

        entry = entry_from_gguf(stored.path, stored.manifest.get("quantization", ""))
        ctx = min(self.ctx_size or entry["context_length"], entry["context_length"])
        need = estimate(entry, ctx * self.slots, self.kv_cache or "f16").total
        while True:
            free = detect(with_gpu=False).available_ram
            if len(self.held) < self.max_loaded and need <= free:
                return
            idle = [h for h in self.held.values() if h.scheduler.busy == 0]
            if not idle:
                why = (
                    f"{len(self.held)} models are loaded (--max-loaded {self.max_loaded})"
                    if len(self.held) >= self.max_loaded
                    else f"{stored.name} needs about {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is free"
                )
                raise NotEnoughMemory(
                    f"cannot load {stored.name} now: {why}; try again later or lower --ctx-size/--parallel"
                )
            self._unload(min(idle, key=lambda h: h.expires_at).name)

    def _unload(self, name: str) -> None:
        held = self.held.pop(name, None)
        if held is not None:
            held.scheduler.close()

    def unload(self, name: str) -> bool:
        with self._lock:
            key = self.canonical(name)
            present = key in self.held
            self._unload(key)
            return present

    def reap(self) -> None:
        """Unload models whose keep-alive ran out and that serve nothing."""
        now = time.time()
        with self._lock:
            for name, held in list(self.held.items()):
                if held.expires_at <= now and held.grace_until <= now and held.scheduler.busy == 0:
                    self._unload(name)

    def close(self) -> None:
        with self._lock:
            for name in list(self.held):
                self._unload(name)
