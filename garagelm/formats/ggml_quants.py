"""GGML block formats: vectorised torch dequantization.

Each function takes the raw bytes of a tensor as a uint8 tensor shaped (n_blocks, type_size)
and returns float32 values shaped (n_blocks, block_size). The arithmetic follows the order of
ggml's reference code (and gguf-py's numpy port) so that results are bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

QK_K = 256
CHUNK_VALUES = 1 << 21  # values dequantized per slice

# GGML type id (as a GGUF file stores it) -> name: ggml's enum ggml_type, the ids with a type
# (gguf-py's GGMLQuantizationType; kept here so reading a file does not import gguf and yaml).
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

# name -> (block_size, type_size); matches ggml's type traits.
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32 from little-endian half floats."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """Split bytes into low then high nibbles per group of `group` bytes.

    (n, k*group) uint8 -> (n, k, 2*group): for each group, the low nibbles come first.
    """
    n = qs.shape[0]
    qs = qs.reshape(n, -1, 1, group)
    shifts = torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)
    return ((qs >> shifts) & 0x0F).reshape(n, -1, 2 * group)


def _bits(qh: torch.Tensor, group: int, nbits: int, width: int) -> torch.Tensor:
    """Extract `nbits` planes of `width`-bit fields from (n, k*group) bytes -> (n, k, planes*group)."""
    n = qh.shape[0]
    planes = 8 // width
    qh = qh.reshape(n, -1, 1, group)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8).reshape(1, 1, planes, 1)
    mask = (1 << width) - 1
    return ((qh >> shifts) & mask).reshape(n, -1, planes * group)[..., : nbits * group]


def _deq_f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _deq_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _deq_bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    x = b[:, 2:].contiguous().view(torch.int8).float()
    return x * d


def _deq_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).to(torch.int8) - 8
    return d * q.float()


def _deq_q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).float()
    return d * q + m


def _q5_values(qh_bytes: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """The 5-bit values of a Q5_0/Q5_1 block: low nibbles from qs, fifth bit from the 32-bit qh."""
    n = qs.shape[0]
    qh = qh_bytes.contiguous().view(torch.int32)  # (n, 1), little-endian bit j is element j
    high = ((qh >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)
    low = _nibbles(qs, 16).reshape(n, 32)
    return low | (high << 4)


def q5_parts(b: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Q5_0 / Q5_1 blocks -> (values int8 (n, 32), scale f32 (n, 1), added min f32 (n, 1) or None)."""
    d = _f16(b[:, :2])
    if qtype == "Q5_0":
        return _q5_values(b[:, 2:6], b[:, 6:]).to(torch.int8) - 16, d, None
    return _q5_values(b[:, 4:8], b[:, 8:]).to(torch.int8), d, _f16(b[:, 2:4])


def _deq_q5_0(b: torch.Tensor) -> torch.Tensor:
    q, d, _ = q5_parts(b, "Q5_0")
    return d * q.float()


def _deq_q5_1(b: torch.Tensor) -> torch.Tensor:
    q, d, m = q5_parts(b, "Q5_1")
    return d * q.float() + m


def k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12-byte 6-bit scales and mins of Q4_K / Q5_K into (n, 8) each."""
    d, m, md = scales[:, :4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def kquant_parts(b: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """K-quant blocks (n, type_size) -> (values int8 (n, 256), scales f32 (n, S), mins f32 (n, S) or None).

    Each value w = scale * q - min over sub-blocks of 256/S values (S = 8 for Q4_K/Q5_K, 16 for
    Q6_K), with scale and min computed exactly as the dequantizer does, so a layer may keep the
    parts and still reproduce the dequantized weights bit for bit.
    """
    n = b.shape[0]
    if qtype == "Q6_K":
        scales = b[:, 192:208].contiguous().view(torch.int8).float()
        d = _f16(b[:, 208:210]) * scales  # (n, 16)
        low = _nibbles(b[:, :128], 64).reshape(n, -1, 32)  # (n, 8, 32)
        high = _bits(b[:, 128:192], 32, 4, 2).reshape(n, -1, 32)  # (n, 8, 32)
        q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, QK_K)
        return q, d, None
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = k_scale_min(b[:, 4:16])
    scale, mins = d * sc.float(), dmin * mn.float()  # (n, 8)
    if qtype == "Q4_K":
        q = _nibbles(b[:, 16:], 32).reshape(n, QK_K)
    else:  # Q5_K: bit plane j of qh is sub-block j's fifth bit
        low = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
        high = _bits(b[:, 16:48], 32, 8, 1).reshape(n, 8, 32)
        q = (low | (high << 4)).reshape(n, QK_K)
    return q.to(torch.int8), scale, mins


def _deq_kquant(qtype: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def deq(b: torch.Tensor) -> torch.Tensor:
        q, scale, mins = kquant_parts(b, qtype)
        n, groups = scale.shape
        w = scale.reshape(n, groups, 1) * q.reshape(n, groups, -1).float()
        if mins is not None:
            w = w - mins.reshape(n, groups, 1)
        return w.reshape(n, QK_K)

    return deq


_deq_q4_k, _deq_q5_k, _deq_q6_k = _deq_kquant("Q4_K"), _deq_kquant("Q5_K"), _deq_kquant("Q6_K")


DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _deq_f32,
    "F16": _deq_f16,
    "BF16": _deq_bf16,
    "Q8_0": _deq_q8_0,
    "Q4_0": _deq_q4_0,
    "Q4_1": _deq_q4_1,
    "Q5_0": _deq_q5_0,
    "Q5_1": _deq_q5_1,
    "Q4_K": _deq_q4_k,
    "Q5_K": _deq_q5_k,
    "Q6_K": _deq_q6_k,
}


def dequantize(raw: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGML bytes (uint8, any shape) of type `qtype` -> float32 tensor of `shape`.

    `shape` is in PyTorch order (outermost first), i.e. GGUF's dims reversed.
    """
    try:
        fn = DEQUANTIZE[qtype]
    except KeyError:
        supported = ", ".join(DEQUANTIZE)
        raise ValueError(f"no dequantizer for GGML type {qtype}; supported: {supported}") from None
    block, type_size = BLOCK_LAYOUT[qtype]
    blocks = raw.reshape(-1, type_size)
    out = torch.empty(blocks.shape[0], block, dtype=torch.float32)
    # In slices, so the temporaries of a large tensor (an embedding table) stay small.
    step = max(1, CHUNK_VALUES // block)
    for i in range(0, blocks.shape[0], step):
        out[i : i + step] = fn(blocks[i : i + step])
    return out.reshape(shape)
