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
    # what a decode step reads: SmolLM2's Q4_1 weights are held as the file has them, and its
    # output head is the embedding table (tied), so every 2-D tensor of the file counts once
    from garagelm.formats.gguf import GGUFFile

    matrices = sum(t.n_bytes for t in GGUFFile(smol_path).tensors.values() if len(t.shape) == 2)
    assert r["weight_bytes_per_token"] == matrices
    cfg = {k: GGUFFile(smol_path).metadata[f"llama.{k}"] for k in ("block_count", "attention.head_count_kv")}
    per_position = cfg["block_count"] * 2 * cfg["attention.head_count_kv"] * 64 * 2  # f16 keys and values
    assert r["kv_bytes_per_position"] == per_position


def test_bench_table(smol_path, capsys):
    args = ["bench", str(smol_path), "--prompt-tokens", "16", "--gen-tokens", "2", "--reps", "1"]
    assert main([*args, "--kv-cache", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "prompt processing" in out and "tokens/s" in out and "peak memory" in out
    assert "q8_0 KV cache" in out
