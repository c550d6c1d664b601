"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style) with Hugging Face parameter names.

Config comes from the checkpoint's own metadata. The same module is used to serve (with a KV
cache) and to train (no cache, full causal attention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from garagelm.models.base import (
    CAUSAL,
    CausalLM,
    Embedding,
    Linear,
    RMSNorm,
    RopeConfig,
    RotaryEmbedding,
    apply_rope,
    attention,
    causal_mask,
    gguf_key,
    gguf_shape,
    hf_shape,
    llama3_freq_factors,
)
from garagelm.quant import rows
from garagelm.quant.ggml_linear import GGMLLinear


class KVCacheLike(Protocol):
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def query(self, q: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_dim: int | None = None
    rope_linear_factor: float = 1.0
    rope_freq_factors: tuple[float, ...] | None = None  # Llama 3.1 scaling: divisors per pair
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_bias: bool = False  # Qwen2: biases on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on each query and key head

    @classmethod
    def from_hf(cls, c: dict[str, Any]) -> LlamaConfig:
        """From a Hugging Face config.json (llama, mistral, qwen2, qwen3)."""
        rope = c.get("rope_parameters") or {}
        theta = float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        scaling = c.get("rope_scaling") or rope
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"RoPE scaling {kind!r} is not supported yet (supported: linear, llama3)")
        shape = hf_shape(c)
        factors = llama3_freq_factors(theta, shape["head_dim"], scaling) if kind == "llama3" else None
        window = c.get("sliding_window")
        if c.get("model_type") in ("qwen2", "qwen3") and not c.get("use_sliding_window"):
            window = None  # Qwen configs name a window they do not use
        return cls(
            **shape,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_linear_factor=float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0,
            rope_freq_factors=tuple(factors) if factors else None,
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None,
            attention_bias=bool(c.get("attention_bias", c.get("model_type") == "qwen2")),
            qk_norm=c.get("model_type") == "qwen3",
        )

    @classmethod
    def from_gguf(cls, md: dict[str, Any], arch: str, vocab_size: int, tied: bool) -> LlamaConfig:
        shape = gguf_shape(md, arch, vocab_size, 1e-5)
        return cls(
            **shape,
            rope_theta=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_dim=int(md.get(f"{arch}.rope.dimension_count", shape["head_dim"])),
            max_position_embeddings=int(gguf_key(md, arch, "context_length", 4096)),
            tie_word_embeddings=tied,
            sliding_window=md.get(f"{arch}.attention.sliding_window"),
        )


class LlamaAttention(nn.Module):
    bf16_prefill = False  # set for quantized models: their prefill attention may run in bf16

    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.hd, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.o_proj = Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        # Serving may fuse q/k/v into one product (see models.fuse_projections).
        self.qkv_proj: nn.Module | None = None

    def forward(self, x, cos, sin, mask, cache: KVCacheLike | None, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv, self.hd
        if self.qk_norm:  # Qwen3: each head normalised before RoPE
            if self.qkv_proj is not None:
                q, k, v = self.qkv_proj(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = self.q_norm(q.view(B, T, H, hd)).transpose(1, 2)
            k = self.k_norm(k.view(B, T, Hkv, hd)).transpose(1, 2)
            v = v.view(B, T, Hkv, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        elif self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(B, T, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H+2Hkv, T, hd)
            qk = apply_rope(qkv[:, : H + Hkv], cos, sin)  # one rotation for q and k together
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]
        else:
            q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
            k = self.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
            v = self.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start)  # (B, Hkv, start + T, hd)
            q = cache.query(q)
        y = attention(q, k, v, mask, bf16_prefill=self.bf16_prefill)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # fused gate+up for serving
        self.inter = cfg.intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:  # serving: fused product, activation in C where it can
            # bf16 out of a bf16 prefill product, when the down product takes bf16 as it is
            gu = self.gate_up_proj(x, keep_bf16=isinstance(self.down_proj, GGMLLinear))
            h = rows.gated(gu, self.inter, gelu=False)
            if h is None:
                gate, up = gu.float().split(self.inter, dim=-1)
                h = nn.functional.silu(gate) * up
            return self.down_proj(h)
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """Token ids in, next-token logits out."""

    whole_layer_decode = True  # the C decode step (quant/decode.py) implements this block

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        factors = cfg.rope_freq_factors
        self.rope = RotaryEmbedding(
            RopeConfig(cfg.rope_dim or cfg.head_dim, cfg.rope_theta, cfg.rope_linear_factor),
            min(cfg.max_position_embeddings, 4096),
            torch.tensor(factors, dtype=torch.float32, device="cpu") if factors else None,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCacheLike | None = None,
        start: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T) at positions start..start+T-1 -> logits (B, T, vocab).

        With a cache, keys/values of earlier positions come from it. last_only computes the
        head for the final position only (generation needs nothing else).
        """
        B, T = input_ids.shape
        positions = torch.arange(start, start + T).unsqueeze(0).expand(B, T)
        if T == 1 and B == 1 and self.planned(1, [cache]):
            return self.decode_batch([int(input_ids[0, 0])], [cache], [start]).view(1, 1, -1)
        cos, sin = self.rope(positions)
        window = self.config.sliding_window
        if window is None and T == 1:
            mask = None
        elif window is None and start == 0:
            mask = CAUSAL
        else:
            mask = causal_mask(positions, start + T, window)
        x = self.embed(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, cache, start)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)


def unpermute_qk(raw: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time row permutation of Q/K (interleaved -> rotate-half RoPE).

    Works on rows of any element type (float or quantized bytes): whole rows move.
    """
    rows = raw.shape[0]
    return raw.reshape(n_heads, rows // n_heads // 2, 2, -1).transpose(1, 2).reshape(rows, -1)
