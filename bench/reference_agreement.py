"""How closely garagelm follows llama.cpp on the same GGUF file, and llama.cpp follows itself.

The reference is llama.cpp as it loads by default (weights repacked into interleaved blocks for
this CPU where it can), its prompt evaluated in one batch. Two more llama.cpp runs show how far
"the same tokens as llama.cpp" is defined at all on a quantized file, where activations are
rounded to 8 bits and a rounding that flips on a last-bit difference moves later logits:
- repacking off (`use_extra_bufts = false`, the plain kernels it uses on other CPUs);
- the same kernels with the prompt fed one token at a time (only the batch split differs).
Prints, per file: for each prompt, how many greedy tokens (of 64) equal the reference's for
garagelm and for each of those two llama.cpp runs; top-1 agreement when reading
llama.cpp's own greedy text; logit differences; and, where the argmaxes differ along that text,
how close to a tie the choice was (the larger of the two engines' gaps). Usage:

    python bench/reference_agreement.py MODEL.gguf [MORE.gguf ...] [--raw-only] [--json out.json]
    python bench/reference_agreement.py MODEL.gguf --prompts ../shared/data/prompts/self_instruct_seed_tasks.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_gemma3 import PROMPTS as GEMMA_PROMPTS
from test_reference import (
    CHAT_PROMPTS,
    RAW_PROMPTS,
    _prompt_ids,
    _ref_greedy,
    llama_cpp_logits,
    our_logits,
    tie_gap,
)

from garagelm.runtime.generate import Engine
from garagelm.runtime.load import load_model
from garagelm.runtime.sampling import SamplingParams


@contextlib.contextmanager
def _no_repacking():
    """llama-cpp-python has no argument for it: patch the default model params it starts from."""
    import llama_cpp
    import llama_cpp.llama as module

    original = llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    module.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_cpp.llama_model_default_params = original


def _open(path: str, repack: bool):
    from llama_cpp import Llama

    with contextlib.nullcontext() if repack else _no_repacking():
        return Llama(path, n_ctx=1024, n_threads=2, verbose=False, logits_all=True)


def _stepwise_greedy(ref, ids: list[int], n: int, eog) -> list[int]:
    """llama.cpp's greedy tokens with the prompt evaluated one token at a time (ref keeps all
    logits, so each step's row is the last one)."""
    ref.reset()
    for t in ids:
        ref.eval([t])
    out: list[int] = []
    while len(out) < n:
        out.append(int(np.argmax(ref.scores[ref.n_tokens - 1])))
        if out[-1] in eog:
            break
        ref.eval([out[-1]])
    return out


def _equal_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def read_prompts(path: str, limit: int) -> list[str]:
    """Raw-text prompts from a file: JSON lines with an "instruction" (the seed tasks in
    ../shared/data/prompts), or one prompt a line; the first `limit`."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    texts = [json.loads(line)["instruction"] if line.lstrip().startswith("{") else line for line in lines]
    return texts[:limit]


def measure(path: str, raw_only: bool, texts: list[str] | None = None) -> dict:
    loaded = load_model(path)
    ref, plain = _open(path, repack=True), _open(path, repack=False)
    prompts = [(p, False) for p in dict.fromkeys(texts or RAW_PROMPTS + GEMMA_PROMPTS)]
    if not raw_only and not texts:
        prompts += [(p, True) for p in CHAT_PROMPTS]
    rows, agree, total, maxdiff, meandiff, gaps, plain_gaps = [], 0, 0, 0.0, [], [], []
    eog = loaded.tokenizer.eog_ids
    for text, chat in prompts:
        ids = _prompt_ids(loaded, text, chat)
        params = SamplingParams(temperature=0, max_tokens=64)
        ours = list(Engine(loaded.model, loaded.tokenizer, 1024).tokens(ids, params))
        theirs, theirs_plain = _ref_greedy(ref, ids, 64, eog), _ref_greedy(plain, ids, 64, eog)
        theirs_stepwise = _stepwise_greedy(ref, ids, 64, eog)
        # along llama.cpp's greedy text: its logits, ours, and its unrepacked kernels' logits
        seq = ids + _ref_greedy(ref, ids, 64, set())
        got, expected = our_logits(loaded, seq, len(ids) - 1), llama_cpp_logits(ref, seq, len(ids) - 1)
        plain_logits = llama_cpp_logits(plain, seq, len(ids) - 1)
        gaps.append(tie_gap(got, expected))
        plain_gaps.append(tie_gap(plain_logits, expected))
        agree += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += len(expected)
        d = np.abs(got - expected)
        maxdiff = max(maxdiff, float(d.max()))
        meandiff.append(float(d.mean()))
        rows.append({"prompt": text, "chat": chat, "of": len(theirs),
                     "garagelm_equal_prefix": _equal_prefix(ours, theirs),
                     "llama_cpp_plain_equal_prefix": _equal_prefix(theirs_plain, theirs),
                     "llama_cpp_stepwise_equal_prefix": _equal_prefix(theirs_stepwise, theirs)})  # fmt: skip
    return {
        "file": path,
        "greedy": rows,
        "top1_agreement": agree / total,
        "positions": total,
        "logit_max_abs_diff": maxdiff,
        "logit_mean_abs_diff": float(np.mean(meandiff)),
        "largest_gap_at_a_disagreement": max(gaps),
        "llama_cpp_plain_largest_gap_at_a_disagreement": max(plain_gaps),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--raw-only", action="store_true", help="skip the chat prompts (base models)")
    ap.add_argument("--prompts", help="raw-text prompts instead: a JSONL of instructions, or one a line")
    ap.add_argument("--limit", type=int, default=20, help="the first this many of --prompts")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    texts = read_prompts(args.prompts, args.limit) if args.prompts else None
    results = [measure(f, args.raw_only, texts) for f in args.files]
    for r in results:
        print(f"\n{r['file']}\n  greedy tokens equal to llama.cpp's:      garagelm   llama.cpp unrepacked"
              "   llama.cpp prompt token by token")  # fmt: skip
        keys = ("garagelm_equal_prefix", "llama_cpp_plain_equal_prefix", "llama_cpp_stepwise_equal_prefix")
        for row in r["greedy"]:
            kind = "chat" if row["chat"] else "raw "
            print(f"  {kind} {row['prompt'][:34]:34s} {row[keys[0]]:5d}/{row['of']:<5d}"
                  f" {row[keys[1]]:8d}/{row['of']:<10d} {row[keys[2]]:8d}/{row['of']}")  # fmt: skip
        whole = [sum(row[k] == row["of"] for row in r["greedy"]) for k in keys]
        print(f"  {'prompts equal throughout':39s} {whole[0]:5d}/{len(r['greedy']):<5d}"
              f" {whole[1]:8d}/{len(r['greedy']):<10d} {whole[2]:8d}/{len(r['greedy'])}")  # fmt: skip
        print(f"  top-1 agreement {r['top1_agreement']:.4f} over {r['positions']} positions; "
              f"logits |diff| max {r['logit_max_abs_diff']:.4f} mean {r['logit_mean_abs_diff']:.5f}")  # fmt: skip
        print(f"  where the argmaxes differ, the larger logit gap (near-tie size): garagelm "
              f"{r['largest_gap_at_a_disagreement']:.3f}, llama.cpp unrepacked "
              f"{r['llama_cpp_plain_largest_gap_at_a_disagreement']:.3f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
