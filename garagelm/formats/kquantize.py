"""K-quants: Q4_K, Q5_K and Q6_K blocks of 256 values, with llama.cpp's scale searches.

The algorithms are ggml's reference ones (make_qkx2_quants for the 4- and 5-bit types: a
weighted least-squares scale and minimum per 32 values, tried over a sweep of scales;
make_qx_quants for 6 bits: a symmetric scale per 16 values), run for all blocks at once in
torch. Sums are taken in another order than ggml's loops, so a value can round the other way
now and then; quality, not bytes, is what the tests compare with llama.cpp's quantizer.
"""

from __future__ import annotations

import torch

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
TYPES = tuple(BLOCK_BYTES)
CHUNK = 4096  # super-blocks per pass


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def _qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants for rows of x (n, 32) with weights w: (scale, -min, levels 0..nmax)."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True)
    span = hi - lo
    flat = span == 0
    span = torch.where(flat, torch.ones_like(span), span)
    sum_w, sum_x = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)
    iscale = nmax / span
    scale = 1 / iscale
    levels = torch.round(iscale * (x - lo)).clamp(0, nmax)  # (the caller re-derives the levels)
    best = (w * (scale * levels + lo - x) ** 2).sum(-1, keepdim=True)
    mn = lo.clone()
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + nmax) / span
        lv = torch.round(iscale * (x - lo)).clamp(0, nmax)
        sum_l, sum_l2, sum_xl = (
            (w * lv).sum(-1, keepdim=True),
            (w * lv * lv).sum(-1, keepdim=True),
            (w * lv * x).sum(-1, keepdim=True),
        )
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = torch.where(ok, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = this_min > 0
        this_scale = torch.where(
            pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), this_scale
        )
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        err = (w * (this_scale * lv + this_min - x) ** 2).sum(-1, keepdim=True)
        better = ok & (err < best)
        best, scale, mn = (
            torch.where(better, err, best),
            torch.where(better, this_scale, scale),
            torch.where(better, this_min, mn),
        )
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale.squeeze(-1), -mn.squeeze(-1)


def _scale_min_bytes(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins per super-block -> ggml's 12-byte layout."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    out = torch.zeros(ls.shape[0], 12, dtype=torch.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    return out


def _qkx_super(x: torch.Tensor, nmax: int, rmin: float, nstep: int, qw: torch.Tensor | None = None):
    """Q4_K / Q5_K shared part: (d, dmin, 12 scale bytes, levels (n, 256)). qw: per-value
    weights of the rounding error from an importance matrix, (n, 256)."""
    n = x.shape[0]
    sub = x.view(n * 8, 32)
    if qw is None:
        weights = (sub.pow(2).sum(-1, keepdim=True) / 32).sqrt() + sub.abs()  # ggml's default
    else:
        weights = qw.reshape(n * 8, 32)
    scales, mins = _qkx2(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    max_scale, max_min = scales.amax(-1, keepdim=True), mins.amax(-1, keepdim=True)
    inv_s = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
    ls = torch.round(inv_s * scales).clamp(max=63)
    lm = torch.round(inv_m * mins).clamp(max=63)
    d, dmin = _f16(max_scale / 63), _f16(max_min / 63)
    dd = (d.float() * ls).view(n * 8, 1)
    dm = (dmin.float() * lm).view(n * 8, 1)
    safe = torch.where(dd == 0, torch.ones_like(dd), dd)
    levels = torch.where(dd == 0, torch.zeros_like(sub), torch.round((sub + dm) / safe).clamp(0, nmax))
    return d, dmin, _scale_min_bytes(ls, lm), levels.view(n, QK_K).to(torch.uint8)


def _q4_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    d, dmin, sc, lv = _qkx_super(x, 15, -1.0, 20, qw)
    lv = lv.view(-1, 4, 2, 32)  # per 64 values: 32 low nibbles, then 32 high
    qs = (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), sc, qs], -1)


def _q5_k(x: torch.Tensor, qw: torch.Tensor | None = None) -> torch.Tensor:
    # ggml's reference searches 16 scales from rmin -0.5 here; the 4-bit search (21 from -1)
    # measured ~20% less squared error on SmolLM2's weights, below llama.cpp's own Q5_K
    d, dmin, sc, lv = _qkx_super(x, 31, -1.0, 20, qw)
    lv = lv.view(-1, 4, 2, 32)
    low = lv & 0x0F
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    hi = (lv >> 4).to(torch.int32)  # bit 4 of each value: pair p of 64 values sets bits 2p and 2p+1
    qh = sum((hi[:, p, 0] << (2 * p)) | (hi[:, p, 1] << (2 * p + 1)) for p in range(4)).to(torch.uint8)
    return torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), sc, qh, qs], -1)


def qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants for rows of x: a symmetric scale chosen by weighted least squares over a
    sweep, and the levels (-nmax..nmax-1) it was fitted with. Weights default to x^2 (ggml's
    rmse_type 1); an importance matrix supplies its own."""
    idx = x.abs().argmax(-1, keepdim=True)
    mx = torch.gather(x, 1, idx)
    zero = mx.abs() < 1e-15
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x if w is None else w

    def fit(iscale):
        lv = torch.round(iscale * x).clamp(-nmax, nmax - 1)
        return lv, (w * x * lv).sum(-1, keepdim=True), (w * lv * lv).sum(-1, keepdim=True)

    levels, sumlx, suml2 = fit(-nmax / mx)
    scale = torch.where(
        suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx)
    )
    best = scale * sumlx
    for i in [*range(-9, 0), *range(1, 10)]:
        lv, sumlx, suml2 = fit(-(nmax + 0.1 * i) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new = sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2))
        scale = torch.where(better, new, scale)
        best = torch.where(better, new * sumlx, best)
        levels = torch.where(better, lv, levels)
    scale = torch.where(zero, torch.zeros_like(scale), scale).squeeze(-1)
    return scale, torch.where(zero, torch.zeros_like(levels), levels)


def _q6_k(x: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    n = x.shape[0]
    sub = x.view(n * 16, 16)
    scales = qx_quants(sub, 32, None if importance is None else importance.view(n * 16, 16))[0].view(n, 16)
    idx = scales.abs().argmax(-1, keepdim=True)
    max_scale = torch.gather(scales, 1, idx)
    tiny = max_scale.abs() < 1e-15
    iscale = torch.where(
        tiny, torch.zeros_like(max_scale), -128 / torch.where(tiny, torch.ones_like(max_scale), max_scale)
    )
    d = _f16(
        torch.where(tiny, torch.zeros_like(max_scale), 1 / torch.where(tiny, torch.ones_like(iscale), iscale))
    )
    sc = torch.round(iscale * scales).clamp(-128, 127)
    dd = (d.float() * sc).view(n * 16, 1)
    safe = torch.where(dd == 0, torch.ones_like(dd), dd)
    lv = torch.where(dd == 0, torch.full_like(sub, 32), torch.round(sub / safe).clamp(-32, 31) + 32)
    lv = lv.view(n, 2, 4, 32).to(torch.uint8)  # halves of 128, quarters of 32
    ql = torch.cat(
        [lv[:, :, 0] & 0xF | ((lv[:, :, 2] & 0xF) << 4), lv[:, :, 1] & 0xF | ((lv[:, :, 3] & 0xF) << 4)], -1
    )
    qh = (
        (lv[:, :, 0] >> 4) | ((lv[:, :, 1] >> 4) << 2) | ((lv[:, :, 2] >> 4) << 4) | ((lv[:, :, 3] >> 4) << 6)
    )
    return torch.cat(
        [ql.reshape(n, 128), qh.reshape(n, 64), sc.to(torch.int8).view(torch.uint8), d.view(torch.uint8)], -1
    )


_QUANTIZERS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize_k(w: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """float weights (..., K), K a multiple of 256 -> uint8 (..., K / 256 * block bytes).

    importance (K,), per input column (an imatrix), weights the rounding error in every type's
    scale search, as llama.cpp's quantizers do with an imatrix."""
    if w.shape[-1] % QK_K:
        raise ValueError(f"rows of {w.shape[-1]} values are not whole {QK_K}-value blocks")
    blocks = w.detach().to(torch.float32).reshape(-1, QK_K)
    if importance is not None:
        qw = _row_weights(w.detach().float().reshape(-1, w.shape[-1]), importance).reshape(-1, QK_K)
        quant = _QUANTIZERS[qtype]
        parts = [quant(blocks[i : i + CHUNK], qw[i : i + CHUNK]) for i in range(0, len(blocks), CHUNK)]
        return torch.cat(parts).reshape(*w.shape[:-1], w.shape[-1] // QK_K * BLOCK_BYTES[qtype])
    parts = [_QUANTIZERS[qtype](blocks[i : i + CHUNK]) for i in range(0, len(blocks), CHUNK)]
    return torch.cat(parts).reshape(*w.shape[:-1], w.shape[-1] // QK_K * BLOCK_BYTES[qtype])


def _row_weights(w: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """llama.cpp's weighting with an imatrix: importance[col] * sqrt(sigma2 + x^2), sigma2 the
    mean square of the row."""
    sigma2 = w.pow(2).mean(-1, keepdim=True)
    return importance.float().view(1, -1) * (sigma2 + w * w).sqrt()
