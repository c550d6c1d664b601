"""`garage eval perplexity MODEL --text FILE` and `garage eval compare SOURCE MODEL... --text FILE`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from garagelm.errors import GarageError


def add_arguments(verb: str, p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "what", choices=["perplexity", "compare"], help="perplexity of one model, or a trade-off table"
    )
    p.add_argument("models", nargs="+", help="compare: the source (reference) first, then the others")
    p.add_argument("--text", required=True, help="a UTF-8 text file to score")
    p.add_argument("--ctx", type=int, default=512, help="window length (default 512, as llama.cpp)")
    p.add_argument("--chunks", type=int, default=None, help="score only the first N windows")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    p.add_argument(
        "--plot", default=None, metavar="PNG", help="compare: bits per weight vs quality, as a PNG"
    )


def _load(ref: str):
    from garagelm.cli.resolve import resolve_model
    from garagelm.runtime.load import load_model

    return load_model(resolve_model(ref, pull_missing=False))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size


def _decode_rate(loaded, n: int = 32) -> float:
    from garagelm.evaluate.speed import bench_tokens
    from garagelm.runtime.generate import Engine

    engine = Engine(loaded.model, loaded.tokenizer, 160)
    logits = engine._forward(bench_tokens(loaded.tokenizer, 64), 0)
    t0 = time.perf_counter()
    for i in range(n):
        logits = engine._forward([int(logits.argmax())], 64 + i)
    return n / (time.perf_counter() - t0)


def main(args: argparse.Namespace) -> int:
    from garagelm.evaluate.quality import evaluate, windows

    text_path = Path(args.text)
    if not text_path.is_file():
        raise GarageError(f"--text {args.text}: no such file")
    text = text_path.read_text(encoding="utf-8", errors="replace")
    if args.what == "perplexity":
        if len(args.models) != 1:
            raise GarageError("eval perplexity takes one model")
        loaded = _load(args.models[0])
        q = evaluate(loaded.model, windows(loaded.tokenizer, text, args.ctx, args.chunks), progress=True)
        print(f"{args.models[0]}: perplexity {q.perplexity:.4f} over {q.tokens_scored} tokens "
              f"({len(q.per_window)} windows of {args.ctx})")  # fmt: skip
        if args.json:
            Path(args.json).write_text(
                json.dumps({"model": args.models[0], "ctx": args.ctx, **q.__dict__}, indent=2)
            )
        return 0
    if len(args.models) < 2:
        raise GarageError("eval compare takes the source model, then at least one model to compare with it")
    return _compare(args, text, evaluate, windows)


def _compare(args, text: str, evaluate, windows) -> int:
    source = _load(args.models[0])
    wins = windows(source.tokenizer, text, args.ctx, args.chunks)
    n_params = sum(p.numel() for p in source.model.parameters()) or 1
    from garagelm.quant.ggml_linear import GGMLLinear

    n_params = max(
        n_params,
        sum(m.in_features * m.out_features for m in source.model.modules() if isinstance(m, GGMLLinear)),
    )
    base = evaluate(source.model, wins, progress=True)
    rows = [_row(args.models[0], source, base, base, n_params)]
    for name in args.models[1:]:
        other = _load(name)
        if other.tokenizer.tokens != source.tokenizer.tokens:
            raise GarageError(
                f"{name} has another vocabulary than {args.models[0]}; they cannot be compared token by token"
            )
        q = evaluate(other.model, wins, reference=source.model, progress=True)
        rows.append(_row(name, other, q, base, n_params))
        del other
    del source  # each model's memory is measured in a child process, with none held here
    for row in rows:
        row["peak_rss_mib"] = _peak_rss(row.pop("path"))
    _print(rows, args)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"text": args.text, "ctx": args.ctx, "windows": len(wins.ids), "rows": rows}, indent=2)
        )
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _peak_rss(path: str) -> float | None:
    import subprocess

    from garagelm.evaluate.memory import peak_rss_mib

    try:
        return peak_rss_mib(path)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"warning: no peak RSS for {path}: {e}", file=sys.stderr)
        return None


def _row(name: str, loaded, q, base, n_params: int) -> dict:
    size = _size(loaded.path)
    return {
        "path": str(loaded.path),
        "model": name,
        "file_mib": size / 2**20,
        "bits_per_weight": size * 8 / n_params,
        "reduction_vs_16bit": 1 - size / (2 * n_params),
        "perplexity": q.perplexity,
        "perplexity_change": q.perplexity / base.perplexity - 1,
        "kl_mean": q.kl_mean,
        "kl_p99": q.kl_p99,
        "top1_agreement": q.top1_agreement,
        "decode_tok_s": _decode_rate(loaded),
    }


def _print(rows: list[dict], args) -> None:
    print(
        f"{'model':28s}{'MiB':>8s}{'bpw':>7s}{'vs16b':>7s}{'PPL':>9s}{'dPPL':>8s}{'KL mean':>9s}{'KL p99':>8s}{'top-1':>7s}{'tok/s':>7s}{'RSS MiB':>8s}"
    )
    for r in rows:
        kl = (
            f"{r['kl_mean']:>9.4f}{r['kl_p99']:>8.3f}{r['top1_agreement'] * 100:>6.1f}%"
            if r["kl_mean"] is not None
            else f"{'(source)':>24s}"
        )
        print(f"{r['model'][:27]:28s}{r['file_mib']:>8.1f}{r['bits_per_weight']:>7.2f}{r['reduction_vs_16bit'] * 100:>6.0f}%"
              f"{r['perplexity']:>9.3f}{r['perplexity_change'] * 100:>+7.1f}%{kl}{r['decode_tok_s']:>7.1f}{_mib(r['peak_rss_mib'])}")  # fmt: skip
    print(
        f"(perplexity over {args.text}, windows of {args.ctx}; KL(source || model) in nats per token; "
        "RSS: peak of loading the model and generating 32 tokens, each in a process of its own)",
        file=sys.stderr,
    )


def _mib(v: float | None) -> str:
    return f"{v:>8.0f}" if v is not None else f"{'-':>8s}"


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    bpw = [r["bits_per_weight"] for r in rows]
    ax[0].plot(bpw, [r["perplexity"] for r in rows], "o")
    for r in rows:
        ax[0].annotate(r["model"], (r["bits_per_weight"], r["perplexity"]), fontsize=7)
    ax[0].set(xlabel="bits per weight", ylabel="perplexity", title="Perplexity")
    comp = [r for r in rows if r["kl_mean"] is not None]
    ax[1].plot([r["bits_per_weight"] for r in comp], [r["kl_mean"] for r in comp], "o")
    for r in comp:
        ax[1].annotate(r["model"], (r["bits_per_weight"], r["kl_mean"]), fontsize=7)
    ax[1].set(
        xlabel="bits per weight",
        ylabel="mean KL vs source (nats)",
        title="Distance from the source",
        yscale="log",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
