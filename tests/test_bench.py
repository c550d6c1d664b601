"""`garage bench` reports its measurements (behaviour only; timings are not asserted)."""

from __future__ import annotations

import json

from garagelm.cli import main


def test_bench_json(smol_path, capsys):
    assert (
        main(["bench", str(smol_path), "--prompt-tokens", "32", "--gen-tokens", "4", "--reps", "1", "--json"])
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["pp_tokens"] == 32 and r["tg_tokens"] == 4
    for key in ("pp_tok_s", "tg_tok_s", "load_to_first_token_s", "peak_rss_mib"):
        assert r[key] > 0, key
    from garagelm.quant.ggml_linear import bf16_products_fast

    # a quantized model's 32-token prompt runs in bf16 where the CPU multiplies bf16 natively,
    # else through the int8 kernel (its Q4_1 products have integer dots)
    assert r["prefill_products"] == ("bf16" if bf16_products_fast() else "int8 (x as q8_0)")
    assert r["kv_cache"] == "f16"
    from garagelm.quant import cpu

    assert r["kernels"] == cpu.VARIANT


def test_bench_table(smol_path, capsys):
    args = ["bench", str(smol_path), "--prompt-tokens", "16", "--gen-tokens", "2", "--reps", "1"]
    assert main([*args, "--kv-cache", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "prompt processing" in out and "tokens/s" in out and "peak memory" in out
    assert "q8_0 KV cache" in out
