"""Linear layers and embeddings whose weights stay quantized (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, K-quants).

At load the GGML blocks are split into values and scales ("packed", see PACKED_KINDS). Decode
(a few rows) runs the C kernel on them, reading 0.6-1.25 bytes per weight instead of 4, with x
quantized to q8_0 where the weight type has integer products (see int8_activations), or as the
float32 product of the dequantized weights up to float32 rounding. Longer inputs (prefill): on
CPUs with bf16 dot products (AMX, AVX512-BF16), from BF16_MIN_ROWS rows, the weight dequantized
for the call (bit-equal to gguf-py) and one bf16 matmul, which rounds the activations to 8
significant bits as llama.cpp rounds them to 8-bit blocks; elsewhere (AVX2, ARM) the int8 kernel
8 rows at a time with x as q8_0 (use_int8_prefill), where the weight type has integer products;
float32 otherwise, for the output head's many-row calls (evaluation's logits), and inside
`exact_products()` (evaluation, tests against references, or GARAGE_EXACT=1).
`models.from_gguf` puts these layers in place of nn.Linear.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from garagelm.formats.ggml_quants import BLOCK_LAYOUT, dequantize, k_scale_min, kquant_parts
from garagelm.quant import cpu, hugepages

# Types split at load into values + scales (+ mins), the layout the fastest kernel reads:
# Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 keep their bits (f16 scales); Q4_K keeps 4-bit values with a float32
# scale and min per 32; Q5_K and Q6_K become int8 values with float32 scales.
PACKED_KINDS = {"Q4_1": 0, "Q4_0": 1, "Q8_0": 2, "Q4_K": 8, "Q5_K": 3, "Q6_K": 4, "Q5_1": 9, "Q5_0": 10}
QUANTIZED_TYPES = set(PACKED_KINDS)
MAX_KERNEL_ROWS = 8
BF16_MIN_ROWS = 16  # measured on SmolLM2 down_proj: float32 wins at 12 rows, even at 16, bf16 from 24
_exact = threading.local()


def bf16_products_fast() -> bool:
    """Whether prefill's products run in bf16 (cpu.bf16_prefill_cpu: AVX-512 kernels, bf16 dots)."""
    return cpu.bf16_prefill_cpu()


@contextlib.contextmanager
def exact_products():
    """Float32 products for every row count in this thread: what perplexity, KL divergence and
    comparisons against transformers or llama.cpp's float runs need."""
    depth = getattr(_exact, "depth", 0)
    _exact.depth = depth + 1
    try:
        yield
    finally:
        _exact.depth = depth


def _exact_mode() -> bool:
    """Float32 products asked for: exact_products() in this thread, or GARAGE_EXACT=1."""
    return bool(getattr(_exact, "depth", 0)) or os.environ.get("GARAGE_EXACT", "").lower() not in (
        "",
        "0",
        "false",
        "no",
    )


def int8_activations() -> bool:
    """Whether decode's products (1..MAX_KERNEL_ROWS rows, in C) take x quantized to q8_0 for the
    weight types that have integer products (Q4_0, Q4_1, Q8_0, Q4_K, and Q5_0/Q5_1 on CPUs with
    AVX512-BITALG), as llama.cpp computes them:
    everywhere (the output head included) but under exact_products() or GARAGE_EXACT=1, which keep
    float32 products."""
    return not _exact_mode()


# the kinds with integer products (int8_activations): every packed one
INT8_KINDS = frozenset(PACKED_KINDS)


def use_int8_prefill(rows: int, qtype: str) -> bool:
    """Whether a product over `rows` (> MAX_KERNEL_ROWS: prefill) takes x as q8_0 in the int8
    kernel, 8 rows at a time: where there is no bf16 dot (AVX2 laptops, ARM), integer products
    run 1.6-2.2x faster per core than float32 GEMMs (vpmaddubsw, AVX-VNNI, sdot), with llama.cpp's
    own prompt arithmetic (x rounded to 8-bit blocks)."""
    return (
        rows > MAX_KERNEL_ROWS
        and qtype in INT8_KINDS
        and cpu.kernels is not None
        and not _exact_mode()
        and not use_bf16(rows)
    )


