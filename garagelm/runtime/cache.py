"""KV caches: keys and values of past positions, per layer."""

from __future__ import annotations

import torch

from garagelm.quant import hugepages

Q8_0 = "q8_0"  # llama.cpp's -ctk/-ctv q8_0: int8 values with one f16 scale per 32 along the head
KV_TYPES = {"f32": torch.float32, "f16": torch.float16, "q8_0": Q8_0}
QK = 32


class ContextFullError(RuntimeError):
    """The sequence would grow past the cache's context size."""


def kv_type(name: str) -> torch.dtype | str:
    """A --kv-cache name -> what KVCache takes; ValueError naming the choices otherwise."""
    try:
        return KV_TYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown KV cache type {name!r}; choose one of {', '.join(KV_TYPES)}") from None


def kv_type_name(dtype: torch.dtype | str) -> str:
    """What KVCache takes -> its --kv-cache name (the inverse of kv_type)."""
    return next(name for name, t in KV_TYPES.items() if t == dtype)


def kv_bytes_per_value(dtype: torch.dtype | str) -> float:
    """Bytes one cached key or value element takes (q8_0: 32 int8 + one f16 scale)."""
    from garagelm.store.fit import KV_BYTES_PER_VALUE

    return KV_BYTES_PER_VALUE[kv_type_name(dtype)]


