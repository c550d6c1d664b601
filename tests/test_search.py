"""Catalog search and the fit estimate."""

from __future__ import annotations

import json

import pytest

from garagelm.cli import main
from garagelm.store.fit import estimate, verdict
from garagelm.store.hardware import Hardware, detect
from garagelm.store.pull import catalog

GIB = 2**30
THIS_MACHINE = Hardware(total_ram=24 * GIB, available_ram=23 * GIB, cores=2)  # the project's CPU machine


def test_kv_cache_formula():
    e = catalog()["deepseek-r1:7b"]  # 28 layers, 4 KV heads of 128, f16
    assert estimate(e, 4096).kv_cache == 28 * 2 * 4 * 128 * 4096 * 2
    assert estimate(e, 4096, "q8_0").kv_cache == 28 * 2 * 4 * 128 * 4096 * 34 // 32  # --kv-cache q8_0
    mla = catalog()["deepseek-v3:671b"]  # compressed latent KV: 61 layers x 576 values x 2 bytes
    assert estimate(mla, 1000).kv_cache == 61 * 576 * 2 * 1000


def test_deepseek_verdicts_on_a_24_gib_cpu_machine():
    cat = catalog()
    for name in ("deepseek-r1:7b", "deepseek-r1:14b"):
        assert verdict(estimate(cat[name]), THIS_MACHINE) == "fits in RAM (CPU)", name
    for name in ("deepseek-r1:70b", "deepseek-v3:671b"):
        assert verdict(estimate(cat[name]), THIS_MACHINE) == "won't fit", name


def test_gpu_verdicts():
    e = estimate(catalog()["deepseek-r1:7b-q8_0"])
    small_ram = Hardware(total_ram=8 * GIB, available_ram=6 * GIB, cores=8)
    assert verdict(e, Hardware(16 * GIB, 14 * GIB, 8, gpus=[("big", 24 * GIB)])) == "fits in GPU"
    assert verdict(e, Hardware(8 * GIB, 6 * GIB, 8, gpus=[("small", 6 * GIB)])) == "partial GPU"
    assert verdict(e, small_ram) == "won't fit"


# VmHWM, not getrusage: a child's ru_maxrss counts the pages it shared with the (large) pytest
# process it was forked from; VmHWM starts again at exec.
_MEASURE = """
import sys
from garagelm.cli import main
sys.stdin = open(sys.argv[2])
rc = main(["run", sys.argv[1], "--raw", "--ctx-size", "2048", "--temperature", "0", "--max-tokens", "8"])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
print("PEAK", int(hwm.split()[1]) / 1024)
"""


@pytest.mark.parametrize("name", ["smollm2:135m", "gemma3:270m"])
def test_estimate_close_to_measured_peak_rss(name, smol_path, gemma_path, tmp_path):
    """`garage run` at --ctx-size 2048 on a ~1600-token prompt, in its own process: the fit
    estimate (which plans for the whole context) within 25% of the peak RSS it reaches."""
    import os
    import subprocess
    import sys
    from pydoc_data.topics import topics

    from conftest import CACHE

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("\n".join(topics[k] for k in sorted(topics))[:7000])
    env = {**os.environ, "GARAGE_HOME": str(CACHE / "store"), "GARAGE_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, name, str(prompt)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    peak = float(out.stdout.strip().splitlines()[-1].split()[1])
    need = estimate(catalog()[name], 2048).total / 2**20
    assert abs(need / peak - 1) < 0.25, (name, need, peak)


def test_search_cli(capsys):
    assert main(["search", "deepseek", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = {m["name"] for m in out["models"]}
    assert {"deepseek-r1:7b", "deepseek-r1:14b", "deepseek-v3:671b"} <= names
    assert all(m["needs"] > m["weights"] for m in out["models"])
    assert next(m for m in out["models"] if m["name"] == "deepseek-v3:671b")["verdict"] == "won't fit"
    assert main(["search", "--fits"]) == 0
    table = capsys.readouterr().out
    assert "This computer:" in table and "won't fit" not in table
    assert detect().total_ram > 0


def test_search_expects_decode_speed_from_bytes_and_bandwidth(capsys, tmp_path, monkeypatch):
    """`search` gives each model an expected decode tok/s: this machine's memory read speed
    (measured once, then kept in GARAGE_HOME/machine.json) over the bytes a token reads, so a
    bigger file is slower, an untied output head does not count its embedding table in full, and
    a Mixture of Experts counts its active share only."""
    from garagelm.store import bandwidth
    from garagelm.store.fit import decode_bytes_per_token

    monkeypatch.setenv("GARAGE_HOME", str(tmp_path))
    calls = []
    real = bandwidth.measure
    monkeypatch.setattr(bandwidth, "measure", lambda *a, **k: calls.append(1) or real(*a, nbytes=64 << 20))
    for _ in range(2):
        assert main(["search", "deepseek", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
    assert calls == [1] and (tmp_path / "machine.json").exists()  # measured once, then read
    speed = {m["name"]: m["decode_tok_s"] for m in out["models"]}
    assert out["memory_read_gb_s"] > 0
    assert speed["deepseek-r1:1.5b"] > speed["deepseek-r1:7b"] > speed["deepseek-r1:7b-q8_0"] > 0
    r1 = catalog()["deepseek-r1:7b"]
    tied = decode_bytes_per_token({**r1, "tied_embeddings": True})
    untied = decode_bytes_per_token(r1)
    table = r1["vocab_size"] * r1["hidden_size"] / r1["parameters"]  # the embedding's share
    assert untied < tied and abs((tied - untied) / tied - table) < 0.02
    v3 = catalog()["deepseek-v3:671b"]
    dense_v3 = decode_bytes_per_token({**v3, "active_parameters": None})
    assert decode_bytes_per_token(v3) < dense_v3 * 0.06  # 37B of 671B read a token
