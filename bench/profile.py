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

import garagelm.quant.decode as qdecode
import garagelm.quant.ggml_linear as qlinear
from garagelm.cli.resolve import resolve_model
from garagelm.evaluate.speed import bench_tokens
from garagelm.runtime.generate import Engine
from garagelm.runtime.load import load_model


def _wrap(cls, name, acc, key, when=None):
    """Time cls.name into acc[key] (only the calls `when(self, *args)` accepts, if given)."""
    orig = getattr(cls, name)

    def timed(self, *args, **kwargs):
        if when is not None and not when(self, *args):
            return orig(self, *args, **kwargs)
        t = time.perf_counter()
        out = orig(self, *args, **kwargs)
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
    # GGMLLinear.forward itself is timed on prefill rows (whichever product it picks, bf16 or
    # float32), and so are the dequantizations it calls there; the products are the difference.
    # The one-row output head is a kernel product, left in "rest" as outside the profile.
    acc = {"dequant": 0.0, "linear": 0.0}
    cls = qlinear.GGMLLinear

    def prefill_rows(self, x):
        return x.numel() // self.in_features > qlinear.MAX_KERNEL_ROWS

    def whole_weight(self, rows=None):  # not an embedding lookup
        return rows is None

    originals = {
        "forward": _wrap(cls, "forward", acc, "linear", prefill_rows),
        "dequantized": _wrap(cls, "dequantized", acc, "dequant", whole_weight),
        "dequantized_bf16": _wrap(cls, "dequantized_bf16", acc, "dequant", whole_weight),
    }
    t = time.perf_counter()
    for _ in range(reps):
        engine.reset()
        engine._forward(ids, 0)
    total = (time.perf_counter() - t) / reps * 1e3
    for name, fn in originals.items():
        setattr(cls, name, fn)
    dq, gemm = acc["dequant"] / reps * 1e3, (acc["linear"] - acc["dequant"]) / reps * 1e3
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
