"""Quantize float weights into GGML blocks: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

The arithmetic follows ggml's reference quantizers (quantize_row_*_ref) step by step in float32,
so the bytes equal gguf-py's and llama.cpp's for the same input (tested); vectorised in torch,
a few million values at a time.
"""

from __future__ import annotations

import torch

QK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}
CHUNK_BLOCKS = 1 << 16


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), written as gguf-py writes it."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.uint8)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) values 0..15 -> (n, 16) bytes: value i in the low nibble, value i+16 in the high."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) 5-bit values -> (n, 4) bytes holding bit 4 of each, little-endian."""
    bits = ((q >> 4) & 1).to(torch.int64)
    word = (bits << torch.arange(32)).sum(-1)
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], -1).to(torch.uint8)


def _signed_max(b: torch.Tensor) -> torch.Tensor:
    """The value with the largest magnitude (its sign kept), first one on ties."""
    return torch.gather(b, 1, b.abs().argmax(-1, keepdim=True))


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = b.abs().amax(-1, keepdim=True) / 127
    qs = _roundf(b * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), qs], -1)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _signed_max(b) / -8
    q = torch.trunc(b * _inverse(d) + 8.5).to(torch.uint8).clamp(0, 15)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], -1)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((b - lo) * _inverse(d) + 0.5).to(torch.uint8).clamp(0, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], -1)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _signed_max(b) / -16
    q = torch.trunc(b * _inverse(d) + 16.5).to(torch.uint8).clamp(0, 31)
    return torch.cat([_f16_bytes(d), _high_bits(q), _pack_nibbles(q)], -1)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 31
    q = torch.trunc((b - lo) * _inverse(d) + 0.5).to(torch.uint8).clamp(0, 31)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _high_bits(q), _pack_nibbles(q)], -1)


_QUANTIZERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1}
TYPES = tuple(_QUANTIZERS)


def _weighted_symmetric(b: torch.Tensor, qw: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q5_0 with an importance matrix: the scale minimising the weighted error (ggml's
    make_qx_quants), levels 0..2*nmax-1."""
    from garagelm.formats.kquantize import qx_quants

    d, levels = qx_quants(b, nmax, qw)
    return d.unsqueeze(-1), (levels + nmax).to(torch.uint8)


def _weighted_affine(b: torch.Tensor, qw: torch.Tensor, nmax: int) -> tuple[torch.Tensor, ...]:
    """Q4_1 / Q5_1 with an importance matrix: scale and minimum by weighted least squares over
    a sweep (ggml's make_qkx searches), levels 0..nmax against the f16-rounded pair."""
    from garagelm.formats.kquantize import _qkx2

    scale, neg_min = _qkx2(b, qw, nmax, -1.0, 0.1, 20)
    d, m = scale.unsqueeze(-1).to(torch.float16), (-neg_min).unsqueeze(-1).to(torch.float16)
    df = d.float()
    safe = torch.where(df == 0, torch.ones_like(df), df)
    q = torch.where(df == 0, torch.zeros_like(b), torch.round((b - m.float()) / safe).clamp(0, nmax))
    return d, m, q.to(torch.uint8)


def quantize(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """float weights (..., K), K a multiple of 32 -> uint8 (..., K / 32 * block bytes).

    importance (K,), per input column (an imatrix: mean squared activation), makes Q4_0, Q4_1,
    Q5_0 and Q5_1 choose each block's scale (and minimum) for the least error weighted by it,
    as llama.cpp does; Q8_0 rounds plainly (llama.cpp ignores an imatrix there too)."""
    if qtype not in _QUANTIZERS:
        raise ValueError(f"unknown quantization type {qtype!r} (one of {', '.join(TYPES)})")
    if w.shape[-1] % QK:
        raise ValueError(f"rows of {w.shape[-1]} values are not whole {QK}-value blocks")
    if importance is not None and qtype in ("Q4_0", "Q5_0"):
        from garagelm.formats.kquantize import _row_weights

        x = w.detach().float().reshape(-1, w.shape[-1])
        qw = _row_weights(x, importance).reshape(-1, QK)
        d, q = _weighted_symmetric(x.reshape(-1, QK), qw, 8 if qtype == "Q4_0" else 16)
        parts = [_f16_bytes(d)] + ([_high_bits(q)] if qtype == "Q5_0" else []) + [_pack_nibbles(q)]
        return torch.cat(parts, -1).reshape(*w.shape[:-1], w.shape[-1] // QK * BLOCK_BYTES[qtype])
    if importance is not None and qtype in ("Q4_1", "Q5_1"):
        from garagelm.formats.kquantize import _row_weights

        x = w.detach().float().reshape(-1, w.shape[-1])
        qw = _row_weights(x, importance).reshape(-1, QK)
        d, m, q = _weighted_affine(x.reshape(-1, QK), qw, 15 if qtype == "Q4_1" else 31)
        parts = [d.view(torch.uint8), m.view(torch.uint8)] + ([_high_bits(q)] if qtype == "Q5_1" else [])
        return torch.cat([*parts, _pack_nibbles(q)], -1).reshape(
            *w.shape[:-1], w.shape[-1] // QK * BLOCK_BYTES[qtype]
        )
    blocks = w.detach().to(torch.float32).reshape(-1, QK)
    out = torch.cat(
        [_QUANTIZERS[qtype](blocks[i : i + CHUNK_BLOCKS]) for i in range(0, len(blocks), CHUNK_BLOCKS)]
    )
    return out.reshape(*w.shape[:-1], w.shape[-1] // QK * BLOCK_BYTES[qtype])
