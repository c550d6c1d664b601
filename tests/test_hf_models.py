"""Hugging Face folders: tiny random qwen2 / qwen3 / mistral / gemma3 models made and saved with
`transformers` (config only, nothing downloaded), loaded by us; logits against transformers'."""

from __future__ import annotations

import pytest
import torch

from garagelm.formats.safetensors import HFFolder
from garagelm.models import from_hf
from garagelm.runtime.cache import KVCache

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
TOL = 1e-4  # float32 on both sides; logits spread over a few units
# Llama 3.1's RoPE scaling with a short original context, so that with 16-wide heads some pairs
# keep their frequency (wavelength < 16), some are slowed 8x (> 64) and two are blended.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip


def _make(kind: str):
    import transformers as tf

    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON))
    if kind == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=32))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=8, head_dim=16))
    if kind == "llama3":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, head_dim=16, rope_scaling=LLAMA3_ROPE))
    if kind == "gemma3":
        cfg = tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])  # fmt: skip
        return tf.Gemma3ForCausalLM(cfg)
    raise ValueError(kind)


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "mistral", "gemma3", "llama3"])
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    ref = _make(request.param).float().eval()
    with torch.no_grad():  # random norms and biases, so a misplaced one shows
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return request.param, ref, from_hf(HFFolder(folder))


def test_logits_equal_transformers_batched(pair):
    kind, ref, ours = pair
    ids = torch.randint(0, 512, (2, 20))  # batch of 2, longer than the sliding windows
    with torch.no_grad():
        expected = ref(ids).logits
    got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < TOL, kind


def test_cached_decode_equals_transformers(pair):
    kind, ref, ours = pair
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        expected = ref(ids).logits
    cfg = ours.config
    cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 64, batch=2)
    with torch.inference_mode():
        first = ours(ids[:, :10], cache=cache, start=0)
        steps = [ours(ids[:, t : t + 1], cache=cache, start=t) for t in range(10, 16)]
    got = torch.cat([first, *steps], dim=1)
    assert (got - expected).abs().max() < TOL, kind


def test_unsupported_and_broken_folders(tmp_path):
    import json

    from garagelm.errors import GarageError

    with pytest.raises(GarageError, match=r"no config\.json"):
        HFFolder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(GarageError, match="never loads"):
        HFFolder(tmp_path)


def test_real_model_from_a_hf_folder_runs_like_its_gguf(smol_hf, smol_loaded, capsys):
    from test_reference import _ours_greedy

    from garagelm.cli import main
    from garagelm.runtime.load import load_model

    hf = load_model(smol_hf)
    for text in ["Héllo wörld 🦙 — 12345", "def f(x):\n\treturn x  # <|im_start|>", "  spaces  "]:
        for special in (False, True):
            assert hf.tokenizer.encode(text, True, special) == smol_loaded.tokenizer.encode(
                text, True, special
            )
    assert hf.tokenizer.eog_ids >= smol_loaded.tokenizer.eog_ids
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = hf.encode_chat(hf.chat_template(), messages)
    assert ids == smol_loaded.encode_chat(smol_loaded.chat_template(), messages)
    from garagelm.quant.ggml_linear import exact_products

    with exact_products():  # the Q4_1 file would prefill in bf16, the float folder does not
        assert _ours_greedy(hf, ids, 24) == _ours_greedy(smol_loaded, ids, 24)
    assert main(["run", str(smol_hf), "What is 2+2?", "--temperature", "0", "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["show", str(smol_hf)]) == 0
    shown = capsys.readouterr().out
    assert "llama" in shown and "134.5M" in shown and "<|im_start|>" in shown


def test_sharded_folder(tmp_path):
    torch.manual_seed(0)
    ref = _make("qwen3").float().eval()
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(
        list(tmp_path.glob("*.safetensors"))
    ) > 2
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert (from_hf(HFFolder(tmp_path))(ids) - ref(ids).logits).abs().max() < TOL
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    from garagelm.errors import GarageError

    with pytest.raises(GarageError, match="listed in the index but missing"):
        HFFolder(tmp_path)


GGUF_KINDS = {  # llama.cpp's own layer layouts: Gemma 3 with its fixed 5-local/1-global pattern
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "mistral": ("llama", {"head_dim": 16}),
    "llama3": ("llama", {"head_dim": 16, "rope_scaling": LLAMA3_ROPE}),
    "gemma3": (
        "gemma3",
        {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16, "num_hidden_layers": 6},
    ),
}


@pytest.mark.parametrize("kind", list(GGUF_KINDS))
def test_converted_to_gguf_greedy_equals_llama_cpp(kind, smol_path, tmp_path, llama_cpp_model):
    """Our GGUF writer: a random model (SmolLM2's vocabulary, so llama.cpp has a tokenizer) runs
    in llama.cpp with the same 32 greedy tokens as in our engine."""
    import transformers as tf
    from test_reference import _ours_greedy, _ref_greedy

    from garagelm.formats.gguf import GGUFFile
    from garagelm.formats.gguf_write import write_gguf
    from garagelm.runtime.load import load_model

    arch, extra = GGUF_KINDS[kind]
    base = {**COMMON, "vocab_size": 49152, **extra}
    torch.manual_seed(1)
    cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM), "llama3": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}[kind]  # fmt: skip
    ref = cls[1](cls[0](**base)).float().eval()
    with torch.no_grad():  # weights large enough that the next token is never a near tie
        for p in ref.parameters():
            p.mul_(8.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path / "hf")
    ours = from_hf(HFFolder(tmp_path / "hf"))
    tokenizer_md = {k: v for k, v in GGUFFile(smol_path).metadata.items() if k.startswith("tokenizer.")}
    path = write_gguf(tmp_path / f"{kind}.gguf", arch, ours.config, ours.state_dict(), tokenizer_md)
    loaded = load_model(path)
    ids = loaded.tokenizer.encode(
        "The capital of France is Paris, and the capital of Spain is", add_special=True
    )
    got = _ours_greedy(loaded, ids, 32)
    assert got == _ref_greedy(llama_cpp_model(path, logits_all=False), ids, 32, set())
    with torch.no_grad():  # and the GGUF we read back is the model we wrote
        assert (loaded.model(torch.tensor([ids])) - ref(torch.tensor([ids])).logits).abs().max() < 1e-3