def use_bf16(rows: int) -> bool:
    """Whether a quantized model's product (or attention) over `rows` rows runs in bf16."""
    return rows >= BF16_MIN_ROWS and not _exact_mode() and bf16_products_fast()


_SPLIT_HEAD = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}  # bytes of f16 scale (and min) before the values
_KQUANT_KIND = {"Q4_K": 0, "Q5_K": 1, "Q6_K": 2}  # split_kquant's kinds


def _split_into(
    raw: torch.Tensor, qtype: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None
) -> None:
    """Q4_0/Q4_1/Q8_0 blocks (rows, row bytes) into contiguous q, d (, m) in one C pass."""
    n_blocks = raw.numel() // BLOCK_LAYOUT[qtype][1]
    cpu.kernels.split_blocks(raw.data_ptr(), n_blocks, BLOCK_LAYOUT[qtype][1], _SPLIT_HEAD[qtype],
                          q.data_ptr(), d.data_ptr(), 0 if m is None else m.data_ptr())  # fmt: skip


def packed_specs(qtype: str, n: int, k: int) -> tuple | None:
    """(shape, dtype) of the packed q, d, m (None for an absent m) of an (n, k) weight, for the
    types split in C; None for the others."""
    nb = k // 32
    d16, m16 = ((n, nb), torch.int16), ((n, nb), torch.int16)
    if qtype in _SPLIT_HEAD and hasattr(cpu.kernels, "split_blocks"):
        values = ((n, nb * (BLOCK_LAYOUT[qtype][1] - _SPLIT_HEAD[qtype])), torch.uint8)
        return values, d16, m16 if qtype == "Q4_1" else None
    if qtype in ("Q5_0", "Q5_1") and hasattr(cpu.kernels, "split_q5"):
        return ((n, nb * 20), torch.uint8), d16, m16 if qtype == "Q5_1" else None
    if qtype in _KQUANT_KIND and hasattr(cpu.kernels, "split_kquant"):
        values = ((n, k // 2), torch.uint8) if qtype == "Q4_K" else ((n, k), torch.int8)
        return values, ((n, kscale_row_bytes(qtype, k)), torch.uint8), None
    return None


def kscale_row_bytes(qtype: str, k: int) -> int:
    """Bytes of a K-quant weight row's scales as the kernels read them (KSCALES in
    kernels/core.h): per 256 values a float32 d (and dmin), per 32 (Q6_K: 16) a byte of scale
    (and one of min): the file's integers, not their float32 products."""
    sb = k // 256
    return 4 * sb + 16 * sb if qtype == "Q6_K" else 8 * sb + 16 * sb


def _pack(raw: torch.Tensor, qtype: str, n: int, k: int, out: tuple | None = None):
    """GGML blocks (n, row bytes) -> (values, d, m): the same bits without block headers, written
    into `out` (arrays of packed_specs' shapes) when given."""
    specs = packed_specs(qtype, n, k)
    if specs is None:
        parts = _pack_torch(raw, qtype, n, k)
        if out is None:
            return parts
        for dst, src in zip(out, parts, strict=True):
            if dst is not None:
                dst.copy_(src)
        return out
    raw = raw.contiguous()  # (llama's unpermuted Q/K rows are a strided view)
    if out is None:
        out = tuple(None if s is None else torch.empty(s[0], dtype=s[1]) for s in specs)
    q, d, m = out
    ptr = 0 if m is None else m.data_ptr()
    if qtype in _SPLIT_HEAD:
        _split_into(raw, qtype, q, d, m)
    elif qtype in _KQUANT_KIND:
        cpu.kernels.split_kquant(_KQUANT_KIND[qtype], raw.data_ptr(), n, k // 256, q.data_ptr(), d.data_ptr())
    else:
        cpu.kernels.split_q5(raw.data_ptr(), n * (k // 32), qtype == "Q5_1", q.data_ptr(), d.data_ptr(), ptr)
    return out


def _pack_torch(raw: torch.Tensor, qtype: str, n: int, k: int):
    """_pack through torch ops: without the C splitters."""
    nb = k // 32
    if qtype.startswith("Q5_") and not qtype.endswith("_K"):
        # per 32 values: the 16 nibble bytes, then the 4 bytes of fifth bits (the file's bits)
        blocks = raw.reshape(n, nb, BLOCK_LAYOUT[qtype][1])
        head = 4 if qtype == "Q5_1" else 2
        q = torch.cat([blocks[:, :, head + 4 :], blocks[:, :, head : head + 4]], dim=2).reshape(n, nb * 20)
        d = blocks[:, :, 0:2].contiguous().view(torch.int16).reshape(n, nb)
        m = blocks[:, :, 2:4].contiguous().view(torch.int16).reshape(n, nb) if qtype == "Q5_1" else None
        return q.contiguous(), d, m
    if qtype.endswith("_K"):
        blocks = raw.reshape(-1, BLOCK_LAYOUT[qtype][1])
        q, _, _ = kquant_parts(blocks, qtype)
        if qtype == "Q4_K":  # values 0..15: two to a byte, values i and i + 16 of each 32
            halves = q.reshape(-1, 2, 16).to(torch.uint8)
            q = halves[:, 0] | (halves[:, 1] << 4)
        q = q.reshape(n, -1).contiguous()

        def f32_bytes(f16: torch.Tensor) -> torch.Tensor:  # (n * per_row, 2) f16 -> (n, 4 per_row)
            return f16.contiguous().view(torch.float16).float().reshape(n, -1).view(torch.uint8)

        if qtype == "Q6_K":  # d, then the int8 scale of each 16
            return q, torch.cat([f32_bytes(blocks[:, 208:210]), blocks[:, 192:208].reshape(n, -1)], 1), None
        sc, mn = k_scale_min(blocks[:, 4:16])  # d, dmin, then the 6-bit scales, then the mins
        parts = [f32_bytes(blocks[:, :2]), f32_bytes(blocks[:, 2:4]), sc.reshape(n, -1), mn.reshape(n, -1)]
        return q, torch.cat([p.to(torch.uint8) for p in parts], 1), None
    blocks = raw.reshape(n, nb, BLOCK_LAYOUT[qtype][1])
    d = blocks[:, :, 0:2].contiguous().view(torch.int16).reshape(n, nb)  # f16 bit patterns
    m = blocks[:, :, 2:4].contiguous().view(torch.int16).reshape(n, nb) if qtype == "Q4_1" else None
    start = 4 if qtype == "Q4_1" else 2
    q = blocks[:, :, start:].contiguous().reshape(n, -1)  # nibbles (n, k/2) or int8 bytes (n, k)
    return q, d, m


def _joined(arrays: list[torch.Tensor]) -> torch.Tensor:
    """The arrays' rows one after another: a view when they already lie so in one storage (a
    load packs a fused product's parts into place), else a copy."""
    a0 = arrays[0]
    rows = sum(a.shape[0] for a in arrays)
    adjacent = all(
        a.is_contiguous() and a.untyped_storage().data_ptr() == a0.untyped_storage().data_ptr()
        for a in arrays
    ) and all(a.data_ptr() + a.nbytes == b.data_ptr() for a, b in itertools.pairwise(arrays))
    if adjacent and a0.is_contiguous():
        shape = (rows, *a0.shape[1:])
        return a0.as_strided(shape, torch.empty(shape, device="meta").stride())  # row-major
    return torch.cat(arrays)


def kernels_available() -> bool:
    """Whether the C kernels were built (without a compiler the torch path runs instead)."""
    return cpu.kernels is not None


def set_threads(n: int) -> int:
    return cpu.set_threads(n)


class GGMLLinear(nn.Module):
    """y = x @ W.T (+ bias) with W held as raw GGML blocks, shape (out_features, row bytes)."""

    # True for the output head: many-row calls (evaluation's logits over a text) stay float32
    # rather than bf16; its 1..8-row calls take int8 activations, as llama.cpp's output product
    exact = False

    def __init__(self, raw: torch.Tensor | None, qtype: str, in_features: int, out_features: int, bias=None,
                 packed: tuple | None = None, into: tuple | None = None):  # fmt: skip
        """raw: the GGML blocks (out_features, row bytes), packed at once (into the arrays `into`,
        of packed_specs' shapes, when given); or packed: arrays packed already."""
        super().__init__()
        block, type_size = BLOCK_LAYOUT[qtype]
        if packed is None and (
            raw.dtype != torch.uint8 or raw.shape != (out_features, in_features // block * type_size)
        ):
            raise ValueError(f"raw {qtype} weight has shape {tuple(raw.shape)}, expected "
                             f"({out_features}, {in_features // block * type_size}) uint8")  # fmt: skip
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.bias = bias
        self._kind = PACKED_KINDS.get(qtype) if cpu.kernels is not None else None
        if self._kind is not None:
            q, d, m = packed if packed is not None else _pack(raw, qtype, out_features, in_features, into)
            self.register_buffer("q", q, persistent=False)
            self.register_buffer("d", d, persistent=False)
            self.register_buffer("m", m, persistent=False)
            self.raw = None
        else:
            self.register_buffer("raw", raw.contiguous(), persistent=False)

    @classmethod
    def packed_by_rows(cls, raw: torch.Tensor, qtype: str, in_features: int, out_features: int,
                       chunk_rows: int, done=None, before=None, arrays=None) -> GGMLLinear:  # fmt: skip
        """Pack a large weight a slice of rows at a time into preallocated arrays (`arrays`, from
        split_arrays, or allocated here), calling before(row0, row1) ahead of each slice (to
        map its source pages) and done(row0, row1) after it, so that its source pages can be
        released as it goes (a 262k-row embedding otherwise holds file and copy whole at once)."""
        if cpu.kernels is None or qtype not in PACKED_KINDS:
            return cls(raw, qtype, in_features, out_features)
        for r0 in range(0, out_features, chunk_rows):
            r1 = min(out_features, r0 + chunk_rows)
            if before is not None:
                before(r0, r1)
            if (
                arrays is not None
                and qtype in _SPLIT_HEAD
                and raw.is_contiguous()
                and hasattr(cpu.kernels, "split_blocks")
            ):
                _split_into(raw[r0:r1], qtype, *[None if a is None else a[r0:r1] for a in arrays])
                if done is not None:  # straight into place: no slice copy in between
                    done(r0, r1)
                continue
            parts = _pack(raw[r0:r1], qtype, r1 - r0, in_features)
            if arrays is None:
                arrays = [None if x is None else hugepages.empty((out_features, *x.shape[1:]), x.dtype, defer=True)
                          for x in parts]  # fmt: skip
            for dst, src in zip(arrays, parts):
                if dst is not None:
                    dst[r0:r1] = src
            if done is not None:
                done(r0, r1)
        return cls(None, qtype, in_features, out_features, packed=tuple(arrays))

    @staticmethod
    def split_arrays(qtype: str, in_features: int, out_features: int) -> tuple | None:
        """Empty packed arrays (q, d, m) for a Q4_0/Q4_1/Q8_0 weight, moved onto huge pages after
        the load (hugepages.settle_in_background), to hand to packed_by_rows; None for other
        types (allocated as they pack)."""
        specs = packed_specs(qtype, out_features, in_features) if qtype in _SPLIT_HEAD else None
        return (
            None
            if specs is None
            else tuple(None if s is None else hugepages.empty(*s, defer=True) for s in specs)
        )

    @classmethod
    def concat(cls, parts: list[GGMLLinear]) -> GGMLLinear:
        """One layer computing all of `parts` (same type and input size), outputs side by side."""
        first = parts[0]
        out = sum(p.out_features for p in parts)
        if first._kind is None:
            return cls(torch.cat([p.raw for p in parts]), first.qtype, first.in_features, out)
        packed = tuple(None if getattr(first, a) is None else _joined([getattr(p, a) for p in parts])
                       for a in ("q", "d", "m"))  # fmt: skip
        return cls(None, first.qtype, first.in_features, out, packed=packed)

    def _pointers(self) -> tuple[int, int, int]:
        return self.q.data_ptr(), self.d.data_ptr(), self.m.data_ptr() if self.m is not None else 0

    def dequantized_bf16(self) -> torch.Tensor:
        """The weight in bf16: the float32 dequantization rounded to nearest even."""
        if self._kind is None or cpu.kernels is None:
            return self.dequantized().to(torch.bfloat16)
        out = torch.empty(self.out_features, self.in_features, dtype=torch.bfloat16)
        cpu.kernels.dequantize_packed_bf16(self._kind, *self._pointers(), out.data_ptr(), self.out_features,
                                        self.in_features)  # fmt: skip
        return out

    def dequantized(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight (or only `rows` of it), bit-equal to gguf-py's dequantization."""
        if self._kind is None:  # no C kernels: blocks kept as they are, torch dequantizer
            raw = self.raw if rows is None else self.raw[rows].contiguous()
            return dequantize(raw, self.qtype, (raw.shape[0], self.in_features))
        q, d, m = self.q, self.d, self.m
        if rows is not None:
            q, d = q[rows].contiguous(), d[rows].contiguous()
            m = m[rows].contiguous() if m is not None else None
        out = torch.empty(q.shape[0], self.in_features, dtype=torch.float32)
        cpu.kernels.dequantize_packed(self._kind, q.data_ptr(), d.data_ptr(), m.data_ptr() if m is not None else 0,
                                   out.data_ptr(), q.shape[0], self.in_features)  # fmt: skip
        return out

    def _kernel_call(self):
        """(x_ptr, y_ptr, rows) -> None, with the weight's pointers bound once: decode calls this
        ~120 times a token, and module buffer lookups would cost more than the small products."""
        if self._kind is None:
            return None
        n, k = self.out_features, self.in_features
        kind, q, d, m = self._kind, *self._pointers()
        return lambda xp, yp, rows: cpu.kernels.matmul_packed(
            kind, q, d, m, xp, yp, rows, n, k, int8_activations()
        )

    def forward(self, x: torch.Tensor, keep_bf16: bool = False) -> torch.Tensor:
        """x @ W.T. keep_bf16: when the product runs in bf16 (prefill), return its bf16 output
        as it is (for a caller that feeds it to another bf16 product); float32 otherwise."""
        rows = x.numel() // self.in_features
        if rows <= MAX_KERNEL_ROWS and x.dtype == torch.float32:
            if self.__dict__.get("_fast") is None:
                self._fast = self._kernel_call()
            if self._fast is not None:
                x = x if x.is_contiguous() else x.contiguous()
                y = torch.empty((*x.shape[:-1], self.out_features))
                self._fast(x.data_ptr(), y.data_ptr(), rows)
                return y if self.bias is None else y + self.bias
        x2 = x.reshape(-1, self.in_features)
        if (
            not self.exact
            and self._kind is not None
            and x2.dtype == torch.float32
            and use_int8_prefill(rows, self.qtype)
        ):
            x2 = x2.contiguous()
            y = torch.empty(rows, self.out_features)
            cpu.kernels.matmul_packed(self._kind, *self._pointers(), x2.data_ptr(), y.data_ptr(), rows,
                                      self.out_features, self.in_features, True)  # fmt: skip
            y = y if self.bias is None else y + self.bias
        elif not self.exact and x2.dtype in (torch.float32, torch.bfloat16) and use_bf16(rows):
            y = F.linear(x2.to(torch.bfloat16), self.dequantized_bf16())
            y = y if keep_bf16 and self.bias is None else y.float()
            y = y if self.bias is None else y + self.bias
        else:
            y = F.linear(x2, self.dequantized().to(x2.dtype), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, qtype={self.qtype}"


class GGMLEmbedding(nn.Module):
    """Token embeddings kept quantized; only the rows looked up are dequantized.

    It reads its rows from a GGMLLinear over the same table, so a tied output head and the
    embedding share one copy of the weights.
    """

    def __init__(self, table: GGMLLinear):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.table.dequantized(ids.reshape(-1))
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.table.qtype}"


class MappedEmbedding(nn.Module):
    """Token embeddings read straight from the model file's memory map, never copied.

    A table that is not also the output head is read one row a token, so packing it would cost
    load time and memory for nothing (a 7B Qwen2's is 0.3 GB). The rows looked up are packed and
    dequantized as GGMLEmbedding's are: the same C code, the same bits. The file's pages come
    into memory as their rows are used; `raw` is a view of the map (the map lives as long)."""

    def __init__(self, raw: torch.Tensor, qtype: str, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.raw, self.qtype = raw, qtype
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = GGMLLinear(self.raw[flat], self.qtype, self.embedding_dim, flat.numel())
        return rows.dequantized().reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}, mapped from the file"
