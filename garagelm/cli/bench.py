"""`garage bench MODEL`: how fast a model runs on this machine."""

from __future__ import annotations

import argparse
import json

from garagelm.cli.run import add_kv_cache_argument


def add_arguments(verb: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="store name or path to a .gguf file")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_kv_cache_argument(p)


def main(args: argparse.Namespace) -> int:
    from garagelm.cli.resolve import resolve_model
    from garagelm.evaluate.speed import measure

    r = measure(
        resolve_model(args.model), args.prompt_tokens, args.gen_tokens, args.reps, kv_cache=args.kv_cache
    )
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"model                 {r['model']}")
    print(f"threads               {r['threads']}")
    print(f"kernels               {r['kernels']} (GARAGE_CPU picks another)")
    print(
        f"prompt processing     {r['pp_tok_s']:.1f} tokens/s ({r['pp_tokens']} tokens, median of {args.reps}, "
        f"{r['prefill_products']} products)"
    )
    print(
        f"generation            {r['tg_tok_s']:.1f} tokens/s ({r['tg_tokens']} tokens, greedy, {r['kv_cache']} KV cache)"
    )
    print(f"load to first token   {r['load_to_first_token_s']:.2f} s")
    print(f"peak memory (RSS)     {r['peak_rss_mib']:.0f} MiB")
    return 0
