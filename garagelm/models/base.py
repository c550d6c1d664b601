"""Pieces every architecture shares: RMSNorm, rotary embeddings, the attention helper."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from garagelm.quant import rows
from garagelm.quant.attention import decode_attention
from garagelm.quant.ggml_linear import use_bf16


class Linear(nn.Linear):
    """nn.Linear that skips random initialisation on the meta device: checkpoint weights replace
    it anyway, and torch's meta init pulls in ~1 s of imports on first use."""

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            super().reset_parameters()


class Embedding(nn.Embedding):
    """nn.Embedding with the same meta-device shortcut as Linear."""

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            super().reset_parameters()


def gguf_key(md: dict, arch: str, name: str, default=None):
    """`{arch}.{name}` from GGUF metadata; KeyError naming it when absent and no default."""
    v = md.get(f"{arch}.{name}", default)
    if v is None:
        raise KeyError(f"GGUF metadata {arch}.{name} is missing")
    return v


def gguf_shape(md: dict, arch: str, vocab_size: int, default_eps: float) -> dict:
    """The decoder dimensions (and linear RoPE scaling) every llama.cpp architecture states alike."""
    n_head = int(gguf_key(md, arch, "attention.head_count"))
    hidden = int(gguf_key(md, arch, "embedding_length"))
    linear = md.get(f"{arch}.rope.scaling.type") == "linear"
    return dict(
        vocab_size=int(md.get(f"{arch}.vocab_size", vocab_size)),
        hidden_size=hidden,
        intermediate_size=int(gguf_key(md, arch, "feed_forward_length")),
        num_hidden_layers=int(gguf_key(md, arch, "block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(md.get(f"{arch}.attention.head_count_kv", n_head)),
        head_dim=int(md.get(f"{arch}.attention.key_length", hidden // n_head)),
        rms_norm_eps=float(gguf_key(md, arch, "attention.layer_norm_rms_epsilon", default_eps)),
        rope_linear_factor=float(md.get(f"{arch}.rope.scaling.factor", 1.0)) if linear else 1.0,
    )


def hf_shape(c: dict) -> dict:
    """The decoder dimensions every Hugging Face config.json states the same way."""
    n_head = int(c["num_attention_heads"])
    return dict(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_hidden_layers=int(c["num_hidden_layers"]),
        num_attention_heads=n_head,
        num_key_value_heads=int(c.get("num_key_value_heads") or n_head),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // n_head),
    )


class CausalLM(nn.Module):
    """What every decoder offers the runtime besides forward(input_ids, cache, start, last_only).

    A model built with quantized weights may carry a `decode_plan` (quant/decode.py): its
    single-token steps then run each layer as one C call, for up to 8 sequences at once.
    Subclasses say how to embed (`embed`), which RoPE tables their layers use (`ropes`), and
    how hidden states become logits (`logits`).
    """

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids).float()  # a 16-bit table widens its rows

    def ropes(self) -> list:
        return [self.rope]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x)).float()

    def planned(self, batch: int, caches: list) -> bool:
        plan = self.__dict__.get("decode_plan")
        return (
            plan is not None
            and batch <= plan.max_rows
            and all(c is not None and c.kernel_ready for c in caches)
        )

    def decode_batch(
        self, ids: list[int], caches: list, positions: list[int], rows_out: list[int] | None = None
    ) -> torch.Tensor:
        """One new token for each of several sequences, each with its own cache: logits (M, vocab),
        or of the rows listed in rows_out only. Rows may also be consecutive positions of one
        sequence (its cache repeated, in order): every row's keys and values are stored before
        any row attends, and a row attends only up to its own position.

        With a decode plan the M rows share one step, so each weight is read once for all of them
        (the server's continuous batching); otherwise they run one after another.
        """
        M = len(ids)
        if self.planned(M, caches):
            pos = torch.tensor(positions).unsqueeze(1)  # (M, 1)
            tables = []
            for rope in self.ropes():
                cos, sin = rope(pos)  # (M, 1, 1, head_dim)
                tables.append((cos.reshape(M, -1).contiguous(), sin.reshape(M, -1).contiguous()))
            x = self.embed(torch.tensor(ids).unsqueeze(1)).reshape(M, -1).contiguous()
            self.decode_plan.step(x, caches, positions, tables)
            if rows_out == []:  # rows of a prompt that goes on in the next step: no logits yet
                return torch.empty(0, self.config.vocab_size)
            return self.logits(x if rows_out is None else x[rows_out])
        rows = [
            self(torch.tensor([[t]]), cache=c, start=p, last_only=True)[0, -1]
            for t, c, p in zip(ids, caches, positions)
        ]
        if rows_out is not None:
            rows = [rows[i] for i in rows_out]
        return torch.stack(rows) if rows else torch.empty(0, self.config.vocab_size)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset  # Gemma stores weight - 1
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.offset == 0.0 else self.weight + self.offset
        if x.dtype == torch.float32 and x.numel() >= 8192:  # many rows: one C pass (quant/rows.py)
            out = rows.rmsnorm(x, w, self.eps)
            if out is not None:
                return out
        # Plain ops: on CPU they beat F.rms_norm (~12 vs ~30 us per decode step).
        xf = x.float()
        ms = (xf * xf).sum(-1, keepdim=True).mul_(1.0 / xf.shape[-1]).add_(self.eps)
        y = xf * ms.rsqrt_() * w.float()
        return y if x.dtype == torch.float32 else y.to(x.dtype)


@dataclass
class RopeConfig:
    dim: int  # rotated dimensions per head
    base: float = 10000.0
    linear_factor: float = 1.0  # positions are divided by this ("linear" scaling)


def llama3_freq_factors(base: float, dim: int, scaling: dict[str, Any]) -> list[float]:
    """Llama 3.1's RoPE scaling as per-pair divisors of the angle (what llama.cpp stores as the
    `rope_freqs` tensor): long wavelengths slowed by `factor`, short ones kept, and a smooth
    blend between the two thresholds set by the original context length."""
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE, angles computed the way ggml does.

    ggml multiplies the angle by base^(-2/d) once per pair in float32, so the table is built the
    same way; it keeps our logits close to llama.cpp's at long positions.
    """

    def __init__(self, cfg: RopeConfig, max_positions: int, freq_factors: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.freq_factors = freq_factors
        self._hint = max(max_positions, 1)
        self._max = 0  # built on first use, so a model made on the meta device gets real tables
        self.cos = self.sin = torch.empty(0)

    def _build(self, n: int) -> None:
        half = self.cfg.dim // 2
        scale = torch.tensor(self.cfg.base ** (-2.0 / self.cfg.dim), dtype=torch.float32)
        theta = torch.arange(n, dtype=torch.float32) / self.cfg.linear_factor  # (n,)
        cols = []
        for _ in range(half):
            cols.append(theta)
            theta = theta * scale
        ang = torch.stack(cols, dim=-1)  # (n, half)
        if self.freq_factors is not None:
            ang = ang / self.freq_factors.float()
        ang = torch.cat([ang, ang], dim=-1)  # (n, dim)
        self.cos, self.sin = ang.cos(), ang.sin()
        # sin with its first half negated: rotate_half(x) * sin == roll(x, dim/2) * sin_signed
        self.sin_signed = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)
        self._max = n

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin_signed (B, 1, T, dim); see apply_rope."""
        need = int(positions.max()) + 1
        if need > self._max:
            self._build(max(need, 2 * self._max, self._hint))
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x (B, H, T, hd); the first cos.shape[-1] dims of each head rotate.

    x * cos + rotate_half(x) * sin, written as x * cos + roll(x) * sin_signed (sin with its
    first half negated): the same products, in three ops instead of seven.
    """
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return torch.addcmul(x * cos.to(x.dtype), torch.roll(x, d // 2, -1), sin_signed.to(x.dtype))
    rot, rest = x[..., :d], x[..., d:]
    out = torch.addcmul(rot * cos.to(x.dtype), torch.roll(rot, d // 2, -1), sin_signed.to(x.dtype))
    return torch.cat([out, rest], dim=-1)


CAUSAL = "causal"  # mask value: plain causal attention over exactly the query positions (T == S)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | str | None,
    scale: float | None = None,
    bf16_prefill: bool = False,
) -> torch.Tensor:
    """q (B, H, T, hd), k/v (B, Hkv, S, hd), mask (B or 1, 1, T, S) bool (True = attend) or CAUSAL.

    bf16_prefill: a quantized model's layer, whose prefill may run in bf16 (see
    quant.ggml_linear.use_bf16: many query rows, a CPU with bf16 dot products, not exact mode)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if k.dtype == torch.float16 and mask is None and q.shape[2] == 1:
        out = decode_attention(q, k, v, scale)
        if out is not None:
            return out
    if bf16_prefill and q.dtype == torch.float32 and use_bf16(q.shape[2]):
        return attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, scale).float()
    if k.dtype != q.dtype:  # an f16 cache read by a float32 model
        k, v = k.to(q.dtype), v.to(q.dtype)
    gqa = q.shape[1] != k.shape[1]
    if isinstance(mask, str):  # CAUSAL: the fused causal kernel, ~3x faster than a mask tensor
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def causal_mask(q_pos: torch.Tensor, k_len: int, window: int | None = None) -> torch.Tensor:
    """q_pos (B, T) absolute positions -> (B, 1, T, k_len) bool; key j is visible to query p if j <= p."""
    k_pos = torch.arange(k_len, device=q_pos.device)
    visible = k_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)  # (B, T, S)
    if window is not None:
        visible &= k_pos.view(1, 1, -1) > q_pos.unsqueeze(-1) - window
    return visible.unsqueeze(1)
