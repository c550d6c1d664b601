"""Generation pieces: cache reuse, stop strings, sampling, chat template sandbox."""

from __future__ import annotations

import pytest
import torch

from garagelm.quant.ggml_linear import exact_products
from garagelm.runtime.chat_template import ChatTemplate, TemplateError
from garagelm.runtime.generate import Completion, Engine, _partial_stop
from garagelm.runtime.sampling import Sampler, SamplingParams, min_p, top_k, top_p

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@exact_products()  # the property under test: the same function, however the prompt is split
def test_cached_prefix_gives_same_tokens(smol_loaded):
    tok = smol_loaded.tokenizer
    a = tok.encode("The quick brown fox jumps over the lazy dog. The end of", add_special=True)
    fresh = list(Engine(smol_loaded.model, tok, 256).tokens(a, GREEDY))
    eng = Engine(smol_loaded.model, tok, 256)
    list(eng.tokens(a[:-3], GREEDY))  # fills the cache with a shared prefix and more
    reused = list(eng.tokens(a, GREEDY))
    assert reused == fresh


@exact_products()
def test_kv_cache_decode_equals_full_forward(smol_loaded):
    tok = smol_loaded.tokenizer
    ids = tok.encode("Counting: one, two, three,", add_special=True)
    gen = list(Engine(smol_loaded.model, tok, 256).tokens(ids, SamplingParams(temperature=0, max_tokens=10)))
    seq = ids + gen
    with torch.inference_mode():
        logits = smol_loaded.model(torch.tensor([seq]))[0]
    assert logits[len(ids) - 1 : -1].argmax(-1).tolist() == gen


def test_batched_rows_match_single(smol_loaded):
    tok = smol_loaded.tokenizer
    a = tok.encode("Hello there, how are", add_special=True)
    b = tok.encode("Paris is the capital of", add_special=True)
    n = min(len(a), len(b))
    # float32 products: the row counts differ (2n and n rows), and by default fewer than 9 rows
    # take int8 activations, more do not
    with torch.inference_mode(), exact_products():
        both = smol_loaded.model(torch.tensor([a[:n], b[:n]]))
        one = smol_loaded.model(torch.tensor([b[:n]]))
    assert torch.allclose(both[1], one[0], atol=1e-4)


def test_stop_strings_never_emitted(smol_loaded):
    tok = smol_loaded.tokenizer
    ids = tok.encode("1, 2, 3, 4, 5, 6,", add_special=True)
    c = Completion()
    text = "".join(
        Engine(smol_loaded.model, tok, 256).complete(
            ids, SamplingParams(temperature=0, max_tokens=30, stop=[" 9"]), c
        )
    )
    assert " 9" not in text and c.finish_reason == "stop"
    c2 = Completion()
    "".join(
        Engine(smol_loaded.model, tok, 256).complete(ids, SamplingParams(temperature=0, max_tokens=5), c2)
    )
    assert c2.finish_reason == "length" and c2.stats.generated_tokens == 5


def test_partial_stop_holdback():
    assert _partial_stop("abc<|e", ["<|end|>"]) == 3
    assert _partial_stop("abc", ["xyz"]) == 0


def test_prompt_longer_than_context_is_clear(smol_loaded):
    from garagelm.errors import GarageError

    eng = Engine(smol_loaded.model, smol_loaded.tokenizer, 32)
    with pytest.raises(GarageError, match="40 tokens but the context holds 32"):
        list(eng.tokens(list(range(100, 140)), GREEDY))


def test_context_full_ends_with_length(smol_loaded):
    tok = smol_loaded.tokenizer
    ids = tok.encode("Once upon a time", add_special=True)
    c = Completion()
    "".join(Engine(smol_loaded.model, tok, len(ids) + 6).complete(ids, SamplingParams(temperature=0), c))
    assert c.finish_reason == "length"


def test_samplers():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(top_k(logits, 2)).tolist() == [False, False, True, True, True]
    kept = ~torch.isinf(top_p(logits, 0.7))
    assert kept.tolist() == [True, True, False, False, False]  # 0.64 < 0.7 <= 0.88
    assert (~torch.isinf(min_p(logits, 0.3))).tolist() == [True, True, False, False, False]


def test_greedy_takes_the_first_of_equal_maxima():
    greedy = Sampler(SamplingParams(temperature=0))
    assert greedy(torch.tensor([1.0, 5.0, 2.0, 5.0]), []) == 1
    assert greedy(torch.tensor([0.0, float("-inf"), 0.0]), []) == 0
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # as torch.argmax picks, on vocabularies with many ties
        row = torch.randint(0, 50, (49152,), generator=g).float()
        assert greedy(row, []) == int(torch.argmax(row))
    view = torch.randn(4, 100, generator=g)[:, 3]  # a strided row
    assert greedy(view, []) == int(torch.argmax(view))


def test_template_sandbox_blocks_escapes():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError, match="unsafe"):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError, match="refused"):
        ChatTemplate("{{ raise_exception('no system role') }}").render([])


def test_smollm2_template_renders_chatml(smol_loaded):
    text = smol_loaded.chat_template().render([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
