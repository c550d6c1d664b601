"""Float32 linear layers whose few-row products (decode) run in the C kernels.

A float model (a Hugging Face folder, an F32/F16 GGUF) decodes one token at a time; torch's
small matrix-vector products and the ops around them then cost more than reading the weights.
DenseLinear is an nn.Linear (same parameters, same state_dict, trainable) that hands products
of up to 8 rows to the kernel that also serves the quantized types, so the whole-layer decode
step (quant/decode.py) covers float models too. Longer inputs, and anything that needs
gradients, take F.linear. The product is the float32 dot product in another summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from garagelm.quant.ggml_linear import MAX_KERNEL_ROWS, _kernels

P_F32 = 5  # the kernels' kind for plain float32 rows


class DenseLinear(nn.Linear):
    _kind = P_F32

    def _pointers(self) -> tuple[int, int, int]:
        return self.weight.data_ptr(), 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (
            rows <= MAX_KERNEL_ROWS
            and x.dtype == torch.float32
            and self.bias is None
            and not (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad))
        ):
            x = x if x.is_contiguous() else x.contiguous()
            y = torch.empty((*x.shape[:-1], self.out_features))
            _kernels.matmul_packed(
                P_F32, self.weight.data_ptr(), 0, 0, x.data_ptr(), y.data_ptr(), rows, self.out_features,
                self.in_features,
            )  # fmt: skip
            return y
        return super().forward(x)


def use_dense_kernels(model: nn.Module) -> int:
    """Turn the model's bias-free float32 nn.Linear layers (input a multiple of 32 wide) into
    DenseLinear in place; returns how many. The class is swapped on the same module object, so
    parameters, tied weights and hooks stay as they are."""
    if _kernels is None:
        return 0
    n = 0
    for module in model.modules():
        if (
            isinstance(module, nn.Linear)
            and type(module).forward is nn.Linear.forward  # plain layers only, not specialised ones
            and module.bias is None
            and module.weight.dtype == torch.float32
            and module.weight.is_contiguous()
            and module.in_features % 32 == 0
        ):
            module.__class__ = DenseLinear
            n += 1
    return n