def test_bf16_checkpoint_stays_bf16_and_equals_transformers(tmp_path):
    """A bf16 checkpoint keeps its linear weights in bf16 (half the memory); the products are
    float32 products of those weights, as transformers computes them after widening the same
    checkpoint to float32; decode through the kernels gives the torch layers' tokens."""
    import transformers as tf

    from garagelm.quant.dense import DenseLinear

    torch.manual_seed(0)
    tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=32)).to(torch.bfloat16).save_pretrained(tmp_path)
    ref = tf.Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = from_hf(HFFolder(tmp_path))
    down = ours.model.layers[0].mlp.down_proj
    assert isinstance(down, DenseLinear) and down.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < TOL
    assert ours.decode_plan is not None

    _plan_decodes_as_torch(ours, ids[:1])


def _plan_decodes_as_torch(model, ids: torch.Tensor, n: int = 16) -> None:
    """Greedy decode of n tokens after ids through the whole-layer kernel (the model's decode
    plan) and through the torch layers give the same tokens and logits."""
    cfg, runs = model.config, []
    for plan in (model.decode_plan, None):
        saved, model.decode_plan = model.decode_plan, plan
        cache = KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 64, dtype=torch.float16)
        with torch.inference_mode():
            out = [model(ids, cache=cache, start=0, last_only=True)[0, -1]]
            for t in range(ids.shape[1], ids.shape[1] + n):
                out.append(model(out[-1].argmax().view(1, 1), cache=cache, start=t)[0, -1])
        runs.append(torch.stack(out))
        model.decode_plan = saved
    assert torch.equal(runs[0].argmax(-1), runs[1].argmax(-1))
    assert (runs[0] - runs[1]).abs().max() < 1e-4


def test_quantized_gguf_with_its_own_output_head_and_biases(smol_path, tmp_path):
    """A Qwen2 file quantized to Q8_0 with an output head of its own (not the embedding) loads, and
    its q/k/v biases are applied: the quantized layers (float32 products) give the logits of the
    same file dequantized (before, such a file failed to load, and a quantized q/k/v dropped its
    bias)."""
    import transformers as tf

    from garagelm.cli import main
    from garagelm.formats.gguf import GGUFFile
    from garagelm.formats.gguf_write import write_gguf
    from garagelm.models import from_gguf
    from garagelm.quant.ggml_linear import GGMLLinear, exact_products

    torch.manual_seed(0)
    ref = tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, tie_word_embeddings=False)).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p))  # biases that matter
    ref.save_pretrained(tmp_path / "hf")
    ours = from_hf(HFFolder(tmp_path / "hf"))
    tokenizer_md = {k: v for k, v in GGUFFile(smol_path).metadata.items() if k.startswith("tokenizer.")}
    f32 = write_gguf(tmp_path / "f32.gguf", "qwen2", ours.config, ours.state_dict(), tokenizer_md)
    q8 = tmp_path / "q8_0.gguf"
    assert main(["quantize", str(f32), "--type", "Q8_0", "--out", str(q8), "--quiet"]) == 0
    g = GGUFFile(q8)
    assert g.tensors["output.weight"].qtype == "Q8_0" and "blk.0.attn_q.bias" in g.tensors
    fast, slow = from_gguf(g), from_gguf(g, quantized=False)
    attn = fast.model.layers[0].self_attn
    assert isinstance(attn.q_proj, GGMLLinear) and attn.q_proj.bias is not None
    assert isinstance(fast.lm_head, GGMLLinear)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad(), exact_products():
        assert (fast(ids) - slow(ids)).abs().max() < 1e-3
    # its embedding is not the output head: read from the file's map, not packed; the rows equal
    # the torch dequantizer's (the slow model's table)
    from garagelm.quant.ggml_linear import MappedEmbedding

    assert isinstance(fast.model.embed_tokens, MappedEmbedding)
    assert torch.equal(fast.model.embed_tokens(ids), slow.model.embed_tokens(ids))
    # decode runs through the whole-layer kernel, biases included (before, a bias meant no plan
    # and decode 1.3x slower on a 1.5B Qwen2): the same logits as the torch layers
    assert fast.decode_plan is not None
    _plan_decodes_as_torch(fast, ids)
