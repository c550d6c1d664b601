"""What this computer has: memory, cores, CPU features, and GPUs (through torch, when present)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Hardware:
    total_ram: int  # bytes
    available_ram: int  # bytes the kernel says can be used without swapping
    cores: int
    cpu_flags: set[str] = field(default_factory=set)
    gpus: list[tuple[str, int]] = field(default_factory=list)  # (name, VRAM bytes)


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * 1024  # kB
    except OSError:
        pass
    return out


def detect(with_gpu: bool = True) -> Hardware:
    mem = _meminfo()
    total = mem.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = mem.get("MemAvailable", total)
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    gpus = []
    if with_gpu:
        try:
            import torch

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    gpus.append((p.name, int(p.total_memory)))
        except Exception:  # no torch GPU support: a CPU machine
            pass
    return Hardware(int(total), int(available), os.cpu_count() or 1, flags, gpus)
