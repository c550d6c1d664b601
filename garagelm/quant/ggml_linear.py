"""A linear layer whose weight stays in its GGML blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0).

Decode (a few rows) runs the fused C kernel, reading ~0.6 bytes per weight instead of 4.
Longer inputs (prefill) dequantize the weight for the call and use a float32 matmul. Either
way each weight has exactly its dequantized float32 value, so results match the float model up
to summation order. `quantize_model` swaps such layers into a model built from a GGUF.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from garagelm.formats.ggml_quants import BLOCK_LAYOUT, dequantize

try:
    from garagelm.quant import _kernels
except ImportError:  # built without a C compiler: the torch path below still works
    _kernels = None

# GGML type ids the C kernel reads.
KERNEL_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8}
MAX_KERNEL_ROWS = 8


def kernels_available() -> bool:
    return _kernels is not None


def set_threads(n: int) -> int:
    return _kernels.set_threads(n) if _kernels is not None else 1


def dequantize_fast(raw: torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The C dequantizer where it reads the type (same values, several times faster)."""
    if _kernels is None or qtype not in KERNEL_TYPES or not raw.is_contiguous():
        return dequantize(raw, qtype, shape)
    out = torch.empty(shape, dtype=torch.float32)
    _kernels.dequantize(KERNEL_TYPES[qtype], raw.data_ptr(), out.data_ptr(), out.numel() // 32)
    return out


class GGMLLinear(nn.Module):
    """y = x @ W.T (+ bias) with W held as raw GGML blocks, shape (out_features, row bytes)."""

    def __init__(self, raw: torch.Tensor, qtype: str, in_features: int, out_features: int, bias=None):
        super().__init__()
        block, type_size = BLOCK_LAYOUT[qtype]
        if raw.dtype != torch.uint8 or raw.shape != (out_features, in_features // block * type_size):
            raise ValueError(f"raw {qtype} weight has shape {tuple(raw.shape)}, expected "
                             f"({out_features}, {in_features // block * type_size}) uint8")  # fmt: skip
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.register_buffer("raw", raw.contiguous(), persistent=False)
        self.bias = bias
        self._kernel_id = KERNEL_TYPES.get(qtype) if _kernels is not None else None

    def dequantized(self) -> torch.Tensor:
        return dequantize_fast(self.raw, self.qtype, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if self._kernel_id is not None and rows <= MAX_KERNEL_ROWS and x2.dtype == torch.float32:
            x2 = x2.contiguous()
            y = torch.empty(rows, self.out_features, dtype=torch.float32)
            _kernels.matmul(self._kernel_id, self.raw.data_ptr(), x2.data_ptr(), y.data_ptr(),
                            rows, self.out_features, self.in_features)  # fmt: skip
            if self.bias is not None:
                y += self.bias
        else:
            y = F.linear(x2, self.dequantized().to(x2.dtype), self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, qtype={self.qtype}"


class GGMLEmbedding(nn.Module):
    """Token embeddings kept in GGML blocks; only the rows looked up are dequantized."""

    def __init__(self, raw: torch.Tensor, qtype: str, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.qtype, self.num_embeddings, self.embedding_dim = qtype, num_embeddings, embedding_dim
        self.register_buffer("raw", raw, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.raw[ids.reshape(-1)]  # (n, row bytes): the quantized rows
        out = dequantize_fast(rows.contiguous(), self.qtype, (rows.shape[0], self.embedding_dim))
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"