def quantize_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., hd) float -> int8 values (..., hd) and f16 scales (..., hd/32), as llama.cpp's q8_0
    (d = max|x| / 127, q = round(x / d)) and as the C decode step writes them."""
    b = x.float().unflatten(-1, (-1, QK))
    d = b.abs().amax(-1) / 127.0
    inv = torch.where(d == 0, 0.0, 1.0 / d)
    q = torch.round(b * inv.unsqueeze(-1)).to(torch.int8)
    return q.flatten(-2), d.half()


def dequantize_q8_0(q: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.unflatten(-1, (-1, QK)).to(dtype) * d.to(dtype).unsqueeze(-1)).flatten(-2)


# A q8_0 cache keeps positions in tiles of TILE for the C kernel's integer dot products: per head,
# a key tile holds, for each 4 consecutive values of the head, the TILE positions' 4 bytes (as
# u8 = q + 128), so one vpdpbusd with 4 query bytes gives TILE partial dots; a scale tile holds
# block b's TILE scales together. Values stay one row per position. Storage keeps the logical
# shape (..., positions, width); these map whole tiles between the two orders.
TILE = 16


def _tile_keys(q: torch.Tensor) -> torch.Tensor:
    """int8 keys (..., n, hd), n a multiple of TILE -> storage (u8, tiled)."""
    *lead, n, hd = q.shape
    u = (q.to(torch.int16) + 128).to(torch.uint8)
    return u.reshape(*lead, n // TILE, TILE, hd // 4, 4).transpose(-3, -2).reshape(*lead, n, hd)


def _untile_keys(u: torch.Tensor) -> torch.Tensor:
    *lead, n, hd = u.shape
    t = u.reshape(*lead, n // TILE, hd // 4, TILE, 4).transpose(-3, -2).reshape(*lead, n, hd)
    return (t.to(torch.int16) - 128).to(torch.int8)


def _tile_scales(d: torch.Tensor) -> torch.Tensor:
    *lead, n, nb = d.shape
    return d.reshape(*lead, n // TILE, TILE, nb).transpose(-2, -1).reshape(*lead, n, nb)


def _untile_scales(d: torch.Tensor) -> torch.Tensor:
    *lead, n, nb = d.shape
    return d.reshape(*lead, n // TILE, nb, TILE).transpose(-2, -1).reshape(*lead, n, nb)


def _put_tiled(store: torch.Tensor, x: torch.Tensor, start: int, tile, untile) -> None:
    """Write logical rows x at positions start.. of tiled storage (whole tiles read and rewritten)."""
    end = start + x.shape[-2]
    a, b = start // TILE * TILE, -(-end // TILE) * TILE
    rows = untile(store[..., a:b, :]).clone()  # a copy: a view would alias the store
    rows[..., start - a : end - a, :] = x
    store[..., a:b, :] = tile(rows)


def _get_tiled(store: torch.Tensor, end: int, untile) -> torch.Tensor:
    return untile(store[..., : -(-end // TILE) * TILE, :])[..., :end, :]


class KVCache:
    """Contiguous (layers, batch, kv_heads, positions, head_dim) storage that grows in chunks.

    Growing (rather than allocating the whole context up front) keeps memory proportional to
    the tokens actually held; `max_len` is the hard context limit. dtype is a torch float type
    or Q8_0, which keeps u8 `k` and int8 `v` plus f16 `k_scales`/`v_scales` (positions,
    head_dim/32), keys and scales in tiles of 16 positions (see TILE): half the bytes of f16, read
    by the C decode step directly; the torch path (prefill, models without a decode plan) sees it
    dequantized. Its capacity is a whole number of tiles.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        batch: int = 1,
        dtype: torch.dtype | str = torch.float32,
        chunk: int = 256,
    ):
        self.max_len, self.chunk = max_len, chunk
        self.quantized = dtype == Q8_0
        if self.quantized and head_dim % QK:
            raise ValueError(f"a q8_0 KV cache needs a head size that is a multiple of {QK}, not {head_dim}")
        self._dtype = dtype
        self._shape = (n_layers, batch, n_kv_heads, 0, head_dim)
        self.k = torch.empty(self._shape, dtype=torch.uint8 if self.quantized else dtype)
        self.v = torch.empty(self._shape, dtype=torch.int8 if self.quantized else dtype)
        self.k_scales = self.v_scales = None
        if self.quantized:
            self.k_scales = torch.empty((*self._shape[:4], head_dim // QK), dtype=torch.float16)
            self.v_scales = torch.empty_like(self.k_scales)
        self._views()

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def _names(self) -> tuple[str, ...]:
        return ("k", "v", "k_scales", "v_scales") if self.quantized else ("k", "v")

    def _grow(self, need: int) -> None:
        if need > self.max_len:
            raise ContextFullError(f"context of {self.max_len} tokens is full (needs {need})")
        want = max(need, 2 * self.capacity, self.chunk)
        limit = -(-self.max_len // TILE) * TILE if self.quantized else self.max_len  # whole tiles
        cap = min(limit, -(-want // self.chunk) * self.chunk)  # whole chunks, within the limit
        for name in self._names():
            old = getattr(self, name)
            new = hugepages.empty((*old.shape[:3], cap, old.shape[4]), old.dtype)  # read whole each step
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)
        self._views()

    def _views(self) -> None:
        self._layers = [tuple(getattr(self, n)[i] for n in self._names()) for i in range(self._shape[0])]

    @property
    def dtype(self) -> torch.dtype | str:
        return self._dtype

    @property
    def kernel_ready(self) -> bool:
        """Whether the C decode step can read and write this cache (f16 or q8_0)."""
        return self.quantized or self._dtype == torch.float16

    def nbytes(self) -> int:
        return sum(getattr(self, n).nbytes for n in self._names())

    def reserve(self, n: int) -> None:
        """Make room for positions 0..n-1 (raises ContextFullError past max_len)."""
        if n > self.capacity:
            self._grow(n)

    def layer(self, i: int) -> tuple[torch.Tensor, ...]:
        """Layer i's whole (batch, kv_heads, capacity, head_dim) key and value storage (and, for
        q8_0, the key and value scales)."""
        return self._layers[i]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Store k/v (B, Hkv, T, hd) at positions start..start+T-1; return all of 0..start+T-1
        (dequantized to k's dtype for a q8_0 cache)."""
        end = start + k.shape[2]
        self.reserve(end)
        if not self.quantized:
            kl, vl = self._layers[layer]
            kl[:, :, start:end] = k
            vl[:, :, start:end] = v
            return kl[:, :, :end], vl[:, :, :end]
        kl, vl, ksl, vsl = self._layers[layer]
        kq, kd = quantize_q8_0(k)
        vq, vd = quantize_q8_0(v)
        _put_tiled(kl, kq, start, _tile_keys, _untile_keys)
        _put_tiled(ksl, kd, start, _tile_scales, _untile_scales)
        _put_tiled(vsl, vd, start, _tile_scales, _untile_scales)
        vl[:, :, start:end] = vq
        return (
            dequantize_q8_0(_get_tiled(kl, end, _untile_keys), _get_tiled(ksl, end, _untile_scales), k.dtype),
            dequantize_q8_0(vl[:, :, :end], _get_tiled(vsl, end, _untile_scales), v.dtype),
        )

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """q as attention over this cache sees it: for q8_0, quantized to q8_0 too, as llama.cpp
        quantizes the query for its q8_0 key dot and the C kernel does (integer dots)."""
        return dequantize_q8_0(*quantize_q8_0(q), q.dtype) if self.quantized else q
