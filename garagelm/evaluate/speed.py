"""Speed of our engine on this machine: prompt processing, decode, time to first token, RSS."""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch

# Text to build benchmark prompts from: the Python language reference ships with every Python.
try:
    from pydoc_data.topics import topics as _TOPICS
except ImportError:  # pragma: no cover - stripped Pythons
    _TOPICS = {"x": "The quick brown fox jumps over the lazy dog. " * 2000}


def bench_tokens(tokenizer, n: int) -> list[int]:
    text = "\n".join(_TOPICS[k] for k in sorted(_TOPICS))
    ids = tokenizer.encode(text)
    if len(ids) < n:
        raise ValueError(f"benchmark text has only {len(ids)} tokens, {n} asked")
    return ids[:n]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.inference_mode()
def _decode(engine, first: int, start: int, n: int) -> float:
    """Greedy decode of n tokens after position `start`, ignoring end tokens (as llama-bench)."""
    tok = first
    t0 = time.perf_counter()
    for i in range(n):
        logits = engine._forward([tok], start + i)
        tok = int(logits.argmax())
    return n / (time.perf_counter() - t0)


def measure(
    path: str | Path,
    pp: int = 512,
    tg: int = 128,
    reps: int = 3,
    decode_ctx: tuple[int, ...] = (),
    kv_cache: str | None = None,
) -> dict:
    """Median tok/s over `reps` runs; also decode after each context length in decode_ctx.
    kv_cache names the KV cache type (default: the engine's, f16 where the kernels are built)."""
    from garagelm.runtime.generate import Engine
    from garagelm.runtime.load import load_model

    t0 = time.perf_counter()
    loaded = load_model(path)
    tok = loaded.tokenizer
    longest = max((pp, *decode_ctx))
    # prompts go in 512-token chunks, as `garage run` and the server take them
    engine = Engine(loaded.model, tok, longest + tg + 8, kv_dtype=kv_cache)
    first = engine._forward(tok.encode("Hello"), 0)
    load_to_first_token = time.perf_counter() - t0
    from garagelm.quant import hugepages

    hugepages.wait_settled()  # the weights moved onto huge pages after the load: measure after
    prompt = bench_tokens(tok, longest)
    pp_rates, tg_rates = [], []
    at_ctx: dict[str, list[float]] = {str(n): [] for n in decode_ctx}
    for _ in range(reps):
        engine.reset()
        t1 = time.perf_counter()
        logits = engine._forward(prompt[:pp], 0)
        pp_rates.append(pp / (time.perf_counter() - t1))
        tg_rates.append(_decode(engine, int(logits.argmax()), pp, tg))
    ttft: dict[str, list[float]] = {str(n): [] for n in decode_ctx}
    for _ in range(reps):  # contexts interleaved, as llama.cpp's are in bench/speed.py: drift
        for n in decode_ctx:  # in this machine's speed then touches every context alike
            engine.reset()
            t1 = time.perf_counter()
            logits = engine._forward(prompt[:n], 0)
            ttft[str(n)].append(time.perf_counter() - t1)  # the prompt's logits give the 1st token
            at_ctx[str(n)].append(_decode(engine, int(logits.argmax()), n, tg))
    del first
    from garagelm.quant.ggml_linear import GGMLLinear, use_bf16, use_int8_prefill
    from garagelm.runtime.cache import kv_type_name

    fast = any(getattr(m, "bf16_prefill", False) for m in loaded.model.modules()) and use_bf16(pp)
    int8 = any(isinstance(m, GGMLLinear) and use_int8_prefill(pp, m.qtype) for m in loaded.model.modules())
    from garagelm.quant import cpu

    out = {"model": str(path), "threads": torch.get_num_threads(), "pp_tokens": pp, "tg_tokens": tg,
           "kernels": cpu.variant_name(),
           "prefill_products": "bf16" if fast else "int8 (x as q8_0)" if int8 else "float32",
           "kv_cache": kv_type_name(engine.cache.dtype),
           "weight_bytes_per_token": weight_bytes_per_token(loaded.model),
           "kv_bytes_per_position": engine.cache.nbytes() // engine.cache.capacity}  # fmt: skip
    return {**out, **summary("garagelm", pp_rates, tg_rates, at_ctx, load_to_first_token, ttft)}


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads, as this engine holds them: every product's weights
    (packed values and scales, or float), the output head included; of the embedding one row."""
    from garagelm.quant.ggml_linear import GGMLEmbedding, GGMLLinear

    # a quantized embedding's table is read a row a token, unless it is the (tied) output head too
    skip = {id(m.table) for m in model.modules() if isinstance(m, GGMLEmbedding)} - {id(model.lm_head)}
    total = 0
    for m in model.modules():  # each module once, a tied head's table included
        if id(m) in skip or isinstance(m, (torch.nn.Embedding, GGMLEmbedding)):
            continue
        if isinstance(m, GGMLLinear):
            total += sum(t.nbytes for t in (m.q, m.d, m.m) if t is not None)
        elif isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2:
            total += m.weight.nbytes  # a float product (nn.Linear, DenseLinear; a tied head too)
    return total


def summary(
    engine: str, pp_rates, tg_rates, at_ctx: dict[str, list[float]], load_s: float, ttft=None
) -> dict:
    """Medians of the repeated measurements, and this process's peak RSS (shared with bench/)."""
    out = {
        "engine": engine,
        "pp_tok_s": statistics.median(pp_rates),
        "tg_tok_s": statistics.median(tg_rates),
        "load_to_first_token_s": load_s,
        "peak_rss_mib": peak_rss_mib(),
    }
    if at_ctx:
        out["tg_tok_s_at_ctx"] = {n: statistics.median(r) for n, r in at_ctx.items()}
    if ttft:  # time to first token: the prompt of that many tokens processed, from a fresh start
        out["ttft_s_at_ctx"] = {n: statistics.median(r) for n, r in ttft.items()}
    return out
