"""The plain-C kernel path (CPUs without AVX-512), built here with AVX-512 switched off."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from garagelm.formats.gguf import GGUFFile
from garagelm.quant.ggml_linear import PACKED_KINDS, GGMLLinear, kernels_available

SOURCE = Path(__file__).resolve().parents[1] / "garagelm" / "quant" / "_kernels.c"
pytestmark = pytest.mark.skipif(
    not kernels_available() or shutil.which("cc") is None, reason="needs the kernels and a C compiler"
)


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    out = tmp_path_factory.mktemp("portable") / ("_kernels" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = ["cc", "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-pthread", "-std=c11", "-mno-avx512f",
           f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-o", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True)
    loader = importlib.machinery.ExtensionFileLoader("_kernels", str(out))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_kernels", loader))
    loader.exec_module(module)
    assert not hasattr(module, "decode_layers")  # the AVX-512-only parts are really out
    module.set_threads(2)
    return module


@pytest.mark.parametrize("qtype,kind", [("Q4_1", None), ("Q8_0", None), ("Q4_0", "Q4_0"), ("Q5_0", "Q5_0"),
                                        ("Q5_1", "Q5_1"), ("Q4_K", "Q4_K_M"), ("Q6_K", "Q6_K")])  # fmt: skip
def test_plain_c_products_and_dequantization(portable, smol_path, quantized, qtype, kind):
    g = GGUFFile(smol_path if kind is None else quantized(kind))
    t = next(t for t in g.tensors.values() if t.qtype == qtype and len(t.shape) == 2)
    n, k = t.shape
    layer = GGMLLinear(t.raw_bytes(), qtype, k, n)
    q, d, m = layer._pointers()
    want_w = gguf_dequantize(t.raw, GGMLQuantizationType[qtype]).reshape(n, k)
    out = torch.empty(n, k)
    portable.dequantize_packed(PACKED_KINDS[qtype], q, d, m, out.data_ptr(), n, k)
    assert np.array_equal(out.numpy().view(np.uint32), want_w.view(np.uint32))
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    y = torch.empty(3, n)
    portable.matmul_packed(PACKED_KINDS[qtype], q, d, m, x.data_ptr(), y.data_ptr(), 3, n, k)
    want = (x.double() @ torch.from_numpy(want_w).double().T).float()
    assert (y - want).abs().max() <= 1e-5 * want.abs().max()
