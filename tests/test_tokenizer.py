"""Tokenizer conformance: llama.cpp's own test vectors, and ids equal to llama.cpp on SmolLM2."""

from __future__ import annotations

import pytest

from garagelm.formats.gguf import GGUFFile
from garagelm.runtime.tokenizer import Tokenizer

# BPE and SPM vocabularies of llama.cpp's tests that we must read exactly.
VOCABS = [
    "gpt-2", "llama-bpe", "llama-spm", "qwen2", "deepseek-llm", "deepseek-coder", "falcon", "mpt",
    "starcoder", "refact", "command-r", "phi-3", "qwen35",
]  # fmt: skip

STRINGS = [
    "Hello world",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\n\n\n  mixed \t\n",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, 한국어, العربية, русский текст",
    "emoji 🦙🚀👩‍👩‍👧 and symbols ∑∫√≠ ©®™",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e10 0x1F",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))",
    'for (int i = 0; i < n; ++i) { s += a[i]; }  // C\n<div class="x">&amp;</div>',
    "I'm sure they'll've done it, didn't they? 'quoted' \"double\"",
    "                                    many spaces",
    "<|im_start|> literal special text <|im_end|>",
]


def _vectors(path):
    inputs = path.with_name(path.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = path.with_name(path.name + ".out").read_text(encoding="utf-8").split("\n")
    return list(zip(inputs, outputs, strict=False))


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vocab_vectors(vocab_dir, name):
    path = vocab_dir / f"ggml-vocab-{name}.gguf"
    tok = Tokenizer(GGUFFile(path).metadata)
    cases = _vectors(path)
    assert len(cases) >= 40
    failures = [(s, exp) for s, exp in cases if tok.encode(s) != [int(x) for x in exp.split()]]
    assert not failures, (
        f"{name}: {len(cases) - len(failures)}/{len(cases)} pass; first failure {failures[0]!r}"
    )


def test_ids_equal_llama_cpp(smol_path, llama_cpp_model):
    ref = llama_cpp_model(smol_path)
    tok = Tokenizer(GGUFFile(smol_path).metadata)
    for s in STRINGS:
        for special in (False, True):
            expected = ref.tokenize(s.encode(), add_bos=False, special=special)
            assert tok.encode(s, parse_special=special) == expected, (s, special)


def test_special_tokens_parsed_only_when_asked(smol_path):
    tok = Tokenizer(GGUFFile(smol_path).metadata)
    assert tok.encode("<|im_start|>", parse_special=True) == [1]
    assert 1 not in tok.encode("<|im_start|>", parse_special=False)
    assert 2 in tok.eog_ids and 0 in tok.eog_ids  # <|im_end|>, <|endoftext|>


def test_detokenize_round_trip_and_streaming(smol_path):
    tok = Tokenizer(GGUFFile(smol_path).metadata)
    for s in STRINGS[:-1]:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        stream = tok.stream()
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == s
        assert all("\ufffd" not in p for p in pieces), "a stream piece split a UTF-8 character"


def test_unsupported_tokenizer_is_a_clear_error(vocab_dir):
    md = dict(GGUFFile(vocab_dir / "ggml-vocab-bert-bge.gguf").metadata)
    with pytest.raises(ValueError, match="unsupported tokenizer model 'bert'"):
        Tokenizer(md)
    md = dict(GGUFFile(vocab_dir / "ggml-vocab-gpt-2.gguf").metadata)
    md["tokenizer.ggml.pre"] = "no-such-pre"
    with pytest.raises(ValueError, match="unknown pre-tokenizer 'no-such-pre'"):
        Tokenizer(md)


def _hf_encode(tok, text):
    hf = tok.hf_tokenizer()
    hf.encode_special_tokens = True
    return hf.encode(text, add_special_tokens=False).ids if text else []


def test_sentencepiece_as_tokenizers_object_cached_and_rebuilt_when_damaged(vocab_dir, tmp_path, monkeypatch):
    """The `tokenizers` form of a SentencePiece vocabulary (for writing a tokenizer.json) reads
    llama.cpp's vectors exactly too; its derived merges are kept as a plain .npy (no pickle),
    and a damaged entry is derived again. Loading a model does not build it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = vocab_dir / "ggml-vocab-llama-spm.gguf"
    cases = _vectors(path)[:20]
    expected = [[int(x) for x in exp.split()] for _, exp in cases]
    first = Tokenizer(GGUFFile(path).metadata)
    assert not (tmp_path / "garagelm").exists()  # encoding needs no derived merges
    assert [_hf_encode(first, s) for s, _ in cases] == expected
    (entry,) = (tmp_path / "garagelm" / "tokenizers").glob("spm-*.npy")
    for damage in (b"not an array", b""):  # garbage, and an empty file left by a crash
        entry.write_bytes(damage)
        again = Tokenizer(GGUFFile(path).metadata)
        assert [_hf_encode(again, s) for s, _ in cases] == expected
        assert entry.read_bytes().startswith(b"\x93NUMPY")  # written anew
