"""`garage serve` (OpenAI + Ollama API and a chat page) and `garage ps` (what a server holds)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys

from garagelm.cli.run import add_kv_cache_argument
from garagelm.errors import GarageError

DEFAULT_PORT = 11435  # beside Ollama's 11434, so both can run


def add_arguments(verb: str, p: argparse.ArgumentParser) -> None:
    if verb == "ps":
        p.add_argument(
            "--server",
            default=None,
            help=f"server URL (default $GARAGE_HOST or http://127.0.0.1:{DEFAULT_PORT})",
        )
        p.add_argument(
            "--api-key", default=os.environ.get("GARAGE_API_KEY"), help="the server's key ($GARAGE_API_KEY)"
        )
        return
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)"
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-key", default=os.environ.get("GARAGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every API route ($GARAGE_API_KEY)")  # fmt: skip
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN call the API (repeatable; closed by default)")  # fmt: skip
    p.add_argument(
        "--ctx-size", type=int, default=4096, help="context per request slot (at most the model's)"
    )
    add_kv_cache_argument(p)
    p.add_argument("--parallel", type=int, default=4, help="requests served side by side per model")
    p.add_argument("--max-loaded", type=int, default=2, help="models held in memory at once")


def server_url(arg: str | None) -> str:
    url = arg or os.environ.get("GARAGE_HOST") or f"http://127.0.0.1:{DEFAULT_PORT}"
    return url if "://" in url else f"http://{url}"


def _ps(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = server_url(args.server).rstrip("/") + "/api/ps"
    req = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            models = json.load(r)["models"]
    except urllib.error.HTTPError as e:
        raise GarageError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise GarageError(
            f"no garage server at {url} ({getattr(e, 'reason', e)}); start one with `garage serve`"
        ) from None
    print(f"{'NAME':28s}{'SIZE':>10s}{'CONTEXT':>9s}{'BUSY':>6s}  UNTIL")
    for m in models:
        print(
            f"{m['name']:28s}{m['size'] / 2**20:>7.0f} MB{m['context_length']:>9d}{m['busy']:>6d}  {m['expires_at']}"
        )
    return 0


def main(args: argparse.Namespace) -> int:
    if args.verb == "ps":
        return _ps(args)
    import uvicorn

    from garagelm.serve.app import Server
    from garagelm.serve.models import ModelPool

    if args.ctx_size < 16 or args.parallel < 1 or args.max_loaded < 1:
        raise GarageError("--ctx-size must be at least 16, --parallel and --max-loaded at least 1")
    if not _loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this address "
              "can use your models", file=sys.stderr)  # fmt: skip
    pool = ModelPool(ctx_size=args.ctx_size, slots=args.parallel, max_loaded=args.max_loaded,
                     kv_cache=args.kv_cache)  # fmt: skip
    app = Server(
        pool, api_key=args.api_key, cors_origins=args.cors_origin, local_only=_loopback(args.host)
    ).app()
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"garage serving on http://{host}:{args.port}/  (OpenAI: /v1, Ollama: /api; Ctrl-C stops)",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
