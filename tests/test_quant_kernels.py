"""The fused dequantize+matmul kernels against float32 matmuls of gguf-py-dequantized weights."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from garagelm.formats.gguf import GGUFFile
from garagelm.quant import cpu
from garagelm.quant.ggml_linear import (
    PACKED_KINDS,
    GGMLEmbedding,
    GGMLLinear,
    exact_products,
    kernels_available,
    use_bf16,
    use_int8_prefill,
)

pytestmark = pytest.mark.skipif(not kernels_available(), reason="C kernels not built")

FILES = {
    "Q4_0": "Q4_0", "Q4_1": None, "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
    "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
}  # fmt: skip


@pytest.fixture(scope="module")
def tensors(smol_path, quantized):
    """qtype -> a real tensor of that type (SmolLM2 weights)."""
    out = {}
    for qtype, kind in FILES.items():
        g = GGUFFile(smol_path if kind is None else quantized(kind))
        out[qtype] = next(t for t in g.tensors.values() if t.qtype == qtype and len(t.shape) == 2)
    return out


@pytest.mark.parametrize("qtype", list(FILES))
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_matmul_matches_float_reference(tensors, qtype, rows, variant):
    t = tensors[qtype]
    n, k = t.shape
    w = torch.from_numpy(gguf_dequantize(t.raw, GGMLQuantizationType[qtype]).reshape(n, k))
    lin = GGMLLinear(t.raw_bytes(), qtype, k, n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    with exact_products():
        got = lin(x)
        previous = cpu.set_variant("generic")  # every variant: the plain C build's bits
        try:
            assert torch.equal(got, lin(x)), variant
        finally:
            cpu.set_variant(previous)
    want = F.linear(x.double(), w.double()).float()
    # float32 rounding only: errors far below the spread of the outputs
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_decode_products_with_int8_activations(tensors, qtype, variant):
    """Outside exact_products, a 1..8-row product quantizes x to q8_0 as llama.cpp does for these
    weight types: it equals a float64 product of the dequantized weights with that int8 input
    (exact integer dots), differs from the float32 product by the input's rounding, and row r of
    an 8-row product equals the 1-row product of row r bit for bit (Q4_K: x in q8_0 blocks, finer
    than llama.cpp's q8_K, and so for Q5_K and Q6_K, whose scale per 16 values splits a block's dot in two)."""
    from garagelm.runtime.cache import dequantize_q8_0, quantize_q8_0

    t = tensors[qtype]
    n, k = t.shape
    w = torch.from_numpy(gguf_dequantize(t.raw, GGMLQuantizationType[qtype]).reshape(n, k)).double()
    lin = GGMLLinear(t.raw_bytes(), qtype, k, n)
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(3)) * torch.logspace(-1, 1, k)
    with torch.inference_mode():
        got = lin(x)
        singles = torch.cat([lin(x[r : r + 1]) for r in range(8)])
        with exact_products():
            exact = lin(x)
    scale = (x.double() @ w.T).abs().max()
    want = dequantize_q8_0(*quantize_q8_0(x), torch.float64) @ w.T
    assert (got.double() - want).abs().max() <= 1e-6 * scale
    assert (got.double() - exact.double()).abs().max() > 1e-4 * scale  # the int8 input shows
    assert torch.equal(got, singles)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_int8_products_are_the_same_bits_on_every_variant(tensors, qtype, variant):
    """Every variant's int8-activation product (16, 8, 4 weight rows a register) equals, bit for
    bit, the plain C loop that takes one row at a time, and so the portable build's output: the
    same integer dots and the same float32 operations per output, in the same order. So greedy
    text does not depend on the CPU. Also with a partial last group of weight rows."""
    t = tensors[qtype]
    n, k = t.shape
    lin = GGMLLinear(t.raw_bytes(), qtype, k, n)
    q, d, m = lin._pointers()
    generic = cpu.load("generic")
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(11)) * torch.logspace(-1, 1, k)
    for rows, cols in ((1, n), (3, n - 3), (8, n - 5), (5, n)):
        ys = []
        for module, reference in ((cpu.kernels, False), (cpu.kernels, True), (generic, False)):
            y = torch.empty(rows, cols)
            module.int8_reference(reference)
            try:
                module.matmul_packed(
                    PACKED_KINDS[qtype], q, d, m, x.data_ptr(), y.data_ptr(), rows, cols, k, True
                )
            finally:
                module.int8_reference(False)
            ys.append(y)
        assert torch.equal(ys[0], ys[1]), (variant, rows, cols)
        assert torch.equal(ys[0], ys[2]), (variant, rows, cols)


@pytest.mark.parametrize("qtype", list(FILES))
def test_bf16_prefill_products(tensors, qtype, variant):
    """Many rows (prefill). On a CPU with bf16 dot products: the weights dequantized straight to
    bf16 equal the float32 dequantization rounded to nearest even, and the product is the float32
    one up to bf16 rounding of its inputs and output (errors ~2^-8 of the output spread). Without
    (or with another variant than AVX-512): the int8 kernel with x as q8_0, exactly that product
    up to float32 rounding, for the kinds with integer dots."""
    t = tensors[qtype]
    n, k = t.shape
    lin = GGMLLinear(t.raw_bytes(), qtype, k, n)
    w = lin.dequantized()
    assert torch.equal(lin.dequantized_bf16().view(torch.int16), w.to(torch.bfloat16).view(torch.int16))
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(64))
    want = F.linear(x.double(), w.double()).float()
    got = lin(x)
    err = float((got - want).abs().max() / want.abs().max())
    if use_bf16(64):
        assert 1e-5 < err < 2e-2, err  # not the float32 path, and within bf16's precision
    elif use_int8_prefill(64, qtype):  # no bf16 dot (AVX2, ARM): x as q8_0, the int8 kernel
        from garagelm.runtime.cache import dequantize_q8_0, quantize_q8_0

        exact = dequantize_q8_0(*quantize_q8_0(x), torch.float64) @ w.double().T
        assert (got.double() - exact).abs().max() <= 1e-6 * exact.abs().max()
        # 8 rows at a time: each group the same bits as a decode step's product of those rows
        assert torch.equal(got, torch.cat([lin(x[r : r + 8]) for r in range(0, 64, 8)]))
    else:  # Q5_K, Q6_K without bf16: float32
        assert err <= 1e-5
    with exact_products():
        assert (lin(x) - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("qtype", list(FILES))
def test_fast_dequantize_bit_exact(tensors, qtype, variant):
    t = tensors[qtype]
    want = gguf_dequantize(t.raw, GGMLQuantizationType[qtype]).reshape(t.shape)
    layer = GGMLLinear(t.raw_bytes(), qtype, t.shape[1], t.shape[0])  # packed for Q4_0/Q4_1/Q8_0
    assert np.array_equal(layer.dequantized().numpy().view(np.uint32), want.view(np.uint32))
    rows = torch.tensor([3, 0, 3])
    assert np.array_equal(layer.dequantized(rows).numpy(), want[[3, 0, 3]])


def test_concat_equals_parts(tensors):
    t = tensors["Q4_1"]
    a = GGMLLinear(t.raw_bytes(), "Q4_1", t.shape[1], t.shape[0])
    both = GGMLLinear.concat([a, a])
    x = torch.randn(2, t.shape[1])
    assert torch.equal(both(x), torch.cat([a(x), a(x)], dim=-1))


def test_embedding_rows(smol_path):
    t = GGUFFile(smol_path).tensors["token_embd.weight"]
    emb = GGMLEmbedding(GGMLLinear(t.raw_bytes(), t.qtype, t.shape[1], t.shape[0]))
    ids = torch.tensor([[0, 5, 49151], [17, 17, 2]])
    full = t.to_float()
    assert torch.equal(emb(ids), full[ids])


def test_quantized_model_equals_dequantized_model(smol_path):
    from garagelm.models import from_gguf

    g = GGUFFile(smol_path)
    fast, ref = from_gguf(g, quantized=True), from_gguf(g, quantized=False)
    assert isinstance(fast.model.layers[0].self_attn.qkv_proj, GGMLLinear)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253]])
    with torch.inference_mode(), exact_products():  # float32 products (no int8 activations)
        a, b = fast(ids), ref(ids)  # prefill path
        a1 = fast(ids[:, :1])  # decode-sized path (kernel)
        b1 = ref(ids[:, :1])
    # float32 rounding differences (fused products, other GEMM blocking) grow over 30 layers
    assert (a - b).abs().max() < 1e-2 and (a1 - b1).abs().max() < 1e-2
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    with torch.inference_mode():  # decode's default: x quantized to q8_0 as llama.cpp does
        c1 = fast(ids[:, :1])
    assert 1e-2 < (c1 - b1).abs().max() < 2.0 and torch.equal(c1.argmax(-1), b1.argmax(-1))


def test_load_packs_the_layers_in_place(gemma_path):
    """A load packs each layer weight straight into its place on huge pages: q/k/v and gate/up
    (Q5_0 in Gemma 3) into row slices of their fused product (the fusion is then a view), every
    other layer product (Q4_K, Q6_K, Q8_0) into the same reserved piece; values equal a fresh
    pack of the file's blocks."""
    from garagelm.models import from_gguf
    from garagelm.quant import hugepages
    from garagelm.quant.ggml_linear import _pack

    g = GGUFFile(gemma_path)
    model = from_gguf(g)
    # a layer whose v is Q5_0 like its q and k (half of them have a Q8_0 v: no fused q/k/v there)
    i = next(i for i in range(18) if g.tensors[f"blk.{i}.attn_v.weight"].qtype == "Q5_0")
    attn, mlp = model.model.layers[i].self_attn, model.model.layers[i].mlp
    products = [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
    arrays = [a for p in products for a in (p.q, p.d, p.m) if a is not None]
    if hugepages._madvise() is not None:
        assert len({a.untyped_storage().data_ptr() for a in arrays}) == 1
    row = 0
    for name, fused in (("attn_q", attn.qkv_proj), ("attn_k", attn.qkv_proj), ("attn_v", attn.qkv_proj),
                        ("ffn_gate", mlp.gate_up_proj), ("ffn_up", mlp.gate_up_proj), ("ffn_down", mlp.down_proj)):  # fmt: skip
        t = g.tensors[f"blk.{i}.{name}.weight"]
        row = 0 if name in ("attn_q", "ffn_gate", "ffn_down") else row
        want = _pack(t.raw_bytes(), t.qtype, *t.shape)
        got = [None if a is None else a[row : row + t.shape[0]] for a in (fused.q, fused.d, fused.m)]
        assert all(a is b is None or torch.equal(a, b) for a, b in zip(got, want, strict=True)), name
        row += t.shape[0]


def test_bad_raw_shape_is_rejected():
    with pytest.raises(ValueError, match="expected"):
        GGMLLinear(torch.zeros(4, 10, dtype=torch.uint8), "Q4_1", 64, 4)


def _plan_and_module_logits(model, kv: str = "f16") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a prompt and 12 greedy steps, with the decode plan and with the torch modules."""
    from garagelm.runtime.cache import KVCache, kv_type

    cfg, plan = model.config, model.decode_plan
    ids = [1, 504, 3458, 282, 4649, 314]
    runs = []
    for use_plan in (True, False):
        model.decode_plan = plan if use_plan else None
        cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 64, dtype=kv_type(kv))
        with torch.inference_mode():
            out = [model(torch.tensor([ids]), cache=cache, start=0, last_only=True)[0, -1]]
            for i in range(12):
                tok = int(out[-1].argmax())
                out.append(model(torch.tensor([[tok]]), cache=cache, start=len(ids) + i)[0, -1])
        runs.append(torch.stack(out))
    model.decode_plan = plan
    return runs[0], runs[1]


def _step_pairs(model, kv: str) -> tuple[torch.Tensor, torch.Tensor]:
    """12 greedy decode steps; each one run twice from the same cache state, once through the
    decode plan and once through the torch modules (so differences do not accumulate)."""
    import copy

    from garagelm.runtime.cache import KVCache, kv_type

    cfg, plan = model.config, model.decode_plan
    ids = [1, 504, 3458, 282, 4649, 314]
    cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 64, dtype=kv_type(kv))
    planned, modules = [], []
    with torch.inference_mode():
        tok = int(model(torch.tensor([ids]), cache=cache, start=0, last_only=True)[0, -1].argmax())
        for i in range(12):
            twin = copy.deepcopy(cache)
            model.decode_plan = None
            modules.append(model(torch.tensor([[tok]]), cache=twin, start=len(ids) + i)[0, -1])
            model.decode_plan = plan
            planned.append(model(torch.tensor([[tok]]), cache=cache, start=len(ids) + i)[0, -1])
            tok = int(planned[-1].argmax())
    return torch.stack(planned), torch.stack(modules)


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_whole_layer_decode_equals_module_path(smol_path, kv, variant):
    """The one-call-per-layer C decode gives the torch module path's logits and tokens over 12
    steps of its own greedy text, on an f16 cache and on a q8_0 one (written in C by the step,
    in torch by the modules); and so does a whole 12-step run on an f16 cache."""
    from garagelm.models import from_gguf

    model = from_gguf(GGUFFile(smol_path))
    assert model.decode_plan is not None
    with exact_products():  # float32 products: the C layer computes the torch layers' function
        planned, modules = _step_pairs(model, kv)
    assert torch.equal(planned.argmax(-1), modules.argmax(-1))
    # float32 sums in another order; q8_0 can also round a new key, or the query (quantized to
    # q8_0 for the key dot, as llama.cpp does), one int8 step apart (measured: max 1.4e-3 on f16;
    # on q8_0 max 0.13, the median staying small)
    diff = (planned - modules).abs()
    print("plan vs modules:", kv, float(diff.max()), float(diff.median()))
    assert diff.max() < (1e-2 if kv == "f16" else 0.3)
    assert diff.median() < (1e-3 if kv == "f16" else 0.02)
    if kv == "f16":
        with exact_products():
            planned, modules = _plan_and_module_logits(model, kv)
        assert torch.equal(planned.argmax(-1), modules.argmax(-1))
        assert (planned - modules).abs().max() < 1e-2


def test_float_models_decode_in_the_kernels_too(smol_f32):
    """F32 weights become DenseLinear (the same parameters) and get a whole-layer plan; its
    decode equals the torch layers' (float32 sums in another order)."""
    from garagelm.models import from_gguf
    from garagelm.quant.dense import DenseLinear

    model = from_gguf(GGUFFile(smol_f32))
    assert model.decode_plan is not None
    assert isinstance(model.model.layers[0].mlp.down_proj, DenseLinear)
    assert "model.layers.0.mlp.down_proj.weight" in model.state_dict()
    planned, modules = _plan_and_module_logits(model)
    assert torch.equal(planned.argmax(-1), modules.argmax(-1))
    # measured 4.4e-3: SmolLM2 carries activations in the thousands
    assert (planned - modules).abs().max() < 1e-2
    cfg = model.config
    x = torch.randn(3, cfg.hidden_size, requires_grad=True)  # training: plain autograd products
    model.model.layers[0].mlp.gate_proj(x).sum().backward()
    assert x.grad is not None


def test_packing_by_rows_equals_packing_whole(smol_path):
    """The embedding packs a slice of rows at a time (releasing its file pages as it goes):
    the same arrays as packing it whole, and every row reported done once."""
    t = GGUFFile(smol_path).tensors["token_embd.weight"]
    whole = GGMLLinear(t.raw_bytes(), t.qtype, t.shape[1], t.shape[0])
    seen = []
    sliced = GGMLLinear.packed_by_rows(
        t.raw_bytes(), t.qtype, t.shape[1], t.shape[0], 5000, lambda a, b: seen.append((a, b))
    )
    for name in ("q", "d", "m"):
        a, b = getattr(whole, name), getattr(sliced, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert (
        seen[0][0] == 0
        and seen[-1][1] == t.shape[0]
        and all(x[1] == y[0] for x, y in itertools.pairwise(seen))
    )


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"])
def test_c_split_equals_the_torch_split(tensors, qtype, monkeypatch):
    """A load splits K-quant and Q5 blocks in C (split_kquant, split_q5); the torch split they
    replaced, still the path without them, gives the same bits."""
    from types import SimpleNamespace

    from garagelm.quant import ggml_linear

    t = tensors[qtype]
    raw, (n, k) = t.raw_bytes(), t.shape
    fast = ggml_linear._pack(raw, qtype, n, k)
    kept = {a: getattr(cpu.kernels, a) for a in dir(cpu.kernels) if a not in ("split_kquant", "split_q5")}
    monkeypatch.setattr(cpu, "kernels", SimpleNamespace(**kept))
    slow = ggml_linear._pack(raw, qtype, n, k)
    for a, b in zip(fast, slow, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_q4_k_and_q5_stay_4_and_5_bit(tensors):
    """Q4_K is held as its 4-bit values plus, per 32 values, its integer scale and min (a byte
    each) and per 256 a float32 d and dmin: 0.59 bytes a weight (the file: 0.5625); Q5_0 and Q5_1
    as their 5-bit values and f16 scales (and mins), as in the file; Q6_K unpacked to int8 with
    its int8 scale per 16 and a float32 d per 256: 1.08 (before: float32 scales, 0.75 and 1.25)."""
    for qtype, per_weight in (
        ("Q4_K", 19 / 32),
        ("Q5_0", 22 / 32),
        ("Q5_1", 24 / 32),
        ("Q6_K", 1 + 2.5 / 32),
    ):
        t = tensors[qtype]
        n, k = t.shape
        lin = GGMLLinear(t.raw_bytes(), qtype, k, n)
        held = sum(b.numel() * b.element_size() for b in lin.buffers())
        assert held == n * k * per_weight, (qtype, held / (n * k))


def test_prefill_rows_kernels_against_float64(variant):
    """RMSNorm and the gated activations (SiLU, GELU-tanh) over many rows in C against float64:
    float32 rows within a few float32 roundings, bf16 rows in and out within one bf16 step of
    the float64 result rounded to bf16 (and equal to it almost always)."""
    from garagelm.quant import rows

    torch.manual_seed(0)
    x, w = torch.randn(300, 640) * 30, torch.randn(640)
    x64 = x.double()
    ref = x64 * torch.rsqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6) * w.double()
    cpu_norm = rows.rmsnorm(x, w, 1e-6)
    assert ((cpu_norm.double() - ref).abs() <= 1e-6 * ref.abs() + 1e-6).all()
    gu = torch.randn(2, 150, 2 * 512) * 4
    for gelu in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            g = gu.to(dtype)
            gate, up = g.double().split(512, dim=-1)
            # GELU-tanh, 0.5 g (1 + tanh u), as g * sigmoid(2u): the same function, and exact in
            # float64 where 1 + tanh u would cancel to 0 (large negative g)
            u = (2 / math.pi) ** 0.5 * (gate + 0.044715 * gate**3)
            want = (gate * torch.sigmoid(2 * u) if gelu else F.silu(gate)) * up
            got = rows.gated(g, 512, gelu)
            assert got.dtype == dtype and got.shape == (2, 150, 512)
            previous = cpu.set_variant("generic")  # every variant: the plain C build's bits
            try:
                assert torch.equal(got, rows.gated(g, 512, gelu)), variant
                assert torch.equal(rows.rmsnorm(x, w, 1e-6), cpu_norm), variant
            finally:
                cpu.set_variant(previous)
            if dtype == torch.float32:
                # GELU's tail: exp(-2u) of a float32 u with |2u| up to ~60 carries ~60 roundings
                tol = 2e-5 if gelu else 1e-6
                assert ((got.double() - want).abs() <= tol * want.abs() + 1e-30).all(), gelu
            else:
                exact = want.to(torch.bfloat16).double()
                step = (got.double() - exact).abs()
                assert (step <= want.abs() * 2**-7 + 1e-30).all() and (step > 0).double().mean() < 0.01, gelu
    x.requires_grad_(True)  # training: torch's ops, so autograd sees them
    assert rows.rmsnorm(x, w, 1e-6) is None
