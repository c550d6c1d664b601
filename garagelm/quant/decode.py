"""Whole-layer decode steps in C for llama-family models (one token per sequence), quantized
(GGMLLinear) or float32 (DenseLinear).

Decode otherwise spends more time in the dozens of tiny torch ops around each layer's products
than in the products themselves. A plan binds each layer's packed weights and norm weights once;
a step then runs every layer with one call each. Models that do not fit the kernel (other
architectures, unpacked types, biases other than Qwen2's on q/k/v, partial RoPE) simply have
no plan; sliding windows and
Gemma 3's extra norms are options of the layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from garagelm.quant import cpu
from garagelm.quant.dense import DenseLinear
from garagelm.quant.ggml_linear import MAX_KERNEL_ROWS, GGMLLinear, int8_activations

AVAILABLE = cpu.kernels is not None


class DecodePlan:
    """Per-layer C handles for one model. A plan owns scratch buffers, so one thread at a time
    steps a model through it; one step can carry up to MAX_ROWS sequences (the server's batch)."""

    max_rows = MAX_KERNEL_ROWS  # sequences one step can carry

    def __init__(self, layers: list, keep_alive: list, rope_of_layer: list[int]):
        self._layers = tuple(layers)  # capsules, one per layer (decode_layers takes a tuple)
        self._keep = keep_alive  # tensors whose memory the C side points into
        self._rope = rope_of_layer  # per layer: which RoPE table of step()'s `tables` it uses

    @classmethod
    def build(cls, model: nn.Module) -> DecodePlan | None:
        """A plan for a llama-family or Gemma 3 model whose products all run in the kernels."""
        cfg = getattr(model, "config", None)
        if not AVAILABLE or cfg is None or not getattr(model, "whole_layer_decode", False):
            return None
        if (getattr(cfg, "rope_dim", None) or cfg.head_dim) != cfg.head_dim:
            return None  # partial RoPE
        layers, keep, ropes = [], [], []

        def weights(norm) -> int:
            if norm is None:
                return 0
            w = (norm.weight.detach().float() + norm.offset).contiguous()  # Gemma's HF norms: w + 1
            keep.append(w)
            return w.data_ptr()

        def prods(group):
            return tuple((p._kind, p.out_features, *p._pointers()) for p in group)

        gemma = hasattr(model.model.layers[0], "pre_feedforward_layernorm")
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = [attn.qkv_proj] if attn.qkv_proj is not None else [attn.q_proj, attn.k_proj, attn.v_proj]
            gate_up = [mlp.gate_up_proj] if mlp.gate_up_proj is not None else [mlp.gate_proj, mlp.up_proj]
            parts = [*qkv, attn.o_proj, *gate_up, mlp.down_proj]
            if not all(isinstance(p, (GGMLLinear, DenseLinear)) and p._kind is not None for p in parts):
                return None
            if any(p.bias is not None for p in parts[len(qkv) :]):
                return None  # only q/k/v biases (Qwen2) have a place in the kernel
            b_qkv = qkv_bias(qkv)
            if b_qkv is not None:
                keep.append(b_qkv)
            if gemma:
                norms = (layer.input_layernorm, layer.pre_feedforward_layernorm, attn.q_norm, attn.k_norm,
                         layer.post_attention_layernorm, layer.post_feedforward_layernorm)  # fmt: skip
                window, scale = attn.window or 0, attn.scale
                ropes.append(1 if layer.sliding else 0)
            else:
                qn, kn = (attn.q_norm, attn.k_norm) if attn.qk_norm else (None, None)  # Qwen3
                norms = (layer.input_layernorm, layer.post_attention_layernorm, qn, kn, None, None)
                window, scale = cfg.sliding_window or 0, 1.0 / math.sqrt(cfg.head_dim)
                ropes.append(0)
            w_in, w_post, w_qn, w_kn, w_pa, w_pf = (weights(n) for n in norms)
            try:
                layers.append(
                    cpu.kernels.make_layer(
                        cfg.hidden_size,
                        cfg.num_attention_heads,
                        cfg.num_key_value_heads,
                        cfg.head_dim,
                        cfg.intermediate_size,
                        cfg.rms_norm_eps,
                        scale,
                        w_in,
                        w_post,
                        prods(qkv),
                        prods([attn.o_proj]),
                        prods(gate_up),
                        prods([mlp.down_proj]),
                        w_qn,
                        w_kn,
                        w_pa,
                        w_pf,
                        int(gemma),
                        int(window),
                        0 if b_qkv is None else b_qkv.data_ptr(),
                    )
                )
            except ValueError:
                return None
        return cls(layers, keep, ropes)

    def step(self, x: torch.Tensor, caches: list, positions: list[int], tables: list) -> None:
        """Run every layer on x (M, hidden) float32 in place, one token for each of M sequences
        (M <= MAX_ROWS); caches[r] (batch 1, f16 or q8_0) gains position positions[r]. tables holds
        (cos, sin_signed), each (M, head_dim), per RoPE the model uses (Gemma: global, local)."""
        M = len(caches)
        for cache, pos in zip(caches, positions):
            cache.reserve(pos + 1)

        def scales(c, name: str) -> int:
            return getattr(c, name).data_ptr() if c.quantized else 0  # 0: an f16 cache

        table = torch.tensor(
            [[c.k.data_ptr() for c in caches], [c.v.data_ptr() for c in caches],
             [c.capacity for c in caches], positions,
             [scales(c, "k_scales") for c in caches], [scales(c, "v_scales") for c in caches]],
            dtype=torch.int64,
        )  # fmt: skip
        ptrs = [(cos.data_ptr(), sin.data_ptr()) for cos, sin in tables]
        ropes = tuple(ptrs[r] for r in self._rope)
        # every layer in one call: the GIL is let go once a step (a server's event loop would
        # otherwise hold each layer's return up)
        cpu.kernels.decode_layers(
            self._layers, x.data_ptr(), M, table.data_ptr(), ropes, not int8_activations()
        )


def qkv_bias(parts: list) -> torch.Tensor | None:
    """The q/k/v products' biases as one float32 vector in their output order (zeros for a part
    without one), or None when none has a bias."""
    if all(p.bias is None for p in parts):
        return None
    return torch.cat(
        [
            torch.zeros(p.out_features) if p.bias is None else p.bias.detach().float().reshape(-1)
            for p in parts
        ]
    ).contiguous()
