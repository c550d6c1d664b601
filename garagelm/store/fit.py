"""Will a model run on this computer? Memory needed by *this* engine, and a verdict.

needed = weights as garagelm holds them + KV cache at the chosen context + runtime + margin:
- weights: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and float files are held at their file size; Q4_K keeps its
  4-bit values and the file's integer scales (0.59 bytes a weight), while Q5_K and Q6_K are
  unpacked to int8 values (1.09 and 1.08 bytes a weight, see quant/ggml_linear), so a Q4_K_M
  file (mostly Q4_K, some Q6_K) is held at ~0.71 bytes a weight;
- KV cache: layers x 2 (keys, values) x KV heads x head dim x context x 2 bytes (f16; 1.0625 for
  --kv-cache q8_0), or the catalog's kv_bytes_per_token for attention that compresses it
  (DeepSeek's MLA);
- runtime: torch and Python (~310 MiB), the tokenizer's tables (measured: ~0.75 KiB a token for
  byte-level BPE vocabularies, ~0.15 KiB for SentencePiece ones, encoded from the pieces
  directly), plus buffers that grow with the context; then a 10% margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from garagelm.store.hardware import Hardware

RUNTIME_BYTES = 310 * 2**20
TOKENIZER_BYTES_PER_TOKEN = {"bpe": 768, "spm": 160}
MARGIN = 0.10
KV_BYTES_PER_VALUE = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 and an f16 scale
# bytes per weight as the engine holds them, by the file's quantization (None: the file size)
# (Q4_K_M: 1264 MB held for DeepSeek-R1-Distill-Qwen-1.5B's 1.78B weights, bench/make_model.py)
HELD_BYTES_PER_WEIGHT = {
    "Q4_K_M": 0.71,
    "Q5_K_M": 1.09,
    "Q6_K": 1.08,
    "Q4_K_S": 0.62,
}


@dataclass
class Estimate:
    weights: int
    kv_cache: int
    runtime: int
    total: int
    context: int


def file_size(entry: dict[str, Any]) -> int | None:
    return entry.get("size") or entry.get("size_estimate")


def estimate(entry: dict[str, Any], context: int = 4096, kv_cache: str = "f16") -> Estimate:
    size = file_size(entry) or 0
    per_weight = HELD_BYTES_PER_WEIGHT.get(entry.get("quantization", ""))
    params = entry.get("parameters") or 0
    weights = int(params * per_weight) if per_weight and params else int(size)
    context = min(context, entry.get("context_length") or context)
    if entry.get("kv_bytes_per_token"):
        kv = int(entry["kv_bytes_per_token"]) * context
    else:
        kv = int(
            int(entry.get("layers", 0))
            * 2
            * int(entry.get("kv_heads", 0))
            * int(entry.get("head_dim", 0))
            * context
            * KV_BYTES_PER_VALUE[kv_cache]
        )
    hidden = int(entry.get("hidden_size") or 4096)
    vocab = int(entry.get("vocab_size") or 50_000)
    tokenizer = vocab * TOKENIZER_BYTES_PER_TOKEN.get(entry.get("tokenizer", "bpe"), 768)
    runtime = RUNTIME_BYTES + tokenizer + context * hidden * 4 * 8  # + activations of a context-long prefill
    total = int((weights + kv + runtime) * (1 + MARGIN))
    return Estimate(weights, kv, runtime, total, context)


def decode_bytes_per_token(entry: dict[str, Any], context: int = 512, kv_cache: str = "f16") -> int:
    """Bytes a decode step reads at `context` tokens: the weights as held (of a Mixture of
    Experts the active share), less the embedding table when the output head is a tensor of its
    own (the table is read a row a token), and the KV cache so far."""
    est = estimate(entry, context, kv_cache)
    weights = est.weights
    total, active = entry.get("parameters") or 0, entry.get("active_parameters")
    if total and active:
        weights = weights * active / total
    if entry.get("tied_embeddings") is False and total:
        table = int(entry.get("vocab_size") or 0) * int(entry.get("hidden_size") or 0)
        weights -= est.weights * table / total
    return int(weights + est.kv_cache)


def decode_tok_s(entry: dict[str, Any], read_gb_s: float, context: int = 512) -> float:
    """Expected decode tokens/s on a machine that reads read_gb_s (store.bandwidth)."""
    from garagelm.store.bandwidth import decode_tok_s as at_bandwidth

    return at_bandwidth(decode_bytes_per_token(entry, context), read_gb_s)


_FILE_TYPES = {
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    14: "Q4_K_S",
    15: "Q4_K_M",
    17: "Q5_K_M",
    18: "Q6_K",
}  # fmt: skip  (llama.cpp's enum llama_ftype)


def entry_from_gguf(path, quantization: str = "") -> dict[str, Any]:
    """What estimate() needs, read from a GGUF file's metadata (for files not in the catalog)."""
    from garagelm.formats.gguf import GGUFFile

    g = GGUFFile(path)
    arch = g.architecture
    heads = int(g.get(f"{arch}.attention.head_count", 1) or 1)
    hidden = int(g.get(f"{arch}.embedding_length", 0))
    return {
        "size": g.path.stat().st_size,
        "quantization": quantization or _FILE_TYPES.get(int(g.get("general.file_type", -1) or -1), ""),
        "parameters": sum(math.prod(t.shape) for t in g.tensors.values()),
        "tied_embeddings": "output.weight" not in g.tensors,
        "context_length": int(g.get(f"{arch}.context_length", 4096)),
        "layers": int(g.get(f"{arch}.block_count", 0)),
        "kv_heads": int(g.get(f"{arch}.attention.head_count_kv", heads) or heads),
        "head_dim": int(g.get(f"{arch}.attention.key_length", hidden // heads if heads else 0)),
        "hidden_size": hidden,
        "vocab_size": len(g.get("tokenizer.ggml.tokens", [])) or None,
        "tokenizer": "spm" if g.get("tokenizer.ggml.model") == "llama" else "bpe",
    }


def verdict(est: Estimate, hw: Hardware) -> str:
    """'fits in RAM (CPU)', "won't fit", or with a GPU 'fits in GPU' / 'partial GPU'."""
    vram = max((v for _, v in hw.gpus), default=0)
    if vram and est.total <= vram:
        return "fits in GPU"
    if est.total <= hw.available_ram:
        return "fits in RAM (CPU)"
    if vram and est.total <= vram + hw.available_ram:
        return "partial GPU"
    return "won't fit"
