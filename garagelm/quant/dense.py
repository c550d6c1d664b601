"""Float linear layers (float32, or bf16/f16 kept at 16 bits) whose few-row products (decode)
run in the C kernels.

A float model (a Hugging Face folder, an F32/F16 GGUF) decodes one token at a time; torch's
small matrix-vector products and the ops around them then cost more than reading the weights.
DenseLinear is an nn.Linear (same parameters, same state_dict, trainable) that hands products
of up to 8 rows to the kernel that also serves the quantized types, so the whole-layer decode
step (quant/decode.py) covers float models too. Longer inputs, and anything that needs
gradients, take F.linear. Weights stored in bf16 or f16 (a bf16 checkpoint, an F16 GGUF) stay
so, half the memory; they are widened to float32 exactly as they are read, so every product is
the float32 product of the stored weights, in another summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from garagelm.quant import cpu
from garagelm.quant.ggml_linear import MAX_KERNEL_ROWS

KINDS = {torch.float32: 5, torch.bfloat16: 6, torch.float16: 7}  # the kernels' plain float kinds


class DenseLinear(nn.Linear):
    @property
    def _kind(self) -> int:
        return KINDS[self.weight.dtype]

    def _pointers(self) -> tuple[int, int, int]:
        return self.weight.data_ptr(), 0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (
            cpu.kernels is not None
            and rows <= MAX_KERNEL_ROWS
            and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad))
        ):
            x = x if x.is_contiguous() else x.contiguous()
            y = torch.empty((*x.shape[:-1], self.out_features))
            cpu.kernels.matmul_packed(
                self._kind, self.weight.data_ptr(), 0, 0, x.data_ptr(), y.data_ptr(), rows, self.out_features,
                self.in_features,
            )  # fmt: skip
            return y if self.bias is None else y + self.bias.float()
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        return F.linear(x, w, b)


def use_dense_kernels(model: nn.Module) -> int:
    """Turn the model's float nn.Linear layers (input a multiple of 32 wide) into DenseLinear in
    place; returns how many. The class is swapped on the same module object, so parameters,
    tied weights and hooks stay as they are. Without the kernels only 16-bit layers change (they
    need DenseLinear's widening); 16-bit layers that cannot change are widened to float32."""
    n = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            continue  # plain layers only, not specialised ones
        if (
            module.weight.dtype in KINDS
            and (cpu.kernels is not None or module.weight.dtype != torch.float32)
            and module.weight.is_contiguous()
            and module.in_features % 32 == 0
        ):
            module.__class__ = DenseLinear
            n += 1
        elif module.weight.dtype != torch.float32:
            module.weight = nn.Parameter(module.weight.float(), requires_grad=module.weight.requires_grad)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.float(), requires_grad=module.bias.requires_grad)
    return n
