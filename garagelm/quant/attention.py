"""Decode-step attention over an f16 KV cache, in the C kernels (one query position)."""

from __future__ import annotations

import torch

from garagelm.quant.ggml_linear import _kernels

AVAILABLE = _kernels is not None and hasattr(_kernels, "attend_f16")


def decode_attention_f16(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """q (1, H, 1, hd) float32; k, v (1, Hkv, S, hd) float16 views of a cache. None if unsupported.

    Reads each cached key and value once (half the bytes of float32), all heads of a group
    together, positions split over the kernel threads.
    """
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if not AVAILABLE or B != 1 or T != 1 or q.dtype != torch.float32 or k.dtype != torch.float16:
        return None
    if k.stride(-1) != 1 or k.stride(-2) != hd or v.stride() != k.stride() or H % Hkv or hd % 16:
        return None
    q = q.contiguous()
    out = torch.empty(1, H, 1, hd)
    _kernels.attend_f16(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), k.stride(1), H, Hkv, S, hd, scale
    )
    return out
