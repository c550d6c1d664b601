"""Hugging Face folder -> GGUF (`garage quantize FOLDER`, `garage convert FOLDER`): the same
bytes llama.cpp's quantizer makes from the same weights, the tokenizer llama.cpp reads back
tokenizing like the folder's tokenizer.json, and models llama.cpp runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from garagelm.cli import main
from garagelm.formats.gguf import GGUFFile

STRINGS = [
    "Héllo wörld 🦙 — 12345 numbers and   spaces",
    "Привет, мир! 日本語のテキスト 1,234,567.89",
    "def f(x):\n\treturn x ** 2  # it's, they're, I'LL, we'VE",
    "<|im_start|>user\nHi<|im_end|>  trailing   \n\n",
    "e\u0301 ﬁ 🦙🔥👩‍👩‍👧‍👦 ١٢٣ ⅷ",
    "Hello\n\nWorld\n\n\n  x\r\n\ty",
    "don't DON'T (hello) [world] {x: 3.14159, y: 1000000}",
    "",
]
# tokenizer.json's own spelling of the pre-tokenizers (as the models' repositories ship them)
_HF_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3 = (
    _HF_CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _HF_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
PRE = {  # name written -> (pre_tokenizer, the BPE's ignore_merges)
    "starcoder": (  # SmolLM2's: single digits, then GPT-2's splits
        {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, {**_BYTES, "use_regex": True}]},
        False,
    ),
    "llama3": (
        {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3}, "behavior": "Isolated", "invert": False}, _BYTES]},
        True,
    ),
    "qwen2": (
        {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _QWEN2}, "behavior": "Isolated", "invert": False}, _BYTES]},
        False,
    ),
}  # fmt: skip


def test_folder_to_q8_0_equals_llama_cpps_file(smol_hf, smol_path, quantized, tmp_path):
    """SmolLM2 as a Hugging Face folder, quantized by us, against the same weights in GGUF
    quantized by llama.cpp: every tensor byte-equal; the tokenizer keys as the original GGUF's."""
    out = tmp_path / "smol-Q8_0.gguf"
    assert main(["quantize", str(smol_hf), "--type", "Q8_0", "--out", str(out), "--quiet"]) == 0
    ours, theirs, original = GGUFFile(out), GGUFFile(quantized("Q8_0")), GGUFFile(smol_path)
    assert set(ours.tensors) == set(theirs.tensors)
    for name, t in ours.tensors.items():
        assert t.qtype == theirs.tensors[name].qtype, name
        assert np.array_equal(t.raw, theirs.tensors[name].raw), name
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "model", "add_bos_token"):  # fmt: skip
        got, want = ours.get(f"tokenizer.ggml.{key}"), original.get(f"tokenizer.ggml.{key}")
        assert list(np.atleast_1d(got)) == list(np.atleast_1d(want)), key
    assert ours.get("tokenizer.chat_template") == original.get("tokenizer.chat_template")
    assert ours.get("general.file_type") == 7


def _tiny_folder(root: Path, smol_hf: Path, arch: str, pre: dict, ignore_merges: bool, **extra) -> Path:
    """A small random model with SmolLM2's vocabulary and the given pre-tokenizer."""
    import transformers as tf

    torch.manual_seed(2)
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[
        arch
    ]
    model = cls[1](cls[0](**common, **extra)).float().eval()
    with torch.no_grad():  # large weights: greedy text without near ties
        for p in model.parameters():
            p.mul_(8.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    folder = root / f"{arch}-{id(pre)}"
    model.save_pretrained(folder)
    spec = json.loads((smol_hf / "tokenizer.json").read_text())
    spec["pre_tokenizer"], spec["model"]["ignore_merges"] = pre, ignore_merges
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(smol_hf / "tokenizer_config.json", folder)
    return folder


@pytest.mark.parametrize("name,arch", [("starcoder", "llama"), ("llama3", "llama"), ("qwen2", "qwen2")])
def test_converted_tokenizer_and_model_run_in_llama_cpp(name, arch, smol_hf, tmp_path, llama_cpp_model):
    """The pre-tokenizer is recognised from tokenizer.json; llama.cpp, reading our GGUF,
    tokenizes as the `tokenizers` library does with the folder's tokenizer.json, and its greedy
    tokens equal ours on the F32 file."""
    from llama_cpp import Llama
    from test_hf_models import LLAMA3_ROPE
    from test_reference import _ours_greedy, _ref_greedy
    from tokenizers import Tokenizer as HFTokenizer

    from garagelm.runtime.load import load_model

    # Llama 3's tokenizer comes with Llama 3.1's RoPE scaling, which GGUF keeps as rope_freqs
    extra = {"rope_scaling": LLAMA3_ROPE} if name == "llama3" else {}
    folder = _tiny_folder(tmp_path, smol_hf, arch, *PRE[name], **extra)
    out = tmp_path / f"{name}.gguf"
    assert main(["convert", str(folder), "--type", "F32", "--out", str(out), "--quiet"]) == 0
    assert GGUFFile(out).get("tokenizer.ggml.pre") == name
    assert ("rope_freqs.weight" in GGUFFile(out).tensors) == bool(extra)
    reference = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = Llama(str(out), vocab_only=True, verbose=False)
    for text in STRINGS:
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == reference.encode(text).ids, text
    loaded = load_model(out)
    ids = loaded.tokenizer.encode("The capital of France is Paris, and 12345", add_special=True)
    assert _ours_greedy(loaded, ids, 16) == _ref_greedy(
        llama_cpp_model(out, logits_all=False), ids, 16, set()
    )


def test_folders_that_cannot_be_converted(smol_hf, tmp_path, capsys):
    unknown = {"type": "Split", "pattern": {"Regex": r"\w+"}, "behavior": "Isolated", "invert": False}
    folder = _tiny_folder(tmp_path, smol_hf, "llama", unknown, False)
    out = tmp_path / "x.gguf"

    def refused(match: str) -> None:
        assert main(["quantize", str(folder), "--type", "Q8_0", "--out", str(out), "--quiet"]) == 1
        assert match in capsys.readouterr().err

    refused("match no llama.cpp pre-tokenizer")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}
    spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    refused("byte fallback")
    (folder / "tokenizer.json").unlink()
    refused("no tokenizer.json")
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_calibration_from_a_folder_equals_from_its_gguf(smol_hf, smol_f32):
    """The importance matrix measured on the folder is the GGUF's (same weights, same text)."""
    from conftest import shared_data

    from garagelm.quant.imatrix import collect

    text = shared_data("austen/emma.txt").read_text()[:4000]
    a = collect(smol_hf, text, ctx=128, max_windows=2, quiet=True)
    b = collect(smol_f32, text, ctx=128, max_windows=2, quiet=True)
    assert set(a) == set(b) and "token_embd.weight" in a
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), name


