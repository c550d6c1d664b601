"""The decode attention kernel and the q8_0 KV cache, against float64 references and llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from garagelm.quant import cpu
from garagelm.quant.attention import AVAILABLE, decode_attention
from garagelm.quant.ggml_linear import exact_products
from garagelm.runtime.cache import KVCache, dequantize_q8_0, kv_bytes_per_value, kv_type, quantize_q8_0


def _reference(q, k, v, scale):
    """float64 softmax attention of one query, grouped heads."""
    H, Hkv = q.shape[1], k.shape[1]
    k, v = (t.double().repeat_interleave(H // Hkv, 1) for t in (k, v))
    w = torch.softmax((q.double() @ k.transpose(-1, -2)) * scale, -1)
    return (w @ v).float()


def test_q8_0_is_llama_cpps_q8_0():
    """Our cache quantizer writes gguf-py's Q8_0 blocks (llama.cpp's reference quantizer)."""
    x = torch.randn(7, 128) * torch.logspace(-3, 2, 128)  # columns of very different size
    x[2] = 0  # an all-zero block gets d = 0
    q, d = quantize_q8_0(x)
    ours = np.concatenate(
        [d.view(torch.uint8).numpy().reshape(7, 4, 2), q.view(torch.uint8).numpy().reshape(7, 4, 32)], -1
    )
    ref = gguf_quantize(x.numpy(), GGMLQuantizationType.Q8_0).reshape(7, 4, 34)
    assert np.array_equal(ours, ref)
    back = gguf_dequantize(ref.reshape(7, -1), GGMLQuantizationType.Q8_0)
    assert np.array_equal(dequantize_q8_0(q, d, torch.float32).numpy(), back)


@pytest.mark.parametrize(
    ("kind", "H", "Hkv", "hd"),
    [
        (kind, *shape)
        for kind in ("f16", "q8_0")
        for shape in ((9, 3, 64), (4, 1, 256), (8, 8, 128), (6, 2, 96))
    ]
    + [("f16", 4, 2, 16), ("f16", 6, 3, 48)],  # heads of 1 and 3 vectors of 16 (f16 only: q8_0 needs 32s)
)
@pytest.mark.parametrize(("S", "first"), [(1, 0), (15, 0), (17, 0), (255, 0), (256, 0), (1000, 0), (2001, 0),
                                          (40, 3), (700, 189), (1030, 512)])  # fmt: skip
def test_decode_attention_kernel(kind, H, Hkv, hd, S, first, variant):
    """The kernel on a cache's views (capacity above S, so heads are strided) equals float64
    attention over the values the cache holds, for head sizes the kernel specialises (64, 128,
    256) and one it does not (96), short and split (>= 256 positions) contexts, partial tiles,
    and sliding windows (positions first..S-1, starting inside a tile or on its edge), heads of
    16 and 48 values too (an odd number of 16-value vectors). Every
    kernel variant gives the same bits as the plain C one."""
    torch.manual_seed(S + hd)
    cache = KVCache(1, Hkv, hd, 4096, dtype=kv_type(kind))
    k, v = torch.randn(1, Hkv, S, hd) * 2, torch.randn(1, Hkv, S, hd)
    k[..., 5] += 8  # an outlier channel, as real keys have
    held_k, held_v = cache.update(0, k, v, 0)
    q = torch.randn(1, H, 1, hd)
    views = [t[:, :, :S] for t in cache.layer(0)]
    out = decode_attention(q, *views[:2], hd**-0.5, *views[2:], first=first)
    assert out is not None
    previous = cpu.set_variant("generic")  # every variant computes the plain C build's bits
    try:
        assert torch.equal(out, decode_attention(q, *views[:2], hd**-0.5, *views[2:], first=first))
    finally:
        cpu.set_variant(previous)
    # q8_0: the kernel dots keys with the query quantized as llama.cpp's q8_0 key dot does
    held_q = dequantize_q8_0(*quantize_q8_0(q), torch.float32) if kind == "q8_0" else q
    window = slice(first, S)
    ref = _reference(held_q, held_k[:, :, window], held_v[:, :, window], hd**-0.5)
    assert (out - ref).abs().max() < 2e-5
    if kind == "q8_0":  # and the int8 cache stays close to the exact keys and values
        assert (out - _reference(q, k[:, :, window], v[:, :, window], hd**-0.5)).abs().max() < 0.05


def test_q8_0_cache_grows_and_keeps_what_it_held():
    cache = KVCache(2, 2, 64, 1000, dtype=kv_type("q8_0"), chunk=16)
    k, v = torch.randn(1, 2, 40, 64), torch.randn(1, 2, 40, 64)
    cache.update(1, k[:, :, :10], v[:, :, :10], 0)
    hk, hv = cache.update(1, k[:, :, 10:], v[:, :, 10:], 10)  # grows from 16 to 48 positions
    assert cache.capacity >= 40 and hk.shape == (1, 2, 40, 64)
    assert (hk - k).abs().max() < k.abs().max() / 127 and (hv - v).abs().max() < v.abs().max() / 127
    assert cache.nbytes() == 2 * 2 * 2 * cache.capacity * 64 * kv_bytes_per_value("q8_0")
    assert kv_bytes_per_value("q8_0") == 34 / 32 and kv_bytes_per_value(torch.float16) == 2


def test_kv_type_names_the_choices():
    with pytest.raises(ValueError, match="f32, f16, q8_0"):
        kv_type("q4")
    with pytest.raises(ValueError, match="multiple of 32"):
        KVCache(1, 1, 48, 16, dtype="q8_0")


def _decode_logits(loaded, seq: list[int], start: int, kv: str) -> np.ndarray:
    """Our next-token logits at positions start .. len(seq) - 1: the prompt seq[:start + 1] in
    one prefill, then one decode step per token (the C whole-layer step), on a `kv` cache."""
    cfg = loaded.model.config
    cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 1024, dtype=kv_type(kv))
    with torch.inference_mode():
        out = [loaded.model(torch.tensor([seq[: start + 1]]), cache=cache, start=0, last_only=True)[0, -1]]
        for pos in range(start + 1, len(seq)):
            out.append(loaded.model(torch.tensor([[seq[pos]]]), cache=cache, start=pos)[0, -1])
    return torch.stack(out).numpy()


@pytest.mark.skipif(not AVAILABLE, reason="C kernels not built")
def test_q8_0_cache_decode_agrees_with_llama_cpps_q8_0_cache(smol_loaded, smol_path, llama_cpp_model):
    """Decoding on a q8_0 cache, teacher-forced along llama.cpp's greedy text with its own q8_0
    cache (-ctk q8_0 -ctv q8_0): the argmaxes agree but for near-ties, as with f16 caches."""
    from test_reference import (
        CHAT_PROMPTS,
        NEAR_TIE,
        RAW_PROMPTS,
        _prompt_ids,
        _ref_greedy,
        llama_cpp_logits,
        tie_gap,
    )

    assert smol_loaded.model.decode_plan is not None
    ref = llama_cpp_model(smol_path, q8_cache=True)
    agree = total = 0
    moved = 0.0
    for text, chat in [(p, False) for p in RAW_PROMPTS[:3]] + [(p, True) for p in CHAT_PROMPTS[:2]]:
        ids = _prompt_ids(smol_loaded, text, chat)
        seq = ids + _ref_greedy(ref, ids, 64, set())
        got = _decode_logits(smol_loaded, seq, len(ids) - 1, "q8_0")
        expected = llama_cpp_logits(ref, seq, len(ids) - 1)
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += len(expected)
        assert tie_gap(got, expected) < NEAR_TIE, text
        with exact_products():  # the cache's own effect, without the activations' int8 rounding
            f16 = _decode_logits(smol_loaded, seq, len(ids) - 1, "f16")
            q8 = _decode_logits(smol_loaded, seq, len(ids) - 1, "q8_0")
        moved = max(moved, float(np.abs(q8 - f16).max()))
    print(f"q8_0 cache: top-1 agreement with llama.cpp {agree}/{total}, logits moved up to {moved:.3f}")
    assert agree / total >= 0.95, f"top-1 agreement {agree}/{total}"
    # the int8 cache (and the query quantized for the key dot) does change the logits, by little
    # (measured 1.13 at most against the f16 cache)
    assert 0 < moved < 1.5


def test_huge_page_buffers_hold_what_is_copied_in():
    """Buffers on 2 MiB pages (runtime streaming): aligned, and exact copies; small tensors
    share an arena chunk, large ones get their own."""
    from garagelm.quant import hugepages

    t = hugepages.empty((3, 1 << 20), torch.float16)  # 6 MiB
    assert t.shape == (3, 1 << 20) and t.dtype == torch.float16 and t.is_contiguous()
    if hugepages._madvise() is not None:
        assert t.data_ptr() % hugepages.HUGE == 0
    arena = hugepages.Arena()
    small = [torch.randint(-100, 100, (n, 33), dtype=torch.int8) for n in (5, 700, 3)]
    taken = [arena.take(s) for s in small]
    assert all(torch.equal(a, b) for a, b in zip(small, taken))
    if hugepages._madvise() is not None:
        assert taken[1].data_ptr() - taken[0].data_ptr() == 192  # packed, on cache-line starts
    big = torch.randn(3 << 20)
    assert torch.equal(arena.take(big), big)


def test_loaded_model_weights_live_on_huge_pages(smol_loaded):
    """The packed weights of a loaded model were moved into 2 MiB-page chunks before its decode
    plan bound their addresses (the plan's outputs are tested against the modules elsewhere)."""
    from garagelm.quant import hugepages
    from garagelm.quant.ggml_linear import GGMLLinear

    if hugepages._madvise() is None:
        pytest.skip("no madvise on this platform: weights stay where torch put them")
    layers = [m for m in smol_loaded.model.modules() if isinstance(m, GGMLLinear)]
    storages = {m.q.untyped_storage().data_ptr() for m in layers}
    assert len(storages) < len(layers) / 4  # many layers share a chunk
