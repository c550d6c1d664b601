"""Gemma 3 text decoder with Hugging Face parameter names.

What sets it apart from llama: embeddings scaled by sqrt(hidden); four RMSNorms per block
(before and after attention, before and after the MLP); RMSNorm on each query and key head
(QK-norm); GELU (tanh) gating; sliding-window layers (local RoPE base 10000) interleaved with
global ones (every `sliding_window_pattern`-th layer, its own RoPE base and scaling); attention
scaled by query_pre_attn_scalar^-1/2; optional final logit soft-capping. Hugging Face stores the
norms as weight - 1 (norm_offset 1); llama.cpp's GGUF stores them with the 1 added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
)
from garagelm.quant import rows
from garagelm.quant.ggml_linear import GGMLLinear


@dataclass
class Gemma3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding-window layers
    rope_linear_factor: float = 1.0  # global layers only
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    query_pre_attn_scalar: float | None = None  # None: head_dim
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    norm_offset: float = 0.0
    final_logit_softcapping: float | None = None
    layer_types: list[str] | None = None  # "sliding_attention" / "full_attention" per layer

    def is_sliding(self, layer: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[layer] == "sliding_attention"
        return (layer + 1) % self.sliding_window_pattern != 0

    @classmethod
    def from_hf(cls, c: dict[str, Any]) -> Gemma3Config:
        """From a Hugging Face config.json (gemma3_text, or the text part of gemma3)."""
        c = c.get("text_config", c)
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        full = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
        local = rope.get("sliding_attention", {}) if isinstance(rope, dict) else {}
        kind = full.get("rope_type") or full.get("type") or "default"
        if kind not in ("default", "linear"):
            raise ValueError(f"RoPE scaling {kind!r} is not supported for Hugging Face folders yet")
        return cls(
            **hf_shape(c),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(c.get("rope_theta") or full.get("rope_theta") or 1_000_000.0),
            rope_local_base_freq=float(c.get("rope_local_base_freq") or local.get("rope_theta") or 10_000.0),
            rope_linear_factor=float(full.get("factor", 1.0)) if kind == "linear" else 1.0,
            sliding_window=int(c.get("sliding_window") or 512),
            sliding_window_pattern=int(c.get("sliding_window_pattern") or 6),
            query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or c.get("head_dim") or 256),
            max_position_embeddings=int(c.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
            norm_offset=1.0,  # Hugging Face keeps Gemma's norms as weight - 1
            final_logit_softcapping=c.get("final_logit_softcapping"),
            layer_types=c.get("layer_types"),
        )

    @classmethod
    def from_gguf(cls, md: dict[str, Any], arch: str, vocab_size: int, tied: bool) -> Gemma3Config:
        shape = gguf_shape(md, arch, vocab_size, 1e-6)
        shape["vocab_size"] = vocab_size
        # llama.cpp scales by 1/sqrt(hidden / heads) for the 27B model only (its
        # query_pre_attn_scalar); every other size uses the head dimension.
        big = shape["num_hidden_layers"] == 62
        scalar = shape["hidden_size"] / shape["num_attention_heads"] if big else shape["head_dim"]
        return cls(
            **shape,
            rope_theta=float(md.get(f"{arch}.rope.freq_base", 1_000_000.0)),
            sliding_window=int(gguf_key(md, arch, "attention.sliding_window", 512)),
            query_pre_attn_scalar=scalar,
            max_position_embeddings=int(gguf_key(md, arch, "context_length", 32768)),
            tie_word_embeddings=tied,
            final_logit_softcapping=md.get(f"{arch}.final_logit_softcapping"),
        )


class Gemma3Attention(nn.Module):
    bf16_prefill = False  # set for quantized models: their prefill attention may run in bf16

    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.hd, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, cfg.norm_offset)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, cfg.norm_offset)
        self.qkv_proj: nn.Module | None = None  # fused q/k/v for serving (models.fuse_projections)

    def forward(self, x, cos, sin, mask, cache, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv, self.hd
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(B, T, H, hd)).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(k.view(B, T, Hkv, hd)).transpose(1, 2)
        v = v.view(B, T, Hkv, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start)
            q = cache.query(q)
        if T == 1 and self.window is not None and k.shape[2] > self.window:
            # one query: its window is exactly the last `window` keys, no mask needed
            k, v = k[:, :, -self.window :], v[:, :, -self.window :]
        y = attention(q, k, v, mask, scale=self.scale, bf16_prefill=self.bf16_prefill)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None
        self.inter = cfg.intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:  # serving: fused product, activation in C where it can
            # bf16 out of a bf16 prefill product, when the down product takes bf16 as it is
            gu = self.gate_up_proj(x, keep_bf16=isinstance(self.down_proj, GGMLLinear))
            h = rows.gated(gu, self.inter, gelu=True)
            if h is not None:
                return self.down_proj(h)
            gate, up = gu.float().split(self.inter, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(nn.functional.gelu(gate, approximate="tanh") * up)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer: int):
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        self.sliding = cfg.is_sliding(layer)
        self.self_attn = Gemma3Attention(cfg, layer)
        self.mlp = Gemma3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)

    def forward(self, x, cos, sin, mask, cache, start):
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start)
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Model(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class Gemma3ForCausalLM(CausalLM):
    whole_layer_decode = True  # the C decode step (quant/decode.py) implements this block too

    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        self.config = cfg
        self.model = Gemma3Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        hint = min(cfg.max_position_embeddings, 4096)
        self.rope_local = RotaryEmbedding(RopeConfig(cfg.head_dim, cfg.rope_local_base_freq), hint)
        self.rope = RotaryEmbedding(RopeConfig(cfg.head_dim, cfg.rope_theta, cfg.rope_linear_factor), hint)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids).float() * math.sqrt(self.config.hidden_size)

    def ropes(self) -> list:
        return [self.rope, self.rope_local]  # the decode plan's table 0 (global) and 1 (sliding)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(x)).float()
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    def forward(
        self, input_ids: torch.Tensor, cache=None, start: int = 0, last_only: bool = False
    ) -> torch.Tensor:
        """input_ids (B, T) at positions start..start+T-1 -> logits (B, T, vocab)."""
        B, T = input_ids.shape
        if T == 1 and B == 1 and self.planned(1, [cache]):
            return self.decode_batch([int(input_ids[0, 0])], [cache], [start]).view(1, 1, -1)
        cfg = self.config
        positions = torch.arange(start, start + T).unsqueeze(0).expand(B, T)
        ropes = {False: self.rope(positions), True: self.rope_local(positions)}
        end = start + T
        masks = {}
        for sliding in (False, True):
            window = cfg.sliding_window if sliding else None
            if T == 1:
                masks[sliding] = None  # the attention slices the window itself
            elif start == 0 and (window is None or end <= window):
                masks[sliding] = CAUSAL
            else:
                masks[sliding] = causal_mask(positions, end, window)
        x = self.embed(input_ids)
        for layer in self.model.layers:
            cos, sin = ropes[layer.sliding]
            x = layer(x, cos, sin, masks[layer.sliding], cache, start)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)
