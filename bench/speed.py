"""garagelm vs llama.cpp on the same GGUF file, same threads, in one run.

Each engine runs in its own process (so peak RSS is its own), on the same prompt tokens:
prompt processing of --pp tokens, greedy decode of --tg tokens, decode after --long-ctx tokens,
load to first token. Prints medians and the ratios; --json FILE writes them.

    python bench/speed.py smollm2:135m --threads 2 --reps 3 --json bench/speed.json
    python bench/speed.py ./hf-folder --peer ./same-weights-f32.gguf   # a Hugging Face folder
    python bench/speed.py smollm2:135m --kv-cache q8_0   # both engines on an 8-bit KV cache
    # what an AVX2 laptop runs, on a machine with AVX-512: our AVX2 kernels (torch's own capped
    # at AVX2 too) against a llama.cpp built for AVX2 only, in its own venv
    python bench/speed.py smollm2:135m --cpu avx2 --peer-python /work/venv-avx2/bin/python

llama.cpp comes from llama-cpp-python (tests/run.sh builds it with the flags this machine needs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def _llama_cpp(
    path: str, pp: int, tg: int, reps: int, threads: int, decode_ctx: tuple[int, ...], kv_cache: str
) -> dict:
    from llama_cpp import Llama

    from garagelm.evaluate.speed import bench_tokens, summary
    from garagelm.formats.gguf import GGUFFile
    from garagelm.runtime.tokenizer import Tokenizer

    longest = max((pp, *decode_ctx))
    prompt = bench_tokens(Tokenizer(GGUFFile(path).metadata), longest)
    t0 = time.perf_counter()
    # q8_0: -ctk q8_0 -ctv q8_0, which needs flash attention (8 = GGML_TYPE_Q8_0)
    kv = {"type_k": 8, "type_v": 8, "flash_attn": True} if kv_cache == "q8_0" else {}
    ll = Llama(path, n_ctx=longest + tg + 8, n_batch=longest, n_threads=threads,
               n_threads_batch=threads, verbose=False, **kv)  # fmt: skip
    ll.eval(ll.tokenize(b"Hello", add_bos=False))
    load = time.perf_counter() - t0
    import llama_cpp

    # which of its CPU kernels this build runs (AVX512 = 1 or not)
    system = llama_cpp.llama_print_system_info().decode()

    ttft: dict[str, list[float]] = {str(n): [] for n in decode_ctx}

    def decode(n_ctx: int, first: list[float] | None = None) -> float:
        ll.reset()
        t = time.perf_counter()
        ll.eval(prompt[:n_ctx])
        if first is not None:  # time to first token: the prompt's logits are the first token's
            first.append(time.perf_counter() - t)
        t = time.perf_counter()
        for i, _ in enumerate(ll.generate([], temp=0.0, top_k=1, reset=False)):
            if i + 1 >= tg:
                break
        return tg / (time.perf_counter() - t)

    pp_rates, tg_rates = [], []
    at_ctx: dict[str, list[float]] = {str(n): [] for n in decode_ctx}
    for _ in range(reps):
        ll.reset()
        t = time.perf_counter()
        ll.eval(prompt[:pp])
        pp_rates.append(pp / (time.perf_counter() - t))
        tg_rates.append(decode(pp))
        for n in decode_ctx:
            at_ctx[str(n)].append(decode(n, ttft[str(n)]))
    return {**summary("llama.cpp", pp_rates, tg_rates, at_ctx, load, ttft), "kernels": system.strip()}


def _first_token(engine: str, path: str, threads: int) -> None:
    """Load the model and compute the first token of a 1-token prompt, then print the wall
    clock: the parent, which noted the time it started this process, takes the difference."""
    if engine == "garagelm":
        import garagelm  # noqa: F401
        from garagelm.runtime.generate import Engine
        from garagelm.runtime.load import load_model

        loaded = load_model(path)
        e = Engine(loaded.model, loaded.tokenizer, 64)
        int(e._forward(loaded.tokenizer.encode("Hello")[:1], 0).argmax())
    else:
        from llama_cpp import Llama

        ll = Llama(path, n_ctx=64, n_threads=threads, n_threads_batch=threads, verbose=False)
        ll.eval(ll.tokenize(b"Hello", add_bos=False)[:1])
    print(json.dumps({"first_token_at": time.time()}))


def file_bytes_per_token(path: str) -> int:
    """Bytes of weights a decode step reads from a GGUF as the file holds them (llama.cpp reads
    them so): every tensor but the token embedding, which is read a row a token, unless the
    output head is the embedding (tied)."""
    from garagelm.formats.gguf import GGUFFile

    t = GGUFFile(path).tensors
    tied = "output.weight" not in t
    return sum(x.n_bytes for name, x in t.items() if tied or name != "token_embd.weight")


# torch's own kernels (prefill GEMMs, elementwise ops) choose their instruction set at run time
# too; for a variant below the machine's best these caps make them run what that CPU would have.
TORCH_CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avxvnni": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2_VNNI",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
    "generic": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    },
}


def _ctx_points(args: argparse.Namespace) -> tuple[int, ...]:
    return (args.short_ctx, args.long_ctx) if args.long_ctx else ()


def _child(args: argparse.Namespace) -> None:
    if args.first_token:
        return _first_token(args.engine, args.model, args.threads)
    if args.engine == "garagelm":
        import garagelm  # noqa: F401  (before torch: it settles how torch's OpenMP threads wait)
    import torch

    torch.set_num_threads(args.threads)
    if args.engine == "garagelm":
        from garagelm.evaluate.speed import measure

        r = measure(args.model, args.pp, args.tg, args.reps, _ctx_points(args), args.kv_cache)
    else:
        r = _llama_cpp(
            args.model, args.pp, args.tg, args.reps, args.threads, _ctx_points(args), args.kv_cache
        )
    print(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="store name, .gguf path or Hugging Face folder")
    ap.add_argument("--peer", help="the GGUF llama.cpp runs, when MODEL is not one (the same weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--short-ctx", type=int, default=50, help="decode after this many tokens ...")
    ap.add_argument("--long-ctx", type=int, default=2000, help="... and after this many (0: skip both)")
    ap.add_argument("--kv-cache", choices=["f16", "q8_0"], default="f16",
                    help="KV cache type for both engines (q8_0: llama.cpp's -ctk/-ctv q8_0 -fa)")  # fmt: skip
    ap.add_argument(
        "--cpu",
        help="garagelm's kernel variant (GARAGE_CPU: avx512, avxvnni, avx2, neon, generic); "
        "below the machine's best, torch's own kernels are capped to match",
    )
    ap.add_argument(
        "--peer-python",
        default=sys.executable,
        help="the python whose llama-cpp-python runs (a venv with llama.cpp built for AVX2 only, say)",
    )
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--first-token", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bandwidth:
        from garagelm.store.bandwidth import measure

        return print(json.dumps(measure(args.threads)))
    if args.engine:
        return _child(args)
    from garagelm.cli.resolve import resolve_model

    path = str(resolve_model(args.model))
    import os
    from pathlib import Path

    from garagelm.store.bandwidth import DECODE_EFFICIENCY, cpu_name

    # in a process of its own: a child inherits its parent's peak RSS, which would then be 2 GiB
    # of buffers measured here rather than the engine's
    proc = subprocess.run([sys.executable, __file__, path, "--bandwidth", "--threads", str(args.threads)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    bandwidth = json.loads(proc.stdout.strip().splitlines()[-1])
    results, envs = {}, {}
    for engine in ("garagelm", "llama.cpp"):
        source = args.peer if engine == "llama.cpp" and args.peer else path
        python = args.peer_python if engine == "llama.cpp" else sys.executable
        env = dict(os.environ)
        if engine == "garagelm" and args.cpu:
            env.update(GARAGE_CPU=args.cpu, **TORCH_CAPS.get(args.cpu, {}))
        # the peer's venv imports this checkout's tokenizer (pure Python) for the prompt tokens
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")])
        )
        common = [python, __file__, source, "--engine", engine, "--threads", str(args.threads)]
        cmd = [*common, "--reps", str(args.reps), "--pp", str(args.pp), "--tg", str(args.tg),
               "--short-ctx", str(args.short_ctx), "--long-ctx", str(args.long_ctx),
               "--kv-cache", args.kv_cache]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
        envs[engine] = (common, env)
    # load: process start to the first token of a 1-token prompt, each engine in turn (the file
    # in the page cache for both, as after any earlier run)
    for _ in range(args.reps):
        for engine, (common, env) in envs.items():
            start = time.time()
            proc = subprocess.run(
                [*common, "--first-token"], capture_output=True, text=True, check=True, env=env
            )
            at = json.loads(proc.stdout.strip().splitlines()[-1])["first_token_at"]
            results[engine].setdefault("process_start_to_first_token_s", []).append(at - start)
    for r in results.values():
        r["process_start_to_first_token_s"] = statistics.median(r["process_start_to_first_token_s"])
    ours, peer = results["garagelm"], results["llama.cpp"]
    # bandwidth: bytes a decode step reads (weights as each engine holds them, and the KV cache
    # at the decode's context) x tok/s, against what this machine reads per second
    kv_at = args.pp + args.tg // 2
    peer["weight_bytes_per_token"] = file_bytes_per_token(args.peer or path)
    peer["kv_bytes_per_position"] = ours["kv_bytes_per_position"]  # same heads, same cache type
    for r in results.values():
        per_token = r["weight_bytes_per_token"] + kv_at * r["kv_bytes_per_position"]
        r["decode_gb_s"] = per_token * r["tg_tok_s"] / 1e9
        r["bandwidth_share"] = r["decode_gb_s"] / bandwidth["read_gb_s"]
    file_limit = (
        bandwidth["read_gb_s"]
        * 1e9
        / (peer["weight_bytes_per_token"] + kv_at * peer["kv_bytes_per_position"])
    )
    from garagelm.store.bandwidth import decode_tok_s

    estimate = decode_tok_s(ours["weight_bytes_per_token"] + kv_at * ours["kv_bytes_per_position"],
                            bandwidth["read_gb_s"])  # fmt: skip
    ratios = {
        "decode": ours["tg_tok_s"] / peer["tg_tok_s"],
        "prompt_processing": ours["pp_tok_s"] / peer["pp_tok_s"],
        "peak_rss": ours["peak_rss_mib"] / peer["peak_rss_mib"],
        "load": ours["process_start_to_first_token_s"] / peer["process_start_to_first_token_s"],
    }
    if args.long_ctx:
        short, long = str(args.short_ctx), str(args.long_ctx)
        ratios[f"ttft_{long}"] = ours["ttft_s_at_ctx"][long] / peer["ttft_s_at_ctx"][long]
        for name, r in results.items():
            # how much slower decode gets with a long context, each engine against itself
            ratios[f"{name}_slowdown_{long}_vs_{short}"] = (
                r["tg_tok_s_at_ctx"][short] / r["tg_tok_s_at_ctx"][long]
            )
    peer_note = f" (llama.cpp: {args.peer})" if args.peer else ""
    size = Path(args.peer or path).stat().st_size / 2**20
    print(
        f"{path}{peer_note}  {size:.0f} MiB  threads={args.threads} reps={args.reps} kv={args.kv_cache} (medians)"
    )
    print(f"CPU: {cpu_name()}; garagelm kernels: {ours.get('kernels')}; llama.cpp: {peer.get('kernels')}")
    print(f"memory: read {bandwidth['read_gb_s']:.1f} GB/s, copy {bandwidth['copy_gb_s']:.1f} GB/s "
          f"({args.threads} threads)")  # fmt: skip
    long = str(args.long_ctx)
    print(f"{'':12s}{'pp' + str(args.pp) + ' tok/s':>14s}{'tg' + str(args.tg) + ' tok/s':>14s}"
          f"{'tg@' + str(args.short_ctx):>9s}{'tg@' + long:>9s}{'ttft@' + long + ' s':>12s}"
          f"{'load s':>8s}{'RSS MiB':>9s}{'GB/tok':>8s}{'bw share':>9s}")  # fmt: skip
    for name, r in results.items():
        at = r.get("tg_tok_s_at_ctx", {})
        short, lng = at.get(str(args.short_ctx), float("nan")), at.get(long, float("nan"))
        ttft = r.get("ttft_s_at_ctx", {}).get(long, float("nan"))
        print(f"{name:12s}{r['pp_tok_s']:14.1f}{r['tg_tok_s']:14.1f}{short:9.1f}{lng:9.1f}{ttft:12.2f}"
              f"{r['process_start_to_first_token_s']:8.2f}{r['peak_rss_mib']:9.0f}"
              f"{r['weight_bytes_per_token'] / 1e9:8.2f}{r['bandwidth_share']:9.0%}")  # fmt: skip
    print(f"decode limit at this bandwidth for the file's bytes: {file_limit:.1f} tok/s; garagelm "
          f"{ours['tg_tok_s'] / file_limit:.0%} of it, llama.cpp {peer['tg_tok_s'] / file_limit:.0%}; "
          f"`garage search` estimate {estimate:.1f} tok/s ({estimate / ours['tg_tok_s'] - 1:+.0%} vs measured)")  # fmt: skip
    print("ratios (garagelm / llama.cpp): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "bandwidth": bandwidth,
                       "decode_limit_tok_s": file_limit, "search_estimate_tok_s": estimate,
                       "decode_efficiency_assumed": DECODE_EFFICIENCY, "results": results,
                       "ratios": ratios}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
