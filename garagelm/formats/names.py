"""Tensor names: GGUF <-> Hugging Face (our modules use Hugging Face's names), both ways.

One table per architecture family; an unknown name raises instead of being dropped, so a
checkpoint never loads half-silently.
"""

from __future__ import annotations

import re

# GGUF per-block suffix -> Hugging Face per-layer suffix ("{i}" is the block index).
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GEMMA3_BLOCK = {
    **_LLAMA_BLOCK,
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
BLOCK_TABLES: dict[str, dict[str, str]] = {
    "llama": _LLAMA_BLOCK,
    "qwen2": _LLAMA_BLOCK,
    "qwen3": _LLAMA_BLOCK,
    "gemma3": _GEMMA3_BLOCK,
}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def gguf_to_hf(name: str, arch: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    table = BLOCK_TABLES.get(arch, _LLAMA_BLOCK)
    if m := _BLOCK_RE.match(name):
        i, part, kind = m.groups()
        if part in table:
            return f"model.layers.{i}.{table[part]}.{kind}"
    elif (m := _GLOBAL_RE.match(name)) and m.group(1) in _GLOBAL:
        return f"{_GLOBAL[m.group(1)]}.{m.group(2)}"
    raise KeyError(f"unknown GGUF tensor name {name!r} for architecture {arch!r}")


def hf_to_gguf(name: str, arch: str) -> str:
    """The inverse of gguf_to_hf."""
    table = BLOCK_TABLES.get(arch, _LLAMA_BLOCK)
    if m := re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name):
        i, part, kind = m.groups()
        for g, h in table.items():
            if h == part:
                return f"blk.{i}.{g}.{kind}"
    else:
        for g, h in _GLOBAL.items():
            if name == f"{h}.weight" or name == f"{h}.bias":
                return f"{g}.{name.rsplit('.', 1)[1]}"
    raise KeyError(f"unknown Hugging Face tensor name {name!r} for architecture {arch!r}")
