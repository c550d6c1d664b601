"""Whole-layer decode steps in C for quantized llama-family models (one token, batch 1).

Decode otherwise spends more time in the dozens of tiny torch ops around each layer's products
than in the products themselves. A plan binds each layer's packed weights and norm weights once;
a step then runs every layer with one call each. Models that do not fit the kernel (other
architectures, unpacked types, partial RoPE, sliding windows) simply have no plan.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from garagelm.quant.ggml_linear import GGMLLinear, _kernels

AVAILABLE = _kernels is not None and hasattr(_kernels, "decode_layer")


class DecodePlan:
    """Per-layer C handles for one model. A plan owns scratch buffers, so one model decodes one
    sequence at a time through it (the server's batching must serialise steps per model)."""

    def __init__(self, layers: list, keep_alive: list):
        self._layers = layers
        self._keep = keep_alive  # tensors whose memory the C side points into

    @classmethod
    def build(cls, model: nn.Module) -> DecodePlan | None:
        cfg = getattr(model, "config", None)
        if not AVAILABLE or cfg is None or cfg.sliding_window:
            return None
        if (cfg.rope_dim or cfg.head_dim) != cfg.head_dim:
            return None
        layers, keep = [], []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
            gate_up = [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
            parts = [*qkv, attn.o_proj, *gate_up, mlp.down_proj]
            if not all(isinstance(p, GGMLLinear) and p._kind is not None and p.bias is None for p in parts):
                return None
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            if any(n.offset != 0.0 for n in norms):
                return None
            w_in, w_post = (n.weight.detach().float().contiguous() for n in norms)
            keep += [w_in, w_post]

            def prods(group):
                return tuple((p._kind, p.out_features, *p._pointers()) for p in group)

            try:
                layers.append(
                    _kernels.make_layer(
                        cfg.hidden_size,
                        cfg.num_attention_heads,
                        cfg.num_key_value_heads,
                        cfg.head_dim,
                        cfg.intermediate_size,
                        cfg.rms_norm_eps,
                        1.0 / math.sqrt(cfg.head_dim),
                        w_in.data_ptr(),
                        w_post.data_ptr(),
                        prods(qkv),
                        prods([attn.o_proj]),
                        prods(gate_up),
                        prods([mlp.down_proj]),
                    )
                )
            except ValueError:
                return None
        return cls(layers, keep)

    def step(self, x: torch.Tensor, cache, pos: int, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
        """Run every layer on x (1, 1, hidden) float32 in place; the cache gains position `pos`."""
        cache.reserve(pos + 1)
        xp, cp, sp = x.data_ptr(), cos.data_ptr(), sin_signed.data_ptr()
        for i, layer in enumerate(self._layers):
            k, v = cache.layer(i)  # (1, Hkv, capacity, hd) float16
            _kernels.decode_layer(layer, xp, k.data_ptr(), v.data_ptr(), k.stride(1), pos, cp, sp)
