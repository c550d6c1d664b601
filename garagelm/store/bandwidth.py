"""How fast this machine reads memory, and the decode speed that allows a model.

Decoding one token reads every active weight once (and the KV cache so far), so on a CPU its
speed is set by memory bandwidth, not arithmetic: tok/s ~ bandwidth x efficiency / bytes read per
token. `measure` reads a buffer far larger than the caches with the threads decode uses; the
figure is kept per CPU and thread count in GARAGE_HOME/machine.json, so `garage search` measures
once (about half a second) and then just reads it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# Share of the measured read bandwidth garagelm's decode reaches on models large enough to be
# bound by memory (bytes of packed weights and KV cache read per token x tok/s / bandwidth),
# bench/speed.py on random-weight Qwen2 Q4_K_M files, Xeon, 2 threads, 2026-12-08: 62% for the
# 1.5B (AVX-512 kernels), 59% (AVX2), 60% for the 7B. Small models fall short of it (per-token
# overheads), which the estimate does not claim to cover.
DECODE_EFFICIENCY = 0.60


def measure(threads: int | None = None, nbytes: int = 1 << 30, reps: int = 3) -> dict[str, float]:
    """Read and copy bandwidth in GB/s (best of reps) over nbytes on 2 MiB pages: `read` sums the
    buffer (what decode does to weights), `copy` moves it (bytes read + written)."""
    import torch

    from garagelm.quant import hugepages

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = hugepages.empty((nbytes // 4,), torch.float32)
        a.fill_(1.0)  # faults the pages in before any timing
        b = hugepages.empty((nbytes // 4,), torch.float32)
        b.zero_()
        read = copy = 0.0
        for _ in range(reps):
            t = time.perf_counter()
            a.sum()
            read = max(read, nbytes / (time.perf_counter() - t) / 1e9)
            t = time.perf_counter()
            b.copy_(a)
            copy = max(copy, 2 * nbytes / (time.perf_counter() - t) / 1e9)
        return {"read_gb_s": read, "copy_gb_s": copy, "threads": torch.get_num_threads()}
    finally:
        torch.set_num_threads(old)


def cpu_name() -> str:
    """The CPU's model name, as lscpu and /proc/cpuinfo give it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def cached(home: Path, threads: int | None = None) -> dict[str, float]:
    """measure()'s figures for this CPU and thread count, measured on first use and kept in
    home/machine.json (written to a temporary name, then renamed into place)."""
    threads = threads or min(os.cpu_count() or 1, 8)
    key = f"{cpu_name()} / {threads} threads"
    path = Path(home) / "machine.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known.get("bandwidth", {}):
        known.setdefault("bandwidth", {})[key] = measure(threads, nbytes=512 << 20)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    return known["bandwidth"][key]


def decode_tok_s(bytes_per_token: float, read_gb_s: float) -> float:
    """Expected decode tokens/s for a model reading bytes_per_token a token."""
    return read_gb_s * 1e9 * DECODE_EFFICIENCY / bytes_per_token
