"""Load test of `garage serve`: 1, 4 and 8 concurrent streaming clients for a fixed time.

    python bench/serve_load.py smollm2:135m [--seconds 20] [--clients 1,4,8] [--rounds 3] [--json out.json]

Starts a server in a child process, then for each client count runs that many clients in a
loop (greedy chat requests of --max-tokens tokens, streamed) and prints aggregate generated
tok/s, p50/p95 time to first token, errors, and whether every reply equals the reply the same
request got alone (the first client count's replies). With --rounds N the client counts run N
times, interleaved in alternating order (1, 4, 8, 8, 4, 1, ...), and each count's tok/s is taken
over all its passes (each pass's own is kept in the JSON): this machine's speed drifts by tens of
percent within minutes, and one pass per count put a slow minute on one side of the ratio.
Ratio target: 8 clients >= 4x one client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

PROMPTS = [
    "Tell me about cats.", "What is 2+2?", "Write a haiku about rain.", "Why is the sky blue?",
    "Name three rivers in Europe.", "How do plants make food?", "Give me a tip for sleeping well.",
    "What is a prime number?", "Describe the sea in one sentence.", "Who wrote Hamlet?",
]  # fmt: skip


async def client(http, url, model, max_tokens, deadline, i0, step, out):
    i = i0
    while time.perf_counter() < deadline:
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        t0 = time.perf_counter()
        ttft, text, tokens = None, "", 0
        try:
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for ch in chunk.get("choices", []):
                        piece = ch["delta"].get("content") or ""
                        if piece and ttft is None:
                            ttft = time.perf_counter() - t0
                        text += piece
            out["done"].append((prompt, text, tokens, ttft if ttft is not None else time.perf_counter() - t0))
        except Exception as e:  # counted, never hidden
            out["errors"].append(repr(e))
        i += step


async def level(url, model, n, seconds, max_tokens):
    """One pass of n clients for `seconds`: what they got, and how long it took."""
    out = {"done": [], "errors": []}
    limits = httpx.Limits(max_connections=n + 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        deadline = t0 + seconds
        await asyncio.gather(*(client(http, url, model, max_tokens, deadline, i, n, out) for i in range(n)))
        out["elapsed"] = time.perf_counter() - t0
    return out


def summary(n, passes):
    """One client count's passes together: tok/s over their summed time, and each pass's own."""
    done = [d for p in passes for d in p["done"]]
    ttfts = sorted(d[3] for d in done)
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else ttfts * 19
    return {
        "clients": n,
        "requests": len(done),
        "errors": sum(len(p["errors"]) for p in passes),
        "tok_s": sum(d[2] for d in done) / sum(p["elapsed"] for p in passes),
        "tok_s_per_round": [round(sum(d[2] for d in p["done"]) / p["elapsed"], 1) for p in passes],
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p95_s": q[18] if ttfts else None,
        "all_replies": [(p, t) for p, t, _, _ in done],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the client counts, interleaved (the machine's speed drifts)",
    )
    args = ap.parse_args()
    counts = list(dict.fromkeys(int(c) for c in args.clients.split(",")))  # each count once
    if args.rounds < 1 or not counts or min(counts) < 1:
        ap.error("--rounds and every --clients count must be at least 1")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "garagelm",
        "serve",
        "--port",
        str(port),
        "--parallel",
        "8",
        "--ctx-size",
        "1024",
    ]
    server = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        for _ in range(600):
            try:
                httpx.get(url + "/api/version", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        httpx.post(url + "/api/generate", json={"model": args.model, "prompt": ""}, timeout=300)  # load it
        passes = {n: [] for n in counts}
        for r in range(args.rounds):  # 1, 4, 8, 8, 4, 1, ...: a drift in speed hits every count alike
            for n in counts if r % 2 == 0 else counts[::-1]:
                passes[n].append(asyncio.run(level(url, args.model, n, args.seconds, args.max_tokens)))
    finally:
        server.terminate()
        server.wait(timeout=30)
    results = [summary(n, passes[n]) for n in counts]
    alone = {}  # the first client count's reply to each prompt (greedy: the same every time)
    for p, t in results[0]["all_replies"]:
        alone.setdefault(p, t)
    print(
        f"{'clients':>8s}{'requests':>10s}{'errors':>8s}{'tok/s':>9s}{'x one':>7s}{'TTFT p50':>10s}{'p95':>8s}  same as alone"
    )
    nan = float("nan")  # a count that finished no request has no TTFT (nor, the first, a ratio)
    for r in results:
        same = [alone[p] == t for p, t in r["all_replies"] if p in alone]
        r["identical_to_alone"] = f"{sum(same)}/{len(same)}"
        r["speedup"] = r["tok_s"] / results[0]["tok_s"] if results[0]["tok_s"] else nan
        print(f"{r['clients']:>8d}{r['requests']:>10d}{r['errors']:>8d}{r['tok_s']:>9.1f}{r['speedup']:>7.2f}"
              f"{r['ttft_p50_s'] or nan:>10.3f}{r['ttft_p95_s'] or nan:>8.3f}  {r['identical_to_alone']}"
              + (f"  (rounds: {', '.join(map(str, r['tok_s_per_round']))} tok/s)" if args.rounds > 1 else ""))  # fmt: skip
    if args.json:
        for r in results:
            del r["all_replies"]
        with open(args.json, "w") as f:
            json.dump(
                {"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "seconds": args.seconds,
                 "rounds": args.rounds, "results": results}, f, indent=2,
            )  # fmt: skip


if __name__ == "__main__":
    main()
