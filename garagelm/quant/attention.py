"""Decode-step attention over an f16 or q8_0 KV cache, in the C kernels (one query position)."""

from __future__ import annotations

import torch

from garagelm.quant import cpu

AVAILABLE = cpu.kernels is not None


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    first: int = 0,
) -> torch.Tensor | None:
    """q (1, H, 1, hd) float32; k, v (1, Hkv, S, hd) views of a cache, float16, or (q8_0) u8 keys
    and int8 values with k_scales/v_scales (1, Hkv, S, hd/32) float16, in KVCache's tiled
    layout. Attends to positions first..S-1 (a sliding window). None if the shape is unsupported.

    Reads each cached key and value once, all heads of a group together, positions split over
    the kernel threads.
    """
    B, H, T, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q8 = k_scales is not None
    if not AVAILABLE or B != 1 or T != 1 or q.dtype != torch.float32 or H % Hkv:
        return None
    if k.dtype != (torch.uint8 if q8 else torch.float16) or v.dtype != (torch.int8 if q8 else torch.float16):
        return None
    if hd % (32 if q8 else 16) or (q8 and k.stride(1) % 16):  # q8_0: whole tiles of 16 positions
        return None
    if k.stride(-1) != 1 or k.stride(-2) != hd or v.stride() != k.stride():
        return None
    if q8 and (
        v_scales is None
        or k_scales.stride(-2) != hd // 32
        or k_scales.stride(1) * 32 != k.stride(1)
        or v_scales.stride() != k_scales.stride()
    ):
        return None
    q = q.contiguous()
    out = torch.empty(1, H, 1, hd)
    cpu.kernels.attend(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        k_scales.data_ptr() if q8 else 0,
        v_scales.data_ptr() if q8 else 0,
        out.data_ptr(),
        k.stride(1),
        H,
        Hkv,
        S,
        hd,
        scale,
        first,
    )
    return out
