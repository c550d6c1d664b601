"""Peak memory of running one model, measured in a fresh process.

A process's peak RSS only grows, so models compared in one process (as `garage eval compare`
does) cannot be told apart by it; each is loaded again in a child that prefills a prompt,
decodes a few tokens and reports its `VmHWM` (peak resident set since the child started).

    python -m garagelm.evaluate.memory MODEL.gguf [--prompt 128] [--decode 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def peak_rss_mib(path: str | Path, prompt: int = 128, decode: int = 32, timeout: float = 600) -> float:
    """Peak RSS (MiB) of loading `path` and generating with it, in its own process."""
    cmd = [sys.executable, "-m", "garagelm.evaluate.memory", str(path), "--prompt", str(prompt)]
    out = subprocess.run(
        [*cmd, "--decode", str(decode)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "GARAGE_OFFLINE": "1"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"measuring the memory of {path} failed: {out.stderr.strip()[-500:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"])


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args(argv)

    import torch

    from garagelm.evaluate.speed import bench_tokens
    from garagelm.runtime.generate import Engine
    from garagelm.runtime.load import load_model

    loaded = load_model(args.model)
    engine = Engine(loaded.model, loaded.tokenizer, args.prompt + args.decode + 8)
    with torch.inference_mode():
        logits = engine._forward(bench_tokens(loaded.tokenizer, args.prompt), 0)
        for i in range(args.decode):
            logits = engine._forward([int(logits.argmax())], args.prompt + i)
    print(json.dumps({"model": args.model, "peak_rss_mib": _vm_hwm_mib()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
