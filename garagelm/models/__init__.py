"""Architectures by GGUF `general.architecture` name, and building one from a checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from garagelm.errors import GarageError
from garagelm.formats.ggml_quants import dequantize
from garagelm.formats.gguf import GGUFFile
from garagelm.formats.names import gguf_to_hf
from garagelm.models.llama import LlamaConfig, LlamaForCausalLM, unpermute_qk

SUPPORTED = ("llama",)


def from_gguf(gguf: GGUFFile, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the model a GGUF file describes, with its weights, without holding them twice."""
    arch = gguf.architecture
    if arch not in SUPPORTED:
        raise GarageError(
            f"{gguf.path}: architecture {arch!r} is not supported yet (supported: {', '.join(SUPPORTED)})"
        )
    tied = "output.weight" not in gguf.tensors
    vocab = gguf.tensors["token_embd.weight"].shape[0]
    try:
        cfg = LlamaConfig.from_gguf(gguf.metadata, arch, vocab, tied)
    except KeyError as e:
        raise GarageError(f"{gguf.path}: {e.args[0]}; the file is incomplete") from None
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    state = {}
    for name, t in gguf.tensors.items():
        if name == "rope_freqs.weight":
            continue  # llama3-style frequency factors, handled below
        try:
            hf = gguf_to_hf(name, arch)
        except KeyError as e:
            raise GarageError(f"{gguf.path}: {e.args[0]}") from None
        raw = t.raw_bytes()
        if name.endswith("attn_q.weight"):
            raw = unpermute_qk(raw, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            raw = unpermute_qk(raw, cfg.num_key_value_heads)
        state[hf] = dequantize(raw, t.qtype, t.shape).to(dtype)
    if "rope_freqs.weight" in gguf.tensors:
        model.rope.freq_factors = gguf.tensors["rope_freqs.weight"].to_float()
    missing = set(model.state_dict()) - set(state) - ({"lm_head.weight"} if tied else set())
    if missing:
        raise GarageError(
            f"{gguf.path}: tensors missing for {sorted(missing)[:3]}...; the file is incomplete"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()
