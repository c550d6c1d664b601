"""Random-weight GGUF models with the real shapes of the models people run, for speed benches.

Speed does not depend on what the weights say, only on their shapes and types, so a model with
DeepSeek-R1-Distill-Qwen-7B's shapes and random weights measures what the real one would, and
needs no download. Each model is written F16 (gguf-py's writer, one tensor at a time, so a 7B
model never sits in memory) and then quantized by llama.cpp's own quantizer
(`llama_model_quantize` through llama-cpp-python), the same tool that makes the files people
download. The F16 file is deleted afterwards unless asked for.

The tokenizer and chat template are SmolLM2's (chatml, the same turn format as Qwen's), copied
from its GGUF, with the vocabulary padded to the real model's size by unused tokens, as
llama.cpp's converter pads Qwen's: the output head and embedding have their real shapes.

Weights are N(0, 0.02), norms 1, biases N(0, 0.02): every activation stays finite (RMSNorm after
each residual add), the logits are spread, so greedy decoding does not stop at once on an end
token (its chance is about 1 in the vocabulary size a step).

    python bench/make_model.py qwen2-1.5b --types Q4_K_M Q4_0 Q8_0 --out bench/models
    python bench/make_model.py qwen2-7b --types Q4_K_M
    python bench/make_model.py --list
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    arch: str  # llama.cpp's architecture name
    real: str  # the model whose shapes these are
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float
    context: int
    qkv_bias: bool = False
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(GGUF name, numpy shape (rows, cols)) in the order llama.cpp's converter writes them."""
        h, f, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out = [("token_embd.weight", (self.vocab, h))]
        for i in range(self.layers):
            b = f"blk.{i}."
            out += [(b + "attn_norm.weight", (h,)), (b + "attn_q.weight", (h, h)),
                    (b + "attn_k.weight", (kv, h)), (b + "attn_v.weight", (kv, h))]  # fmt: skip
            if self.qkv_bias:
                out += [(b + "attn_q.bias", (h,)), (b + "attn_k.bias", (kv,)), (b + "attn_v.bias", (kv,))]
            out += [(b + "attn_output.weight", (h, h)), (b + "ffn_norm.weight", (h,)),
                    (b + "ffn_gate.weight", (f, h)), (b + "ffn_up.weight", (f, h)),
                    (b + "ffn_down.weight", (h, f))]  # fmt: skip
        out.append(("output_norm.weight", (h,)))
        if not self.tied:
            out.append(("output.weight", (self.vocab, h)))
        return out

    def parameters(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensors())


# From each model's config.json on the Hugging Face hub.
SHAPES = {
    "qwen2-1.5b": Shape("qwen2", "DeepSeek-R1-Distill-Qwen-1.5B (Qwen2.5-Math-1.5B)", 1536, 8960, 28,
                        12, 2, 151936, 10000.0, 131072, qkv_bias=True),
    "qwen2-7b": Shape("qwen2", "DeepSeek-R1-Distill-Qwen-7B (Qwen2.5-Math-7B)", 3584, 18944, 28, 28, 4,
                      152064, 10000.0, 131072, qkv_bias=True),
    "llama3-8b": Shape("llama", "Meta-Llama-3-8B-Instruct", 4096, 14336, 32, 32, 8, 128256, 500000.0,
                       8192),
}  # fmt: skip

# llama.cpp's file types (enum llama_ftype)
FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}


