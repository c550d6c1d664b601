"""Weights packed on ordinary pages, then moved onto 2 MiB pages in the background."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from garagelm.quant import hugepages


def _huge_kib(address: int) -> int:
    """AnonHugePages of the mapping that holds address (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_deferred_buffers_move_onto_huge_pages_with_their_contents():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    # 64 MiB: above the heap's 32 MiB threshold (hugepages.heap_for_temporaries), so fresh pages
    # of a mapping of its own rather than heap memory that may be on huge pages already
    n = 64 << 20
    t = hugepages.empty((n,), torch.uint8, defer=True)
    t.copy_(torch.arange(n, dtype=torch.int64).to(torch.uint8))
    start = t.data_ptr()
    before = _huge_kib(start)  # (its mapping may have merged with others that hold huge pages)
    thread = hugepages.settle_in_background()
    assert thread is not None
    hugepages.wait_settled()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    probe = libc.madvise(ctypes.c_void_p(start - start % hugepages.HUGE), ctypes.c_size_t(0), 25)
    if probe != 0 and ctypes.get_errno() == 22:
        pytest.skip("no MADV_COLLAPSE (Linux < 6.1): khugepaged moves the pages at its own pace")
    assert _huge_kib(start) - before >= 32 << 10  # most of the 64 MiB (the ends may be unaligned)
    assert torch.equal(t, torch.arange(n, dtype=torch.int64).to(torch.uint8))  # same bytes
    assert t.data_ptr() == start  # same addresses: pointers bound to them stay valid
