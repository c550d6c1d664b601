"""`garage search [QUERY] [--fits]`: catalog models, and whether each runs on this computer."""

from __future__ import annotations

import argparse
import json


def add_arguments(verb: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("query", nargs="?", default="", help="part of a name, family or description")
    p.add_argument("--fits", action="store_true", help="only models that fit, largest first")
    p.add_argument("--ctx", type=int, default=4096, help="context length to plan for (default 4096)")
    p.add_argument("--kv-cache", choices=["f16", "q8_0"], default="f16", help="KV cache type to plan for")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _params(e: dict) -> str:
    total = e.get("parameters") or 0
    text = f"{total / 1e9:.1f}B" if total >= 1e9 else f"{total / 1e6:.0f}M"
    if e.get("active_parameters"):
        text += f" ({e['active_parameters'] / 1e9:.0f}B active)"
    return text


def main(args: argparse.Namespace) -> int:
    from garagelm.store import bandwidth
    from garagelm.store.fit import decode_tok_s, estimate, file_size, verdict
    from garagelm.store.hardware import detect
    from garagelm.store.local import garage_home
    from garagelm.store.pull import catalog

    hw = detect()
    # decode reads every active weight once a token: its speed follows memory bandwidth,
    # measured once per machine (half a second) and kept in GARAGE_HOME/machine.json
    read_gb_s = bandwidth.cached(garage_home())["read_gb_s"]
    q = args.query.lower()
    rows = []
    for name, e in catalog().items():
        if q and q not in f"{name} {e.get('family', '')} {e.get('description', '')}".lower():
            continue
        est = estimate(e, args.ctx, args.kv_cache)
        rows.append((name, e, est, verdict(est, hw)))
    from garagelm.models import SUPPORTED

    fitting = [r for r in rows if r[3] != "won't fit" and r[1].get("architecture") in SUPPORTED]
    best = max(fitting, key=lambda r: r[1].get("parameters") or 0)[0] if fitting else None
    if args.fits:
        rows = sorted((r for r in rows if r[3] != "won't fit"), key=lambda r: -(r[1].get("parameters") or 0))
    if args.json:
        out = [{"name": n, "parameters": e.get("parameters"), "active_parameters": e.get("active_parameters"),
                "quantization": e.get("quantization"), "file_size": file_size(e), "size_exact": bool(e.get("size")),
                "weights": est.weights, "kv_cache": est.kv_cache, "runtime": est.runtime, "needs": est.total,
                "context": est.context, "verdict": v, "recommended": n == best,
                "decode_tok_s": round(decode_tok_s(e, read_gb_s), 1)} for n, e, est, v in rows]  # fmt: skip
        print(json.dumps({"available_ram": hw.available_ram, "total_ram": hw.total_ram,
                          "memory_read_gb_s": round(read_gb_s, 1), "models": out}, indent=2))  # fmt: skip
        return 0
    flags = "AVX-512" if "avx512f" in hw.cpu_flags else ("AVX2" if "avx2" in hw.cpu_flags else "no AVX2")
    gpus = ", ".join(f"{n} {_gib(v)}" for n, v in hw.gpus) or "no GPU"
    print(f"This computer: {_gib(hw.total_ram)} RAM ({_gib(hw.available_ram)} available), {hw.cores} cores, "
          f"{flags}, {gpus}, memory read {read_gb_s:.0f} GB/s. Needs at a {args.ctx}-token context:\n")  # fmt: skip
    table = [("NAME", "PARAMS", "QUANT", "FILE", "NEEDS", "= WEIGHTS + KV + RUNTIME", "~TOK/S", "VERDICT")]
    for n, e, est, v in rows:
        size = file_size(e)
        size_text = ("" if e.get("size") else "~") + _gib(size) if size else "?"
        parts = f"{_gib(est.weights)} + {_gib(est.kv_cache)} + {_gib(est.runtime)}"
        table.append((n + (" *" if n == best else ""), _params(e), e.get("quantization", "?"), size_text,
                      _gib(est.total), parts, f"{decode_tok_s(e, read_gb_s):.1f}", v))  # fmt: skip
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if best:
        print(f"\n* recommended here: {best} (the largest that fits and that garagelm runs today).")
    print("~ sizes are estimates until the file's exact size is in the catalog. Needs include a 10% margin.")
    print(
        "~TOK/S: expected decode speed on the CPU, from the bytes a token reads and this machine's memory speed."
    )
    return 0
