"""Where garagelm's time goes on one model: decode (per token) and prefill (per 512 tokens).

    python bench/profile.py smollm2:135m

Decode is split into the whole-layer C calls, the output head and the rest (Python, embedding,
final norm); prefill into GEMMs (bf16 where the CPU has bf16 dot products, else float32),
per-call dequantization and the rest (attention, norms, activations). Timers wrap the
calls, so the figures include a little of their own overhead.
"""

from __future__ import annotations

import argparse
import time

import torch

import garagelm.quant.decode as qdecode
import garagelm.quant.ggml_linear as qlinear
from garagelm.cli.resolve import resolve_model
from garagelm.evaluate.speed import bench_tokens
from garagelm.runtime.generate import Engine
from garagelm.runtime.load import load_model


def _wrap(cls, name, acc, key):
    orig = getattr(cls, name)

    def timed(self, *args):
        t = time.perf_counter()
        out = orig(self, *args)
        acc[key] += time.perf_counter() - t
        return out

    setattr(cls, name, timed)
    return orig


def decode(loaded, ctx: int, n: int = 100) -> None:
    engine = Engine(loaded.model, loaded.tokenizer, ctx + n + 8, prefill_chunk=ctx)
    logits = engine._forward(bench_tokens(loaded.tokenizer, ctx), 0)
    acc = {"layers": 0.0, "head": 0.0}
    step = _wrap(qdecode.DecodePlan, "step", acc, "layers")
    fwd = _wrap(qlinear.GGMLLinear, "forward", acc, "head")  # only the head runs in Python
    t = time.perf_counter()
    for i in range(n):
        logits = engine._forward([int(logits.argmax())], ctx + i)
    total = (time.perf_counter() - t) / n * 1e3
    qdecode.DecodePlan.step, qlinear.GGMLLinear.forward = step, fwd
    layers, head = acc["layers"] / n * 1e3, acc["head"] / n * 1e3
    print(f"decode at {ctx} tokens: {total:.2f} ms/token = layer calls {layers:.2f} + output head {head:.2f}"
          f" + rest {total - layers - head:.2f}")  # fmt: skip


def prefill(loaded, n_tokens: int = 512, reps: int = 3) -> None:
    engine = Engine(loaded.model, loaded.tokenizer, n_tokens + 8, prefill_chunk=n_tokens)
    ids = bench_tokens(loaded.tokenizer, n_tokens)
    engine._forward(ids, 0)
    acc = {"dequant": 0.0, "gemm": 0.0}
    orig = qlinear.GGMLLinear.forward

    def forward(self, x):
        if x.numel() // self.in_features <= qlinear.MAX_KERNEL_ROWS:
            return orig(self, x)  # the one-row output head: a kernel product, as outside the profile
        t = time.perf_counter()
        bf16 = not self.exact and qlinear.use_bf16(x.numel() // self.in_features)
        w = self.dequantized_bf16() if bf16 else self.dequantized()
        t2 = time.perf_counter()
        y = torch.nn.functional.linear(x.to(w.dtype), w).float()  # as GGMLLinear.forward computes
        acc["dequant"] += t2 - t
        acc["gemm"] += time.perf_counter() - t2
        return y

    qlinear.GGMLLinear.forward = forward
    t = time.perf_counter()
    for _ in range(reps):
        engine.reset()
        engine._forward(ids, 0)
    total = (time.perf_counter() - t) / reps * 1e3
    qlinear.GGMLLinear.forward = orig
    dq, gemm = acc["dequant"] / reps * 1e3, acc["gemm"] / reps * 1e3
    print(f"prefill {n_tokens} tokens: {total:.0f} ms ({n_tokens / total * 1e3:.0f} tok/s) = GEMMs {gemm:.0f}"
          f" + dequantization {dq:.0f} + rest {total - gemm - dq:.0f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    args = ap.parse_args()
    loaded = load_model(resolve_model(args.model))
    if loaded.model.__dict__.get("decode_plan") is None:
        raise SystemExit("this model has no whole-layer decode plan; the profile would not mean much")
    for ctx in (50, 2000):
        decode(loaded, ctx)
    prefill(loaded)


if __name__ == "__main__":
    main()
