"""Write GGUF files (through gguf-py's writer): a model's float weights and metadata, in the
layout llama.cpp expects, so that llama.cpp, LM Studio and Ollama run what garagelm makes.

The model side speaks Hugging Face names and conventions; GGUF differs in three ways handled
here: tensor names (formats.names), llama's Q/K rows permuted for its interleaved RoPE, and
Gemma's norms stored with the 1 added.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from garagelm.formats.names import hf_to_gguf


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's convert-time Q/K row permutation (rotate-half -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_layout(name: str, t: torch.Tensor, arch: str, cfg) -> torch.Tensor:
    """A float tensor under its Hugging Face name, as GGUF stores it: llama's Q/K rows permuted
    for its interleaved RoPE, Gemma's norm weights with the 1 added."""
    if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        return permute_qk(t, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
    offset = getattr(cfg, "norm_offset", 0.0)
    if offset and name.endswith("norm.weight"):
        return t + offset
    return t


def extra_tensors(cfg) -> dict[str, torch.Tensor]:
    """Tensors GGUF has and a Hugging Face checkpoint does not: Llama 3.1's RoPE scaling, which
    config.json describes and llama.cpp reads as per-pair divisors (`rope_freqs.weight`)."""
    factors = getattr(cfg, "rope_freq_factors", None)
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)} if factors else {}


def model_metadata(arch: str, cfg) -> dict[str, Any]:
    """The `{arch}.*` keys llama.cpp reads, from one of our config objects."""
    md: dict[str, Any] = {
        f"{arch}.context_length": int(cfg.max_position_embeddings),
        f"{arch}.embedding_length": int(cfg.hidden_size),
        f"{arch}.block_count": int(cfg.num_hidden_layers),
        f"{arch}.feed_forward_length": int(cfg.intermediate_size),
        f"{arch}.attention.head_count": int(cfg.num_attention_heads),
        f"{arch}.attention.head_count_kv": int(cfg.num_key_value_heads),
        f"{arch}.attention.key_length": int(cfg.head_dim),
        f"{arch}.attention.value_length": int(cfg.head_dim),
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
        f"{arch}.rope.freq_base": float(cfg.rope_theta),
    }
    if arch != "gemma3":
        md[f"{arch}.rope.dimension_count"] = int(cfg.rope_dim or cfg.head_dim)
    if getattr(cfg, "sliding_window", None):
        md[f"{arch}.attention.sliding_window"] = int(cfg.sliding_window)
    if cfg.rope_linear_factor != 1.0:
        md[f"{arch}.rope.scaling.type"] = "linear"
        md[f"{arch}.rope.scaling.factor"] = float(cfg.rope_linear_factor)
    return md


def write_gguf(
    path: str | Path,
    arch: str,
    cfg,
    state: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `state` (Hugging Face names) as a GGUF of float tensors; `extra` adds metadata such
    as the tokenizer.* keys. Written to a temporary name, then renamed into place."""
    import gguf

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch=arch)
    w.add_uint32("general.file_type", 1 if dtype == torch.float16 else 0)
    for key, value in {**model_metadata(arch, cfg), **(extra or {})}.items():
        add_value(w, key, value)
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = gguf_layout(name, t.detach().float(), arch, cfg)
        # 1-D tensors (norms, biases) stay float32, as llama.cpp's converter keeps them
        out = t.to(dtype) if t.dim() > 1 else t
        w.add_tensor(hf_to_gguf(name, arch), out.numpy())
    for name, t in extra_tensors(cfg).items():
        w.add_tensor(name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def add_value(w, key: str, v: Any) -> None:
    """One metadata value, typed as GGUF wants it."""
    if isinstance(v, str):
        w.add_string(key, v)
    elif isinstance(v, bool):
        w.add_bool(key, v)
    elif isinstance(v, int):
        w.add_uint32(key, v) if v >= 0 else w.add_int32(key, v)
    elif isinstance(v, float):
        w.add_float32(key, v)
    elif isinstance(v, np.ndarray):
        w.add_array(key, v.tolist())
    else:
        w.add_array(key, list(v))
