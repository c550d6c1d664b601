"""Architectures by GGUF `general.architecture` name, and building one from a checkpoint."""

from __future__ import annotations

import re

import torch
from torch import nn

from garagelm.errors import GarageError
from garagelm.formats.ggml_quants import dequantize
from garagelm.formats.gguf import GGUFFile
from garagelm.formats.names import gguf_to_hf
from garagelm.models.gemma3 import Gemma3Config, Gemma3ForCausalLM
from garagelm.models.llama import LlamaConfig, LlamaForCausalLM, unpermute_qk

# GGUF architecture -> (config, model, whether llama.cpp permuted the Q/K rows at conversion)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, True),
    "qwen2": (LlamaConfig, LlamaForCausalLM, False),  # llama + q/k/v biases
    "qwen3": (LlamaConfig, LlamaForCausalLM, False),  # llama + QK-norm
    "gemma3": (Gemma3Config, Gemma3ForCausalLM, False),
}
SUPPORTED = tuple(ARCHITECTURES)
# Hugging Face config.json model_type -> GGUF architecture name
HF_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
            "gemma3_text": "gemma3", "gemma3": "gemma3"}  # fmt: skip


def _set_module(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def from_gguf(gguf: GGUFFile, dtype: torch.dtype = torch.float32, quantized: bool = True) -> nn.Module:
    """Build the model a GGUF file describes, with its weights, without holding them twice.

    quantized: linear layers and the embedding whose GGML type the C kernels read stay quantized
    (packed values and scales, see quant.ggml_linear); everything else is dequantized to `dtype`.
    quantized=False dequantizes everything (for training or as a reference).
    """
    from garagelm.quant import hugepages
    from garagelm.quant.ggml_linear import (
        QUANTIZED_TYPES,
        GGMLEmbedding,
        GGMLLinear,
        MappedEmbedding,
        kernels_available,
    )

    keep = quantized and kernels_available()
    arch = gguf.architecture
    if arch not in SUPPORTED:
        raise GarageError(
            f"{gguf.path}: architecture {arch!r} is not supported yet (supported: {', '.join(SUPPORTED)})"
        )
    tied = "output.weight" not in gguf.tensors
    vocab = gguf.tensors["token_embd.weight"].shape[0]
    config_cls, model_cls, permuted = ARCHITECTURES[arch]
    try:
        cfg = config_cls.from_gguf(gguf.metadata, arch, vocab, tied)
    except KeyError as e:
        raise GarageError(f"{gguf.path}: {e.args[0]}; the file is incomplete") from None
    if isinstance(cfg, LlamaConfig):  # the variants show in which tensors exist
        cfg.attention_bias = "blk.0.attn_q.bias" in gguf.tensors
        cfg.qk_norm = "blk.0.attn_q_norm.weight" in gguf.tensors
    with torch.device("meta"):
        model = model_cls(cfg)
    state, swapped = {}, set()
    embd = gguf.tensors["token_embd.weight"]
    embd_arrays = None
    # an embedding the output head does not read is used a row a token: straight from the map
    mapped = keep and not tied and embd.qtype in QUANTIZED_TYPES and len(embd.shape) == 2
    if keep and embd.qtype in QUANTIZED_TYPES and len(embd.shape) == 2 and not mapped:
        # packed straight into place, a slice of rows at a time (the largest tensor: last)
        embd_arrays = GGMLLinear.split_arrays(embd.qtype, embd.shape[1], embd.shape[0])
    arena = hugepages.Arena()
    places = _packed_places(gguf, arena) if keep else {}
    for name in sorted(gguf.tensors, key=lambda n: n == "token_embd.weight"):
        t = gguf.tensors[name]
        if name == "rope_freqs.weight":
            continue  # llama3-style frequency factors, handled below
        try:
            hf = gguf_to_hf(name, arch)
        except KeyError as e:
            raise GarageError(f"{gguf.path}: {e.args[0]}") from None
        # the embedding packed by rows below maps its pages a slice at a time
        big = name == "token_embd.weight" and keep and t.qtype in QUANTIZED_TYPES and len(t.shape) == 2
        if not big:
            gguf.populate_bytes(t.offset, t.n_bytes)
        raw = t.raw_bytes()
        if permuted and name.endswith("attn_q.weight"):
            raw = unpermute_qk(raw, cfg.num_attention_heads)
        elif permuted and name.endswith("attn_k.weight"):
            raw = unpermute_qk(raw, cfg.num_key_value_heads)
        if keep and t.qtype in QUANTIZED_TYPES and len(t.shape) == 2:  # stays quantized
            module = hf.removesuffix(".weight")
            out_f, in_f = t.shape
            if hf == "model.embed_tokens.weight" and mapped:
                _set_module(model, module, MappedEmbedding(raw, t.qtype, out_f, in_f))
                swapped.add(hf)
                continue  # its pages stay mapped (not released): lookups read them
            if hf == "model.embed_tokens.weight":
                row_bytes = raw.shape[1]
                table = GGMLLinear.packed_by_rows(  # the largest tensor: its pages go as it packs
                    raw, t.qtype, in_f, out_f, max(1, (16 << 20) // row_bytes),
                    lambda r0, r1, t=t, rb=row_bytes: gguf.release_bytes(t.offset + r0 * rb, (r1 - r0) * rb),
                    lambda r0, r1, t=t, rb=row_bytes: gguf.populate_bytes(t.offset + r0 * rb, (r1 - r0) * rb),
                    embd_arrays,
                )  # fmt: skip
                _set_module(model, module, GGMLEmbedding(table))
                if tied:  # the output head reads the same weights
                    model.lm_head = table
                    swapped.add("lm_head.weight")
            else:
                _set_module(model, module, GGMLLinear(raw, t.qtype, in_f, out_f, into=places.get(name)))
            swapped.add(hf)
        elif keep and t.qtype in ("F16", "BF16") and len(t.shape) == 2 and _linear_weight(hf):
            # linear weights stay 16-bit (half the memory); DenseLinear widens them exactly
            state[hf] = (
                raw.view(torch.float16 if t.qtype == "F16" else torch.bfloat16).reshape(t.shape).clone()
            )
        else:
            state[hf] = dequantize(raw, t.qtype, t.shape).to(dtype)
        if keep:  # the bytes now live in a packed or float copy (or are mapped back on use)
            gguf.release(t)
    if "rope_freqs.weight" in gguf.tensors:
        model.rope.freq_factors = gguf.tensors["rope_freqs.weight"].to_float()
    if isinstance(model.lm_head, GGMLLinear):
        model.lm_head.exact = True  # logits over many rows from float32 products, never bf16
    if any(isinstance(m, GGMLLinear) for m in model.model.layers.modules()):
        for m in model.modules():  # weights already rounded to a few bits: prefill may use bf16
            if hasattr(m, "bf16_prefill"):
                m.bf16_prefill = True
    for name in [n for n in state if n.endswith(".bias")]:  # Qwen2's q/k/v biases
        module = model.get_submodule(name.removesuffix(".bias"))
        if isinstance(module, GGMLLinear):  # a quantized product keeps its float bias itself
            module.bias = state.pop(name)
    # (quantized layers' buffers are non-persistent, so state_dict lists only real parameters)
    missing = set(model.state_dict()) - set(state) - swapped - ({"lm_head.weight"} if tied else set())
    if missing:
        raise GarageError(
            f"{gguf.path}: tensors missing for {sorted(missing)[:3]}...; the file is incomplete"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if tied and "lm_head.weight" not in swapped:
        model.tie_weights()
    if keep:
        _prepare_decode(model, arena)
    return model.eval()


_FUSED = re.compile(r"blk\.(\d+)\.(attn_q|attn_k|attn_v|ffn_gate|ffn_up)\.weight")
_FUSED_PARTS = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"))  # fuse_projections' rows, in order
_FUSED_GROUP = {part: (group, row) for group in _FUSED_PARTS for row, part in enumerate(group)}


def fusable(parts: list[tuple]) -> bool:
    """Whether a layer's q/k/v (or gate/up), each given as (GGML type, input width, has a bias),
    are served as one product: one type and width, no biases. The load's placement of the packed
    weights and fuse_projections both ask here, so they cannot disagree."""
    return len({p[:2] for p in parts}) == 1 and not any(p[2] for p in parts)


def _packed_places(gguf: GGUFFile, arena) -> dict[str, tuple]:
    """Arrays in `arena`, reserved in one piece, for the packed weights of the layers (not the
    embedding): {tensor name: (q, d, m)}, so that a load packs each weight straight into place
    (before, into fresh arrays then copied onto huge pages: 0.2 s of Gemma 3's load). The parts
    of a product that fuse_projections will fuse (q/k/v, gate/up, where `fusable`) get
    consecutive row slices of the fused product's arrays, so the fusion is a view, not a copy.
    (Faulting the piece in on another thread meanwhile, as the embedding's, made loads slower
    here: the two threads' page faults contend.)"""
    from garagelm.quant.ggml_linear import QUANTIZED_TYPES, packed_specs

    groups: dict[tuple, list[str]] = {}
    for name, t in gguf.tensors.items():
        if name == "token_embd.weight" or t.qtype not in QUANTIZED_TYPES or len(t.shape) != 2:
            continue
        if packed_specs(t.qtype, *t.shape) is None:
            continue
        m = _FUSED.fullmatch(name)
        key = (int(m.group(1)), _FUSED_GROUP[m.group(2)][0]) if m else (name,)
        groups.setdefault(key, []).append(name)
    for key in [k for k in groups if len(k) == 2]:  # a product that will not fuse: its parts alone
        names = groups[key]
        parts = [
            (gguf.tensors[n].qtype, gguf.tensors[n].shape[1], n.replace(".weight", ".bias") in gguf.tensors)
            for n in names
        ]
        if len(names) != len(key[1]) or not fusable(parts):
            del groups[key]
            groups.update({(n,): [n] for n in names})
    order = {n: i for i, n in enumerate(gguf.tensors)}
    plans = []
    for names in groups.values():
        names.sort(key=lambda n: _FUSED_GROUP[m.group(2)][1] if (m := _FUSED.fullmatch(n)) else 0)
        ts = [gguf.tensors[n] for n in names]
        specs = packed_specs(ts[0].qtype, sum(t.shape[0] for t in ts), ts[0].shape[1])
        plans.append((min(order[n] for n in names), names, ts, specs))
    plans.sort(key=lambda p: p[0])  # the file's order, which the load packs in
    size = sum(arena.padded(*s) for *_, specs in plans for s in specs if s is not None)
    if plans:
        arena.reserve(size)
    places = {}
    for _, names, ts, specs in plans:
        arrays = [None if s is None else arena.empty(*s) for s in specs]
        r0 = 0
        for name, t in zip(names, ts):
            r1 = r0 + t.shape[0]
            places[name] = tuple(None if a is None else a[r0:r1] for a in arrays)
            r0 = r1
    return places


def from_hf(folder, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the model a Hugging Face folder (formats.safetensors.HFFolder) describes."""
    model_type = folder.config.get("model_type")
    arch = HF_TYPES.get(model_type)
    if arch is None:
        raise GarageError(
            f"{folder.path}: model_type {model_type!r} is not supported yet (supported: {', '.join(HF_TYPES)})"
        )
    config_cls, model_cls, _ = ARCHITECTURES[arch]
    try:
        cfg = config_cls.from_hf(folder.config)
    except (KeyError, ValueError) as e:
        raise GarageError(f"{folder.path}/config.json: {e}") from None
    with torch.device("meta"):
        model = model_cls(cfg)
    expected = set(model.state_dict())
    state, fp8, scales = {}, {}, {}
    for name, tensor in folder.tensors():
        name = name.removeprefix("language_model.")  # Gemma 3's multimodal checkpoints
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            continue  # the image half is not used by a text model
        if name.endswith(".weight_scale_inv"):  # FP8 block scales (quant/fp8.py)
            scales[name.removesuffix("_scale_inv")] = tensor
            continue
        if name not in expected:
            raise GarageError(f"{folder.path}: unexpected tensor {name!r} for {model_type}")
        if tensor.dtype == torch.float8_e4m3fn:
            fp8[name] = tensor
        elif (
            tensor.dtype in (torch.bfloat16, torch.float16)
            and dtype == torch.float32
            and _linear_weight(name)
        ):
            state[name] = tensor  # kept 16-bit, half the memory; DenseLinear widens it exactly
        else:
            state[name] = tensor.to(dtype)
    if set(fp8) != set(scales):
        raise GarageError(f"{folder.path}: FP8 weights and weight_scale_inv tensors do not pair up")
    if fp8:
        from garagelm.quant.fp8 import FP8Linear

        for name, q in fp8.items():
            module = name.removesuffix(".weight")
            bias = state.pop(module + ".bias", None)
            _set_module(model, module, FP8Linear(q, scales[name], bias))
        expected = set(model.state_dict())  # the FP8 layers hold their tensors as buffers
    tied = cfg.tie_word_embeddings and "lm_head.weight" not in state
    missing = expected - set(state) - ({"lm_head.weight"} if tied else set())
    if missing:
        raise GarageError(
            f"{folder.path}: tensors missing for {sorted(missing)[:3]}...; the checkpoint is incomplete"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    _prepare_decode(model)
    return model.eval()


def _linear_weight(name: str) -> bool:
    """Weights kept at 16 bits when the checkpoint has them so: the products' and the embedding
    table (its rows are widened on lookup, and it is often the tied output head)."""
    return name.endswith("_proj.weight") or name in ("lm_head.weight", "model.embed_tokens.weight")


def _prepare_decode(model: nn.Module, arena=None) -> None:
    """Float layers become DenseLinear (quant/dense.py), quantized q/k/v and gate/up fuse, and
    the model gets a whole-layer decode plan (None where the kernel does not fit)."""
    from garagelm.quant import hugepages
    from garagelm.quant.decode import DecodePlan
    from garagelm.quant.dense import use_dense_kernels

    use_dense_kernels(model)
    fuse_projections(model)
    hugepages.move_weights(model, arena)  # decode streams them every token: fewer TLB misses
    hugepages.settle_in_background()
    model.decode_plan = DecodePlan.build(model)


def fuse_projections(model: nn.Module) -> None:
    """Serve q/k/v and gate/up as one product each when they share a GGML type (fewer calls)."""
    from garagelm.quant.ggml_linear import GGMLLinear

    def fuse(parts):
        if not all(isinstance(p, GGMLLinear) for p in parts):
            return None
        if not fusable([(p.qtype, p.in_features, p.bias is not None) for p in parts]):
            return None
        return GGMLLinear.concat(parts)

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if (qkv := fuse([attn.q_proj, attn.k_proj, attn.v_proj])) is not None:
            attn.qkv_proj = qkv
            del attn.q_proj, attn.k_proj, attn.v_proj
        if (gate_up := fuse([mlp.gate_proj, mlp.up_proj])) is not None:
            mlp.gate_up_proj = gate_up
            del mlp.gate_proj, mlp.up_proj
