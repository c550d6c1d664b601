"""Dequantization is bit-exact against gguf-py on real tensors of every supported type.

The tensors are SmolLM2's real weights: the Q4_1/Q8_0 ones as shipped, the others written by
llama.cpp's own quantizer from the F32 conversion.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from garagelm.formats.ggml_quants import DEQUANTIZE
from garagelm.formats.gguf import GGUFFile


def _check_file(path, want_types):
    g = GGUFFile(path)
    seen = set()
    for t in g.tensors.values():
        if t.qtype in seen:
            continue
        ours = t.to_float().numpy()
        ref = gguf_dequantize(t.raw, GGMLQuantizationType[t.qtype]).reshape(ours.shape)
        assert ref.dtype == np.float32
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), f"{t.name} ({t.qtype}) differs"
        seen.add(t.qtype)
    assert want_types <= seen, f"{path.name}: expected tensors of {want_types}, found {seen}"
    return seen


def test_shipped_types_bit_exact(smol_path):
    _check_file(smol_path, {"Q4_1", "Q8_0", "F32"})


@pytest.mark.parametrize(
    "kind,types",
    [
        ("F16", {"F16"}),
        ("BF16", {"BF16"}),
        ("Q4_0", {"Q4_0"}),
        ("Q5_0", {"Q5_0"}),
        ("Q5_1", {"Q5_1"}),
        ("Q8_0", {"Q8_0"}),
        ("Q4_K_M", {"Q4_K", "Q6_K"}),
        ("Q5_K_M", {"Q5_K", "Q6_K"}),
        ("Q6_K", {"Q6_K"}),
    ],
)
def test_llama_cpp_quantized_types_bit_exact(quantized, kind, types):
    _check_file(quantized(kind), types)


def test_every_type_covered():
    assert set(DEQUANTIZE) == {
        "F32",
        "F16",
        "BF16",
        "Q8_0",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q4_K",
        "Q5_K",
        "Q6_K",
    }


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"])
def test_random_blocks_bit_exact(qtype):
    """All bit patterns of the packed fields, with finite scales."""
    from garagelm.formats.ggml_quants import BLOCK_LAYOUT, dequantize

    block, size = BLOCK_LAYOUT[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(64, size), dtype=np.uint8)
    scale = np.array([0.01], dtype=np.float16).view(np.uint8)
    # put finite half-float scales where each format keeps them
    spots = {"Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "Q5_0": [0], "Q5_1": [0, 2]}[qtype]
    for s in spots:
        raw[:, s : s + 2] = scale
    ours = dequantize(torch.from_numpy(raw), qtype, (64 * block,)).numpy()
    ref = gguf_dequantize(raw, GGMLQuantizationType[qtype]).reshape(-1)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
