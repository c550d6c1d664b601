"""KV caches: keys and values of past positions, per layer."""

from __future__ import annotations

import torch


class ContextFullError(RuntimeError):
    """The sequence would grow past the cache's context size."""


class KVCache:
    """Contiguous (layers, batch, kv_heads, positions, head_dim) storage that grows in chunks.

    Growing (rather than allocating the whole context up front) keeps memory proportional to
    the tokens actually held; `max_len` is the hard context limit.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        chunk: int = 256,
    ):
        self.max_len, self.chunk = max_len, chunk
        self._shape = (n_layers, batch, n_kv_heads, 0, head_dim)
        self.k = torch.empty(self._shape, dtype=dtype)
        self.v = torch.empty(self._shape, dtype=dtype)
        self._views()

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def _grow(self, need: int) -> None:
        if need > self.max_len:
            raise ContextFullError(f"context of {self.max_len} tokens is full (needs {need})")
        want = max(need, 2 * self.capacity, self.chunk)
        cap = min(self.max_len, -(-want // self.chunk) * self.chunk)  # whole chunks, within the limit
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((*self._shape[:3], cap, self._shape[4]))
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)
        self._views()

    def _views(self) -> None:
        self._layers = [(self.k[i], self.v[i]) for i in range(self._shape[0])]  # per-layer views

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def reserve(self, n: int) -> None:
        """Make room for positions 0..n-1 (raises ContextFullError past max_len)."""
        if n > self.capacity:
            self._grow(n)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's whole (batch, kv_heads, capacity, head_dim) key and value storage."""
        return self._layers[i]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Store k/v (B, Hkv, T, hd) at positions start..start+T-1; return all of 0..start+T-1."""
        end = start + k.shape[2]
        self.reserve(end)
        kl, vl = self._layers[layer]
        kl[:, :, start:end] = k
        vl[:, :, start:end] = v
        return kl[:, :, :end], vl[:, :, :end]