def _tokenizer_fields(source: Path) -> dict:
    """tokenizer.* keys of a GGUF file as Python values (gguf-py's reader)."""
    from gguf import GGUFReader

    reader = GGUFReader(source)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def write_f16(shape: Shape, path: Path, tokenizer_gguf: Path, seed: int = 0) -> None:
    """The model in F16 with random weights, streamed tensor by tensor."""
    import gguf
    from tqdm import tqdm

    tok = _tokenizer_fields(tokenizer_gguf)
    tokens = list(tok["tokenizer.ggml.tokens"])
    if len(tokens) > shape.vocab:
        raise ValueError(f"{tokenizer_gguf} has {len(tokens)} tokens, more than {shape.vocab}")
    types = list(tok.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens)))
    pad = range(len(tokens), shape.vocab)
    tokens += [f"[PAD{i}]" for i in pad]
    types += [gguf.TokenType.UNUSED] * len(pad)

    w = gguf.GGUFWriter(path, shape.arch)
    a = shape.arch
    w.add_name(f"random weights, {shape.real} shapes")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_uint32(f"{a}.context_length", shape.context)
    w.add_uint32(f"{a}.embedding_length", shape.hidden)
    w.add_uint32(f"{a}.block_count", shape.layers)
    w.add_uint32(f"{a}.feed_forward_length", shape.intermediate)
    w.add_uint32(f"{a}.attention.head_count", shape.heads)
    w.add_uint32(f"{a}.attention.head_count_kv", shape.kv_heads)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", shape.rope_theta)
    if a == "llama":
        w.add_uint32(f"{a}.rope.dimension_count", shape.head_dim)
        w.add_uint32(f"{a}.vocab_size", shape.vocab)
    w.add_tokenizer_model(tok["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in tok:
        w.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    if "tokenizer.ggml.merges" in tok:
        w.add_token_merges(list(tok["tokenizer.ggml.merges"]))
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
        if f"tokenizer.ggml.{key}" in tok:
            w.add_uint32(f"tokenizer.ggml.{key}", int(tok[f"tokenizer.ggml.{key}"]))
    if "tokenizer.ggml.add_bos_token" in tok:
        w.add_add_bos_token(bool(tok["tokenizer.ggml.add_bos_token"]))
    w.add_chat_template(tok["tokenizer.chat_template"])

    specs = shape.tensors()
    for name, s in specs:
        dtype = np.float32 if len(s) == 1 else np.float16  # norms and biases stay F32, as converted
        w.add_tensor_info(name, s, np.dtype(dtype), int(np.prod(s)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    total = shape.parameters()
    with tqdm(total=total, unit="param", unit_scale=True, desc=f"F16 {path.name}") as bar:
        for name, s in specs:
            if name.endswith("norm.weight"):
                t = np.ones(s, np.float32)
            elif len(s) == 1:
                t = rng.standard_normal(s, np.float32) * np.float32(0.02)
            else:  # row by row block: a 7B layer's tensors are up to 0.3 GB of float32
                t = np.empty(s, np.float16)
                for r in range(0, s[0], 4096):
                    t[r : r + 4096] = rng.standard_normal((min(4096, s[0] - r), s[1]), np.float32) * 0.02
            w.write_tensor_data(t)
            bar.update(t.size)
    w.close()


def quantize(f16: Path, out: Path, qtype: str, threads: int) -> None:
    """llama.cpp's quantizer (the `llama-quantize` tool's function), through llama-cpp-python."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = threads
    tmp = out.with_name(out.name + ".partial")
    rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed ({rc}) on {f16} -> {qtype}")
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", nargs="?", choices=sorted(SHAPES))
    ap.add_argument("--types", nargs="+", default=["Q4_K_M"], choices=sorted(FTYPES))
    ap.add_argument("--out", type=Path, default=Path("bench/models"))
    ap.add_argument("--tokenizer", default="smollm2:135m", help="store name or GGUF to take the vocab from")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--keep-f16", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="the shapes and their sizes")
    args = ap.parse_args()
    if args.list or not args.shape:
        for key, s in SHAPES.items():
            print(f"{key:12s} {s.arch:6s} {s.parameters() / 1e9:5.2f}B params  {s.real}")
        return
    from garagelm.cli.resolve import resolve_model

    shape = SHAPES[args.shape]
    args.out.mkdir(parents=True, exist_ok=True)
    f16 = args.out / f"{args.shape}-random-F16.gguf"
    if not f16.exists():
        partial = f16.with_name(f16.name + ".partial")
        write_f16(shape, partial, Path(resolve_model(args.tokenizer)), args.seed)
        os.replace(partial, f16)
    for qtype in args.types:
        out = args.out / f"{args.shape}-random-{qtype}.gguf"
        t = time.perf_counter()
        quantize(f16, out, qtype, args.threads)
        size = out.stat().st_size / 2**30
        print(f"{out}: {size:.2f} GiB, quantized by llama.cpp in {time.perf_counter() - t:.0f} s")
    if not args.keep_f16:
        f16.unlink()


if __name__ == "__main__":
    main()
