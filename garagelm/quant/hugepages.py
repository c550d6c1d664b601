"""Large buffers on 2 MiB pages, where Linux allows it.

Decode streams every weight (and, at long contexts, the whole KV cache) through the CPU once
per token. On 4 KiB pages that is one TLB miss every 4 KiB, and on this machine it caps the
stream well below memory speed: the Gemma 3 output head (178 MB of Q8_0) took 13.4 ms a token
on 4 KiB pages and 8.4 ms on 2 MiB ones, and a plain torch sum went from 16.5 to 26.6 GB/s.
Transparent huge pages are usually in `madvise` mode, so a buffer gets them only when asked
before its pages are first touched: `empty` allocates, aligns to 2 MiB and asks.

A model's weights are packed onto ordinary pages first and moved onto huge ones afterwards, in
the background (`settle_in_background`, MADV_COLLAPSE): in a virtual machine that hands freed
memory back to its host, a huge page's first touch can cost ~10 ms, and a 1.5B model's load
took 10-13 s packing onto them against 1.0 s onto 4 KiB pages (decode 7% slower until moved).
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from functools import lru_cache

import torch

HUGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25  # Linux 6.1+: move a range onto huge pages now
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters
_deferred: list[tuple[int, int]] = []  # (address, bytes) of buffers to move onto huge pages later
_settling: threading.Thread | None = None


@lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@lru_cache(maxsize=1)
def heap_for_temporaries() -> bool:
    """Have glibc serve blocks up to 32 MiB from its heap and keep up to 64 MiB freed there.
    Prefill's temporaries (a weight widened to bf16, activations: a few MB each, every product)
    otherwise come from mmap and fault in every page on every call, and in this VM a page fault
    costs microseconds: Gemma 3's 512-token prompt ran 15-25% slower. glibc raises both limits by
    itself once it frees such a block, which a load used to do by accident (its temporary packed
    arrays) and no longer does since weights are packed in place. Whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 64 << 20))


def empty(shape: tuple[int, ...], dtype: torch.dtype, defer: bool = False) -> torch.Tensor:
    """torch.empty(shape, dtype), on 2 MiB pages when it spans at least one and the OS agrees
    (defer: later, by settle_in_background, once the buffer is written).

    The tensor is a view into a slightly larger allocation whose first, unaligned part is never
    touched, so it costs address space, not memory. Elsewhere it is a plain torch.empty."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    madvise = _madvise()
    if nbytes < HUGE or madvise is None:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE, dtype=torch.uint8)
    start = raw.data_ptr()
    off = -start % HUGE
    if defer:
        _deferred.append((start + off, nbytes // HUGE * HUGE))
    else:
        madvise(start + off, nbytes // HUGE * HUGE, MADV_HUGEPAGE)  # a refusal leaves 4 KiB pages
    return raw[off : off + nbytes].view(dtype).view(shape)


def settle_in_background() -> threading.Thread | None:
    """Move the buffers allocated with defer=True onto huge pages, on a thread of their own,
    32 MiB at a time (the addresses stay, so pointers bound to them stay valid). Where the kernel
    has no MADV_COLLAPSE (before 6.1), khugepaged moves them at its own pace instead."""
    global _settling
    madvise = _madvise()
    ranges, _deferred[:] = list(_deferred), []
    if madvise is None or not ranges:
        return None

    def run():
        collapse = True
        for start, n in ranges:
            madvise(start, n, MADV_HUGEPAGE)
            for off in range(0, n, 32 << 20) if collapse else ():
                if madvise(start + off, min(32 << 20, n - off), MADV_COLLAPSE) != 0:
                    collapse = ctypes.get_errno() != 22  # EINVAL: no MADV_COLLAPSE here
                    break

    _settling = threading.Thread(target=run, name="garage-hugepages", daemon=True)
    _settling.start()
    return _settling


def wait_settled() -> None:
    """Wait for settle_in_background's moves (a benchmark measures after them)."""
    if _settling is not None:
        _settling.join()


class Arena:
    """Many tensors, each a view into shared 2 MiB-page chunks: a model's packed weights are mostly
    tensors under 2 MiB (SmolLM2's largest layer product is 0.9 MB), which `empty` alone would
    leave on 4 KiB pages. One arena per model, so unloading it frees every chunk. A load that
    knows its total size reserves it first and packs each weight straight into its place."""

    CHUNK = 16 << 20

    def __init__(self):
        self._chunk: torch.Tensor | None = None
        self._used = 0
        self._storages: dict[int, object] = {}  # data pointer -> storage (kept alive: no reuse)

    def reserve(self, nbytes: int) -> None:
        """Start a chunk of at least nbytes (64-byte aligned pieces) for the tensors to come."""
        if _madvise() is not None:
            self._new_chunk(max(nbytes, self.CHUNK))

    def _new_chunk(self, nbytes: int) -> None:
        self._chunk, self._used = empty((nbytes,), torch.uint8, defer=True), 0
        storage = self._chunk.untyped_storage()
        self._storages[storage.data_ptr()] = storage

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the arena (a plain torch.empty without huge pages)."""
        if _madvise() is None:
            return torch.empty(shape, dtype=dtype)
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if self._chunk is None or self._used + nbytes > self._chunk.numel():
            if nbytes >= self.CHUNK // 2:  # a large tensor alone, not a fresh chunk's half
                out = empty(shape, dtype, defer=True)
                self._storages[out.untyped_storage().data_ptr()] = out.untyped_storage()
                return out
            self._new_chunk(self.CHUNK)
        out = self._chunk[self._used : self._used + nbytes].view(dtype).view(shape)
        self._used += self.padded(shape, dtype)
        return out

    @staticmethod
    def padded(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes a tensor takes in a chunk: the next one starts on a cache line."""
        return -(-math.prod(shape) * torch.empty(0, dtype=dtype).element_size() // 64) * 64

    def owns(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self._storages

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of t on huge pages (t itself where the OS has none to give)."""
        if _madvise() is None:
            return t
        out = self.empty(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out


def move_weights(model: torch.nn.Module, arena: Arena | None = None) -> None:
    """Put every quantized layer's packed arrays on huge pages (before a decode plan binds their
    addresses), in `arena` (where the load may have packed most of them already). Float layers
    keep their parameters where they are: those are trained and saved, and arena views sharing
    one storage would not save as separate tensors."""
    from garagelm.quant.ggml_linear import GGMLLinear

    arena = arena or Arena()
    for m in model.modules():
        if isinstance(m, GGMLLinear) and m._kind is not None:
            for name in ("q", "d", "m"):
                t = getattr(m, name)
                if t is None or arena.owns(t):
                    continue
                if not (t.nbytes >= HUGE and t.data_ptr() % HUGE == 0):  # not already
                    setattr(m, name, arena.take(t))
            m.__dict__.pop("_fast", None)  # pointers bound to the old arrays