def test_llama_cpps_own_products_read_our_k_quant_blocks_as_we_do(smol_hf, tmp_path):
    """A model whose rows are whole 256-value blocks (so Q4_K_M uses the K types, not their
    fallbacks), quantized by us from its folder: ggml's own matrix product (llama.cpp's kernel,
    called through ctypes) on each of our tensors equals our dequantized weight times the
    activations as ggml rounds them, to float32 rounding. That is where the engines differ: the
    exact product (ours, transformers') is further from ggml's than that by orders of magnitude,
    which is why greedy text on a quantized file can part from llama.cpp's at a near tie."""
    import transformers as tf
    from ggml_ref import mul_mat, rounded_activations

    from garagelm.formats.ggml_quants import dequantize

    torch.manual_seed(3)
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    folder = tmp_path / "tiny"
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol_hf / name, folder)
    out = tmp_path / "tiny-Q4_K_M.gguf"
    assert main(["quantize", str(folder), "--type", "Q4_K_M", "--out", str(out), "--quiet"]) == 0
    g = GGUFFile(out)
    checked = set()
    for name, t in g.tensors.items():
        if len(t.shape) != 2 or name == "token_embd.weight":
            continue
        n, k = t.shape
        x = torch.randn(3, k)
        x[:, 7] = 12.0  # an outlier, as real activations have
        theirs = mul_mat(t.raw, t.qtype, n, k, x)
        w = dequantize(t.raw_bytes(), t.qtype, t.shape)
        ours_rounded = rounded_activations(x, t.qtype) @ w.T
        exact = x @ w.T
        scale = theirs.abs().max()
        assert (ours_rounded - theirs).abs().max() <= 2e-6 * scale, name
        assert (exact - theirs).abs().max() > 100 * (ours_rounded - theirs).abs().max(), name
        checked.add(t.qtype)
    assert {"Q4_K", "Q6_K"} <= checked


def test_sentencepiece_vocabulary_from_tokenizer_json(gemma_path, tmp_path):
    """Gemma 3's 262k SentencePiece vocabulary, held as tokenizer.json does it (a byte-fallback
    BPE, here the one we build from the real GGUF), converted back to GGUF keys with a small
    Gemma 3 model: the same pieces and types as the original file, and llama.cpp tokenizes a
    Unicode-heavy set with it exactly as with the original."""
    import transformers as tf
    from llama_cpp import Llama
    from test_gemma3 import UNICODE

    from garagelm.runtime.tokenizer import Tokenizer

    original = GGUFFile(gemma_path)
    folder = tmp_path / "gemma"
    cfg = tf.Gemma3TextConfig(vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    tf.Gemma3ForCausalLM(cfg).save_pretrained(folder)
    Tokenizer(original.metadata).hf_tokenizer().save(str(folder / "tokenizer.json"))
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**names, "add_bos_token": True}))
    out = tmp_path / "gemma.gguf"
    assert main(["convert", str(folder), "--type", "F32", "--out", str(out), "--quiet"]) == 0
    ours = GGUFFile(out)
    assert ours.get("tokenizer.ggml.model") == "llama" and not ours.get("tokenizer.ggml.add_space_prefix")
    assert ours.get("tokenizer.ggml.tokens") == original.get("tokenizer.ggml.tokens")
    assert list(ours.get("tokenizer.ggml.token_type")) == list(original.get("tokenizer.ggml.token_type"))
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        assert ours.get(f"tokenizer.ggml.{key}") == original.get(f"tokenizer.ggml.{key}"), key
    converted = Llama(str(out), vocab_only=True, verbose=False)
    reference = Llama(str(gemma_path), vocab_only=True, verbose=False)
    for text in UNICODE:
        for special in (False, True):
            got = converted.tokenize(text.encode(), add_bos=True, special=special)
            assert got == reference.tokenize(text.encode(), add_bos=True, special=special), text
