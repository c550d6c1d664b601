"""ggml itself (the library inside llama-cpp-python) as a reference for one matrix product.

`mul_mat` runs ggml's own `ggml_mul_mat` on a weight in its GGML block type, through ctypes,
exactly as llama.cpp multiplies a layer. `rounded_activations` is what ggml does to the other
operand first: each row is rounded to 8-bit blocks (Q8_0 for the 32-value types, Q8_K for the
K-quants), so a product equals the float product of the dequantized weight with those rounded
activations (which the tests check) and not the exact one.
"""

from __future__ import annotations

import ctypes as C
import os

import numpy as np
import torch

TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12,
            "Q5_K": 13, "Q6_K": 14}  # fmt: skip


class _Params(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


def _libs():
    import llama_cpp

    lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    base = C.CDLL(os.path.join(lib, "libggml-base.so"), mode=C.RTLD_GLOBAL)
    cpu = C.CDLL(os.path.join(lib, "libggml-cpu.so"), mode=C.RTLD_GLOBAL)
    base.ggml_init.restype, base.ggml_init.argtypes = C.c_void_p, [_Params]
    base.ggml_new_tensor_2d.restype = C.c_void_p
    base.ggml_new_tensor_2d.argtypes = [C.c_void_p, C.c_int, C.c_int64, C.c_int64]
    base.ggml_get_data.restype, base.ggml_get_data.argtypes = C.c_void_p, [C.c_void_p]
    base.ggml_mul_mat.restype, base.ggml_mul_mat.argtypes = C.c_void_p, [C.c_void_p] * 3
    base.ggml_new_graph.restype, base.ggml_new_graph.argtypes = C.c_void_p, [C.c_void_p]
    base.ggml_build_forward_expand.argtypes = [C.c_void_p, C.c_void_p]
    base.ggml_free.argtypes = [C.c_void_p]
    cpu.ggml_graph_compute_with_ctx.argtypes = [C.c_void_p, C.c_void_p, C.c_int]
    if hasattr(cpu, "ggml_cpu_init"):
        cpu.ggml_cpu_init()
    return base, cpu


def mul_mat(raw: np.ndarray, qtype: str, n: int, k: int, x: torch.Tensor) -> torch.Tensor:
    """ggml_mul_mat of a (n, k) weight given as its GGML bytes and x (m, k) float32: (m, n)."""
    base, cpu = _libs()
    x = x.contiguous().float().numpy()
    m = x.shape[0]
    ctx = base.ggml_init(_Params(raw.nbytes + x.nbytes + m * n * 4 + (16 << 20), None, False))
    try:
        w = base.ggml_new_tensor_2d(ctx, TYPE_IDS[qtype], k, n)
        a = base.ggml_new_tensor_2d(ctx, 0, k, m)
        C.memmove(base.ggml_get_data(w), np.ascontiguousarray(raw).ctypes.data, raw.nbytes)
        C.memmove(base.ggml_get_data(a), x.ctypes.data, x.nbytes)
        y = base.ggml_mul_mat(ctx, w, a)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, y)
        cpu.ggml_graph_compute_with_ctx(ctx, graph, 1)
        out = np.empty((m, n), np.float32)
        C.memmove(out.ctypes.data, base.ggml_get_data(y), out.nbytes)
    finally:
        base.ggml_free(ctx)
    return torch.from_numpy(out)


def rounded_activations(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """x as ggml rounds it before a product with a `qtype` weight (its values, in float32)."""
    if qtype.endswith("_K"):  # Q8_K: 256 values, scale -max/127 from the largest magnitude, float
        b = x.reshape(*x.shape[:-1], -1, 256)
        mx = b.gather(-1, b.abs().argmax(-1, keepdim=True))
        inv = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
        q = torch.round(b * inv).clamp(max=127)
        return (q * torch.where(mx != 0, 1 / inv, torch.zeros_like(mx))).reshape(x.shape)
    # Q8_0 / Q8_1: 32 values, scale amax/127 stored as f16, rounded to nearest even
    b = x.reshape(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    q = torch.round(b * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    return (q * (amax / 127).half().float()).reshape(x.shape)
